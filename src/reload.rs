//! SIGHUP: re-read the configuration and the manifest, build the next [`InForce`] whole, and
//! swap it in in one step, or refuse it and keep what is in force. Owns what a reload may
//! change (the models, their files and tree, `[gc]`, `[peers]`, `[trust]`), what it leaves for a restart
//! (named in `pending_restart`), and the size rule across reloads (a sha256 names one size).
//!
//! The next state reuses what did not change: a model whose compiled form is the same keeps
//! its file contexts (and so its inodes, open files and cached pages), an unchanged manifest
//! keeps its tree, unchanged peers keep their handles (and health).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::config::Config;
use crate::fetch::Peers;
use crate::file_ctx::file_contexts;
use crate::fs::Tree;
use crate::in_force::{InForce, InForceCell};
use crate::manifest::{Manifest, ModelId};
use crate::source::SourceRegistry;
use crate::store::Store;
use crate::system::{sd_notify, trim_heap};

/// What SIGHUP needs.
pub struct Reloader {
    /// Re-reads the config (file and environment) and the manifest path, as at start.
    pub reread: Box<dyn Fn() -> anyhow::Result<(Config, PathBuf)> + Send>,
    pub cache_dir: PathBuf,
    pub in_force: Arc<InForceCell>,
    pub sources: Arc<SourceRegistry>,
    pub store: Arc<Store>,
    /// Tells the kernel which entries a reload made stale.
    pub notifier: fuser::Notifier,
    /// Fetches the `model.sig` of each model whose verdict the reload must settle again.
    pub fetcher: Arc<crate::fetch::Fetcher>,
}

impl Reloader {
    /// New and removed models, sources and GC limits apply at once; a bad config or manifest
    /// is refused with a log line and what is in force stays. Also reopens the log file.
    pub fn reload(&self) {
        sd_notify("RELOADING=1");
        crate::logging::reopen();
        let now = self.in_force.get();
        match self.next(&now) {
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "reload refused: the running configuration and manifest stay in force"
            ),
            Ok(next) => {
                let (removed, stale) = if Arc::ptr_eq(&now.tree, &next.tree) {
                    (Vec::new(), Vec::new())
                } else {
                    (
                        now.tree.removed_models(&next.tree),
                        now.tree.stale_entries(&next.tree),
                    )
                };
                crate::metrics::register_models(next.models.keys().map(ModelId::as_str));
                let gc_threshold = next.config.gc.high_bytes();
                let (manifest, models) = (next.manifest_path.clone(), next.models.len());
                let unsettled: Vec<_> = next
                    .trust
                    .values()
                    .filter(|t| t.now().is_none())
                    .cloned()
                    .collect();
                drop(now);
                // From here every request sees the new state. The old one goes once the last
                // request that took it is answered.
                drop(self.in_force.swap(next));
                self.store.set_gc_threshold(gc_threshold);
                tokio::spawn(crate::trust::gate::settle_all(
                    unsettled,
                    self.fetcher.clone(),
                ));
                for (parent, name) in &stale {
                    // The kernel caches entries for an hour: forget removed or changed ones now.
                    if let Err(e) = self
                        .notifier
                        .inval_entry(fuser::INodeNo(*parent), std::ffi::OsStr::new(name))
                    {
                        tracing::debug!(entry = %name, error = %e, "could not invalidate a stale entry");
                    }
                }
                tracing::info!(
                    manifest = %manifest.display(),
                    models,
                    removed = ?removed,
                    "reloaded configuration and manifest"
                );
                trim_heap();
            }
        }
        sd_notify("READY=1");
    }

    /// The state to put in force after `now`, built whole; an error leaves `now` in force.
    fn next(&self, now: &InForce) -> anyhow::Result<InForce> {
        let (cfg, manifest_path) = (self.reread)()?;
        let compiled = crate::compiled::load(
            &manifest_path,
            &self.cache_dir,
            crate::compiled::CompileIn::Child,
            Some(&now.sha256),
        )?;
        refuse_size_conflicts(&self.store, &compiled.manifest, &manifest_path)?;
        let manifest = compiled.manifest;
        // Only models whose compiled form changed get new file contexts (and so new inodes
        // where content changed); the others keep theirs as they are.
        let changed = Manifest {
            models: manifest
                .models
                .iter()
                .filter(|(id, _)| {
                    now.fingerprints.get(*id) != compiled.fingerprints.get(*id)
                        || !now.files.contains_key(*id)
                })
                .map(|(id, m)| (id.clone(), m.clone()))
                .collect(),
        };
        let mut fresh = file_contexts(&changed, &self.sources);
        let files: std::collections::BTreeMap<_, _> = manifest
            .models
            .keys()
            .map(|id| {
                let kept = fresh.remove(id).or_else(|| now.files.get(id).cloned());
                (id.clone(), kept.unwrap_or_default())
            })
            .collect();
        tracing::debug!(
            changed = changed.models.len(),
            models = manifest.models.len(),
            "reload: models whose manifest entry changed"
        );
        // Not the hash alone: the same text moved to another directory resolves its
        // `local://` sources elsewhere, which changes fingerprints, not the hash.
        let unchanged = changed.models.is_empty() && now.files.keys().eq(manifest.models.keys());
        let tree = if unchanged {
            now.tree.clone()
        } else {
            Arc::new(Tree::build(&files, Some(&now.tree)))
        };
        let (config, pending_restart, peers) = self.next_config(now, &cfg);
        // `[trust]` applies on reload: new anchors are loaded whole (one that cannot be read
        // refuses the reload), and every verdict is settled again under them.
        let policy = if crate::trust::gate::same_policy(&now.config, &cfg) {
            now.policy.clone()
        } else {
            Arc::new(crate::trust::gate::policy_of(&cfg)?)
        };
        let trust = crate::trust::gate::trust_of(&files, &policy, Some(&now.trust));
        Ok(InForce {
            manifest_path,
            sha256: compiled.sha256,
            fingerprints: compiled.fingerprints,
            models: manifest.models,
            files,
            tree,
            config: Arc::new(config),
            pending_restart,
            peers,
            policy,
            trust,
        })
    }

    /// The configuration in force after a reload that read `read`: `[gc]` and `[peers]`
    /// apply, every other section keeps its running values and is named if it changed (it
    /// waits for a restart). Peers that cannot be set up keep the old ones, with an error.
    fn next_config(&self, now: &InForce, read: &Config) -> (Config, Vec<String>, Arc<Peers>) {
        let mut config = (*now.config).clone();
        let mut later = Vec::new();
        if config.fetch != read.fetch {
            later.push("[fetch]");
        }
        if config.mount != read.mount {
            later.push("[mount]");
        }
        if config.http != read.http {
            later.push("[http]");
        }
        if config.log != read.log {
            later.push("[log]");
        }
        if read.mountpoint.is_some() && config.mountpoint != read.mountpoint {
            later.push("mountpoint");
        }
        if read
            .cache_dir
            .as_ref()
            .is_some_and(|c| *c != self.cache_dir)
        {
            later.push("cache_dir");
        }
        if !later.is_empty() {
            tracing::warn!(
                sections = %later.join(", "),
                "reload: these changes apply at the next restart; the running values stay in force"
            );
        }
        config.gc = read.gc.clone();
        // Applied by `next` (its anchors loaded there, or the reload refused).
        config.trust = read.trust.clone();
        let mut peers = now.peers.clone();
        if config.peers != read.peers {
            match peers_of(&self.sources, read) {
                Ok(new) => {
                    tracing::info!(peers = new.handles.len(), "reload: peers replaced");
                    peers = Arc::new(new);
                    config.peers = read.peers.clone();
                }
                Err(e) => tracing::error!(error = %format!("{e:#}"),
                    "reload: the new peers could not be set up; the old ones stay in force"),
            }
        }
        (config, later.into_iter().map(String::from).collect(), peers)
    }
}

/// The handles of the configured peers; they send the fleet's token (`http.token_env`).
pub fn peers_of(sources: &SourceRegistry, cfg: &Config) -> anyhow::Result<Peers> {
    let token = std::env::var(&cfg.http.token_env)
        .ok()
        .filter(|t| !t.is_empty());
    Ok(Peers {
        handles: sources.peers(&cfg.peers, token)?,
        cooldown: cfg.peers.cooldown(),
    })
}

/// A file of a manifest whose blob the cache holds at another size (see
/// [`crate::store::StoreError::SizeConflict`]).
struct SizeConflict {
    model: ModelId,
    path: String,
    sha256: crate::chunk::Digest,
    cached: u64,
    listed: u64,
}

fn size_conflicts(store: &Store, manifest: &Manifest) -> Vec<SizeConflict> {
    manifest
        .models
        .values()
        .flat_map(|m| m.files.iter().map(move |f| (m, f)))
        .filter_map(|(m, f)| {
            Some(SizeConflict {
                cached: store.size_conflict(f)?,
                model: m.id.clone(),
                path: f.path.clone(),
                sha256: f.sha256,
                listed: f.size,
            })
        })
        .collect()
}

/// At start (nothing is open yet), the manifest in force wins over the cache: a blob held at
/// a size the manifest does not list is dropped and fetched again as listed. Each is logged.
pub fn drop_stale_sizes(store: &Store, manifest: &Manifest) -> anyhow::Result<()> {
    for c in size_conflicts(store, manifest) {
        tracing::warn!(
            model = %crate::logging::untrusted(&c.model),
            file = %crate::logging::untrusted(&c.path),
            blob = %c.sha256,
            cached = c.cached,
            listed = c.listed,
            "the cache holds this sha256 at another size than the manifest lists; the cached blob is dropped"
        );
        store
            .evict(c.sha256)
            .with_context(|| format!("dropping blob {} (cached at another size)", c.sha256))?;
    }
    Ok(())
}

/// Refuses a reload whose manifest lists a sha256 the cache holds at another size: an open
/// file may be reading that blob, and a sha256 names one content of one size. Names every
/// such file.
fn refuse_size_conflicts(store: &Store, manifest: &Manifest, path: &Path) -> anyhow::Result<()> {
    let conflicts = size_conflicts(store, manifest);
    if conflicts.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = conflicts
        .iter()
        .take(10)
        .map(|c| {
            format!(
                "model {} file {}: size {}, but the cache holds sha256 {} with {} bytes",
                crate::logging::untrusted(&c.model),
                crate::logging::untrusted(&c.path),
                c.listed,
                c.sha256,
                c.cached
            )
        })
        .collect();
    bail!(
        "{}: {} file(s) disagree with the cache on a sha256's size (a sha256 names one content \
         of one size): {}{}",
        path.display(),
        conflicts.len(),
        lines.join("; "),
        if conflicts.len() > 10 { "; …" } else { "" }
    )
}
