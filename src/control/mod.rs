//! One control vocabulary — status, health, ensure, verify, gc, pin, evict, mark-corrupted —
//! shared by the `.wan/` control files, the HTTP endpoint and the CLI, so no logic is written
//! twice. Each operation is one [`Request`], answered by [`Control::handle`] with plain serde
//! structs; the front ends only carry requests and render answers.
//!
//! Long work (ensure, verify, gc started from a control file or HTTP) runs as a background job;
//! `status` shows its progress. The CLI without a daemon asks the same requests in process.
//!
//! This file owns the [`Control`] handle, its errors, the catalog of models in force and
//! `status` (with pin, evict and mark-corrupted, which change what status shows). The rest is
//! split by what it owns: `request.rs` the vocabulary as data (the [`Request`] each front end
//! makes, its [`Response`] and `handle`, how to add an operation), `routes.rs` how a request
//! travels over HTTP (the one route table the server and the CLI use), `jobs.rs` the long work
//! (ensure, verify, GC and the background loop), `health.rs` the health checks, `report.rs`
//! events and the daily and storage reports. The GC policy itself (which blobs go) is pure and
//! lives in [`crate::store::gc`].

mod health;
mod jobs;
mod report;
pub mod request;
pub mod routes;

pub use health::{Check, Health, HealthStatus};
pub use jobs::{GcItem, GcReport, JobKind, JobState, JobStatus, Work};
pub use report::{DailyReport, StorageDay, StorageNow, StorageReport, Tally, day_of};
pub use request::{Request, Response, Selection};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::chunk::Digest;
use crate::config::Config;
use crate::fetch::{Fetcher, FileCtx};
use crate::in_force::{InForce, InForceCell};
use crate::manifest::ModelId;
use crate::metrics::METRICS;
use crate::source::{SourceRegistry, mask_url};
use crate::store::{CacheState, Store};
use jobs::Job;

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

pub use crate::store::gc::GcMode;

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

/// Where a model stands, as `status` shows it. Serialized as today's words (`NOT_PRESENT`, …),
/// which scripts and docs/CONTROL.md rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ModelState {
    /// Nothing cached.
    NotPresent,
    /// Some bytes cached, not every file complete.
    Partial,
    /// A verify job is running.
    Verifying,
    /// Every file complete.
    Complete,
    /// Found or marked corrupt; stays so until an ensure or verify completes the model.
    Corrupt,
    /// Refused under `[trust]` (its signature missing, invalid, untrusted or not matching
    /// the entry): listed, nothing of it fetched or served (reads fail with EACCES).
    Untrusted,
}

impl ModelState {
    /// The word in JSON and in `wan models status`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::NotPresent => "NOT_PRESENT",
            ModelState::Partial => "PARTIAL",
            ModelState::Verifying => "VERIFYING",
            ModelState::Complete => "COMPLETE",
            ModelState::Corrupt => "CORRUPT",
            ModelState::Untrusted => "UNTRUSTED",
        }
    }
}

impl std::fmt::Display for ModelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // pad, not write: tables align the word with `{:<12}`.
        f.pad(self.as_str())
    }
}

/// One model as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelStatus {
    pub id: ModelId,
    pub description: String,
    pub state: ModelState,
    pub pinned: bool,
    pub files: usize,
    pub files_complete: usize,
    pub bytes_total: u64,
    pub bytes_cached: u64,
    pub last_access: Option<u64>,
    pub last_verified: Option<u64>,
    pub last_error: Option<String>,
    pub job: Option<JobStatus>,
    /// Where the model stands under `[trust]`.
    #[serde(default)]
    pub trust: TrustStatus,
    /// Its files known to be packed in a compressed OCI layer (fetched whole at first read),
    /// `path: what it is packed in`; known once the source has listed the layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packed: Vec<String>,
}

/// A model's standing under `[trust]`, as status shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrustStatus {
    /// `unsigned`, `pending` (its `model.sig` not verified yet), `trusted` or `untrusted`.
    pub state: String,
    /// Who signed it (`key sha256:…`, `certificate CN=…`, `keyless …`), once trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
    /// Why it is refused (`missing`, `invalid`, `untrusted`, `mismatch`, `unsupported`), or
    /// why its verdict waits (`unavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Files fetched and checked whole before their first byte is served (signed with
    /// sha256, which binds no chunk list): `ensure` them ahead, or sign with BLAKE3.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub whole_checked_files: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub total: usize,
    pub complete: usize,
    pub partial: usize,
    pub not_present: usize,
    pub corrupt: usize,
    pub verifying: usize,
    #[serde(default)]
    pub untrusted: usize,
}

/// A chunk dropped as corrupt by a report-only verify: (file, chunk index).
type Quarantined = (Arc<FileCtx>, u64);

/// Everything the control plane needs; built once by the daemon (or the CLI).
pub struct Control {
    /// The models, their files and the configuration in force (swapped whole on reload).
    in_force: Arc<InForceCell>,
    fetcher: Arc<Fetcher>,
    sources: Arc<SourceRegistry>,
    mountpoint: Option<PathBuf>,
    jobs: Mutex<HashMap<ModelId, Arc<Job>>>,
    gc_running: tokio::sync::Mutex<()>,
    /// Chunks a report-only verify found corrupt and dropped, by model: the next repairing
    /// verify fetches them again (a read would too).
    quarantine: Mutex<HashMap<ModelId, Vec<Quarantined>>>,
}

impl Control {
    pub fn new(
        in_force: Arc<InForceCell>,
        fetcher: Arc<Fetcher>,
        sources: Arc<SourceRegistry>,
        mountpoint: Option<PathBuf>,
    ) -> Arc<Control> {
        crate::metrics::register_models(in_force.get().models.keys().map(ModelId::as_str));
        Arc::new(Control {
            in_force,
            fetcher,
            sources,
            mountpoint,
            jobs: Mutex::new(HashMap::new()),
            gc_running: tokio::sync::Mutex::new(()),
            quarantine: Mutex::new(HashMap::new()),
        })
    }

    /// The models, files and configuration in force: one snapshot, however long a request
    /// takes (a reload meanwhile is seen by the next one).
    fn cat(&self) -> Arc<InForce> {
        self.in_force.get()
    }

    /// The file context to fetch `f` by under `[trust]` (its model's verdict settled first),
    /// or why nothing of it may be fetched: the same gate the filesystem's reads pass.
    async fn gate_file(&self, f: &Arc<FileCtx>) -> Result<Arc<FileCtx>, crate::fs::FsError> {
        let Some(t) = self.cat().trust.get(&f.model).cloned() else {
            return Ok(f.clone());
        };
        t.gate(f, &self.fetcher)
            .await
            .map_err(crate::fs::FsError::from)
    }

    /// Where what is in force lives (the filesystem and the reload share it).
    pub fn in_force(&self) -> &Arc<InForceCell> {
        &self.in_force
    }

    fn cfg(&self) -> Arc<Config> {
        self.in_force.get().config.clone()
    }

    pub fn store(&self) -> &Arc<Store> {
        self.fetcher.store()
    }

    pub fn model_ids(&self) -> Vec<ModelId> {
        self.cat().models.keys().cloned().collect()
    }

    /// The models in force that `ids` (as asked: any strings) name, naming the first unknown
    /// one with a "did you mean"; an empty list means every model.
    pub fn resolve(&self, ids: &[impl AsRef<str>]) -> Result<Vec<ModelId>, ControlError> {
        if ids.is_empty() {
            return Ok(self.model_ids());
        }
        let mut out = Vec::new();
        let cat = self.cat();
        for id in ids {
            let id = id.as_ref().trim();
            let Some((id, _)) = cat.models.get_key_value(id) else {
                return Err(ControlError::unknown_model(
                    id,
                    cat.models.keys().map(ModelId::as_str),
                ));
            };
            if !out.contains(id) {
                out.push(id.clone());
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

    pub fn model_status(&self, id: &str) -> Result<ModelStatus, ControlError> {
        let cat = self.cat();
        let model = cat.models.get(id).ok_or_else(|| {
            ControlError::unknown_model(id, cat.models.keys().map(ModelId::as_str))
        })?;
        let store = self.store();
        let files = &cat.files[id];
        let mut cached = 0;
        let mut complete = 0;
        let mut last_access: Option<u64> = None;
        let mut packed = Vec::new();
        for f in files {
            if let Some(p) = f
                .sources
                .iter()
                .find_map(|s| s.source.packed(&f.entry.path))
            {
                packed.push(format!("{}: {p}", f.entry.path));
            }
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
            .is_some_and(|j| j.running() && j.status.lock().unwrap().kind == JobKind::Verify);
        let trust = self.trust_status(id);
        let state = if trust.state == "untrusted" {
            ModelState::Untrusted
        } else if verifying {
            ModelState::Verifying
        } else if row.corrupt {
            ModelState::Corrupt
        } else if complete == files.len() {
            ModelState::Complete
        } else if cached > 0 {
            ModelState::Partial
        } else {
            ModelState::NotPresent
        };
        Ok(ModelStatus {
            id: model.id.clone(),
            description: model.description.clone(),
            state,
            pinned: row.pinned.unwrap_or(model.pinned),
            files: files.len(),
            files_complete: complete,
            bytes_total: files.iter().map(|f| f.entry.size).sum(),
            bytes_cached: cached,
            last_access,
            last_verified: row.last_verified,
            last_error: row.last_error,
            job: job.map(|j| j.snapshot()),
            trust,
            packed,
        })
    }

    /// Where model `id` stands under `[trust]`.
    fn trust_status(&self, id: &str) -> TrustStatus {
        use crate::trust::bind::Plan;
        use crate::trust::gate::Standing;
        let Some(t) = self.cat().trust.get(id).cloned() else {
            return TrustStatus {
                state: "unsigned".into(),
                ..Default::default()
            };
        };
        if let Some(r) = t.refusal() {
            return TrustStatus {
                state: "untrusted".into(),
                reason: Some(r.reason.as_label().into()),
                detail: Some(r.detail),
                ..Default::default()
            };
        }
        match t.now().as_deref() {
            None => {
                let waiting = t.unavailable();
                TrustStatus {
                    state: "pending".into(),
                    reason: waiting.as_ref().map(|r| r.reason.as_label().into()),
                    detail: waiting.map(|r| r.detail),
                    ..Default::default()
                }
            }
            Some(Standing::Unsigned { note }) => TrustStatus {
                state: "unsigned".into(),
                detail: Some((*note).into()),
                ..Default::default()
            },
            Some(Standing::Refused(_)) => unreachable!("refusal() above"),
            Some(Standing::Trusted { signer, plans, .. }) => TrustStatus {
                state: "trusted".into(),
                signed_by: Some(signer.clone()),
                whole_checked_files: plans
                    .iter()
                    .filter(|p| matches!(p, Plan::Whole | Plan::Shards(_)))
                    .count(),
                ..Default::default()
            },
        }
    }

    /// Sets `wan_models_untrusted` from what is in force (called as metrics are read).
    pub fn count_untrusted(&self) {
        use crate::trust::RefusalReason;
        let mut n = std::collections::HashMap::new();
        for t in self.cat().trust.values() {
            if let Some(r) = t.refusal() {
                *n.entry(r.reason).or_insert(0i64) += 1;
            }
        }
        for reason in RefusalReason::ALL {
            METRICS
                .models_untrusted
                .with_label_values(&[reason.as_label()])
                .set(n.get(&reason).copied().unwrap_or(0));
        }
    }

    /// Status of the given models (all if empty).
    pub fn status(&self, ids: &[String]) -> Result<Vec<ModelStatus>, ControlError> {
        self.resolve(ids)?
            .iter()
            .map(|id| self.model_status(id))
            .collect()
    }

    pub fn summary(&self, models: &[ModelStatus]) -> Summary {
        let count = |s: ModelState| models.iter().filter(|m| m.state == s).count();
        Summary {
            total: models.len(),
            complete: count(ModelState::Complete),
            partial: count(ModelState::Partial),
            not_present: count(ModelState::NotPresent),
            corrupt: count(ModelState::Corrupt),
            verifying: count(ModelState::Verifying),
            untrusted: count(ModelState::Untrusted),
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
        METRICS.storage_capacity.set(cap as i64);
        (used, cap, free_pct)
    }

    /// The configuration in force, secrets masked (only env var names are ever stored), and
    /// under `pending_restart` the sections a reload read but could not apply.
    pub fn config_view(&self) -> serde_json::Value {
        let now = self.cat();
        let cfg = &now.config;
        let mut v = serde_json::to_value(&**cfg).unwrap_or_default();
        v["manifest"] = serde_json::json!(now.manifest_path.display().to_string());
        v["pending_restart"] = serde_json::json!(now.pending_restart);
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
            now.models
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

    /// Pins or unpins a model (persisted; overrides the manifest's `pinned`).
    pub fn set_pinned(&self, id: &str, pinned: bool) -> Result<ModelStatus, ControlError> {
        let id = &self.resolve(&[id])?[0];
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
    fn blobs_of(&self, id: &ModelId) -> Vec<(Arc<FileCtx>, bool)> {
        let mut seen = HashSet::new();
        let cat = self.cat();
        let shared_pinned: HashSet<Digest> = cat
            .files
            .iter()
            .filter(|(m, _)| *m != id && self.pinned(m))
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
        let id = &self.resolve(&[id])?[0];
        if self.job(id).is_some_and(|j| j.running()) {
            return Err(ControlError::Busy(id.to_string(), "a job".into()));
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
    pub fn mark_corrupted(&self, ids: &[impl AsRef<str>]) -> Result<Vec<ModelId>, ControlError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_modes_parse() {
        assert_eq!("deep-clean".parse::<GcMode>().unwrap(), GcMode::DeepClean);
        assert!("everything".parse::<GcMode>().is_err());
    }

    /// The words are the JSON API (scripts, tests and docs/CONTROL.md match on them): each enum
    /// writes exactly the string it replaced, reads it back, and prints it as `as_str` does.
    #[test]
    fn the_vocabulary_serializes_as_its_words() {
        fn word<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
            v: T,
            w: &str,
        ) {
            assert_eq!(serde_json::to_value(&v).unwrap(), w);
            assert_eq!(serde_json::from_value::<T>(w.into()).unwrap(), v);
        }
        for (s, w) in [
            (ModelState::NotPresent, "NOT_PRESENT"),
            (ModelState::Partial, "PARTIAL"),
            (ModelState::Verifying, "VERIFYING"),
            (ModelState::Complete, "COMPLETE"),
            (ModelState::Corrupt, "CORRUPT"),
            (ModelState::Untrusted, "UNTRUSTED"),
        ] {
            word(s, w);
            assert_eq!(format!("{s:<12}|"), format!("{w:<12}|"));
        }
        for (s, w) in [
            (JobState::Running, "running"),
            (JobState::Done, "done"),
            (JobState::Failed, "failed"),
        ] {
            word(s, w);
            assert_eq!(s.as_str(), w);
        }
        for (k, w) in [(JobKind::Ensure, "ensure"), (JobKind::Verify, "verify")] {
            word(k, w);
            assert_eq!(k.to_string(), w);
        }
        word(HealthStatus::Healthy, "healthy");
        word(HealthStatus::Degraded, "degraded");
        word(HealthStatus::Unhealthy, "unhealthy");
        for m in [GcMode::Auto, GcMode::Aggressive, GcMode::DeepClean] {
            word(m, m.as_str());
            assert_eq!(m.as_str().parse::<GcMode>().unwrap(), m);
        }
    }
}
