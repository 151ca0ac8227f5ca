//! The whole-file check of complete blobs, from the read path's side: when it runs, and what a
//! mismatch does. How a blob is hashed and what is kept is `store/checked.rs`.
//!
//! - When: a chunked file's last chunk committed (or adopted) starts a check in the
//!   background; so does opening a complete blob not checked yet (a cache from before checks
//!   existed, an index rebuilt). Readers of a chunked file keep being served from its chunks
//!   meanwhile: each was verified. A whole-only file's reader, and an ensure, wait for it: a
//!   whole-only file's first byte comes only after its whole sha256 matched.
//! - How: single-flight per blob (`FetchKey::Check`), at most one check hashing at a time
//!   (`Fetcher::whole_checks`: a 10 GB file takes seconds of a core and of the disk), on a
//!   blocking thread.
//! - A mismatch with chunks that no longer match their digests is rot on the cache disk:
//!   those chunks are dropped (fetched again by the next read), as verify drops them.
//! - A mismatch with every chunk matching is the entry's own lie, an integrity failure: the
//!   blob is refused (`Store::refuse`: recorded, then
//!   dropped), counted (`wan_whole_file_failures_total`, `wan_integrity_failures_total`),
//!   recorded as an `integrity` event, logged once with model, file, expected and actual
//!   digest, and the model is marked CORRUPT with the reason. Reads of the file then fail
//!   with `FetchError::Refused` (EIO).

use std::sync::Arc;

use futures::future::FutureExt;

use crate::chunk::Digest;
use crate::manifest::FileEntry;
use crate::metrics::METRICS;
use crate::store::WholeCheck;
use crate::store::index::Event;

use super::flight::{FetchKey, SharedWhole};
use super::{FetchError, Fetcher, FileCtx};

impl Fetcher {
    /// `Err(Refused)` when the whole-file check refused `f`'s blob for this very entry.
    pub fn refused(&self, f: &FileEntry) -> Result<(), FetchError> {
        match self.store.refusal(f) {
            None => Ok(()),
            Some(r) => Err(FetchError::Refused {
                path: f.path.clone(),
                expected: f.sha256,
                actual: r.actual,
            }),
        }
    }

    /// Starts the check of `file`'s blob if it is complete and not checked yet; returns at
    /// once.
    pub fn check_in_background(self: &Arc<Self>, file: &Arc<FileCtx>) {
        let f = &file.entry;
        if self.store.is_whole_checked(f)
            || !self.store.is_complete(f)
            || self.store.refusal(f).is_some()
        {
            return;
        }
        let check = self.check_whole(file);
        self.rt.spawn(check);
    }

    /// Resolves once `file`'s blob is whole-checked (`Ok`), or refused (`Refused`); `Ok` too
    /// when it is not complete (nothing to check: the caller looks again).
    pub fn check_whole(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
    ) -> futures::future::BoxFuture<'static, Result<(), FetchError>> {
        let blob = file.entry.sha256;
        let shared: SharedWhole = {
            let mut table = self.table();
            match table.check(blob) {
                Some(s) => s.clone(),
                None => {
                    let this = self.clone();
                    let file = file.clone();
                    let task = self.rt.spawn(async move {
                        let r = this.run_check(&file).await;
                        this.table().finish(FetchKey::Check(blob));
                        r
                    });
                    let fut =
                        async move { task.await.unwrap_or_else(|e| Err(FetchError::join(e))) }
                            .boxed()
                            .shared();
                    table.insert_check(blob, fut.clone());
                    fut
                }
            }
        };
        shared.boxed()
    }

    async fn run_check(self: &Arc<Self>, file: &Arc<FileCtx>) -> Result<(), FetchError> {
        self.refused(&file.entry)?;
        // One at a time: a check reads the whole file.
        let _one = self
            .whole_checks
            .acquire()
            .await
            .expect("the check semaphore is never closed");
        if self.store.is_whole_checked(&file.entry) {
            return Ok(());
        }
        let store = self.store.clone();
        let entry = file.entry.clone();
        let t0 = std::time::Instant::now();
        let found = tokio::task::spawn_blocking(move || store.check_whole(&entry))
            .await
            .map_err(FetchError::join)?
            .map_err(FetchError::store)?;
        match found {
            WholeCheck::Match => {
                tracing::debug!(model = %file.model, file = %file.entry.path,
                    seconds = t0.elapsed().as_secs_f64(), "whole-file sha256 checked");
                Ok(())
            }
            WholeCheck::NotComplete => Ok(()),
            WholeCheck::BadChunks(bad) => {
                // As verify treats them: forgotten, fetched again by the next read.
                for idx in bad {
                    METRICS.integrity_failures.inc();
                    METRICS.errors.with_label_values(&["verify"]).inc();
                    tracing::error!(model = %file.model, file = %crate::logging::untrusted(&file.entry.path), chunk = idx,
                        "integrity failure: cached chunk is corrupt on disk; dropped, fetched again at the next read");
                    let store = self.store.clone();
                    let entry = file.entry.clone();
                    tokio::task::spawn_blocking(move || store.drop_chunk(&entry, idx))
                        .await
                        .map_err(FetchError::join)?
                        .map_err(FetchError::store)?;
                }
                Ok(())
            }
            WholeCheck::Mismatch(actual) => Err(self.whole_file_mismatch(file, actual).await),
        }
    }

    /// A complete blob of `file` hashed whole to `actual`, not to its sha256: refuses it (see
    /// the module doc) and returns the error its readers get.
    pub async fn whole_file_mismatch(&self, file: &FileCtx, actual: Digest) -> FetchError {
        let f = &file.entry;
        tracing::error!(model = %file.model, file = %crate::logging::untrusted(&f.path),
            expected = %f.sha256, actual = %actual,
            "integrity failure: the cached file's chunks verified, but the whole file does not match its sha256; refused and dropped");
        let reason = format!(
            "{}: whole-file sha256 mismatch (expected {}, actual {}): refused",
            f.path, f.sha256, actual
        );
        let store = self.store.clone();
        let entry = f.clone();
        let model = file.model.to_string();
        // The model's state first, so that whoever sees the file refused sees why.
        let recorded = tokio::task::spawn_blocking(move || {
            let _ = store.index().update_model(&model, |r| {
                r.corrupt = true;
                r.last_error = Some(reason.clone());
            });
            let refused = store.refuse(&entry, actual, &model);
            let _ = store.index().add_event(&Event {
                ts: crate::store::now_secs(),
                kind: "integrity".into(),
                model,
                file: entry.path.clone(),
                bytes: entry.size,
                status: "refused".into(),
                detail: reason,
                ..Default::default()
            });
            refused
        })
        .await;
        match recorded {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(model = %file.model, file = %crate::logging::untrusted(&f.path), error = %e,
                    "could not record or drop a refused blob (refused in memory)")
            }
            Err(e) => tracing::error!(error = %e, "the refusal's task died"),
        }
        // Counted once everything above is recorded.
        METRICS.integrity_failures.inc();
        METRICS.whole_file_failures.inc();
        FetchError::Refused {
            path: f.path.clone(),
            expected: f.sha256,
            actual,
        }
    }
}
