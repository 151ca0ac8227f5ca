//! What is in force: the manifest's models with their file contexts, the inode tree laid out
//! from them, the configuration (and the sections a reload read but left for a restart), and
//! the peers, and the trust policy with each model's verdict. One [`InForce`] behind one [`InForceCell`]: a reload (`reload.rs`) builds the
//! next one whole, then swaps it in in one step, so every reader (a FUSE request, a control
//! request, a fetch asking its peers) sees the old or the new, never a mix. Nothing in an
//! `InForce` changes after it is built; it is shared, not copied (`Arc`s all the way down).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::chunk::Digest;
use crate::config::Config;
use crate::fetch::Peers;
use crate::file_ctx::FileCtx;
use crate::fs::Tree;
use crate::manifest::{Model, ModelId};
use crate::trust::gate::{ModelTrust, Policy};

/// The state a request is answered from.
pub struct InForce {
    /// The manifest file it was read from.
    pub manifest_path: PathBuf,
    /// The sha256 of that file's bytes, and per model a digest of everything its compiled
    /// form holds (`crate::compiled`): what a reload compares to rebuild only what changed.
    pub sha256: Digest,
    pub fingerprints: BTreeMap<ModelId, Digest>,
    /// The models, by id.
    pub models: BTreeMap<ModelId, Model>,
    /// Each model's files with their sources, by model id.
    pub files: BTreeMap<ModelId, Vec<Arc<FileCtx>>>,
    /// The inode tree laid out from `files`.
    pub tree: Arc<Tree>,
    /// The configuration in force: a reload applies `[gc]` and `[peers]` (and the manifest);
    /// what else it read waits for a restart, named in `pending_restart`.
    pub config: Arc<Config>,
    pub pending_restart: Vec<String>,
    /// The other daemons asked before the manifest's sources.
    pub peers: Arc<Peers>,
    /// `[trust]` with its anchors loaded, and each model's verdict under it (settled in the
    /// background after a mount or reload; see `crate::trust::gate`).
    pub policy: Arc<Policy>,
    pub trust: BTreeMap<ModelId, Arc<ModelTrust>>,
}

/// Where the [`InForce`] state lives: read by cloning its `Arc` (never held across a wait),
/// replaced whole by [`InForceCell::swap`].
pub struct InForceCell(RwLock<Arc<InForce>>);

impl InForceCell {
    pub fn new(first: InForce) -> Arc<InForceCell> {
        Arc::new(InForceCell(RwLock::new(Arc::new(first))))
    }

    /// What is in force now.
    pub fn get(&self) -> Arc<InForce> {
        self.0.read().unwrap().clone()
    }

    /// Puts `next` in force; returns what was.
    pub fn swap(&self, next: InForce) -> Arc<InForce> {
        std::mem::replace(&mut *self.0.write().unwrap(), Arc::new(next))
    }
}
