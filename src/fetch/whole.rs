//! Files listed with only a whole-file sha256: fetched whole from one source at a time
//! (chunk-sized parts in parallel, written unverified and invisible), hashed, then made
//! visible at once; single-flight per blob, and a failure remembered like a chunk's.

use std::sync::Arc;
use std::time::Instant;

use futures::future::FutureExt;
use futures::{StreamExt, TryStreamExt};

use crate::chunk::Mismatch;
use crate::manifest::FileEntry;
use crate::source::{SourceError, SourceHandle};

use super::attempt::Delivered;
use super::{FailureKind, FetchError, Fetcher, FileCtx, Priority, SourceFailure, kib};

/// The key under which a whole-only file's failed fetch is remembered in `Fetcher::failed`
/// (no chunk has this index).
const WHOLE_FILE: u64 = u64::MAX;

impl Fetcher {
    /// Makes a file listed with only a whole-file sha256 complete (single-flight per blob).
    pub async fn ensure_whole(self: &Arc<Self>, file: &Arc<FileCtx>) -> Result<(), FetchError> {
        let key = file.entry.sha256;
        // A failed whole-file fetch is remembered like a failed chunk: the kernel retries a
        // failed read at once, and each retry would download the whole file again.
        if let Some(err) = self.recently_failed((key, WHOLE_FILE)) {
            return Err(err);
        }
        let shared = {
            let mut map = self.whole.lock().unwrap();
            if self.store.is_complete(&file.entry) {
                return Ok(());
            }
            match map.get(&key) {
                Some(s) => s.clone(),
                None => {
                    let this = self.clone();
                    let file = file.clone();
                    let task = self.rt.spawn(async move {
                        let r = this.fetch_whole(&file).await;
                        if let Err(e) = &r
                            && !matches!(e, FetchError::Evicted)
                        {
                            this.remember_failure((key, WHOLE_FILE), e);
                        }
                        this.whole.lock().unwrap().remove(&key);
                        r
                    });
                    let fut = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(FetchError::Store(format!("fetch task died: {e}")))
                        })
                    }
                    .boxed()
                    .shared();
                    map.insert(key, fut.clone());
                    fut
                }
            }
        };
        shared.await
    }

    /// Fetches chunks `idx` of a whole-only file from `src` in parallel and writes them,
    /// unverified, into its blob; returns the blob generation each write found, and the
    /// requests that delivered them (counted once the whole file is checked).
    async fn write_whole_parts(
        &self,
        src: &Arc<SourceHandle>,
        f: &FileEntry,
        chunks: Vec<u64>,
        attempts: u32,
    ) -> Result<(Vec<u64>, Delivered), SourceError> {
        let layout = f.layout();
        let parallel = (self.cfg.connections / 2).max(1);
        let hex = f.sha256.to_hex();
        let at = src.locator(f, &hex);
        futures::stream::iter(chunks)
            .map(|idx| async move {
                let r = layout.range(idx);
                let _mem = self
                    .memory
                    .acquire_many(kib(r.end - r.start).min(self.memory_kib))
                    .await
                    .expect("open");
                // Whole-only: verified by the file's sha256 once every part is in the blob.
                let (bytes, _, delivered) = self
                    .fetch_range(src, at, r.clone(), Priority::OnDemand, attempts, None)
                    .await?;
                let store = self.store.clone();
                let entry = f.clone();
                let generation = tokio::task::spawn_blocking(move || {
                    store.write_unverified(&entry, r.start, &bytes)
                })
                .await
                .map_err(|e| SourceError::Transport(e.to_string()))?
                .map_err(|e| SourceError::Transport(format!("cache write: {e}")))?;
                Ok((generation, delivered))
            })
            .buffer_unordered(parallel)
            .try_fold(
                (Vec::new(), Delivered::new(src, 0)),
                |(mut gens, mut all), (generation, delivered)| async move {
                    gens.push(generation);
                    all.merge(delivered);
                    Ok((gens, all))
                },
            )
            .await
    }

    async fn fetch_whole(self: &Arc<Self>, file: &Arc<FileCtx>) -> Result<(), FetchError> {
        let f = &file.entry;
        let what = format!("{}/{}", file.model, f.path);
        self.started
            .lock()
            .unwrap()
            .entry(f.sha256)
            .or_insert_with(Instant::now);
        let layout = f.layout();
        let mut errors = Vec::new();
        let peers = self.live_peers().into_iter().map(|p| (p, 1));
        for (src, attempts) in peers.chain(self.source_order(&file.sources)) {
            // Only chunks not present: the unverified bytes of a failed or lying fetch must
            // never land on a chunk that readers are being served (a whole-only file is
            // partial when a chunk was dropped as corrupt). The kept chunks are part of the
            // whole-file hash, though: if it fails with some kept, the blob is evicted and the
            // file fetched whole once more before the source is blamed.
            let mut kept_any = true;
            while kept_any {
                let missing = self.store.missing(f, 0..layout.count());
                kept_any = (missing.len() as u64) < layout.count();
                let written = self.write_whole_parts(&src, f, missing, attempts).await;
                let (generation, delivered) = match written {
                    Ok((gens, _)) if gens.windows(2).any(|w| w[0] != w[1]) => {
                        // Evicted and created again while the parts were being written.
                        return Err(FetchError::Evicted);
                    }
                    Ok((gens, delivered)) => (gens.first().copied(), delivered),
                    Err(e) => {
                        self.source_failed(&src, &e);
                        tracing::warn!(source = %src.name, file = %what, error = %e, "source failed");
                        errors.push(SourceFailure::new(&src, FailureKind::Source(e)));
                        break;
                    }
                };
                let store = self.store.clone();
                let entry = f.clone();
                let actual =
                    tokio::task::spawn_blocking(move || store.verify_whole(&entry, generation))
                        .await
                        .map_err(|e| FetchError::Store(e.to_string()))?
                        .map_err(|e| match e {
                            crate::store::StoreError::Evicted(_) => FetchError::Evicted,
                            e => FetchError::Store(e.to_string()),
                        })?;
                if actual == f.sha256 {
                    drop(delivered);
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
                        .map_err(|e| FetchError::Store(e.to_string()))?
                        .map_err(|e| FetchError::Store(e.to_string()))?;
                    continue;
                }
                delivered.wrong_bytes();
                self.integrity_failure(&src);
                tracing::error!(source = %src.name, file = %what, expected = %f.sha256, actual = %actual,
                    "integrity failure: whole file does not match its sha256; discarded, trying the next source");
                errors.push(SourceFailure::new(
                    &src,
                    FailureKind::WrongFile(Mismatch {
                        hash: crate::chunk::ChunkHash::Sha256,
                        expected: f.sha256,
                        actual,
                    }),
                ));
            }
        }
        Err(FetchError::Exhausted {
            what,
            failures: errors,
        })
    }
}
