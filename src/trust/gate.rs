//! Each model's standing under the trust policy, and the gate every read and fetch of a model
//! passes: [`ModelTrust`] holds one model's verdict (unsigned, trusted with its signer and
//! each file's [`Plan`], or refused with the reason), settled once per model and policy by
//! fetching `model.sig`, verifying it ([`super::Anchors::verify`]) and binding it
//! ([`super::bind::bind`]). Built with what is in force (`crate::in_force`): a reload keeps
//! the verdict of a model whose files and policy did not change.
//!
//! Where it is asked: the filesystem (open and read; a refused model's reads fail with
//! EACCES), control (`ensure` and `verify` fetch nothing of a refused model), status, health
//! and metrics. Verdicts are settled in the background right after a mount or reload
//! ([`settle_all`]); a read that comes first waits for its model's.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use super::bind::{Plan, SIGNATURE_FILE, bind};
use super::{Anchors, Refusal, RefusalReason};
use crate::fetch::Fetcher;
use crate::file_ctx::FileCtx;
use crate::manifest::{ModelId, Verification};
use crate::metrics::METRICS;

/// The largest `model.sig` read: a statement lists every file, about 150 bytes each, so this
/// is room for several hundred thousand files; a larger one is refused unread.
pub const MAX_BUNDLE: u64 = 64 << 20;

/// The trust policy in force: `[trust]` with its anchors loaded.
pub struct Policy {
    /// `[trust] require_signature`: a model without `model.sig` is refused.
    pub require: bool,
    /// Keys, CA roots and keyless identities; a model's `model.sig` is checked only when
    /// there is at least one (else it is served as an unsigned model, and status says so).
    pub anchors: Anchors,
}

impl Policy {
    /// No `[trust]`: every model is served as its manifest entry says.
    pub fn none() -> Policy {
        Policy {
            require: false,
            anchors: Anchors::default(),
        }
    }
}

/// Where a model stands.
pub enum Standing {
    /// No `model.sig` (and none required), or no trust anchors configured to check it with.
    Unsigned { note: &'static str },
    /// Its signature verified and bound to its entry.
    Trusted {
        /// Who signed it (a key fingerprint or a certificate identity).
        signer: String,
        /// How each file (in the entry's order) is served.
        plans: Vec<Plan>,
        /// The files as they are served: a sha256-signed file listed with chunks is served
        /// whole-checked, so its context says `Verification::Whole`.
        files: Vec<Arc<FileCtx>>,
    },
    /// Refused: nothing of it is fetched or served.
    Refused(Refusal),
}

/// One model's verdict, settled once.
pub struct ModelTrust {
    id: ModelId,
    files: Vec<Arc<FileCtx>>,
    policy: Arc<Policy>,
    settled: OnceLock<Arc<Standing>>,
    /// One verification at a time; a second asker waits for it and takes its verdict.
    flight: tokio::sync::Mutex<()>,
    /// Why the last attempt could not settle (`model.sig` could not be fetched): shown in
    /// status, tried again by the next read.
    unavailable: Mutex<Option<Refusal>>,
    /// Shards-signed files whose bytes were checked against their shards.
    shards_ok: Mutex<std::collections::HashSet<String>>,
    /// Set when a trusted model's file turned out not to be what was signed (a shard that
    /// does not match): from then on the model is refused like one whose signature failed.
    broken: OnceLock<Refusal>,
}

/// What the gate says of one read, without waiting.
pub enum Gate {
    /// Serve it by this file context (its plan may make it whole-checked).
    Serve(Arc<FileCtx>),
    /// The model's verdict (or the file's shard check) is not settled yet: ask [`ModelTrust::gate`].
    Wait,
    Refused(Refusal),
}

/// Why [`ModelTrust::gate`] lets nothing through.
#[derive(Debug)]
pub enum GateError {
    /// Refused under the policy (EACCES).
    Refused(Refusal),
    /// `model.sig` could not be fetched; the next read tries again (EIO).
    Unavailable(Refusal),
    /// Fetching the file to check it whole failed (as a read's fetch fails).
    Fetch(crate::fetch::FetchError),
}

impl ModelTrust {
    /// `files` are `model`'s file contexts as in force, in the entry's order.
    pub fn new(id: &ModelId, files: &[Arc<FileCtx>], policy: &Arc<Policy>) -> ModelTrust {
        let me = ModelTrust {
            id: id.clone(),
            files: files.to_vec(),
            policy: policy.clone(),
            settled: OnceLock::new(),
            flight: tokio::sync::Mutex::new(()),
            unavailable: Mutex::new(None),
            shards_ok: Mutex::new(Default::default()),
            broken: OnceLock::new(),
        };
        let has_sig = me.signature().is_some();
        let now = match (has_sig, policy.require, policy.anchors.is_empty()) {
            (false, false, _) => Some(Standing::Unsigned {
                note: "no model.sig",
            }),
            (false, true, _) => Some(Standing::Refused(Refusal {
                reason: RefusalReason::Missing,
                detail: format!(
                    "[trust] require_signature is set and the entry lists no {SIGNATURE_FILE}"
                ),
            })),
            (true, false, true) => Some(Standing::Unsigned {
                note: "model.sig not checked: [trust] names no keys, CA roots or identities",
            }),
            (true, true, true) => Some(Standing::Refused(Refusal {
                reason: RefusalReason::Untrusted,
                detail: "[trust] require_signature is set but names no keys, CA roots or \
                         identities to check model.sig with"
                    .into(),
            })),
            (true, _, false) => None,
        };
        if let Some(s) = now {
            me.settle(s);
        }
        me
    }

    /// Whether this verdict can be kept for `model` with `files` under `policy` (a reload).
    pub fn same(&self, id: &ModelId, files: &[Arc<FileCtx>], policy: &Arc<Policy>) -> bool {
        Arc::ptr_eq(&self.policy, policy)
            && self.files.len() == files.len()
            && self.files.iter().zip(files).all(|(a, b)| Arc::ptr_eq(a, b))
            && self.id == *id
    }

    fn signature(&self) -> Option<&Arc<FileCtx>> {
        self.files.iter().find(|f| f.entry.path == SIGNATURE_FILE)
    }

    /// The verdict, if settled.
    pub fn now(&self) -> Option<Arc<Standing>> {
        self.settled.get().cloned()
    }

    /// Why the model is refused, if it is (its signature, or a file found not to be what
    /// was signed).
    pub fn refusal(&self) -> Option<Refusal> {
        if let Some(r) = self.broken.get() {
            return Some(r.clone());
        }
        match self.settled.get().map(|s| &**s) {
            Some(Standing::Refused(r)) => Some(r.clone()),
            _ => None,
        }
    }

    /// The gate of a read of `file` (one of this model's, as in force), without waiting.
    pub fn gate_now(&self, file: &Arc<FileCtx>) -> Gate {
        if file.entry.path == SIGNATURE_FILE {
            // The bundle itself is public: an operator may read it to see why a model is
            // refused.
            return Gate::Serve(file.clone());
        }
        if let Some(r) = self.refusal() {
            return Gate::Refused(r);
        }
        let Some(standing) = self.now() else {
            return Gate::Wait;
        };
        match &*standing {
            Standing::Unsigned { .. } => Gate::Serve(file.clone()),
            Standing::Refused(r) => Gate::Refused(r.clone()),
            Standing::Trusted { plans, files, .. } => {
                let Some(i) = files.iter().position(|f| f.entry.path == file.entry.path) else {
                    return Gate::Serve(file.clone());
                };
                if matches!(plans[i], Plan::Shards(_))
                    && !self.shards_ok.lock().unwrap().contains(&file.entry.path)
                {
                    return Gate::Wait;
                }
                Gate::Serve(files[i].clone())
            }
        }
    }

    /// The gate of a read of `file`: settles the model's verdict first (fetching
    /// `model.sig`), and checks a shards-signed file whole (fetching it) before its first byte.
    pub async fn gate(
        &self,
        file: &Arc<FileCtx>,
        fetcher: &Arc<Fetcher>,
    ) -> Result<Arc<FileCtx>, GateError> {
        loop {
            match self.gate_now(file) {
                Gate::Serve(f) => return Ok(f),
                Gate::Refused(r) => return Err(GateError::Refused(r)),
                Gate::Wait => {}
            }
            let standing = self
                .resolve(fetcher)
                .await
                .map_err(GateError::Unavailable)?;
            if let Standing::Trusted { plans, files, .. } = &*standing
                && let Some(i) = files.iter().position(|f| f.entry.path == file.entry.path)
                && let Plan::Shards(shards) = &plans[i]
            {
                self.check_shards(&files[i], shards.clone(), fetcher)
                    .await?;
            }
        }
    }

    /// Fetches a shards-signed file whole (checked against its `sha256` line) and checks each
    /// shard against its signed digest; a mismatch refuses the model.
    async fn check_shards(
        &self,
        file: &Arc<FileCtx>,
        shards: Arc<[super::bind::Shard]>,
        fetcher: &Arc<Fetcher>,
    ) -> Result<(), GateError> {
        let _one = self.flight.lock().await;
        if self.shards_ok.lock().unwrap().contains(&file.entry.path) || self.broken.get().is_some()
        {
            return Ok(());
        }
        let store = fetcher.store().clone();
        if !store.is_complete(&file.entry) {
            fetcher.ensure_whole(file).await.map_err(GateError::Fetch)?;
        }
        let entry = file.entry.clone();
        let checked = tokio::task::spawn_blocking(move || -> std::io::Result<Option<String>> {
            use sha2::Digest as _;
            use std::os::unix::fs::FileExt;
            let Some(fd) = store.reader(&entry, 0..entry.layout().count()) else {
                return Err(std::io::Error::other(
                    "the blob was evicted while being checked",
                ));
            };
            let mut buf = vec![0u8; 8 << 20];
            for sh in shards.iter() {
                let mut h = sha2::Sha256::new();
                let mut at = sh.start;
                while at < sh.end {
                    let n = ((sh.end - at) as usize).min(buf.len());
                    fd.read_exact_at(&mut buf[..n], at)?;
                    h.update(&buf[..n]);
                    at += n as u64;
                }
                let got = crate::chunk::Digest(h.finalize().into());
                if got != sh.digest {
                    return Ok(Some(format!(
                        "file {:?}: bytes {}..{} hash to sha256 {got}, but the signed shard \
                         digest is {}",
                        entry.path, sh.start, sh.end, sh.digest
                    )));
                }
            }
            Ok(None)
        })
        .await
        .map_err(|e| GateError::Fetch(crate::fetch::FetchError::join(e)))?
        .map_err(|e| {
            GateError::Fetch(crate::fetch::FetchError::ReadBlob {
                blob: file.entry.sha256,
                err: Arc::new(e),
            })
        })?;
        match checked {
            None => {
                self.shards_ok
                    .lock()
                    .unwrap()
                    .insert(file.entry.path.clone());
                Ok(())
            }
            Some(detail) => {
                METRICS.integrity_failures.inc();
                let r = Refusal {
                    reason: RefusalReason::Mismatch,
                    detail,
                };
                METRICS
                    .trust_refusals
                    .with_label_values(&[r.reason.as_label()])
                    .inc();
                tracing::warn!(model = %self.id, reason = r.reason.as_label(),
                    detail = %crate::logging::untrusted(&r.detail),
                    "model refused: a file is not what was signed");
                let _ = self.broken.set(r.clone());
                Err(GateError::Refused(r))
            }
        }
    }

    /// Why the last try could not settle, while unsettled.
    pub fn unavailable(&self) -> Option<Refusal> {
        self.unavailable.lock().unwrap().clone()
    }

    fn settle(&self, s: Standing) -> Arc<Standing> {
        if let Standing::Refused(r) = &s {
            METRICS
                .trust_refusals
                .with_label_values(&[r.reason.as_label()])
                .inc();
            tracing::warn!(
                model = %self.id,
                reason = r.reason.as_label(),
                detail = %crate::logging::untrusted(&r.detail),
                "model refused: its signature does not let it be served"
            );
        }
        if let Standing::Trusted { signer, plans, .. } = &s {
            let whole = plans
                .iter()
                .filter(|p| matches!(p, Plan::Whole | Plan::Shards(_)))
                .count();
            tracing::info!(model = %self.id, signer = %signer, files_whole_checked = whole,
                "model signature verified");
        }
        let s = Arc::new(s);
        let _ = self.settled.set(s.clone());
        self.settled.get().cloned().unwrap_or(s)
    }

    /// The verdict, settling it first if needed (fetching `model.sig` through `fetcher`).
    /// `Err` only when `model.sig` could not be fetched: nothing is settled, the next call
    /// tries again.
    pub async fn resolve(&self, fetcher: &Arc<Fetcher>) -> Result<Arc<Standing>, Refusal> {
        if let Some(s) = self.now() {
            return Ok(s);
        }
        let _one = self.flight.lock().await;
        if let Some(s) = self.now() {
            return Ok(s);
        }
        let sig = self
            .signature()
            .expect("unsettled only with a model.sig")
            .clone();
        let bytes = match self.fetch_bundle(fetcher, &sig).await {
            Ok(b) => b,
            Err(Fetched::Refused(r)) => return Ok(self.settle(Standing::Refused(r))),
            Err(Fetched::Unavailable(r)) => {
                tracing::warn!(model = %self.id, error = %r.detail,
                    "model.sig could not be fetched: the model waits for it");
                *self.unavailable.lock().unwrap() = Some(r.clone());
                return Err(r);
            }
        };
        let (files, policy) = (self.files.clone(), self.policy.clone());
        let standing = tokio::task::spawn_blocking(move || judge(&files, &policy, &bytes))
            .await
            .unwrap_or_else(|e| {
                Standing::Refused(Refusal {
                    reason: RefusalReason::Invalid,
                    detail: format!("verifying model.sig failed: {e}"),
                })
            });
        *self.unavailable.lock().unwrap() = None;
        Ok(self.settle(standing))
    }

    async fn fetch_bundle(
        &self,
        fetcher: &Arc<Fetcher>,
        sig: &Arc<FileCtx>,
    ) -> Result<bytes::Bytes, Fetched> {
        let size = sig.entry.size;
        if size > MAX_BUNDLE {
            return Err(Fetched::Refused(Refusal {
                reason: RefusalReason::Invalid,
                detail: format!(
                    "{SIGNATURE_FILE} is {size} bytes, more than the {MAX_BUNDLE} a bundle may be"
                ),
            }));
        }
        let mut out = Vec::with_capacity(size as usize);
        while (out.len() as u64) < size {
            let want = (size - out.len() as u64).min(16 << 20) as u32;
            let b = fetcher
                .read(sig, out.len() as u64, want)
                .await
                .map_err(|e| {
                    Fetched::Unavailable(Refusal {
                        reason: RefusalReason::Unavailable,
                        detail: format!("{SIGNATURE_FILE} could not be fetched: {e}"),
                    })
                })?;
            if b.is_empty() {
                break;
            }
            out.extend_from_slice(&b);
        }
        Ok(out.into())
    }
}

enum Fetched {
    Refused(Refusal),
    Unavailable(Refusal),
}

/// Verifies `bundle` under `policy` and binds it to `model`: the verdict.
fn judge(files: &[Arc<FileCtx>], policy: &Policy, bundle: &[u8]) -> Standing {
    let signed = match policy.anchors.verify(bundle, SystemTime::now()) {
        Ok(s) => s,
        Err(r) => return Standing::Refused(r),
    };
    let entries: Vec<&crate::manifest::FileEntry> = files.iter().map(|f| &f.entry).collect();
    let plans = match bind(&entries, &signed.statement) {
        Ok(p) => p,
        Err(r) => return Standing::Refused(r),
    };
    let files = files
        .iter()
        .zip(&plans)
        .map(|(f, p)| match (p, &f.entry.verification) {
            (Plan::Whole | Plan::Shards(_), Verification::Chunked(_)) => {
                let mut entry = f.entry.clone();
                entry.verification = Verification::Whole;
                Arc::new(FileCtx {
                    model: f.model.clone(),
                    entry,
                    sources: f.sources.clone(),
                })
            }
            _ => f.clone(),
        })
        .collect();
    Standing::Trusted {
        signer: signed.signer.to_string(),
        plans,
        files,
    }
}

/// Settles every model of `trust` that is not yet, a few at a time, in the background: run
/// right after a mount or a reload so that status shows verdicts before any read asks.
pub async fn settle_all(trust: Vec<Arc<ModelTrust>>, fetcher: Arc<Fetcher>) {
    use futures::StreamExt;
    futures::stream::iter(trust.into_iter().filter(|t| t.now().is_none()))
        .for_each_concurrent(8, |t| {
            let fetcher = fetcher.clone();
            async move {
                let _ = t.resolve(&fetcher).await;
            }
        })
        .await;
}

/// Each model's verdict under `policy` (`files`: every model's file contexts, as in force),
/// keeping those of `prev` whose files did not change (a reload re-verifies only what it must).
pub fn trust_of(
    files: &std::collections::BTreeMap<ModelId, Vec<Arc<FileCtx>>>,
    policy: &Arc<Policy>,
    prev: Option<&std::collections::BTreeMap<ModelId, Arc<ModelTrust>>>,
) -> std::collections::BTreeMap<ModelId, Arc<ModelTrust>> {
    files
        .iter()
        .map(|(id, fs)| {
            let kept = prev
                .and_then(|p| p.get(id))
                .filter(|t| t.same(id, fs, policy))
                .cloned();
            (
                id.clone(),
                kept.unwrap_or_else(|| Arc::new(ModelTrust::new(id, fs, policy))),
            )
        })
        .collect()
}

/// `[trust]` of `cfg` with its anchors loaded; an anchor that cannot be read is an error
/// naming its file.
pub fn policy_of(cfg: &crate::config::Config) -> anyhow::Result<Policy> {
    Ok(Policy {
        require: cfg.trust.require_signature,
        anchors: Anchors::load(&cfg.trust).map_err(|e| anyhow::anyhow!("[trust]: {e}"))?,
    })
}

/// Whether a reload from `now` to `read` leaves `[trust]` as it is (then its anchors, and
/// every unchanged model's verdict, are kept).
pub fn same_policy(now: &crate::config::Config, read: &crate::config::Config) -> bool {
    now.trust == read.trust
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkHash, Digest};
    use crate::manifest::FileEntry;

    fn files(names: &[&str]) -> Vec<Arc<FileCtx>> {
        names
            .iter()
            .map(|n| {
                Arc::new(FileCtx {
                    model: ModelId::new("m@1.0.0").unwrap(),
                    entry: FileEntry {
                        path: n.to_string(),
                        size: 4,
                        sha256: Digest::of(n.as_bytes()),
                        chunk_size: 4096,
                        head_size: 4096,
                        chunk_hash: ChunkHash::Sha256,
                        verification: Verification::Whole,
                    },
                    sources: Vec::new(),
                })
            })
            .collect()
    }

    fn policy(require: bool, keys: bool) -> Arc<Policy> {
        let mut cfg = crate::trust::TrustConfig::default();
        if keys {
            cfg.keys = vec![
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/trust/p256.pub"),
            ];
        }
        Arc::new(Policy {
            require,
            anchors: Anchors::load(&cfg).unwrap(),
        })
    }

    fn standing(sig: bool, require: bool, keys: bool) -> Option<&'static str> {
        let names: &[&str] = if sig {
            &["a.bin", "model.sig"]
        } else {
            &["a.bin"]
        };
        let id = ModelId::new("m@1.0.0").unwrap();
        let t = ModelTrust::new(&id, &files(names), &policy(require, keys));
        t.now().map(|s| match &*s {
            Standing::Unsigned { note } => *note,
            Standing::Refused(r) => r.reason.as_label(),
            Standing::Trusted { .. } => "trusted",
        })
    }

    /// What a model's verdict is before anything is fetched: only a model with `model.sig`
    /// and anchors to check it with waits for its bundle.
    #[test]
    fn a_verdict_that_needs_no_bundle_is_settled_at_once() {
        assert_eq!(standing(false, false, false), Some("no model.sig"));
        assert_eq!(standing(false, false, true), Some("no model.sig"));
        assert_eq!(standing(false, true, true), Some("missing"));
        assert!(
            standing(true, false, false)
                .unwrap()
                .contains("not checked")
        );
        assert_eq!(standing(true, true, false), Some("untrusted"));
        assert_eq!(standing(true, false, true), None, "waits for its bundle");
        assert_eq!(standing(true, true, true), None, "waits for its bundle");
    }

    /// A refused model lets nothing through but its bundle; an unsigned one everything.
    #[test]
    fn the_gate_follows_the_verdict_and_always_serves_the_bundle() {
        let id = ModelId::new("m@1.0.0").unwrap();
        let fs = files(&["a.bin", "model.sig"]);
        let refused = ModelTrust::new(&id, &fs[..1], &policy(true, true));
        assert!(
            matches!(refused.gate_now(&fs[0]), Gate::Refused(r) if r.reason == RefusalReason::Missing)
        );
        let pending = ModelTrust::new(&id, &fs, &policy(false, true));
        assert!(matches!(pending.gate_now(&fs[0]), Gate::Wait));
        assert!(
            matches!(pending.gate_now(&fs[1]), Gate::Serve(_)),
            "model.sig is public"
        );
        let open = ModelTrust::new(&id, &fs[..1], &Arc::new(Policy::none()));
        assert!(matches!(open.gate_now(&fs[0]), Gate::Serve(f) if Arc::ptr_eq(&f, &fs[0])));
    }

    /// A reload keeps a verdict only for the same files under the same policy.
    #[test]
    fn a_verdict_is_kept_only_for_the_same_files_and_policy() {
        let id = ModelId::new("m@1.0.0").unwrap();
        let (fs, p) = (files(&["a.bin", "model.sig"]), policy(false, true));
        let mut all = std::collections::BTreeMap::new();
        all.insert(id.clone(), fs.clone());
        let first = trust_of(&all, &p, None);
        let again = trust_of(&all, &p, Some(&first));
        assert!(Arc::ptr_eq(&first[&id], &again[&id]));
        let other_policy = trust_of(&all, &policy(false, true), Some(&first));
        assert!(!Arc::ptr_eq(&first[&id], &other_policy[&id]));
        all.insert(id.clone(), files(&["a.bin", "model.sig"]));
        let new_files = trust_of(&all, &p, Some(&first));
        assert!(!Arc::ptr_eq(&first[&id], &new_files[&id]));
    }
}
