//! One control vocabulary — status, health, ensure, verify, gc, pin, evict, mark-corrupted —
//! shared by the `.wan/` control files, the HTTP endpoint and the CLI, so no logic is written
//! twice. Everything here returns plain serde structs; the front ends only render them.
//!
//! Long work (ensure, verify, gc started from a control file or HTTP) runs as a background job;
//! `status` shows its progress. The CLI without a daemon awaits the same functions directly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::chunk::Digest;
use crate::config::Config;
use crate::fetch::{Fetcher, FileCtx};
use crate::manifest::Manifest;
use crate::metrics::METRICS;
use crate::source::{SourceRegistry, mask_url};
use crate::store::index::Event;
use crate::store::{CacheState, Store, now_secs};

/// Why a control request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// An id the manifest does not list, with the id probably meant (see
    /// [`ControlError::unknown_model`]).
    #[error("unknown model id {:?}{} (see `wan models list`)", .0, .1.as_ref().map(|s| format!("; did you mean {s:?}?")).unwrap_or_default())]
    UnknownModel(String, Option<String>),
    #[error("{0}")]
    BadRequest(String),
    #[error("model {0} is busy: {1} is running")]
    Busy(String, String),
    #[error("{0}")]
    Failed(String),
}

impl ControlError {
    /// The refusal of an unknown `id`, with a "did you mean" among `known` (one rule for the
    /// CLI, HTTP and the control files: [`crate::manifest::suggest_id`]).
    pub fn unknown_model<'a>(id: &str, known: impl IntoIterator<Item = &'a str>) -> ControlError {
        let hint = crate::manifest::suggest_id(id, known).map(str::to_string);
        ControlError::UnknownModel(id.to_string(), hint)
    }

    /// HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            ControlError::UnknownModel(..) => 404,
            ControlError::BadRequest(_) => 400,
            ControlError::Busy(..) => 409,
            ControlError::Failed(_) => 500,
        }
    }
}

fn failed(e: impl std::fmt::Display) -> ControlError {
    ControlError::Failed(e.to_string())
}

/// GC modes (DESIGN §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GcMode {
    Auto,
    Aggressive,
    DeepClean,
}

impl std::str::FromStr for GcMode {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<GcMode, ControlError> {
        match s.trim() {
            "auto" => Ok(GcMode::Auto),
            "aggressive" => Ok(GcMode::Aggressive),
            "deep-clean" => Ok(GcMode::DeepClean),
            other => Err(ControlError::BadRequest(format!(
                "unknown gc mode {other:?} (want auto, aggressive or deep-clean, optionally followed by --dry-run)"
            ))),
        }
    }
}

/// Long work on one model, run as a job.
#[derive(Debug, Clone, Copy)]
pub enum Work {
    Ensure { force: bool },
    Verify { report_only: bool },
}

impl Work {
    fn kind(self) -> &'static str {
        match self {
            Work::Ensure { .. } => "ensure",
            Work::Verify { .. } => "verify",
        }
    }
}

/// A background job's progress.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub kind: String,
    pub state: String,
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

struct Job {
    status: Mutex<JobStatus>,
    progress: AtomicU64,
    started_at: std::time::Instant,
}

impl Job {
    fn snapshot(&self) -> JobStatus {
        let mut s = self.status.lock().unwrap().clone();
        s.bytes_done = self.progress.load(Ordering::Relaxed).min(s.bytes_total);
        let secs = self.started_at.elapsed().as_secs_f64();
        if s.state == "running" && secs > 0.0 {
            let rate = s.bytes_done as f64 / secs;
            s.rate_bytes_per_s = Some(rate.round());
            s.eta_secs = (rate > 0.0)
                .then(|| ((s.bytes_total - s.bytes_done) as f64 / rate * 10.0).round() / 10.0);
        }
        s
    }
    fn running(&self) -> bool {
        self.status.lock().unwrap().state == "running"
    }
}

/// One model as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    pub id: String,
    pub description: String,
    /// NOT_PRESENT, PARTIAL, VERIFYING, COMPLETE or CORRUPT.
    pub state: String,
    pub pinned: bool,
    pub files: usize,
    pub files_complete: usize,
    pub bytes_total: u64,
    pub bytes_cached: u64,
    pub last_access: Option<u64>,
    pub last_verified: Option<u64>,
    pub last_error: Option<String>,
    pub job: Option<JobStatus>,
}

/// One health check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub ok: bool,
    /// Whether failing it makes the whole daemon unhealthy (else only degraded).
    pub critical: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// healthy, degraded or unhealthy.
    pub status: String,
    pub checks: BTreeMap<String, Check>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub total: usize,
    pub complete: usize,
    pub partial: usize,
    pub not_present: usize,
    pub corrupt: usize,
    pub verifying: usize,
}

/// One blob GC removed (or would remove).
#[derive(Debug, Clone, Serialize)]
pub struct GcItem {
    pub blob: String,
    pub models: Vec<String>,
    pub files: Vec<String>,
    pub bytes: u64,
    pub last_access: u64,
}

#[derive(Debug, Clone, Serialize)]
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

/// A chunk dropped as corrupt by a report-only verify: (file, chunk index).
type Quarantined = (Arc<FileCtx>, u64);

/// The models in force: replaced whole on reload, so a request sees one consistent set.
pub struct Catalog {
    pub models: BTreeMap<String, crate::manifest::Model>,
    pub files: BTreeMap<String, Vec<Arc<FileCtx>>>,
}

/// Everything the control plane needs; built once by the daemon (or the CLI).
pub struct Control {
    catalog: std::sync::RwLock<Arc<Catalog>>,
    fetcher: Arc<Fetcher>,
    sources: Arc<SourceRegistry>,
    config: std::sync::RwLock<Arc<Config>>,
    manifest_path: PathBuf,
    mountpoint: Option<PathBuf>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    gc_running: tokio::sync::Mutex<()>,
    /// Chunks a report-only verify found corrupt and dropped, by model: the next repairing
    /// verify fetches them again (a read would too).
    quarantine: Mutex<HashMap<String, Vec<Quarantined>>>,
}

impl Control {
    pub fn new(
        manifest: &Manifest,
        manifest_path: PathBuf,
        files: BTreeMap<String, Vec<Arc<FileCtx>>>,
        fetcher: Arc<Fetcher>,
        sources: Arc<SourceRegistry>,
        config: Config,
        mountpoint: Option<PathBuf>,
    ) -> Arc<Control> {
        crate::metrics::register_models(manifest.models.keys().map(String::as_str));
        Arc::new(Control {
            catalog: std::sync::RwLock::new(Arc::new(Catalog {
                models: manifest.models.clone(),
                files,
            })),
            fetcher,
            sources,
            config: std::sync::RwLock::new(Arc::new(config)),
            manifest_path,
            mountpoint,
            jobs: Mutex::new(HashMap::new()),
            gc_running: tokio::sync::Mutex::new(()),
            quarantine: Mutex::new(HashMap::new()),
        })
    }

    /// Replaces the models and the configuration (SIGHUP reload).
    pub fn reload(
        &self,
        manifest: Manifest,
        files: BTreeMap<String, Vec<Arc<FileCtx>>>,
        config: Config,
    ) {
        crate::metrics::register_models(manifest.models.keys().map(String::as_str));
        *self.catalog.write().unwrap() = Arc::new(Catalog {
            models: manifest.models,
            files,
        });
        *self.config.write().unwrap() = Arc::new(config);
    }

    fn cat(&self) -> Arc<Catalog> {
        self.catalog.read().unwrap().clone()
    }

    fn cfg(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    pub fn store(&self) -> &Arc<Store> {
        self.fetcher.store()
    }

    pub fn model_ids(&self) -> Vec<String> {
        self.cat().models.keys().cloned().collect()
    }

    /// Checks ids, naming the first unknown one; an empty list means every model.
    pub fn resolve(&self, ids: &[String]) -> Result<Vec<String>, ControlError> {
        if ids.is_empty() {
            return Ok(self.model_ids());
        }
        let mut out = Vec::new();
        let cat = self.cat();
        for id in ids {
            let id = id.trim();
            if !cat.models.contains_key(id) {
                return Err(ControlError::unknown_model(
                    id,
                    cat.models.keys().map(String::as_str),
                ));
            }
            if !out.iter().any(|o| o == id) {
                out.push(id.to_string());
            }
        }
        Ok(out)
    }

    fn pinned(&self, id: &str) -> bool {
        let manifest = self.cat().models.get(id).is_some_and(|m| m.pinned);
        match self.store().index().model(id) {
            Ok(row) => row.pinned.unwrap_or(manifest),
            Err(_) => manifest,
        }
    }

    fn job(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().unwrap().get(id).cloned()
    }

    pub fn model_status(&self, id: &str) -> Result<ModelStatus, ControlError> {
        let cat = self.cat();
        let model = cat.models.get(id).ok_or_else(|| {
            ControlError::unknown_model(id, cat.models.keys().map(String::as_str))
        })?;
        let store = self.store();
        let files = &cat.files[id];
        let mut cached = 0;
        let mut complete = 0;
        let mut last_access: Option<u64> = None;
        for f in files {
            cached += store.cached_bytes(&f.entry);
            if store.state(&f.entry) == CacheState::Complete {
                complete += 1;
            }
            if let Some(t) = store.last_access(&f.entry) {
                last_access = Some(last_access.map_or(t, |l| l.max(t)));
            }
        }
        let row = store.index().model(id).map_err(failed)?;
        let job = self.job(id);
        let verifying = job
            .as_ref()
            .is_some_and(|j| j.running() && j.status.lock().unwrap().kind == "verify");
        let state = if verifying {
            "VERIFYING"
        } else if row.corrupt {
            "CORRUPT"
        } else if complete == files.len() {
            "COMPLETE"
        } else if cached > 0 {
            "PARTIAL"
        } else {
            "NOT_PRESENT"
        };
        Ok(ModelStatus {
            id: id.to_string(),
            description: model.description.clone(),
            state: state.into(),
            pinned: row.pinned.unwrap_or(model.pinned),
            files: files.len(),
            files_complete: complete,
            bytes_total: files.iter().map(|f| f.entry.size).sum(),
            bytes_cached: cached,
            last_access,
            last_verified: row.last_verified,
            last_error: row.last_error,
            job: job.map(|j| j.snapshot()),
        })
    }

    /// Status of the given models (all if empty).
    pub fn status(&self, ids: &[String]) -> Result<Vec<ModelStatus>, ControlError> {
        self.resolve(ids)?
            .iter()
            .map(|id| self.model_status(id))
            .collect()
    }

    pub fn summary(&self, models: &[ModelStatus]) -> Summary {
        let count = |s: &str| models.iter().filter(|m| m.state == s).count();
        Summary {
            total: models.len(),
            complete: count("COMPLETE"),
            partial: count("PARTIAL"),
            not_present: count("NOT_PRESENT"),
            corrupt: count("CORRUPT"),
            verifying: count("VERIFYING"),
        }
    }

    /// (used bytes, capacity bytes, free percent of the cache filesystem).
    pub fn usage(&self) -> (u64, u64, f64) {
        let used = self.store().used_bytes();
        let (fs_total, fs_free) = statvfs(self.store().root()).unwrap_or((0, 0));
        let gc = self.cfg().gc.clone();
        let cap = if gc.max_bytes > 0 {
            gc.max_bytes
        } else {
            fs_total
        };
        let free_pct = if fs_total > 0 {
            fs_free as f64 * 100.0 / fs_total as f64
        } else {
            100.0
        };
        METRICS.storage_used.set(used as i64);
        METRICS.storage_total.set(cap as i64);
        (used, cap, free_pct)
    }

    /// Health: unhealthy (HTTP 503) if a critical check fails, degraded if another does.
    /// `check_mount`: stat the mountpoint (not from inside a FUSE request: it would ask
    /// ourselves).
    pub async fn health(&self, check_mount: bool) -> Health {
        let mut checks = BTreeMap::new();
        let mut add = |name: &str, ok: bool, critical: bool, detail: String| {
            checks.insert(
                name.to_string(),
                Check {
                    ok,
                    critical,
                    detail,
                },
            );
        };
        if let Some(mp) = self.mountpoint.as_ref().filter(|_| check_mount) {
            let mp2 = mp.clone();
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::task::spawn_blocking(move || std::fs::read_dir(&mp2).map(|_| ())),
            )
            .await;
            let (ok, detail) = match answer {
                Ok(Ok(Ok(()))) => (true, format!("{} answers", mp.display())),
                Ok(Ok(Err(e))) => (false, format!("{}: {e}", mp.display())),
                _ => (false, format!("{} did not answer within 2 s", mp.display())),
            };
            add("mount", ok, true, detail);
        }
        let probe = self.store().root().join(".health-probe");
        let writable = std::fs::write(&probe, b"ok").and_then(|_| std::fs::remove_file(&probe));
        add(
            "cache_writable",
            writable.is_ok(),
            true,
            match writable {
                Ok(()) => format!("{} is writable", self.store().root().display()),
                Err(e) => format!("{}: {e}", self.store().root().display()),
            },
        );
        let index = self.store().index().model("-");
        add(
            "index",
            index.is_ok(),
            true,
            index
                .map(|_| "index answers".to_string())
                .unwrap_or_else(|e| e.to_string()),
        );
        let (used, cap, free_pct) = self.usage();
        let cfg = self.cfg();
        let gc = &cfg.gc;
        let over = gc.max_bytes > 0 && used > gc.max_bytes;
        let floor = gc.min_free_percent > 0.0 && free_pct < gc.min_free_percent / 2.0;
        add(
            "disk",
            !(over || floor),
            true,
            format!("{used} of {cap} bytes used, {free_pct:.1}% of the filesystem free"),
        );
        let high = gc.max_bytes > 0 && used as f64 > gc.high_watermark * gc.max_bytes as f64;
        add(
            "disk_watermark",
            !high,
            false,
            if high {
                "above the high watermark: GC is due".into()
            } else {
                "below the high watermark".into()
            },
        );
        let cooling: Vec<String> = self
            .sources
            .all()
            .into_iter()
            .filter(|s| s.failing())
            .map(|s| s.name.clone())
            .collect();
        add(
            "sources",
            cooling.is_empty(),
            false,
            if cooling.is_empty() {
                "no source is failing".into()
            } else {
                format!(
                    "failing (cooling down): {}; cached data is still served",
                    cooling.join(", ")
                )
            },
        );
        let status = if checks.values().any(|c| !c.ok && c.critical) {
            "unhealthy"
        } else if checks.values().any(|c| !c.ok) {
            "degraded"
        } else {
            "healthy"
        };
        Health {
            status: status.into(),
            checks,
        }
    }

    /// The configuration in force, secrets masked (only env var names are ever stored).
    pub fn config_view(&self) -> serde_json::Value {
        let cfg = self.cfg();
        let mut v = serde_json::to_value(&*cfg).unwrap_or_default();
        v["manifest"] = serde_json::json!(self.manifest_path.display().to_string());
        v["cache_dir"] = serde_json::json!(
            self.store()
                .root()
                .parent()
                .map(|p| p.display().to_string())
        );
        v["mountpoint"] =
            serde_json::json!(self.mountpoint.as_ref().map(|p| p.display().to_string()));
        let token_set = std::env::var(&cfg.http.token_env).is_ok_and(|t| !t.is_empty());
        v["http"]["token"] = serde_json::json!(if token_set { "***" } else { "" });
        v["sources"] = serde_json::json!(
            self.cat()
                .models
                .values()
                .map(|m| (
                    m.id.clone(),
                    m.sources
                        .iter()
                        .map(|s| mask_url(&s.to_string()))
                        .collect::<Vec<_>>()
                ))
                .collect::<BTreeMap<_, _>>()
        );
        v["hf_token"] = serde_json::json!(if std::env::var("HF_TOKEN").is_ok() {
            "***"
        } else {
            ""
        });
        v
    }

    pub fn events(&self, limit: usize) -> Result<Vec<Event>, ControlError> {
        self.store().index().events(0, limit).map_err(failed)
    }

    fn record(
        &self,
        kind: &str,
        model: &str,
        status: &str,
        bytes: u64,
        seconds: f64,
        detail: String,
    ) {
        let e = Event {
            ts: now_secs(),
            kind: kind.into(),
            model: model.into(),
            file: String::new(),
            bytes,
            seconds,
            status: status.into(),
            detail,
        };
        if let Err(err) = self.store().index().add_event(&e) {
            tracing::warn!(error = %err, "could not record an event");
        }
    }

    /// Pins or unpins a model (persisted; overrides the manifest's `pinned`).
    pub fn set_pinned(&self, id: &str, pinned: bool) -> Result<ModelStatus, ControlError> {
        let id = &self.resolve(&[id.to_string()])?[0];
        self.store()
            .index()
            .update_model(id, |r| r.pinned = Some(pinned))
            .map_err(failed)?;
        tracing::info!(model = %id, pinned, "pin changed");
        self.record(
            if pinned { "pin" } else { "unpin" },
            id,
            "success",
            0,
            0.0,
            String::new(),
        );
        self.model_status(id)
    }

    /// Blobs of `id` and, for each, whether another pinned model lists it too.
    fn blobs_of(&self, id: &str) -> Vec<(Arc<FileCtx>, bool)> {
        let mut seen = HashSet::new();
        let cat = self.cat();
        let shared_pinned: HashSet<Digest> = cat
            .files
            .iter()
            .filter(|(m, _)| m.as_str() != id && self.pinned(m))
            .flat_map(|(_, fs)| fs.iter().map(|f| f.entry.sha256))
            .collect();
        cat.files[id]
            .iter()
            .filter(|f| seen.insert(f.entry.sha256))
            .map(|f| (f.clone(), shared_pinned.contains(&f.entry.sha256)))
            .collect()
    }

    fn evict_blob(&self, d: Digest) -> Result<u64, ControlError> {
        let freed = self.store().evict(d).map_err(failed)?;
        METRICS.evictions.inc();
        METRICS.evicted_bytes.inc_by(freed);
        Ok(freed)
    }

    /// Drops a model's cached data (blobs also listed by a pinned model are kept).
    pub fn evict(&self, id: &str, force_pinned: bool) -> Result<u64, ControlError> {
        let id = &self.resolve(&[id.to_string()])?[0];
        if self.job(id).is_some_and(|j| j.running()) {
            return Err(ControlError::Busy(id.clone(), "a job".into()));
        }
        let mut freed = 0;
        for (f, shared_pinned) in self.blobs_of(id) {
            if shared_pinned && !force_pinned {
                continue;
            }
            freed += self.evict_blob(f.entry.sha256)?;
        }
        tracing::info!(model = %id, bytes = freed, "evicted");
        self.record("evict", id, "success", freed, 0.0, String::new());
        self.usage();
        Ok(freed)
    }

    /// Marks models corrupt and drops their cached data, so every byte is fetched and verified
    /// again; the state stays CORRUPT until an ensure or verify completes them.
    pub fn mark_corrupted(&self, ids: &[String]) -> Result<Vec<String>, ControlError> {
        let ids = self.resolve(ids)?;
        for id in &ids {
            for (f, _) in self.blobs_of(id) {
                self.store().mark_suspect(f.entry.sha256);
            }
            self.evict(id, true)?;
            self.store()
                .index()
                .update_model(id, |r| {
                    r.corrupt = true;
                    r.last_error = Some("marked corrupted by an operator".into());
                })
                .map_err(failed)?;
            tracing::warn!(model = %id, "marked corrupted: cached data dropped");
            self.record("mark-corrupted", id, "success", 0, 0.0, String::new());
        }
        Ok(ids)
    }

    /// Creates running jobs for `ids`, all or none: a model with a job running is busy,
    /// except that a second ensure of a model already ensuring is simply left to run.
    fn start_jobs(
        &self,
        ids: &[String],
        work: Work,
    ) -> Result<Vec<(String, Arc<Job>)>, ControlError> {
        let mut jobs = self.jobs.lock().unwrap();
        let mut todo = Vec::new();
        for id in ids {
            if let Some(j) = jobs.get(id)
                && j.running()
            {
                let running = j.status.lock().unwrap().kind.clone();
                if matches!(work, Work::Ensure { .. }) && running == work.kind() {
                    continue;
                }
                return Err(ControlError::Busy(id.clone(), running));
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
                        kind: work.kind().into(),
                        state: "running".into(),
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
            Ok(()) => s.state = "done".into(),
            Err(e) => {
                s.state = "failed".into();
                s.error = Some(e.to_string());
            }
        }
    }

    /// Starts ensure jobs in the background (validated first; an ensure already running for a
    /// model is left to run).
    pub fn ensure(
        self: &Arc<Self>,
        ids: &[String],
        force: bool,
    ) -> Result<Vec<String>, ControlError> {
        self.start(ids, Work::Ensure { force })
    }

    /// Starts verify jobs in the background.
    pub fn verify(
        self: &Arc<Self>,
        ids: &[String],
        report_only: bool,
    ) -> Result<Vec<String>, ControlError> {
        self.start(ids, Work::Verify { report_only })
    }

    fn start(self: &Arc<Self>, ids: &[String], work: Work) -> Result<Vec<String>, ControlError> {
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
        let id = &self.resolve(&[id.to_string()])?[0];
        let Some((_, job)) = self.start_jobs(std::slice::from_ref(id), work)?.pop() else {
            return Err(ControlError::Busy(id.clone(), work.kind().into()));
        };
        self.run_job(id, work, job.clone()).await;
        Ok(job.snapshot())
    }

    async fn run_job(self: &Arc<Self>, id: &str, work: Work, job: Arc<Job>) {
        match work {
            Work::Ensure { force } => self.run_ensure(id, force, job).await,
            Work::Verify { report_only } => self.run_verify(id, report_only, job).await,
        }
    }

    async fn run_ensure(self: &Arc<Self>, id: &str, force: bool, job: Arc<Job>) {
        let t0 = std::time::Instant::now();
        if force {
            for (f, _) in self.blobs_of(id) {
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
                    model: id.into(),
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
    async fn run_verify(self: &Arc<Self>, id: &str, report_only: bool, job: Arc<Job>) {
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
        if f.entry.chunks.is_none() {
            // No chunk digest to fetch it by: a whole-only file is made whole again.
            return self.fetcher.ensure_whole(f).await.map_err(failed);
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
        let recorded = store.chunk_digests(&entry).map_err(failed)?;
        let layout = entry.layout();
        let mut bad_idx = Vec::new();
        let mut checked = 0;
        for idx in 0..layout.count() {
            let expected = match &entry.chunks {
                Some(c) => c[idx as usize],
                None => match recorded.get(&idx) {
                    Some(d) => *d,
                    None => continue,
                },
            };
            let (s2, e2) = (store.clone(), entry.clone());
            let data = tokio::task::spawn_blocking(move || s2.read_chunk(&e2, idx))
                .await
                .map_err(failed)?
                .map_err(failed)?;
            let Some(data) = data else { continue };
            checked += 1;
            progress.fetch_add(data.len() as u64, Ordering::Relaxed);
            let actual = tokio::task::spawn_blocking(move || Digest::of(&data))
                .await
                .map_err(failed)?;
            if actual != expected {
                tracing::error!(model = %f.model, file = %entry.path, chunk = idx, %expected, %actual,
                    "integrity failure: cached chunk is corrupt on disk");
                METRICS.integrity_failures.inc();
                bad_idx.push(idx);
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
        if entry.chunks.is_none() {
            // A whole-only file can only be re-fetched whole.
            self.evict_blob(entry.sha256)?;
            self.fetcher.ensure_whole(f).await.map_err(failed)?;
        } else {
            for idx in bad_idx {
                store.drop_chunk(&entry, idx).map_err(failed)?;
                self.refetch_stored(f, idx).await?;
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
                if !o.0.contains(id) {
                    o.0.push(id.clone());
                }
                o.1.push(format!("{id}/{}", f.entry.path));
                o.2 |= pinned;
            }
        }
        let mut candidates: Vec<_> = store
            .blobs()
            .into_iter()
            .filter(|b| b.cached_bytes > 0 || b.size == 0)
            .filter(|b| !owners.get(&b.digest).is_some_and(|o| o.2))
            .filter(|b| !b.open)
            .collect();
        // Least recently used first; blobs no model lists any more go before everything.
        candidates.sort_by_key(|b| (owners.contains_key(&b.digest), b.last_access));
        let cfg = self.cfg();
        let gc = &cfg.gc;
        let mut used = used_before;
        let mut free = free_pct;
        let mut removed = Vec::new();
        let mut freed = 0;
        for b in candidates {
            if mode == GcMode::Auto {
                let bytes_ok =
                    gc.max_bytes == 0 || (used as f64) <= gc.low_watermark * gc.max_bytes as f64;
                let free_target =
                    gc.min_free_percent + (gc.high_watermark - gc.low_watermark) * 100.0;
                let free_ok = gc.min_free_percent == 0.0 || free >= free_target;
                if bytes_ok && free_ok {
                    break;
                }
            }
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
            used = used.saturating_sub(b.cached_bytes);
            if fs_total > 0 {
                free += b.cached_bytes as f64 * 100.0 / fs_total as f64;
            }
            freed += b.cached_bytes;
            removed.push(GcItem {
                blob: b.digest.to_hex(),
                models,
                files,
                bytes: b.cached_bytes,
                last_access: b.last_access,
            });
        }
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
            used_after: if dry_run { used } else { used_after },
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
        (gc.max_bytes > 0 && used as f64 > gc.high_watermark * gc.max_bytes as f64)
            || (gc.min_free_percent > 0.0 && free_pct < gc.min_free_percent)
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
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        let _ = self.store().flush_access_times();
    }

    /// Downloads, failures, evictions and verifications per day over the last `days`.
    pub fn report_daily(&self, days: u64) -> Result<serde_json::Value, ControlError> {
        let since = now_secs().saturating_sub(days * 86400);
        let events = self
            .store()
            .index()
            .events(since, 1_000_000)
            .map_err(failed)?;
        let mut by_day: BTreeMap<String, BTreeMap<String, serde_json::Value>> = BTreeMap::new();
        for e in &events {
            let day = day_of(e.ts);
            let key = format!("{}_{}", e.kind.replace('-', "_"), e.status);
            let entry = by_day.entry(day).or_default();
            let slot = entry
                .entry(key)
                .or_insert_with(|| serde_json::json!({"count": 0, "bytes": 0}));
            slot["count"] = (slot["count"].as_u64().unwrap_or(0) + 1).into();
            slot["bytes"] = (slot["bytes"].as_u64().unwrap_or(0) + e.bytes).into();
        }
        Ok(serde_json::json!({ "since": since, "days": by_day }))
    }

    /// Storage use over the last `days`, from hourly samples, plus the current figure.
    pub fn report_storage(&self, days: u64) -> Result<serde_json::Value, ControlError> {
        let since = now_secs().saturating_sub(days * 86400);
        let samples = self
            .store()
            .index()
            .storage_samples(since)
            .map_err(failed)?;
        let mut by_day: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        for (ts, used, cap) in samples {
            let e = by_day.entry(day_of(ts)).or_insert((u64::MAX, 0, cap));
            e.0 = e.0.min(used);
            e.1 = e.1.max(used);
            e.2 = cap;
        }
        let (used, cap, free_pct) = self.usage();
        let per_model: BTreeMap<String, u64> = self
            .model_ids()
            .into_iter()
            .filter_map(|id| self.model_status(&id).ok().map(|s| (id, s.bytes_cached)))
            .collect();
        Ok(serde_json::json!({
            "since": since,
            "current": {"used_bytes": used, "capacity_bytes": cap, "free_percent": free_pct, "per_model": per_model},
            "days": by_day.into_iter().map(|(d, (min, max, cap))| (d, serde_json::json!({"min_used": min, "max_used": max, "capacity": cap}))).collect::<BTreeMap<_, _>>(),
        }))
    }
}

/// (total bytes, available bytes) of the filesystem holding `path`.
pub fn statvfs(path: &std::path::Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let frsize = st.fragment_size() as u64;
    Some((
        st.blocks() as u64 * frsize,
        st.blocks_available() as u64 * frsize,
    ))
}

/// `YYYY-MM-DD` (UTC) of a unix time.
pub fn day_of(ts: u64) -> String {
    chrono::DateTime::from_timestamp(ts.min(i64::MAX as u64) as i64, 0)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "out-of-range".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_masks() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_795_000_000), "2026-11-18");
        use crate::source::mask_url;
        assert_eq!(
            mask_url("https://u:p@host/x?sig=1"),
            "https://***@host/x?sig=***"
        );
        assert_eq!(mask_url("hf://org/repo@main"), "hf://org/repo@main");
    }

    #[test]
    fn gc_modes_parse() {
        assert_eq!("deep-clean".parse::<GcMode>().unwrap(), GcMode::DeepClean);
        assert!("everything".parse::<GcMode>().is_err());
    }
}
