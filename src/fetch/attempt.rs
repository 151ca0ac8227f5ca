//! One chunk from the sources: the order sources are asked in (live peers once, healthy
//! sources with retries, cooling ones as a single probe), a range fetched as parallel parts,
//! each part retried with backoff, rounds against flaky sources until the read deadline, and
//! what a failure or wrong bytes do to a source's health. Single-flight and committing are the
//! caller's (`fetch/mod.rs`); nothing here touches the store.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::chunk::{ChunkCheck, Filler, Hashed, VerifiedChunk, blocks_fit};
use crate::metrics::{METRICS, source_result};
use crate::source::{SourceError, SourceHandle, SourceKind, Verdict};

use super::{FailureKind, FetchError, Fetcher, FileCtx, Priority, SourceFailure};

/// About how long one read-ahead request should take (see [`part_len`]). Short
/// enough that a per-connection limit still gets `part_size_kib` parts (1 MiB takes 20 ms at
/// 50 MiB/s), long enough that a source delivering a few hundred MB/s per request gets a
/// whole 8 MiB chunk in one. With `readahead_chunks` chunks in flight it also bounds what
/// the middle ground can deliver: 4 × 8 MiB per 10 ms, over 3 GB/s.
const PART_SECS: f64 = 0.010;

/// A peer whose requests deliver less than this share of the origin's rate is skipped (see
/// [`Fetcher::live_peers`]). A peer is there to save the origin's egress, which is worth some
/// speed: peers on one host measured 3-4 times slower per request than a local origin, and
/// saving egress is still what they are for. Not reads an order of magnitude slower, though (a
/// slow peer measured 15 times slower than the origin).
const SLOW_PEER: f64 = 0.125;

/// Below this many bytes a second per request, a peer is slow enough to be worth comparing
/// with the origin (see [`Fetcher::live_peers`]), at the price of one fetch from it. A peer on
/// the same network delivers several times this (peers of one test host: 60-100 MB/s per
/// request, debug builds); the slow peer of the adversarial pass, 4.8 MB/s.
const SUSPECT_PEER_RATE: f64 = 16.0 * 1024.0 * 1024.0;

/// The longest `Retry-After` a part waits out before asking the same source again: a reader is
/// waiting (`read_timeout` is 30 s by default), so a source that asks for longer is left for
/// the next one, and for the next round.
const MAX_RETRY_AFTER_WAIT: Duration = Duration::from_secs(5);

/// How long a peer's measured rate decides whether it is skipped: a peer that was slow (busy,
/// on a congested link) is measured again after this, with one chunk.
const PEER_RATE_FRESH: Duration = Duration::from_secs(30);

/// How one request's bytes are hashed as they land (see [`Filler`]).
#[derive(Clone, Copy)]
pub(super) enum Landing {
    /// Not here: the caller hashes them, or the file is whole-only.
    Plain,
    /// The request is the whole chunk.
    Whole(ChunkCheck),
    /// The request is the part of a BLAKE3 chunk `offset` bytes into it, hashed as subtrees
    /// of `block` bytes.
    Blocks {
        check: ChunkCheck,
        block: usize,
        offset: u64,
    },
}

/// Requests to one source that delivered their bytes, not judged yet: a request is counted in
/// `wan_source_requests_total` only once the chunk (or whole file) it was part of is checked,
/// so a source that sends wrong bytes is not counted `ok`. Dropped, they count `ok` (verified,
/// or thrown away unjudged because another part failed); [`Delivered::wrong_bytes`] counts them
/// `wrong_bytes` instead.
#[must_use = "counted as ok when dropped: call wrong_bytes for a digest mismatch"]
pub(super) struct Delivered {
    source: String,
    requests: u64,
}

impl Delivered {
    pub(super) fn new(src: &SourceHandle, requests: u64) -> Delivered {
        Delivered {
            source: src.name.clone(),
            requests,
        }
    }

    /// Adds `other`'s requests (of the same source) to these.
    pub(super) fn merge(&mut self, mut other: Delivered) {
        self.requests += std::mem::take(&mut other.requests);
    }

    /// What these requests delivered did not match its digest.
    pub(super) fn wrong_bytes(mut self) {
        self.count(source_result::WRONG_BYTES);
    }

    fn count(&mut self, result: &str) {
        let n = std::mem::take(&mut self.requests);
        if n > 0 {
            METRICS
                .source_requests
                .with_label_values(&[&self.source, result])
                .inc_by(n);
        }
    }
}

impl Drop for Delivered {
    fn drop(&mut self) {
        self.count(source_result::OK);
    }
}

/// The parts of a range that landed from one source while others failed, in the buffer they
/// landed in (see [`Fetcher::fetch_range`]). Their [`Hashed`] name memory of `buf`, which is
/// why the two are kept together and never apart.
pub(super) struct Kept {
    /// The source's address: parts are kept for the source they came from only.
    source: usize,
    start: u64,
    buf: crate::bufpool::PooledBuf,
    part: usize,
    /// Per part: landed (with what it hashed, if anything), or not yet.
    landed: Vec<Option<Option<Hashed>>>,
    /// The requests that delivered the landed parts.
    delivered: Delivered,
}

/// How long a rate measured on a request that ran alone sizes parts (see
/// [`SourceHandle::solo_rate`]): each cold file's first chunk is usually fetched alone (the
/// chunks after it wait for it), so a read of a model measures it again and again; a rate
/// older than this says little of a server others may be loading now.
const SOLO_FRESH: Duration = Duration::from_secs(60);

/// What one request to `src` can deliver, in bytes/s: the larger of what its requests have
/// been delivering and what one delivered alone, lately. Requests that share a source bound
/// by its own CPU each get a share of it, which a per-request rate cannot tell from a
/// per-connection limit; alone, one request shows what a connection carries.
///
/// And where one request alone delivers at least [`NOT_PER_CONNECTION`] of what all requests
/// together do, parallel parts buy nothing: the source is bound by its CPU or its link, not
/// per connection, and every extra request costs it work. Then the whole range is one
/// request ([`f64::INFINITY`]), however long it takes.
fn deliverable(src: &SourceHandle) -> Option<f64> {
    let solo = src.solo_rate(SOLO_FRESH);
    if let (Some(s), Some(t)) = (solo, src.total_rate())
        && s >= NOT_PER_CONNECTION * t
    {
        return Some(f64::INFINITY);
    }
    match (src.rate(), solo) {
        (Some(r), Some(s)) => Some(r.max(s)),
        (r, s) => r.or(s),
    }
}

/// What share of a source's total rate one request alone must deliver for parallel parts to
/// be worth nothing (see [`deliverable`]): a per-connection limit gives one request a
/// twelfth of twelve read-ahead connections, a CPU-bound radosgw gives it all or more.
const NOT_PER_CONNECTION: f64 = 0.5;

/// How large the parts of a `len`-byte fetch are, from a source whose requests deliver `rate`
/// bytes/s ([`deliverable`]; `None`: not measured yet). Parallel parts of `base` (`part_size_kib`) cut the time
/// to a chunk where one connection is slow (an origin limited per connection), but each costs
/// a request, a response head and the wake-ups of a short transfer, at both ends. So a
/// read-ahead fetch, which nobody is blocked on yet, uses parts as large as the source
/// delivers in about `PART_SECS` per request (a multiple of `base`, at most the whole `len`):
/// a fast origin gets one request per chunk, a per-connection-limited one still gets parts of
/// `base`. On-demand fetches, and any before a first measurement, keep `base`: a reader is
/// waiting.
fn part_len(base: u64, rate: Option<f64>, prio: Priority, len: u64) -> usize {
    let base = base.max(1);
    let rate = match (prio, rate) {
        (Priority::ReadAhead, Some(rate)) => rate,
        _ => return base as usize,
    };
    let k = (rate * PART_SECS / base as f64) as u64;
    (base * k.clamp(1, len.div_ceil(base).max(1))) as usize
}

impl Fetcher {
    /// The peers to ask now, in order: those cooling down are skipped outright (not probed,
    /// as a cooling origin is), so a peer that is down costs one connect timeout per
    /// cool-down, and the origin is always there behind them.
    ///
    /// A peer is there to be faster or cheaper than the origin, not slower: one whose requests
    /// deliver less than [`SLOW_PEER`] of what the file's fastest healthy origin delivers is
    /// skipped (a slow but correct peer made a cold read 15 times slower: only failures cooled
    /// a peer down). Its rate counts for [`PEER_RATE_FRESH`]; after that it is asked again, and
    /// measured again. Where no origin of the file was ever measured, a peer delivering less
    /// than [`SUSPECT_PEER_RATE`] has the next fetch go to the origin instead, once per origin
    /// and daemon, so there is a rate to compare with; a peer above it costs the origin
    /// nothing. An origin that is cooling down is no reason to skip anything.
    ///
    /// Each with one attempt, as [`Fetcher::source_order`] pairs them: a peer's miss or failure
    /// moves on to the next at once.
    pub(super) fn live_peers(
        &self,
        origins: &[Arc<SourceHandle>],
    ) -> Vec<(Arc<SourceHandle>, u32)> {
        let peers = self.peers();
        if peers.handles.is_empty() {
            return Vec::new();
        }
        let healthy: Vec<&Arc<SourceHandle>> = origins
            .iter()
            .filter(|s| s.cooling_until().is_none())
            .collect();
        let origin = healthy
            .iter()
            .filter_map(|s| s.rate())
            .fold(None, |best: Option<f64>, r| {
                Some(best.map_or(r, |b| b.max(r)))
            });
        let live: Vec<(&Arc<SourceHandle>, Option<f64>)> = peers
            .handles
            .iter()
            .filter(|p| p.cooling_until().is_none())
            .map(|p| (p, p.rate_within(PEER_RATE_FRESH)))
            .collect();
        let Some(origin) = origin else {
            let suspect = live
                .iter()
                .any(|(_, r)| r.is_some_and(|r| r < SUSPECT_PEER_RATE));
            if suspect && healthy.iter().any(|s| s.probe_once()) {
                tracing::debug!("a peer is slow: this fetch measures the origin");
                return Vec::new();
            }
            return live.into_iter().map(|(p, _)| (p.clone(), 1)).collect();
        };
        live.into_iter()
            .filter(|(p, rate)| match rate {
                Some(peer) if *peer < SLOW_PEER * origin => {
                    tracing::debug!(peer = %p.name, peer_rate = peer, origin_rate = origin,
                        "peer skipped: slower than the origin");
                    false
                }
                _ => true,
            })
            .map(|(p, _)| (p.clone(), 1))
            .collect()
    }

    pub(super) fn cooldown_of(&self, src: &SourceHandle) -> Duration {
        match src.kind {
            SourceKind::Peer => self.peers().cooldown,
            SourceKind::Origin => self.cfg.cooldown(),
        }
    }

    /// Records a failed request to `src` as its kind judges the error ([`SourceKind::judge`]):
    /// a peer that lacks the chunk (404) has not failed; one that is down, erring or stalled
    /// cools down at once.
    pub(super) fn source_failed(&self, src: &SourceHandle, e: &SourceError) {
        let hard = match src.kind.judge(e) {
            Verdict::Miss => return,
            Verdict::Failed => false,
            Verdict::FailedHard => true,
        };
        src.record_failure(hard, self.cooldown_of(src));
    }

    /// Counts wrong bytes from `src` and cools it down at once.
    pub(super) fn integrity_failure(&self, src: &SourceHandle) {
        METRICS.integrity_failures.inc();
        METRICS.errors.with_label_values(&["integrity"]).inc();
        src.record_failure(true, self.cooldown_of(src));
    }

    pub(super) async fn fetch_chunk(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        idx: u64,
        prio: Priority,
    ) -> Result<VerifiedChunk, FetchError> {
        let f = &file.entry;
        let expected = f.verification.chunk(idx).expect("chunked file");
        let what = format!("{}/{} chunk {idx}", file.model, f.path);
        self.fetch_verified(
            file,
            f.layout().range(idx),
            expected,
            f.check(idx),
            prio,
            what,
        )
        .await
    }

    /// Bytes `range` of a file whose digest under `check` is `expected` (a chunk, or a small
    /// whole-only file held in memory), from the sources in order, in rounds; verified.
    pub(super) async fn fetch_verified(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        range: Range<u64>,
        expected: crate::chunk::Digest,
        check: ChunkCheck,
        prio: Priority,
        what: String,
    ) -> Result<VerifiedChunk, FetchError> {
        let f = &file.entry;
        self.table().started(f.sha256);
        let hex = f.sha256.to_hex();
        let deadline = tokio::time::Instant::now() + self.cfg.read_timeout();
        let mut errors = Vec::new();
        let mut round = 0;
        // Peers once, then the manifest's sources in rounds.
        let mut order = self.live_peers(&file.sources);
        let mut kept = None;
        loop {
            let mut transient = !file.sources.is_empty();
            order.extend(self.source_order(&file.sources));
            for (src, attempts) in order.drain(..) {
                let got = tokio::time::timeout_at(
                    deadline,
                    self.fetch_range(
                        &src,
                        src.kind.locator(f, &hex),
                        range.clone(),
                        prio,
                        attempts,
                        Some(check),
                        &mut kept,
                    ),
                )
                .await;
                let (bytes, landed, delivered) = match got {
                    Err(_) => {
                        // A source that cannot answer in time is failing, as much as one that errs.
                        self.source_failed(&src, &SourceError::Timeout);
                        tracing::warn!(source = %src.name, file = %what, "source did not deliver before the read deadline");
                        return Err(FetchError::Timeout(self.cfg.read_timeout()));
                    }
                    Ok(Err(e)) => {
                        // A peer's miss or failure says nothing of whether the origin is flaky.
                        if src.kind.speaks_for_origin() {
                            transient &= e.flaky();
                        }
                        self.source_failed(&src, &e);
                        if src.kind.judge(&e) == Verdict::Miss {
                            tracing::debug!(source = %src.name, file = %what, "peer does not hold the chunk");
                        } else {
                            tracing::warn!(source = %src.name, file = %what, error = %e, "source failed");
                        }
                        errors.push(SourceFailure::new(&src, FailureKind::Source(e)));
                        continue;
                    }
                    Ok(Ok(b)) => b,
                };
                let verified = if landed.is_empty() {
                    tokio::task::spawn_blocking(move || {
                        VerifiedChunk::verify(check, expected, bytes)
                    })
                    .await
                    .map_err(FetchError::join)?
                } else {
                    // Hashed as it landed: only the comparison is left.
                    VerifiedChunk::verify_landed(check, expected, bytes, &landed)
                };
                match verified {
                    Ok(chunk) => {
                        drop(delivered);
                        src.record_success();
                        return Ok(chunk);
                    }
                    Err(mismatch) => {
                        if src.kind.speaks_for_origin() {
                            transient = false;
                        }
                        delivered.wrong_bytes();
                        self.integrity_failure(&src);
                        tracing::error!(source = %src.name, file = %what, %mismatch,
                            "integrity failure: source sent wrong bytes; discarded, trying the next source");
                        errors.push(SourceFailure::new(&src, FailureKind::WrongChunk(mismatch)));
                    }
                }
            }
            if !(transient && self.pause_before_next_round(round, deadline).await) {
                return Err(FetchError::Exhausted {
                    what,
                    failures: errors,
                });
            }
            round += 1;
        }
    }

    /// Every source failed, but only with errors that may pass (5xx, resets, timeouts): the
    /// reader still has time, and a cooling source is still its best chance, so sources are
    /// tried again after a backoff until the read deadline rather than failing a read that a
    /// flaky mirror would serve a moment later. Wrong bytes, 404, denials and a source that
    /// refuses connections (down, not flaky) end the read at once.
    /// Returns false when the next round could not start before `deadline`.
    pub(super) async fn pause_before_next_round(
        &self,
        round: u32,
        deadline: tokio::time::Instant,
    ) -> bool {
        // At least 10 ms and at most 2 s, so a zero backoff does not spin and a long one still
        // leaves rounds inside the read deadline.
        let cap = self
            .cfg
            .backoff_ms
            .max(10)
            .saturating_mul(1 << round.min(8))
            .min(2000);
        let pause = Duration::from_millis(rand::random_range(cap / 2..=cap));
        if tokio::time::Instant::now() + pause >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        true
    }

    /// Healthy sources in priority order with full retries, then cooling ones (one attempt
    /// each, as a probe), so a recovered origin is noticed at once but a dead one costs little.
    pub(super) fn source_order(
        &self,
        sources: &[Arc<SourceHandle>],
    ) -> Vec<(Arc<SourceHandle>, u32)> {
        let (healthy, cooling): (Vec<_>, Vec<_>) = sources
            .iter()
            .cloned()
            .partition(|s| s.cooling_until().is_none());
        healthy
            .into_iter()
            .map(|s| (s, self.cfg.retries))
            .chain(cooling.into_iter().map(|s| (s, 1)))
            .collect()
    }

    /// Fetches `range` from one source as parallel parts, each retried up to `attempts` times.
    /// With `check` (the range is one chunk), the bytes are hashed as they land and what each
    /// part hashed comes back with them, for [`VerifiedChunk::verify_landed`]; empty where
    /// they could not be (parallel parts of a sha256 chunk, or of a `part_size_kib` that is
    /// not a power of two), to be hashed after.
    ///
    /// Every part runs to its end even when another fails, and when some fail, the parts that
    /// landed are left in `kept` with their buffer: the next call for the same range from the
    /// same source (the next round against a flaky mirror) fetches only the missing ones. A
    /// mirror failing half its requests thus converges in a few rounds, where asking for all
    /// parts again needed every one of them to succeed at once. `kept` from another source is
    /// dropped: a chunk's bytes come from one source, so wrong bytes have one culprit. The
    /// requests that delivered the parts come back as [`Delivered`], for the caller to count
    /// once it has checked the bytes.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn fetch_range(
        &self,
        src: &SourceHandle,
        path: &str,
        range: Range<u64>,
        prio: Priority,
        attempts: u32,
        check: Option<ChunkCheck>,
        kept: &mut Option<Kept>,
    ) -> Result<(Bytes, Vec<Hashed>, Delivered), SourceError> {
        let len = (range.end - range.start) as usize;
        let me = src as *const SourceHandle as usize;
        let Kept {
            mut buf,
            part,
            mut landed,
            mut delivered,
            ..
        } = match kept
            .take()
            .filter(|k| k.source == me && k.start == range.start)
        {
            Some(k) if k.buf.as_ref().len() == len => k,
            _ => {
                let part = part_len(
                    self.cfg.part_size(),
                    deliverable(src),
                    prio,
                    range.end - range.start,
                );
                tracing::debug!(source = %src.name, ?prio, part, rate = ?src.rate(),
                    solo = ?src.solo_rate(SOLO_FRESH), total = ?src.total_rate(), "parts");
                Kept {
                    source: me,
                    start: range.start,
                    // Page-aligned, so the commit can write it with O_DIRECT (see
                    // store::commit_chunk). From the pool, not zeroed: the parts below
                    // overwrite every byte or the fetch fails, and the bytes are hashed before
                    // anyone sees them.
                    buf: self.bufs.take(len),
                    part,
                    landed: vec![None; len.div_ceil(part.max(1)).max(1)],
                    delivered: Delivered::new(src, 0),
                }
            }
        };
        let base = self.cfg.part_size() as usize;
        // One request: its digest is the chunk's. Parallel parts, runs of whole `base` blocks
        // (see `part_len`): each block a BLAKE3 subtree, or nothing here (hashed after).
        let landing = |i: usize| match check.filter(|_| src.source.streams()) {
            Some(c) if part >= len => Landing::Whole(c),
            Some(c) if blocks_fit(c, base) && part.is_multiple_of(base) => Landing::Blocks {
                check: c,
                block: base,
                offset: (i * part) as u64,
            },
            _ => Landing::Plain,
        };
        // Each part lands directly in its own slice of the chunk buffer: no reassembly copy.
        let results = futures::future::join_all(
            buf.as_mut_slice()
                .chunks_mut(part)
                .enumerate()
                .filter(|(i, _)| landed[*i].is_none())
                .map(|(i, slice)| {
                    let start = range.start + (i * part) as u64;
                    let r = start..start + slice.len() as u64;
                    let fut = self.fetch_part(src, path, r, prio, attempts, landing(i), slice);
                    async move { (i, fut.await) }
                }),
        )
        .await;
        let mut failed: Option<SourceError> = None;
        for (i, r) in results {
            match r {
                Ok(h) => {
                    landed[i] = Some(h);
                    delivered.merge(Delivered::new(src, 1));
                }
                // The error that says most: one that no retry mends (a denial, a 404) over
                // one that may pass, so a caller deciding on another round sees it.
                Err(e) => {
                    if failed
                        .as_ref()
                        .is_none_or(|f| f.retryable() && !e.retryable())
                    {
                        failed = Some(e);
                    }
                }
            }
        }
        if let Some(e) = failed {
            *kept = Some(Kept {
                source: me,
                start: range.start,
                buf,
                part,
                landed,
                delivered,
            });
            return Err(e);
        }
        // All or nothing: a part without its hashes leaves the whole chunk to be hashed after.
        let hashed = landed
            .into_iter()
            .map(|l| l.expect("every part landed"))
            .collect::<Option<Vec<_>>>();
        Ok((buf.freeze(), hashed.unwrap_or_default(), delivered))
    }

    /// One request's bytes into `buf`, hashed as they land as `landing` says (each attempt
    /// starts its hashing over, as it starts its bytes over). A request that delivered is
    /// counted by the caller, once the bytes are checked ([`Delivered`]). A `Retry-After` of
    /// up to [`MAX_RETRY_AFTER_WAIT`] is waited out before the next attempt; a longer one ends
    /// this source's attempts.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn fetch_part(
        &self,
        src: &SourceHandle,
        path: &str,
        r: Range<u64>,
        prio: Priority,
        attempts: u32,
        landing: Landing,
        buf: &mut [u8],
    ) -> Result<Option<Hashed>, SourceError> {
        let mut last = SourceError::Timeout;
        for attempt in 0..attempts {
            if attempt > 0 {
                let cap = self
                    .cfg
                    .backoff_ms
                    .saturating_mul(1 << (attempt - 1).min(10));
                let mut pause = Duration::from_millis(rand::random_range(0..=cap));
                // A source that said when to ask again (429 or 503 with Retry-After) is not
                // asked before then.
                if let SourceError::RetryAfter { after, .. } = &last {
                    pause = pause.max(*after);
                }
                tokio::time::sleep(pause).await;
            }
            let _ra = match prio {
                Priority::ReadAhead => {
                    Some(self.readahead_connections.acquire().await.expect("open"))
                }
                Priority::OnDemand => None,
            };
            let _conn = self.connections.acquire().await.expect("open");
            let req = src.request();
            let t0 = Instant::now();
            let mut into = match landing {
                Landing::Plain => Filler::plain(&mut *buf),
                Landing::Whole(h) => Filler::whole(h, &mut *buf),
                Landing::Blocks {
                    check,
                    block,
                    offset,
                } => Filler::blocks(check, block, offset, &mut *buf),
            };
            let res = tokio::time::timeout(
                self.cfg.request_timeout(),
                src.source.fetch_filling(path, r.clone(), &mut into),
            )
            .await
            .unwrap_or(Err(SourceError::Timeout));
            let first_byte = into.first_byte();
            let hashed = into.finish();
            match res {
                Ok(()) => {
                    let secs = t0.elapsed().as_secs_f64();
                    // Alone, from its first byte on: what the connection carries once the
                    // answer streams. A small request's time is mostly the answer's latency
                    // (a 1 MiB head chunk: half of it, against a local radosgw), which says
                    // nothing of the parts a larger request saves.
                    // Only a source that streams says when its first byte landed.
                    let alone = (req.alone() && src.source.streams())
                        .then(|| first_byte.map(|t| t.elapsed()))
                        .flatten();
                    src.record_shared_rate(
                        buf.len() as u64,
                        secs,
                        alone.map(|d| d.as_secs_f64()),
                        req.sharing(),
                    );
                    METRICS
                        .source_bytes
                        .with_label_values(&[&src.name])
                        .inc_by(buf.len() as u64);
                    METRICS
                        .source_kind_bytes
                        .with_label_values(&[src.kind.label()])
                        .inc_by(buf.len() as u64);
                    return Ok(hashed);
                }
                Err(e) if src.kind.judge(&e) == Verdict::Miss => {
                    // A peer without the chunk: a miss, not an error.
                    METRICS
                        .source_requests
                        .with_label_values(&[&src.name, source_result::MISS])
                        .inc();
                    return Err(e);
                }
                Err(e) => {
                    METRICS
                        .source_requests
                        .with_label_values(&[&src.name, source_result::ERROR])
                        .inc();
                    METRICS.errors.with_label_values(&["source"]).inc();
                    tracing::debug!(source = %src.name, path, range = ?r, attempt, error = %e, "request failed");
                    // A wait longer than a read can spare goes to the next source instead.
                    let retry = e.retryable()
                        && !matches!(&e, SourceError::RetryAfter { after, .. }
                            if *after > MAX_RETRY_AFTER_WAIT);
                    last = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkHash;
    use crate::config::FetchConfig;
    use crate::source::mock::{Fault, MockSource, Outcome};
    use crate::store::Store;

    const MIB: u64 = 1 << 20;

    /// A BLAKE3 chunk fetched as parallel parts comes back with each part's subtrees, hashed
    /// while the mock handed its pieces over; a part that failed half-way (after bytes that
    /// are not the file's had landed) is retried and hashed afresh; the joined root verifies.
    /// A sha256 chunk's parts come back unhashed, for one pass after.
    #[tokio::test]
    async fn parallel_parts_of_a_blake3_chunk_come_back_hashed_as_they_landed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let cfg = FetchConfig {
            part_size_kib: 64,
            backoff_ms: 1,
            ..FetchConfig::default()
        };
        let fetcher = Fetcher::new(store, cfg);
        let mock = MockSource::new();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i ^ (i >> 9)) as u8).collect();
        mock.insert("f", data.clone());
        mock.inject(Fault::Fail, 1);
        let src = SourceHandle::new("mock".into(), Box::new(mock.clone()));
        let all = 0..data.len() as u64;
        let blake3 = Some(ChunkHash::Blake3.into());
        let (bytes, landed, _) = fetcher
            .fetch_range(
                &src,
                "f",
                all.clone(),
                Priority::OnDemand,
                3,
                blake3,
                &mut None,
            )
            .await
            .unwrap();
        assert_eq!(
            landed.len(),
            5,
            "five 64 KiB parts, each hashed as it landed"
        );
        assert!(landed.iter().all(|h| h.digest().is_none()), "as subtrees");
        let failed = mock
            .log()
            .iter()
            .filter(|r| r.outcome == Outcome::Failed)
            .count();
        assert_eq!(
            (failed, mock.log().len()),
            (1, 6),
            "one part failed half-way, then again"
        );
        let want = ChunkHash::Blake3.digest(&data);
        let chunk = VerifiedChunk::verify_landed(ChunkHash::Blake3, want, bytes, &landed);
        assert_eq!(chunk.expect("the joined root").bytes(), &data[..]);

        let (_, landed, _) = fetcher
            .fetch_range(
                &src,
                "f",
                all,
                Priority::OnDemand,
                3,
                Some(ChunkHash::Sha256.into()),
                &mut None,
            )
            .await
            .unwrap();
        assert!(landed.is_empty());
    }

    #[test]
    fn on_demand_and_unmeasured_fetches_use_the_configured_part() {
        assert_eq!(
            part_len(MIB, Some(5e9), Priority::OnDemand, 8 * MIB),
            MIB as usize
        );
        assert_eq!(
            part_len(MIB, None, Priority::ReadAhead, 8 * MIB),
            MIB as usize
        );
    }

    /// Sixteen requests sharing a CPU-bound server each deliver a sixteenth of it, which
    /// alone would keep 1 MiB parts; a request that ran alone shows what the server carries,
    /// and read-ahead then asks for whole chunks. A source that delivers the same alone keeps
    /// its parts.
    #[test]
    fn a_request_alone_sizes_read_ahead_past_a_shared_servers_share() {
        let src = SourceHandle::new("s".into(), Box::new(MockSource::new()));
        let shared = 600.0 * MIB as f64 / 16.0;
        src.record_rate(MIB, MIB as f64 / shared, None);
        let ra = |src: &SourceHandle| {
            part_len(MIB, deliverable(src), Priority::ReadAhead, 8 * MIB) as u64
        };
        assert_eq!(ra(&src), MIB);
        src.record_rate(MIB, 0.004, Some(MIB as f64 / (900.0 * MIB as f64)));
        assert_eq!(ra(&src), 8 * MIB);

        let limited = SourceHandle::new("l".into(), Box::new(MockSource::new()));
        for (alone, sharing) in [(None, 12), (Some(0.020), 1), (None, 12)] {
            limited.record_shared_rate(MIB, 0.021, alone, sharing);
        }
        assert_eq!(ra(&limited), MIB, "50 MiB/s per connection, alone or not");
    }

    /// A slow server bound by its CPU (200 MiB/s in all, however many requests share it) gets
    /// whole chunks: one request alone delivers what sixteen do. Twelve connections limited to
    /// 50 MiB/s each deliver twelve times what one does, and keep their parts.
    #[test]
    fn a_source_that_one_request_fills_gets_whole_chunks_however_slow() {
        let ra = |src: &SourceHandle| {
            part_len(MIB, deliverable(src), Priority::ReadAhead, 8 * MIB) as u64
        };
        let cpu = SourceHandle::new("cpu".into(), Box::new(MockSource::new()));
        let all = 200.0 * MIB as f64;
        cpu.record_shared_rate(MIB, MIB as f64 / (all / 16.0), None, 16);
        assert_eq!(ra(&cpu), MIB, "no request alone yet");
        cpu.record_shared_rate(MIB, MIB as f64 / all, Some(MIB as f64 / all), 1);
        assert_eq!(ra(&cpu), 8 * MIB);

        let limited = SourceHandle::new("l".into(), Box::new(MockSource::new()));
        let one = 50.0 * MIB as f64;
        limited.record_shared_rate(MIB, MIB as f64 / one, None, 12);
        limited.record_shared_rate(MIB, MIB as f64 / one, Some(MIB as f64 / one), 1);
        limited.record_shared_rate(MIB, MIB as f64 / one, None, 12);
        assert_eq!(ra(&limited), MIB);
    }

    #[test]
    fn read_ahead_parts_grow_with_the_rate_up_to_the_whole_range() {
        let ra = |rate: f64, len: u64| part_len(MIB, Some(rate), Priority::ReadAhead, len) as u64;
        // 50 MiB/s per connection: a 1 MiB part already takes 20 ms.
        assert_eq!(ra(50.0 * MIB as f64, 8 * MIB), MIB);
        // 300 MiB/s: 3 MiB in 10 ms.
        assert_eq!(ra(300.0 * MIB as f64, 8 * MIB), 3 * MIB);
        // Fast: one request for the chunk, never more than the range (rounded up to a part).
        assert_eq!(ra(5e9, 8 * MIB), 8 * MIB);
        assert_eq!(ra(5e9, 8 * MIB - 5), 8 * MIB);
        assert_eq!(ra(5e9, 100), MIB);
        // A zero part size in a config never divides by zero.
        assert_eq!(part_len(0, Some(5e9), Priority::ReadAhead, 10), 10);
    }
}
