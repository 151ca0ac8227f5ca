//! `MockSource`: an in-memory origin with fault injection, for tests.
//!
//! It exists so the read path (fetcher, store, filesystem) can be driven without a network or
//! a mount, as mountpoint-s3's mock clients do: `tests/reftest.rs` runs it against a plain
//! `Vec<u8>` model. It serves byte ranges of files held in memory, keyed by the path relative
//! to the model root (what `Source::fetch` is given), and on request it fails the next N
//! requests (a retryable error), sends wrong bytes (one byte flipped) for the next N, stalls the
//! next N, or delays every request. Bytes land in the caller's `Filler` in small pieces, as from
//! a socket, and a failing request first lands half its range with wrong bytes. It logs every request it answered, with the outcome, so a
//! test can count origin fetches per chunk.
//!
//! A `MockSource` is a cheap handle: clones share files, faults and the log, so a test keeps
//! one clone while the fetcher owns another (boxed in a `SourceHandle`, given to
//! `daemon::Services::builder().sources(…)`).
//!
//! Test code only: compiled under `cfg(any(test, feature = "mock"))`; the integration tests get
//! the `mock` feature through the crate's dev-dependency on itself (Cargo.toml).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::{Source, SourceError};
use crate::chunk::Filler;

/// What the mock did with one request, as the fetcher saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The right bytes.
    Delivered,
    /// An injected retryable error.
    Failed,
    /// The right length with one byte flipped.
    Corrupted,
    /// Not a file the mock holds, or a range past its end.
    Refused,
}

/// One answered request. Requests the caller gave up on (dropped while delayed) are not
/// logged: their bytes never reached it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockRequest {
    pub path: String,
    pub range: Range<u64>,
    pub outcome: Outcome,
}

/// A fault to inject into the next `n` requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with a retryable error (`SourceError::Transport`).
    Fail,
    /// Answer with the right length but one byte flipped.
    Corrupt,
    /// Wait this long before answering (longer than the request timeout: a timeout).
    Stall(Duration),
}

#[derive(Default)]
struct State {
    fail_next: u32,
    corrupt_next: u32,
    stall_next: u32,
    stall: Duration,
    delay: Duration,
    log: Vec<MockRequest>,
}

impl State {
    /// Faults not yet consumed by a request.
    fn pending(&self) -> u32 {
        self.fail_next + self.corrupt_next + self.stall_next
    }
}

/// An in-memory source; see the module doc.
#[derive(Clone, Default)]
pub struct MockSource {
    files: Arc<Mutex<HashMap<String, Bytes>>>,
    state: Arc<Mutex<State>>,
}

impl MockSource {
    pub fn new() -> MockSource {
        MockSource::default()
    }

    /// Serves `data` at `path` (relative to the model root), replacing what was there.
    pub fn insert(&self, path: &str, data: impl Into<Bytes>) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_string(), data.into());
    }

    /// Applies `fault` to the next `n` requests (added to any still pending). A request takes
    /// at most one stall, then at most one failure or else one corruption.
    pub fn inject(&self, fault: Fault, n: u32) {
        let mut s = self.state.lock().unwrap();
        match fault {
            Fault::Fail => s.fail_next += n,
            Fault::Corrupt => s.corrupt_next += n,
            Fault::Stall(d) => {
                s.stall_next += n;
                s.stall = d;
            }
        }
    }

    /// Delays every request by `d` (a slow origin; widens races between readers).
    pub fn set_delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    /// Forgets every injected fault not yet consumed (the delay stays).
    pub fn clear_faults(&self) {
        let mut s = self.state.lock().unwrap();
        (s.fail_next, s.corrupt_next, s.stall_next) = (0, 0, 0);
    }

    /// Injected faults not yet consumed.
    pub fn pending_faults(&self) -> u32 {
        self.state.lock().unwrap().pending()
    }

    /// Every answered request so far, in the order answered.
    pub fn log(&self) -> Vec<MockRequest> {
        self.state.lock().unwrap().log.clone()
    }

    /// Answered requests from index `from` of the log on (to consume the log incrementally).
    pub fn log_since(&self, from: usize) -> Vec<MockRequest> {
        let s = self.state.lock().unwrap();
        s.log.get(from..).map(<[_]>::to_vec).unwrap_or_default()
    }

    /// How many requests for exactly `range` of `path` were answered with `outcome`.
    pub fn count(&self, path: &str, range: Range<u64>, outcome: Outcome) -> usize {
        let s = self.state.lock().unwrap();
        s.log
            .iter()
            .filter(|r| r.path == path && r.range == range && r.outcome == outcome)
            .count()
    }

    fn record(&self, path: &str, range: Range<u64>, outcome: Outcome) {
        self.state.lock().unwrap().log.push(MockRequest {
            path: path.to_string(),
            range,
            outcome,
        });
    }
}

impl Source for MockSource {
    fn fetch<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, SourceError>> {
        Box::pin(async move {
            // Faults are taken when the request arrives, so concurrent requests each take a
            // distinct one and `pending_faults` counts down as requests start.
            let (delay, fail, corrupt) = {
                let mut s = self.state.lock().unwrap();
                let mut delay = s.delay;
                if s.stall_next > 0 {
                    s.stall_next -= 1;
                    delay += s.stall;
                }
                let fail = s.fail_next > 0;
                if fail {
                    s.fail_next -= 1;
                }
                let corrupt = !fail && s.corrupt_next > 0;
                if corrupt {
                    s.corrupt_next -= 1;
                }
                (delay, fail, corrupt)
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let data = self.files.lock().unwrap().get(path).cloned();
            let Some(data) = data else {
                self.record(path, range, Outcome::Refused);
                return Err(SourceError::NotFound);
            };
            if range.start > range.end || range.end > data.len() as u64 {
                self.record(path, range.clone(), Outcome::Refused);
                return Err(SourceError::Short {
                    want: range.end.saturating_sub(range.start),
                    got: (data.len() as u64).saturating_sub(range.start),
                });
            }
            if fail {
                self.record(path, range, Outcome::Failed);
                return Err(SourceError::Transport("injected failure".into()));
            }
            let bytes = data.slice(range.start as usize..range.end as usize);
            if corrupt && !bytes.is_empty() {
                let mut v = bytes.to_vec();
                let mid = v.len() / 2;
                v[mid] ^= 0x5a;
                self.record(path, range, Outcome::Corrupted);
                return Ok(Bytes::from(v));
            }
            self.record(path, range, Outcome::Delivered);
            Ok(bytes)
        })
    }

    fn streams(&self) -> bool {
        true
    }

    /// Hands the bytes over in pieces that do not line up with blocks, yielding between
    /// them, as a socket does: parallel parts interleave, and each piece is hashed as it
    /// lands. An injected failure first lands half the range with bytes that are not the
    /// file's, as a reset mid-body does, so a retry must start its hashing over.
    fn fetch_filling<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
        into: &'a mut Filler<'_>,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let bytes = match self.fetch(path, range).await {
                Ok(b) => b,
                Err(e @ SourceError::Transport(_)) => {
                    let n = into.unfilled().len() / 2;
                    into.unfilled()[..n].fill(0xa5);
                    into.advance(n);
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            if bytes.len() != into.unfilled().len() {
                return Err(SourceError::Short {
                    want: into.unfilled().len() as u64,
                    got: bytes.len() as u64,
                });
            }
            for piece in bytes.chunks(PIECE) {
                into.fill(piece);
                tokio::task::yield_now().await;
            }
            Ok(())
        })
    }
}

/// What one step of [`MockSource::fetch_filling`] hands over: not a divisor of any block.
const PIECE: usize = 3000;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_ranges_and_injects_faults_in_order() {
        let m = MockSource::new();
        m.insert("a/b", Bytes::from_static(b"0123456789"));
        assert_eq!(&m.fetch("a/b", 2..5).await.unwrap()[..], b"234");
        m.inject(Fault::Fail, 1);
        m.inject(Fault::Corrupt, 1);
        assert_eq!(m.pending_faults(), 2);
        let e = m.fetch("a/b", 0..4).await.unwrap_err();
        assert!(e.retryable());
        let wrong = m.fetch("a/b", 0..4).await.unwrap();
        assert_eq!(wrong.len(), 4);
        assert_ne!(&wrong[..], b"0123");
        assert_eq!(&m.fetch("a/b", 0..4).await.unwrap()[..], b"0123");
        assert!(matches!(
            m.fetch("nope", 0..1).await,
            Err(SourceError::NotFound)
        ));
        assert!(m.fetch("a/b", 8..11).await.is_err());
        assert_eq!(m.count("a/b", 0..4, Outcome::Delivered), 1);
        assert_eq!(m.count("a/b", 0..4, Outcome::Corrupted), 1);
        assert_eq!(m.count("a/b", 0..4, Outcome::Failed), 1);
        assert_eq!(m.log().len(), 6);
        assert_eq!(m.log_since(5).len(), 1);
        assert_eq!(m.pending_faults(), 0);
    }

    #[tokio::test]
    async fn a_stalled_request_dropped_by_its_caller_is_not_logged() {
        let m = MockSource::new();
        m.insert("f", Bytes::from_static(b"xy"));
        m.inject(Fault::Stall(Duration::from_secs(60)), 1);
        let r = tokio::time::timeout(Duration::from_millis(10), m.fetch("f", 0..2)).await;
        assert!(r.is_err());
        assert!(m.log().is_empty());
        assert_eq!(&m.fetch("f", 0..2).await.unwrap()[..], b"xy");
    }
}
