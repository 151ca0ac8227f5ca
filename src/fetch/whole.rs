//! Files listed with only a whole-file sha256: fetched whole from one source at a time
//! (chunk-sized parts in parallel, written unverified and invisible), hashed, then made
//! visible at once; single-flight per blob, and a failure remembered like a chunk's.
//!
//! Where the cache cannot take such a file (a full or read-only disk), one no larger than
//! `fetch.max_inflight_mib` is fetched into memory instead, verified whole, and served from
//! there ([`WholeInMemory`]), as chunks are served from memory when they cannot be stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

use bytes::Bytes;

use futures::StreamExt;
use futures::future::FutureExt;

use crate::chunk::{ChunkHash, Digest, Mismatch, VerifiedChunk};
use crate::manifest::FileEntry;
use crate::source::{SourceError, SourceHandle};

use super::attempt::{Delivered, Kept};
use super::flight::FetchKey;
use super::{FailureKind, FetchError, Fetcher, FileCtx, Priority, SourceFailure};

/// Whole-only files the cache could not store, held verified in memory for their readers:
/// at most `cap` bytes, each let go `ttl` after its last read (or sooner, oldest first, to
/// make room for another).
pub(super) struct WholeInMemory {
    cap: usize,
    ttl: Duration,
    used: usize,
    files: HashMap<Digest, (Instant, VerifiedChunk)>,
}

impl WholeInMemory {
    pub(super) fn new(cap: usize, ttl: Duration) -> WholeInMemory {
        WholeInMemory {
            cap,
            ttl,
            used: 0,
            files: HashMap::new(),
        }
    }

    /// Whether a file this large can be held at all.
    pub(super) fn fits(&self, size: u64) -> bool {
        size <= self.cap as u64
    }

    pub(super) fn holds(&self, d: Digest) -> bool {
        self.files.contains_key(&d)
    }

    /// Keeps `file` (its digest is the file's sha256), making room by letting go of expired
    /// files, then the least recently read.
    pub(super) fn insert(&mut self, file: VerifiedChunk) {
        let len = file.bytes().len();
        let now = Instant::now();
        let ttl = self.ttl;
        let mut freed = 0;
        self.files.retain(|_, (t, c)| {
            let keep = now.duration_since(*t) < ttl;
            if !keep {
                freed += c.bytes().len();
            }
            keep
        });
        self.used -= freed;
        while self.used + len > self.cap {
            let Some(oldest) = self
                .files
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(d, _)| *d)
            else {
                break;
            };
            let (_, c) = self.files.remove(&oldest).expect("present");
            self.used -= c.bytes().len();
        }
        if let Some((_, old)) = self.files.insert(file.digest(), (now, file)) {
            self.used -= old.bytes().len();
        }
        self.used += len;
    }

    /// Bytes `offset..end` of the file with sha256 `d`, if held; counts as a read.
    pub(super) fn slice(&mut self, d: Digest, offset: u64, end: u64) -> Option<Bytes> {
        let (t, c) = self.files.get_mut(&d)?;
        *t = Instant::now();
        let b = c.bytes();
        let end = (end as usize).min(b.len());
        Some(b.slice((offset as usize).min(end)..end))
    }
}

/// What one source delivered of a whole-only file so far, kept for its next round.
struct FromSource {
    /// The source's address.
    source: usize,
    /// Chunks written unverified, with the blob generation their write found.
    parts: HashMap<u64, u64>,
    /// Chunks of which some requests landed, with the memory they hold.
    partial: HashMap<u64, (Kept, OwnedSemaphorePermit)>,
    /// The requests that delivered `parts` (judged when the whole file is checked).
    delivered: Delivered,
}

/// Why a part of a whole-only file was not written.
enum PartError {
    /// The source did not deliver it; what did land of the chunk, with its memory, if any.
    Source(SourceError, Option<(u64, (Kept, OwnedSemaphorePermit))>),
    /// The cache could not take it (a full or read-only disk): no source is to blame.
    Store(FetchError),
}

impl Fetcher {
    /// Makes a file listed with only a whole-file sha256 complete (single-flight per blob).
    pub async fn ensure_whole(self: &Arc<Self>, file: &Arc<FileCtx>) -> Result<(), FetchError> {
        let blob = file.entry.sha256;
        let key = FetchKey::Whole(blob);
        self.refused(&file.entry)?;
        let shared = {
            let mut table = self.table();
            // A failed whole-file fetch is remembered like a failed chunk: the kernel retries
            // a failed read at once, and each retry would download the whole file again.
            if let Some(err) = table.recently_failed(key, self.cfg.cooldown()) {
                return Err(err);
            }
            if self.store.is_whole_checked(&file.entry) || table.whole_in_memory.holds(blob) {
                return Ok(());
            }
            if self.store.is_complete(&file.entry) {
                // Complete from chunks of another entry, never checked whole: no byte of it
                // is served before it is (`check.rs`).
                None
            } else {
                Some(match table.whole(blob) {
                    Some(s) => s.clone(),
                    None => {
                        let this = self.clone();
                        let file = file.clone();
                        let task = self.rt.spawn(async move {
                            let r = this.fetch_whole(&file).await;
                            let mut table = this.table();
                            if let Err(e) = &r
                                && !matches!(e, FetchError::Evicted)
                            {
                                table.remember_failure(key, e, this.cfg.cooldown());
                            }
                            table.finish(key);
                            drop(table);
                            r
                        });
                        let fut =
                            async move { task.await.unwrap_or_else(|e| Err(FetchError::join(e))) }
                                .boxed()
                                .shared();
                        table.insert_whole(blob, fut.clone());
                        fut
                    }
                })
            }
        };
        match shared {
            Some(shared) => shared.await,
            None => self.check_whole(file).await,
        }
    }

    /// Fetches chunks `idx` of a whole-only file from `src` in parallel and writes them,
    /// unverified, into its blob. Every part runs to its end: returns the parts written (each
    /// with the blob generation its write found) and the error of those that failed, if any.
    ///
    /// A chunk whose requests failed only in part leaves what landed in `kept`, with the
    /// memory it holds, for the next round against the same source (see `fetch_range`): each
    /// of its requests must not have to succeed in one round either.
    async fn write_whole_parts(
        &self,
        src: &Arc<SourceHandle>,
        f: &FileEntry,
        chunks: Vec<u64>,
        attempts: u32,
        kept: &mut HashMap<u64, (Kept, OwnedSemaphorePermit)>,
    ) -> (Vec<(u64, u64)>, Delivered, Option<PartError>) {
        let layout = f.layout();
        let parallel = (self.cfg.connections / 2).max(1);
        let hex = f.sha256.to_hex();
        let at = src.kind.locator(f, &hex);
        let work: Vec<_> = chunks
            .into_iter()
            .map(|idx| (idx, kept.remove(&idx)))
            .collect();
        let results: Vec<Result<(u64, u64, Delivered), PartError>> = futures::stream::iter(work)
            .map(|(idx, held)| async move {
                let r = layout.range(idx);
                let (mut partial, mem) = match held {
                    Some((k, mem)) => (Some(k), mem),
                    None => (None, self.reserve_memory(r.end - r.start).await),
                };
                // Whole-only: verified by the file's sha256 once every part is in the blob.
                let fetched = self
                    .fetch_range(
                        src,
                        at,
                        r.clone(),
                        Priority::OnDemand,
                        attempts,
                        None,
                        &mut partial,
                    )
                    .await;
                let (bytes, _, delivered) = match fetched {
                    Ok(got) => got,
                    Err(e) => {
                        let held = partial.map(|k| (idx, (k, mem)));
                        return Err(PartError::Source(e, held));
                    }
                };
                drop(mem);
                let store = self.store.clone();
                let entry = f.clone();
                let generation = tokio::task::spawn_blocking(move || {
                    store.write_unverified(&entry, r.start, &bytes)
                })
                .await
                .map_err(|e| PartError::Store(FetchError::join(e)))?
                .map_err(|e| PartError::Store(FetchError::store(e)))?;
                Ok((idx, generation, delivered))
            })
            .buffer_unordered(parallel)
            .collect()
            .await;
        let mut written = Vec::new();
        let mut all = Delivered::new(src, 0);
        let mut failed: Option<PartError> = None;
        for r in results {
            match r {
                Ok((idx, generation, delivered)) => {
                    written.push((idx, generation));
                    all.merge(delivered);
                }
                // The cache's failure over a source's (it is no source's fault, and no round
                // mends it), then the one that says most (see `fetch_range`).
                Err(mut e) => {
                    if let PartError::Source(_, held) = &mut e
                        && let Some((idx, k)) = held.take()
                    {
                        kept.insert(idx, k);
                    }
                    let worse = match (&failed, &e) {
                        (None, _) | (Some(PartError::Source(..)), PartError::Store(_)) => true,
                        (Some(PartError::Source(f, _)), PartError::Source(e, _)) => {
                            f.retryable() && !e.retryable()
                        }
                        (Some(PartError::Store(_)), _) => false,
                    };
                    if worse {
                        failed = Some(e);
                    }
                }
            }
        }
        (written, all, failed)
    }

    /// The cache could not take the file (`why`): fetched and verified whole in memory, and
    /// served from there, if it fits in `fetch.max_inflight_mib`.
    async fn whole_to_memory(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        why: FetchError,
    ) -> Result<(), FetchError> {
        let f = &file.entry;
        if !self.table().whole_in_memory.fits(f.size) {
            return Err(FetchError::TooLargeForMemory {
                why: Box::new(why),
                size: f.size,
            });
        }
        tracing::warn!(model = %file.model, file = %crate::logging::untrusted(&f.path),
            error = %why, "the cache cannot store this whole-only file; serving it from memory");
        let _mem = self.reserve_memory(f.size).await;
        let what = format!("{}/{}", file.model, f.path);
        let whole = self
            .fetch_verified(
                file,
                0..f.size,
                f.sha256,
                ChunkHash::Sha256.into(),
                Priority::OnDemand,
                what,
            )
            .await?;
        self.table().whole_in_memory.insert(whole);
        Ok(())
    }

    /// Sources in order, as for a chunk: live peers once, then the manifest's sources in
    /// rounds while they fail only in ways that may pass (5xx, resets, stalls). Parts written
    /// from a source are kept for its next round, so a mirror failing half its requests
    /// converges; the rounds go on while parts keep landing, and end `read_timeout` after the
    /// last one did (a whole file may take far longer than one read's deadline).
    async fn fetch_whole(self: &Arc<Self>, file: &Arc<FileCtx>) -> Result<(), FetchError> {
        let f = &file.entry;
        let what = format!("{}/{}", file.model, f.path);
        self.table().started(f.sha256);
        let layout = f.layout();
        let mut errors = Vec::new();
        let mut written: Option<FromSource> = None;
        let mut order = self.live_peers(&file.sources);
        let mut round = 0;
        let mut last_progress = tokio::time::Instant::now();
        loop {
            let mut transient = !file.sources.is_empty();
            order.extend(self.source_order(&file.sources));
            for (src, attempts) in order.drain(..) {
                let me = Arc::as_ptr(&src) as usize;
                if written.as_ref().is_some_and(|w| w.source != me) {
                    // A file's bytes come from one source, so wrong bytes have one culprit.
                    written = None;
                }
                let FromSource {
                    parts,
                    partial,
                    delivered,
                    ..
                } = written.get_or_insert_with(|| FromSource {
                    source: me,
                    parts: HashMap::new(),
                    partial: HashMap::new(),
                    delivered: Delivered::new(&src, 0),
                });
                // Only chunks not present: the unverified bytes of a failed or lying fetch
                // must never land on a chunk that readers are being served (a whole-only file
                // is partial when a chunk was dropped as corrupt). The kept chunks are part
                // of the whole-file hash, though: if it fails with some kept, the blob is
                // evicted and the file fetched whole once more before the source is blamed.
                let mut kept_any = true;
                while kept_any {
                    let missing = self.store.missing(f, 0..layout.count());
                    kept_any = (missing.len() as u64) < layout.count();
                    let todo = missing
                        .into_iter()
                        .filter(|i| !parts.contains_key(i))
                        .collect();
                    let (landed, by, failed) = self
                        .write_whole_parts(&src, f, todo, attempts, partial)
                        .await;
                    delivered.merge(by);
                    if !landed.is_empty() {
                        last_progress = tokio::time::Instant::now();
                    }
                    parts.extend(landed);
                    if let Some(PartError::Store(e)) = failed {
                        return self.whole_to_memory(file, e).await;
                    }
                    if let Some(PartError::Source(e, _)) = failed {
                        if src.kind.speaks_for_origin() {
                            transient &= e.flaky();
                        }
                        self.source_failed(&src, &e);
                        tracing::warn!(source = %src.name, file = %what, error = %e,
                            kept = parts.len(), "source failed");
                        errors.push(SourceFailure::new(&src, FailureKind::Source(e)));
                        break;
                    }
                    let mut gens = parts.values().copied();
                    let generation = gens.next();
                    if gens.any(|g| Some(g) != generation) {
                        // Evicted and created again while the parts were being written.
                        return Err(FetchError::Evicted);
                    }
                    parts.clear();
                    let judged = std::mem::replace(delivered, Delivered::new(&src, 0));
                    let store = self.store.clone();
                    let entry = f.clone();
                    let actual =
                        tokio::task::spawn_blocking(move || store.verify_whole(&entry, generation))
                            .await
                            .map_err(FetchError::join)?
                            .map_err(|e| match e {
                                crate::store::StoreError::Evicted(_) => FetchError::Evicted,
                                e => FetchError::store(e),
                            })?;
                    if actual == f.sha256 {
                        drop(judged);
                        src.record_success();
                        self.completed(file);
                        return Ok(());
                    }
                    if kept_any {
                        tracing::warn!(file = %what, "whole-file check failed with chunks kept from the cache; fetching the file whole again");
                        let store = self.store.clone();
                        let d = f.sha256;
                        tokio::task::spawn_blocking(move || store.evict(d))
                            .await
                            .map_err(FetchError::join)?
                            .map_err(FetchError::store)?;
                        continue;
                    }
                    if src.kind.speaks_for_origin() {
                        transient = false;
                    }
                    judged.wrong_bytes();
                    self.integrity_failure(&src);
                    tracing::error!(source = %src.name, file = %what, expected = %f.sha256, actual = %actual,
                        "integrity failure: whole file does not match its sha256; discarded, trying the next source");
                    errors.push(SourceFailure::new(
                        &src,
                        FailureKind::WrongFile(Mismatch {
                            hash: ChunkHash::Sha256,
                            expected: f.sha256,
                            actual,
                        }),
                    ));
                }
            }
            let deadline = last_progress + self.cfg.read_timeout();
            if !(transient && self.pause_before_next_round(round, deadline).await) {
                return Err(FetchError::Exhausted {
                    what,
                    failures: errors,
                });
            }
            round += 1;
        }
    }
}
