//! Why a fetch failed, typed: [`FetchError`] (what a reader, an ensure or a repair is told, and
//! which errno it becomes: `FsError::errno` maps it in one exhaustive match) and
//! [`SourceFailure`] (what each source said, kept typed so a caller tells a missing object from
//! a lying source without parsing text).

use std::sync::Arc;
use std::time::Duration;

use crate::chunk::{Digest, Mismatch};
use crate::source::{SourceError, SourceHandle};
use crate::store::StoreError;

/// Why bytes could not be delivered, or a chunk not stored.
///
/// Typed, so that a caller tells an eviction, a deliberate skip and a dead task from a failing
/// source or disk without parsing text. What each becomes (`FsError::errno` maps them, one
/// exhaustive match) and where it is logged:
///
/// | variant | reaches | errno | logged |
/// |---|---|---|---|
/// | `Exhausted`, `Timeout` | readers, ensures | `EIO` | each source's failure at warn (wrong bytes at error), the read at error |
/// | `ReadBlob`, `Store`, `TooLargeForMemory` | readers, ensures | `EIO` | error (a commit's failure where it happens) |
/// | `Join` | readers, ensures | `EIO` | error: a task panicked, or the runtime is stopping |
/// | `Evicted`, `Incomplete` | ensures (a read goes round again) | `EAGAIN` | by the ensure, at error |
/// | `Skipped`, `InMemoryOnly` | ensures and repairs: the bytes were served, not stored | `EAGAIN` | debug where skipped, warn where held in memory |
/// | `WholeOnly` | nobody (a caller's bug) | `EINVAL` | by the caller |
/// | `Refused` | readers, ensures | `EIO` | once, at error, when the whole-file check refused it (`check.rs`) |
///
/// Only real I/O failures (a source's, the cache disk's) and a task that died are `EIO`: the
/// others never reach a reader, and name what to do instead.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// Every source was asked and none delivered; what each said, in the order asked.
    #[error("no source could deliver {what}: {}", summary(.failures))]
    Exhausted {
        what: String,
        failures: Vec<SourceFailure>,
    },
    #[error("not served within {0:?}")]
    Timeout(Duration),
    /// Present chunks could not be read back from their blob file.
    #[error("cache: reading blob {blob}: {err}")]
    ReadBlob {
        blob: Digest,
        #[source]
        err: Arc<std::io::Error>,
    },
    /// The cache could not store, check or drop what was fetched (a full or read-only disk,
    /// an index that cannot be written, a blob evicted under a commit).
    #[error("cache: {0}")]
    Store(#[source] Arc<StoreError>),
    /// A task the fetch ran on ended without an answer: it panicked (the error says how), or
    /// the runtime is shutting down.
    #[error("cache: {}", join_text(.0))]
    Join(Option<Arc<tokio::task::JoinError>>),
    /// The blob was evicted while it was being fetched whole: nothing is wrong with the
    /// source, and a reader simply goes round again.
    #[error("evicted while being fetched; fetched again on the next read")]
    Evicted,
    /// An ensure's chunks were stored, then evicted or dropped before the file was complete:
    /// the caller may retry.
    #[error("cache: {path}: chunks fetched but evicted or dropped before the file was complete")]
    Incomplete { path: String },
    /// A chunk was served to its reader and deliberately not cached: the cache disk is behind
    /// (`fetch.when_cache_behind = "skip"`).
    #[error("cache: not cached: the cache disk is behind (fetch.when_cache_behind = \"skip\")")]
    Skipped,
    /// A whole-only file was fetched and verified, but the cache could not store it: it is
    /// served from memory (see `whole`).
    #[error("cache: {path}: fetched and verified, but the cache could not store it")]
    InMemoryOnly { path: String },
    /// The cache could not take a whole-only file (`why`), and at `size` bytes it is larger
    /// than `fetch.max_inflight_mib`, so it is not served from memory either.
    #[error(
        "{why}; at {size} bytes the file is larger than fetch.max_inflight_mib, so it is not \
         served from memory either"
    )]
    TooLargeForMemory { why: Box<FetchError>, size: u64 },
    /// The file's cached bytes passed their chunk digests but not the whole-file sha256 that
    /// names them: an integrity failure, refused until an operator clears it or the entry
    /// changes (`store/checked.rs`).
    #[error(
        "refused: whole-file sha256 mismatch: its bytes hash to {actual}, not to the \
         manifest's {expected} (an integrity failure; `wan models ensure --force-redownload` \
         clears it)"
    )]
    Refused {
        path: String,
        expected: Digest,
        actual: Digest,
    },
    /// A chunk was asked of a file listed with only a whole-file sha256 (a caller's bug).
    #[error("cache: {path}: a whole-only file has no chunk to fetch by itself")]
    WholeOnly { path: String },
}

impl FetchError {
    pub(super) fn store(e: StoreError) -> FetchError {
        FetchError::Store(Arc::new(e))
    }

    pub(crate) fn join(e: tokio::task::JoinError) -> FetchError {
        FetchError::Join(Some(Arc::new(e)))
    }
}

fn join_text(e: &Option<Arc<tokio::task::JoinError>>) -> String {
    match e {
        Some(e) => format!("fetch task died: {e}"),
        None => "fetch task ended without an answer".into(),
    }
}

/// One source's failure to deliver, kept typed so callers can tell a missing object from a
/// lying source without parsing text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{source_name}: {kind}")]
pub struct SourceFailure {
    /// The source's name (`SourceHandle::name`).
    pub source_name: String,
    pub kind: FailureKind,
}

impl SourceFailure {
    pub(super) fn new(src: &SourceHandle, kind: FailureKind) -> SourceFailure {
        SourceFailure {
            source_name: src.name.clone(),
            kind,
        }
    }
}

/// What went wrong with one source.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FailureKind {
    /// The request failed (after its retries).
    #[error("{0}")]
    Source(SourceError),
    /// A chunk's bytes did not match its digest.
    #[error("wrong bytes ({0})")]
    WrongChunk(Mismatch),
    /// A whole-only file's bytes did not match its sha256.
    #[error("wrong bytes (sha256 {})", .0.actual)]
    WrongFile(Mismatch),
}

/// The `detail` of an exhausted fetch, as logged and answered to readers.
fn summary(failures: &[SourceFailure]) -> String {
    let text = |fs: &[SourceFailure]| {
        fs.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    };
    match failures.len() {
        0 => "no sources".into(),
        // Rounds of retries against a flaky source: the last few say enough.
        n @ 5.. => format!("{n} failures, the last: {}", text(&failures[n - 3..])),
        _ => text(failures),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(name: &str, kind: FailureKind) -> SourceFailure {
        SourceFailure {
            source_name: name.into(),
            kind,
        }
    }

    /// The typed cache errors say what the strings they replaced said (an ensure's job
    /// status, events and logs carry them).
    #[test]
    fn cache_errors_say_what_the_strings_said() {
        let blob = Digest::of(b"blob");
        let io = std::io::Error::other("boom");
        let cases = [
            (
                FetchError::ReadBlob {
                    blob,
                    err: Arc::new(io),
                },
                format!("cache: reading blob {blob}: boom"),
            ),
            (
                FetchError::store(StoreError::Evicted(blob)),
                format!(
                    "cache: blob {blob} was evicted while being written; it will be fetched again"
                ),
            ),
            (
                FetchError::Join(None),
                "cache: fetch task ended without an answer".into(),
            ),
            (
                FetchError::Skipped,
                "cache: not cached: the cache disk is behind (fetch.when_cache_behind = \"skip\")"
                    .into(),
            ),
            (
                FetchError::InMemoryOnly { path: "a/b".into() },
                "cache: a/b: fetched and verified, but the cache could not store it".into(),
            ),
            (
                FetchError::Incomplete { path: "a/b".into() },
                "cache: a/b: chunks fetched but evicted or dropped before the file was complete"
                    .into(),
            ),
            (
                FetchError::WholeOnly { path: "a/b".into() },
                "cache: a/b: a whole-only file has no chunk to fetch by itself".into(),
            ),
            (
                FetchError::TooLargeForMemory {
                    why: Box::new(FetchError::Join(None)),
                    size: 7,
                },
                "cache: fetch task ended without an answer; at 7 bytes the file is larger than \
                 fetch.max_inflight_mib, so it is not served from memory either"
                    .into(),
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
        let died = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async { tokio::spawn(async { panic!("injected") }).await })
            .unwrap_err();
        let e = FetchError::join(died);
        assert!(
            e.to_string().starts_with("cache: fetch task died: task "),
            "{e}"
        );
        // The cause stays typed beneath: a caller can ask what the store said.
        let e = FetchError::store(StoreError::Evicted(blob));
        let cause = std::error::Error::source(&e).expect("the store's error");
        assert!(matches!(
            cause.downcast_ref::<Arc<StoreError>>().map(|e| &**e),
            Some(StoreError::Evicted(_))
        ));
    }

    /// Logs, readers and tests match on this text: the typed failures must say exactly what
    /// the flattened strings said.
    #[test]
    fn exhausted_says_what_each_source_said() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let none = FetchError::Exhausted {
            what: "m/f chunk 0".into(),
            failures: vec![],
        };
        assert_eq!(
            none.to_string(),
            "no source could deliver m/f chunk 0: no sources"
        );
        let two = FetchError::Exhausted {
            what: "m/f chunk 0".into(),
            failures: vec![
                failure("origin", FailureKind::Source(SourceError::Status(503))),
                failure(
                    "mirror",
                    FailureKind::WrongChunk(Mismatch {
                        hash: crate::chunk::ChunkHash::Sha256,
                        expected: a,
                        actual: b,
                    }),
                ),
            ],
        };
        assert_eq!(
            two.to_string(),
            format!(
                "no source could deliver m/f chunk 0: origin: HTTP 503; \
                 mirror: wrong bytes (sha256 mismatch: expected {a}, got {b})"
            )
        );
        let whole = failure(
            "origin",
            FailureKind::WrongFile(Mismatch {
                hash: crate::chunk::ChunkHash::Sha256,
                expected: a,
                actual: b,
            }),
        );
        assert_eq!(
            whole.to_string(),
            format!("origin: wrong bytes (sha256 {b})")
        );
        let many = FetchError::Exhausted {
            what: "x".into(),
            failures: (0..6)
                .map(|i| failure(&format!("s{i}"), FailureKind::Source(SourceError::Timeout)))
                .collect(),
        };
        assert_eq!(
            many.to_string(),
            "no source could deliver x: 6 failures, the last: s3: timed out; s4: timed out; s5: timed out"
        );
    }
}
