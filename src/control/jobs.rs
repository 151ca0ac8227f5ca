//! The long work of the control plane: ensure and verify jobs (one per model at a time, with
//! progress that `status` shows), GC runs, and the background loop that saves access times,
//! samples storage and starts auto GC. What GC removes is decided by the pure
//! [`crate::store::gc`]; this file only carries a plan out.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Control, ControlError, GcMode, failed, statvfs};
use crate::chunk::Digest;
use crate::fetch::FileCtx;
use crate::manifest::{ModelId, Verification};
use crate::metrics::METRICS;
use crate::store::WholeCheck;
use crate::store::gc::{GcBlob, GcUsage, plan_gc};
use crate::store::index::Event;
use crate::store::now_secs;

/// Long work on one model, run as a job.
#[derive(Debug, Clone, Copy)]
pub enum Work {
    Ensure { force: bool },
    Verify { report_only: bool },
}

impl Work {
    pub fn kind(self) -> JobKind {
        match self {
            Work::Ensure { .. } => JobKind::Ensure,
            Work::Verify { .. } => JobKind::Verify,
        }
    }
}

/// What a job does (serialized `ensure`, `verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Ensure,
    Verify,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Ensure => "ensure",
            JobKind::Verify => "verify",
        }
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Where a job is (serialized `running`, `done`, `failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    /// Ended without an error (a report-only verify that found bad chunks is `failed`).
    Done,
    /// Ended with an error, in `JobStatus::error`.
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A background job's progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    pub kind: JobKind,
    pub state: JobState,
    pub started: u64,
    pub finished: Option<u64>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error: Option<String>,
    /// Verify: chunks found corrupt.
    pub bad_chunks: u64,
    /// Ensure: bytes this job added to the cache (fetched from sources and verified); 0 when
    /// everything was cached already. Set when the job ends.
    pub bytes_fetched: u64,
    /// Ensure: seconds from the job's start to its first chunk stored, `None` if it fetched
    /// nothing (for a whole-only file, the time to the whole file).
    pub first_fetch_secs: Option<f64>,
    /// While running: average progress since the job started, bytes per second (bytes found
    /// cached count as progress, as they do in `bytes_done`).
    pub rate_bytes_per_s: Option<f64>,
    /// While running: seconds to `bytes_total` at that rate.
    pub eta_secs: Option<f64>,
}

pub(super) struct Job {
    pub(super) status: Mutex<JobStatus>,
    progress: AtomicU64,
    started_at: std::time::Instant,
}

impl Job {
    pub(super) fn snapshot(&self) -> JobStatus {
        let mut s = self.status.lock().unwrap().clone();
        s.bytes_done = self.progress.load(Ordering::Relaxed).min(s.bytes_total);
        let secs = self.started_at.elapsed().as_secs_f64();
        if s.state == JobState::Running && secs > 0.0 {
            let rate = s.bytes_done as f64 / secs;
            s.rate_bytes_per_s = Some(rate.round());
            s.eta_secs = (rate > 0.0)
                .then(|| ((s.bytes_total - s.bytes_done) as f64 / rate * 10.0).round() / 10.0);
        }
        s
    }
    pub(super) fn running(&self) -> bool {
        self.status.lock().unwrap().state == JobState::Running
    }
}

/// One blob GC removed (or would remove).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GcItem {
    pub blob: String,
    pub models: Vec<String>,
    pub files: Vec<String>,
    pub bytes: u64,
    pub last_access: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GcReport {
    pub mode: GcMode,
    pub dry_run: bool,
    pub used_before: u64,
    pub used_after: u64,
    pub freed_bytes: u64,
    pub removed: Vec<GcItem>,
    pub orphans_removed: usize,
    pub reverified_bytes: u64,
    pub bad_chunks: u64,
}

impl Control {
    pub(super) fn job(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().unwrap().get(id).cloned()
    }

    /// Creates running jobs for `ids`, all or none: a model with a job running is busy,
    /// except that a second ensure of a model already ensuring is simply left to run.
    fn start_jobs(
        &self,
        ids: &[ModelId],
        work: Work,
    ) -> Result<Vec<(ModelId, Arc<Job>)>, ControlError> {
        let mut jobs = self.jobs.lock().unwrap();
        let mut todo = Vec::new();
        for id in ids {
            if let Some(j) = jobs.get(id)
                && j.running()
            {
                let running = j.status.lock().unwrap().kind;
                if matches!(work, Work::Ensure { .. }) && running == work.kind() {
                    continue;
                }
                return Err(ControlError::Busy(id.to_string(), running.as_str().into()));
            }
            todo.push(id.clone());
        }
        let cat = self.cat();
        Ok(todo
            .into_iter()
            .map(|id| {
                let total = cat
                    .files
                    .get(&id)
                    .map_or(0, |fs| fs.iter().map(|f| f.entry.size).sum());
                let job = Arc::new(Job {
                    status: Mutex::new(JobStatus {
                        kind: work.kind(),
                        state: JobState::Running,
                        started: now_secs(),
                        finished: None,
                        bytes_done: 0,
                        bytes_total: total,
                        error: None,
                        bad_chunks: 0,
                        bytes_fetched: 0,
                        first_fetch_secs: None,
                        rate_bytes_per_s: None,
                        eta_secs: None,
                    }),
                    progress: AtomicU64::new(0),
                    started_at: std::time::Instant::now(),
                });
                jobs.insert(id.clone(), job.clone());
                (id, job)
            })
            .collect())
    }

    fn finish_job(&self, job: &Job, result: &Result<(), ControlError>) {
        let mut s = job.status.lock().unwrap();
        s.finished = Some(now_secs());
        match result {
            Ok(()) => s.state = JobState::Done,
            Err(e) => {
                s.state = JobState::Failed;
                s.error = Some(e.to_string());
            }
        }
    }

    /// Starts ensure jobs in the background (validated first; an ensure already running for a
    /// model is left to run).
    pub fn ensure(
        self: &Arc<Self>,
        ids: &[ModelId],
        force: bool,
    ) -> Result<Vec<ModelId>, ControlError> {
        self.start(ids, Work::Ensure { force })
    }

    /// Starts verify jobs in the background.
    pub fn verify(
        self: &Arc<Self>,
        ids: &[ModelId],
        report_only: bool,
    ) -> Result<Vec<ModelId>, ControlError> {
        self.start(ids, Work::Verify { report_only })
    }

    fn start(self: &Arc<Self>, ids: &[ModelId], work: Work) -> Result<Vec<ModelId>, ControlError> {
        // Still in force: a reload may have removed one since it was named.
        let ids = self.resolve(ids)?;
        for (id, job) in self.start_jobs(&ids, work)? {
            let this = self.clone();
            tokio::spawn(async move { this.run_job(&id, work, job).await });
        }
        Ok(ids)
    }

    /// Runs one job now and waits for it (the CLI without a daemon).
    pub async fn run_now(
        self: &Arc<Self>,
        id: &str,
        work: Work,
    ) -> Result<JobStatus, ControlError> {
        let id = &self.resolve(&[id])?[0];
        let Some((_, job)) = self.start_jobs(std::slice::from_ref(id), work)?.pop() else {
            return Err(ControlError::Busy(
                id.to_string(),
                work.kind().as_str().into(),
            ));
        };
        self.run_job(id, work, job.clone()).await;
        Ok(job.snapshot())
    }

    async fn run_job(self: &Arc<Self>, id: &ModelId, work: Work, job: Arc<Job>) {
        match work {
            Work::Ensure { force } => self.run_ensure(id, force, job).await,
            Work::Verify { report_only } => self.run_verify(id, report_only, job).await,
        }
    }

    async fn run_ensure(self: &Arc<Self>, id: &ModelId, force: bool, job: Arc<Job>) {
        let t0 = std::time::Instant::now();
        if force {
            for (f, _) in self.blobs_of(id) {
                // The operator's word that the file may be fetched and checked again.
                match self.store().clear_refusal(f.entry.sha256) {
                    Ok(true) => tracing::warn!(model = %id, file = %f.entry.path,
                        "force-redownload: a refused file is fetched and checked again"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(model = %id, error = %e, "force-redownload: could not clear a refusal")
                    }
                }
                if let Err(e) = self.evict_blob(f.entry.sha256) {
                    tracing::warn!(model = %id, error = %e, "force-redownload: could not drop a blob");
                }
            }
        }
        tracing::info!(model = %id, force, "ensure started");
        let mut first_err = None;
        let mut fetched = 0u64;
        let mut first_fetch = None;
        for f in self.cat().files.get(id).cloned().unwrap_or_default() {
            // Nothing of a model refused under [trust] is fetched; a sha256-signed file is
            // fetched whole-checked.
            let f = match self.gate_file(&f).await {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(model = %id, file = %f.entry.path, error = %e, "ensure refused");
                    first_err.get_or_insert_with(|| format!("{}: {e}", f.entry.path));
                    if e.errno() == libc::EACCES {
                        break;
                    }
                    continue;
                }
            };
            let before = self.store().cached_bytes(&f.entry);
            let base = job.progress.load(Ordering::Relaxed);
            let mut ensure = std::pin::pin!(self.fetcher.ensure_file(&f, &job.progress));
            // ensure_file adds the bytes already cached at once, then each chunk as it is
            // stored, inside its own poll: checked after each poll, progress past that marks
            // the moment this job's first fetched chunk landed (no timer, no sampling).
            let r = std::future::poll_fn(|cx| {
                let r = ensure.as_mut().poll(cx);
                if first_fetch.is_none() && job.progress.load(Ordering::Relaxed) > base + before {
                    first_fetch = Some(t0.elapsed().as_secs_f64());
                }
                r
            })
            .await;
            fetched += self.store().cached_bytes(&f.entry).saturating_sub(before);
            if let Err(e) = r {
                METRICS.downloads.with_label_values(&[id, "failed"]).inc();
                tracing::error!(model = %id, file = %f.entry.path, error = %e, "download failed");
                let _ = self.store().index().add_event(&Event {
                    ts: now_secs(),
                    kind: "download".into(),
                    model: id.to_string(),
                    file: f.entry.path.clone(),
                    bytes: f.entry.size,
                    status: "failed".into(),
                    detail: e.to_string(),
                    ..Default::default()
                });
                first_err.get_or_insert_with(|| format!("{}: {e}", f.entry.path));
            }
        }
        {
            let mut s = job.status.lock().unwrap();
            s.bytes_fetched = fetched;
            s.first_fetch_secs = first_fetch;
        }
        let secs = t0.elapsed().as_secs_f64();
        let result = match &first_err {
            None => Ok(()),
            Some(e) => Err(ControlError::Failed(e.clone())),
        };
        let _ = self.store().index().update_model(id, |r| {
            if first_err.is_none() {
                r.corrupt = false;
                r.last_error = None;
            } else {
                r.last_error = first_err.clone();
            }
        });
        let bytes = job.progress.load(Ordering::Relaxed);
        match &result {
            Ok(()) => {
                tracing::info!(model = %id, bytes, seconds = format_args!("{secs:.3}"), "ensure completed")
            }
            Err(e) => tracing::error!(model = %id, error = %e, "ensure failed"),
        }
        self.record(
            "ensure",
            id,
            if result.is_ok() { "success" } else { "failed" },
            bytes,
            secs,
            first_err.unwrap_or_default(),
        );
        self.finish_job(&job, &result);
        // Past the hard limit the daemon reports itself unhealthy: collect now rather than
        // at the next tick (the high watermark alone waits for the tick).
        let max = self.cfg().gc.max_bytes;
        if max > 0 && self.store().used_bytes() > max {
            tracing::info!("cache usage crossed the high watermark: running auto GC");
            if let Err(e) = self.gc(GcMode::Auto, false).await {
                tracing::error!(error = %e, "auto GC failed");
            }
        }
    }

    /// Re-reads every present chunk of a model from disk and checks it against its digest;
    /// bad chunks are dropped and (unless `report_only`) fetched again.
    async fn run_verify(self: &Arc<Self>, id: &ModelId, report_only: bool, job: Arc<Job>) {
        let t0 = std::time::Instant::now();
        let mut bad = 0u64;
        // Bad chunks this run found itself; those a report-only run found (and counted) before
        // are repaired here and shown in `bad`, but not counted again.
        let mut found = 0u64;
        let mut checked = 0u64;
        let mut error = None;
        let mut seen = HashSet::new();
        if !report_only {
            let held = self
                .quarantine
                .lock()
                .unwrap()
                .remove(id)
                .unwrap_or_default();
            for (f, idx) in held {
                bad += 1;
                if let Err(e) = self.refetch_stored(&f, idx).await {
                    error.get_or_insert(format!("{}: {e}", f.entry.path));
                }
            }
        }
        for f in self.cat().files.get(id).cloned().unwrap_or_default() {
            if !seen.insert(f.entry.sha256) {
                continue;
            }
            let f = match self.gate_file(&f).await {
                Ok(f) => f,
                Err(e) => {
                    error.get_or_insert(format!("{}: {e}", f.entry.path));
                    if e.errno() == libc::EACCES {
                        break;
                    }
                    continue;
                }
            };
            match self.check_file(&f, &job.progress).await {
                Ok((c, bad_idx)) => {
                    let b = bad_idx.len() as u64;
                    checked += c;
                    bad += b;
                    found += b;
                    // Counted before the repair: a repair that fails still found them.
                    if let Err(e) = self.handle_bad_chunks(&f, bad_idx, report_only).await {
                        error.get_or_insert(format!("{}: {e}", f.entry.path));
                    }
                }
                Err(e) => {
                    error.get_or_insert(format!("{}: {e}", f.entry.path));
                }
            }
        }
        job.status.lock().unwrap().bad_chunks = bad;
        let corrupt = bad > 0 && report_only;
        let _ = self.store().index().update_model(id, |r| {
            r.last_verified = Some(now_secs());
            if bad == 0 && error.is_none() {
                r.corrupt = false;
                r.last_error = None;
            } else if corrupt {
                r.corrupt = true;
                r.last_error = Some(format!("verify found {bad} corrupt chunks"));
            } else if let Some(e) = &error {
                r.last_error = Some(e.clone());
            } else {
                r.corrupt = false;
                r.last_error = None;
            }
        });
        if found > 0 {
            METRICS.errors.with_label_values(&["verify"]).inc_by(found);
        }
        // A repairing verify that fetched every bad chunk again succeeded: the model is whole.
        let ok = error.is_none() && (bad == 0 || !report_only);
        let secs = t0.elapsed().as_secs_f64();
        tracing::info!(model = %id, checked, bad, repaired = !report_only && bad > 0, "verify completed");
        self.record(
            "verify",
            id,
            if ok { "success" } else { "failed" },
            job.progress.load(Ordering::Relaxed),
            secs,
            format!(
                "{bad} corrupt chunks{}",
                if report_only || bad == 0 {
                    ""
                } else {
                    ", fetched again"
                }
            ),
        );
        let result = match error {
            Some(e) => Err(ControlError::Failed(e)),
            None => Ok(()),
        };
        self.finish_job(&job, &result);
    }

    /// Fetches a dropped chunk again and waits until it is stored (not just served): a repair
    /// reported done must leave the model COMPLETE.
    async fn refetch_stored(&self, f: &Arc<FileCtx>, idx: u64) -> Result<(), ControlError> {
        match f.entry.verification {
            Verification::Chunked(_) => {}
            // No chunk digest to fetch it by: a whole-only file is made whole again.
            Verification::Whole => return self.fetcher.ensure_whole(f).await.map_err(failed),
        }
        self.fetcher.refetch_chunk(f, idx).await.map_err(failed)?;
        if self.store().has_chunk(&f.entry, idx) {
            Ok(())
        } else {
            Err(ControlError::Failed(format!(
                "chunk {idx} fetched again but evicted before the repair ended"
            )))
        }
    }

    /// (chunks checked, indices of the bad ones) for one blob.
    async fn check_file(
        self: &Arc<Self>,
        f: &Arc<FileCtx>,
        progress: &AtomicU64,
    ) -> Result<(u64, Vec<u64>), ControlError> {
        let store = self.store().clone();
        let entry = f.entry.clone();
        self.fetcher.refused(&entry).map_err(failed)?;
        let recorded = store.chunk_digests(&entry).map_err(failed)?;
        let layout = entry.layout();
        let mut bad_idx = Vec::new();
        let mut checked = 0;
        // A complete blob is checked whole too, from the same reads (`store/checked.rs`).
        let check = store.begin_check(&entry).map(|(_, token)| token);
        let mut whole = check.map(|_| Sha256::new());
        for idx in 0..layout.count() {
            let expected = match &entry.verification {
                Verification::Chunked(c) => c[idx as usize],
                // Checked against the digest recorded when the whole file was verified.
                Verification::Whole => match recorded.get(&idx) {
                    Some(d) => *d,
                    None => {
                        whole = None;
                        continue;
                    }
                },
            };
            let (s2, e2) = (store.clone(), entry.clone());
            let data = tokio::task::spawn_blocking(move || s2.read_chunk(&e2, idx))
                .await
                .map_err(failed)?
                .map_err(failed)?;
            let Some(data) = data else {
                whole = None;
                continue;
            };
            checked += 1;
            progress.fetch_add(data.len() as u64, Ordering::Relaxed);
            let check = entry.check(idx);
            let (actual, w) = tokio::task::spawn_blocking(move || {
                if let Some(w) = whole.as_mut() {
                    w.update(&data);
                }
                (check.digest(&data), whole)
            })
            .await
            .map_err(failed)?;
            whole = w;
            if actual != expected {
                tracing::error!(model = %f.model, file = %entry.path, chunk = idx, %expected, %actual,
                    "integrity failure: cached chunk is corrupt on disk");
                METRICS.integrity_failures.inc();
                bad_idx.push(idx);
            }
        }
        // Bad chunks explain a whole that differs: they are repaired, and the repaired blob
        // is checked whole when it is complete again. Good chunks and a bad whole are the
        // entry's own lie: an integrity failure, refused.
        if let (Some(token), Some(w), true) = (check, whole, bad_idx.is_empty()) {
            let actual = crate::chunk::Digest(w.finalize().into());
            let (s2, e2) = (store.clone(), entry.clone());
            let found = tokio::task::spawn_blocking(move || s2.finish_check(&e2, token, actual))
                .await
                .map_err(failed)?
                .map_err(failed)?;
            // (`BadChunks` only comes from `check_whole`, which verify does not call.)
            if let WholeCheck::Mismatch(actual) = found {
                return Err(failed(self.fetcher.whole_file_mismatch(f, actual).await));
            }
        }
        Ok((checked, bad_idx))
    }

    /// Drops chunks found corrupt (report-only: quarantined, fetched at the next read) or
    /// fetches them again now (repair).
    async fn handle_bad_chunks(
        self: &Arc<Self>,
        f: &Arc<FileCtx>,
        bad_idx: Vec<u64>,
        report_only: bool,
    ) -> Result<(), ControlError> {
        if bad_idx.is_empty() {
            return Ok(());
        }
        let store = self.store().clone();
        let entry = f.entry.clone();
        if report_only {
            // Never serve a chunk known to be corrupt: forget it (a read fetches it again),
            // but fetch nothing now. Handles already open in passthrough mode read the blob
            // file directly and cannot be revoked; see docs/SEMANTICS.md.
            let mut q = self.quarantine.lock().unwrap();
            let held = q.entry(f.model.clone()).or_default();
            for idx in bad_idx {
                store.drop_chunk(&entry, idx).map_err(failed)?;
                held.push((f.clone(), idx));
            }
            return Ok(());
        }
        match entry.verification {
            Verification::Whole => {
                // A whole-only file can only be re-fetched whole.
                self.evict_blob(entry.sha256)?;
                self.fetcher.ensure_whole(f).await.map_err(failed)?;
            }
            Verification::Chunked(_) => {
                for idx in bad_idx {
                    store.drop_chunk(&entry, idx).map_err(failed)?;
                    self.refetch_stored(f, idx).await?;
                }
            }
        }
        Ok(())
    }

    /// Runs GC now (see DESIGN §6 and docs/CONTROL.md).
    pub async fn gc(
        self: &Arc<Self>,
        mode: GcMode,
        dry_run: bool,
    ) -> Result<GcReport, ControlError> {
        let _one = self.gc_running.lock().await;
        let store = self.store().clone();
        let (used_before, _, free_pct) = self.usage();
        let (fs_total, _) = statvfs(store.root()).unwrap_or((0, 0));
        let mut owners: HashMap<Digest, (Vec<String>, Vec<String>, bool)> = HashMap::new();
        let cat = self.cat();
        for (id, files) in &cat.files {
            let pinned = self.pinned(id);
            for f in files {
                let o = owners.entry(f.entry.sha256).or_default();
                if !o.0.iter().any(|m| m.as_str() == id.as_str()) {
                    o.0.push(id.to_string());
                }
                o.1.push(format!("{id}/{}", f.entry.path));
                o.2 |= pinned;
            }
        }
        let blobs: Vec<GcBlob> = store
            .blobs()
            .into_iter()
            .map(|b| GcBlob {
                digest: b.digest,
                size: b.size,
                cached_bytes: b.cached_bytes,
                last_access: b.last_access,
                pinned: owners.get(&b.digest).is_some_and(|o| o.2),
                open: b.open,
                listed: owners.contains_key(&b.digest),
            })
            .collect();
        let usage = GcUsage {
            used: used_before,
            free_percent: free_pct,
            fs_total,
        };
        let plan = plan_gc(&blobs, &self.cfg().gc, usage, mode);
        let mut removed = Vec::new();
        for b in &plan.evict {
            let (models, files) = owners
                .get(&b.digest)
                .map(|o| (o.0.clone(), o.1.clone()))
                .unwrap_or_default();
            if !dry_run {
                // Unlink and SQLite: off the runtime threads.
                let this = self.clone();
                let d = b.digest;
                tokio::task::spawn_blocking(move || this.evict_blob(d))
                    .await
                    .map_err(failed)??;
                for m in &models {
                    self.record(
                        "evict",
                        m,
                        "success",
                        b.cached_bytes,
                        0.0,
                        format!("gc {mode:?}: blob {}", b.digest),
                    );
                }
            }
            removed.push(GcItem {
                blob: b.digest.to_hex(),
                models,
                files,
                bytes: b.cached_bytes,
                last_access: b.last_access,
            });
        }
        let mut freed = plan.freed;
        let mut orphans_removed = 0;
        let mut reverified = 0;
        let mut bad = 0;
        if mode == GcMode::DeepClean {
            for (path, size) in store.orphans() {
                if !dry_run {
                    match store.remove_orphan(&path) {
                        Ok(true) => {
                            tracing::info!(path = %path.display(), bytes = size, "removed orphan blob")
                        }
                        Ok(false) => continue,
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "could not remove an orphan blob");
                            continue;
                        }
                    }
                }
                freed += size;
                orphans_removed += 1;
            }
            if !dry_run {
                for id in self.model_ids() {
                    // run_verify directly: run_now could reach an ensure, which may run gc.
                    let work = Work::Verify { report_only: false };
                    let Some((_, job)) = self.start_jobs(std::slice::from_ref(&id), work)?.pop()
                    else {
                        continue;
                    };
                    self.run_verify(&id, false, job.clone()).await;
                    let s = job.snapshot();
                    reverified += s.bytes_done;
                    bad += s.bad_chunks;
                }
                let s = store.clone();
                tokio::task::spawn_blocking(move || s.index().vacuum())
                    .await
                    .map_err(failed)?
                    .map_err(failed)?;
            }
        }
        let (used_after, _, _) = self.usage();
        tracing::info!(mode = ?mode, dry_run, freed, blobs = removed.len(), "gc completed");
        Ok(GcReport {
            mode,
            dry_run,
            used_before,
            used_after: if dry_run { plan.used_after } else { used_after },
            freed_bytes: freed,
            removed,
            orphans_removed,
            reverified_bytes: reverified,
            bad_chunks: bad,
        })
    }

    /// Whether usage is past the high watermark (or under the free-space floor).
    pub fn gc_due(&self) -> bool {
        let (used, _, free_pct) = self.usage();
        let cfg = self.cfg();
        let gc = &cfg.gc;
        gc.above_high(used) || (gc.min_free_percent > 0.0 && free_pct < gc.min_free_percent)
    }

    /// The background loop: saves access times, samples storage for reports, and runs auto GC
    /// when usage crosses the high watermark. Ends when `shutdown` resolves.
    pub async fn run_background(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut last_sample = 0u64;
        loop {
            let every = Duration::from_secs_f64(self.cfg().gc.interval_secs);
            let store = self.store().clone();
            match tokio::task::spawn_blocking(move || store.flush_access_times()).await {
                Ok(Err(e)) => tracing::warn!(error = %e, "could not save access times"),
                Err(e) => tracing::warn!(error = %e, "could not save access times"),
                Ok(Ok(())) => {}
            }
            let now = now_secs();
            if now >= last_sample + 3600 {
                let (used, cap, _) = self.usage();
                let _ = self
                    .store()
                    .index()
                    .add_storage_sample(now - now % 3600, used, cap);
                last_sample = now;
            }
            if self.gc_due() {
                tracing::info!("cache usage crossed the high watermark: running auto GC");
                if let Err(e) = self.gc(GcMode::Auto, false).await {
                    tracing::error!(error = %e, "auto GC failed");
                }
            }
            // Every `interval_secs`, or at once when a commit crosses the high watermark
            // (the store's wake-up): a fast fill must not overrun the cache for a whole interval.
            let wake = self.store().clone();
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(every) => {}
                _ = wake.gc_wake().notified() => {}
            }
        }
        let _ = self.store().flush_access_times();
    }
}
