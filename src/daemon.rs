//! Wiring for `wan mount`: config, manifest, store, sources, fetcher, what is in force,
//! filesystem, FUSE session, signals and shutdown. Owns the process lifecycle, no filesystem
//! logic; what a reload changes is `reload.rs`'s, what the host is asked `system.rs`'s.
//!
//! `Services::builder` is the one place the parts a cache is worked with are wired (the CLI's
//! no-daemon backend uses it through `Services::build`, tests/reftest.rs with an in-memory
//! origin); `serve` mounts them and runs the endpoint, reload and background loops until a
//! shutdown future resolves; `run` is `wan mount`: both, with SIGTERM/SIGINT as shutdown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::chunk::Digest;
use crate::config::Config;
use crate::control::Control;
use crate::fetch::{Fetcher, Peers};
use crate::file_ctx::file_contexts;
use crate::fs::{ModelFs, Tree};
use crate::fuse::{FuseAdapter, Unmounter, manifest_mtime};
use crate::in_force::{InForce, InForceCell};
use crate::manifest::{Manifest, ModelId};
use crate::reload::{Reloader, drop_stale_sizes, peers_of};
use crate::source::SourceRegistry;
use crate::store::Store;
use crate::system::{
    check_mountpoint, detach, mount_error, raise_read_ahead, sd_notify, trim_heap,
    wait_until_answering,
};

/// Everything `wan mount` needs, resolved from flags and the config file.
pub struct MountPlan {
    pub mountpoint: PathBuf,
    pub manifest: PathBuf,
    pub cache_dir: PathBuf,
    pub config: Config,
    /// Re-reads config (file + env) and the manifest path, as at start (SIGHUP).
    pub reread: Box<dyn Fn() -> anyhow::Result<(Config, PathBuf)> + Send>,
}

/// What a cache needs to be served or worked on: the store, the sources, the fetcher over
/// them, what is in force (every model's files, the tree, the config, the peers) and the
/// `Control` vocabulary over all of it. Built the same way by the daemon and by the CLI when
/// no daemon runs (`cmd.rs`).
pub struct Services {
    pub store: Arc<Store>,
    pub sources: Arc<SourceRegistry>,
    pub fetcher: Arc<Fetcher>,
    pub in_force: Arc<InForceCell>,
    pub control: Arc<Control>,
}

impl Services {
    /// Opens the cache (a [`crate::store::StoreError`] when it cannot, `Locked` included) and
    /// builds everything over it. `mountpoint` is where the daemon mounts (None for the CLI).
    /// Must be called within a tokio runtime: the fetcher spawns on it.
    pub fn build(
        manifest: &Manifest,
        manifest_path: &Path,
        cache_dir: &Path,
        cfg: &Config,
        mountpoint: Option<PathBuf>,
    ) -> anyhow::Result<Services> {
        Services::builder(manifest, cache_dir)
            .manifest_path(manifest_path)
            .config(cfg)
            .mountpoint(mountpoint)
            .build()
    }

    /// The one place the parts are wired: the daemon and the CLI through [`Services::build`],
    /// tests (tests/reftest.rs) with their own sources, so a test runs the daemon's wiring
    /// and cannot drift from it.
    pub fn builder<'a>(manifest: &'a Manifest, cache_dir: &Path) -> ServicesBuilder<'a> {
        ServicesBuilder {
            manifest,
            cache_dir: cache_dir.to_path_buf(),
            manifest_path: PathBuf::new(),
            config: Config::default(),
            mountpoint: None,
            sources: None,
            compiled: None,
            peers: false,
        }
    }

    /// The filesystem over these services, as [`serve`] mounts it: the inode tree in force,
    /// read-ahead and passthrough as `cfg` says, `mtime` for the directories.
    pub fn filesystem(
        &self,
        rt: tokio::runtime::Handle,
        cfg: &Config,
        mtime: std::time::SystemTime,
    ) -> Arc<ModelFs> {
        Arc::new(ModelFs::new(
            self.in_force.clone(),
            self.fetcher.clone(),
            self.control.clone(),
            rt,
            cfg.fetch.readahead_chunks,
            mtime,
            cfg.mount.passthrough,
            cfg.mount.warm_readahead,
        ))
    }
}

/// What [`Services`] are built from; [`Services::builder`] makes one with the defaults: an
/// empty manifest path, the default configuration, no mountpoint, and each model's sources
/// as its manifest lists them.
pub struct ServicesBuilder<'a> {
    manifest: &'a Manifest,
    cache_dir: PathBuf,
    manifest_path: PathBuf,
    config: Config,
    mountpoint: Option<PathBuf>,
    sources: Option<Vec<Arc<crate::source::SourceHandle>>>,
    /// The manifest file's sha256 and per-model fingerprints, where it came from a compiled
    /// form: what a reload compares with.
    compiled: Option<(Digest, BTreeMap<ModelId, Digest>)>,
    /// Whether the configured peers are asked (the daemon); the CLI and tests ask none.
    peers: bool,
}

impl ServicesBuilder<'_> {
    /// The manifest file `manifest` was read from (status shows it; a reload re-reads it).
    pub fn manifest_path(mut self, path: &Path) -> Self {
        self.manifest_path = path.to_path_buf();
        self
    }

    pub fn config(mut self, cfg: &Config) -> Self {
        self.config = cfg.clone();
        self
    }

    /// Where the daemon mounts (None for the CLI and tests).
    pub fn mountpoint(mut self, mountpoint: Option<PathBuf>) -> Self {
        self.mountpoint = mountpoint;
        self
    }

    /// The sha256 and fingerprints of the compiled form `manifest` came from (see
    /// [`crate::compiled::Compiled`]), so a reload rebuilds only what changed.
    pub fn compiled(mut self, sha256: Digest, fingerprints: BTreeMap<ModelId, Digest>) -> Self {
        self.compiled = Some((sha256, fingerprints));
        self
    }

    /// The peers of the configuration (`[peers]`) are asked before the manifest's sources.
    pub fn with_peers(mut self) -> Self {
        self.peers = true;
        self
    }

    /// Every model is fetched from `sources`, in this order, whatever its manifest lists:
    /// the seam through which a test puts an in-memory origin (`source::mock`) under the
    /// daemon's wiring, as mountpoint-s3 builds its filesystem over a mock client.
    pub fn sources(mut self, sources: Vec<Arc<crate::source::SourceHandle>>) -> Self {
        self.sources = Some(sources);
        self
    }

    /// Opens the cache (a [`crate::store::StoreError`] when it cannot, `Locked` included)
    /// and builds everything over it. At start the manifest wins over the cache: a blob held
    /// at a size it does not list is dropped. Must be called within a tokio runtime: the
    /// fetcher spawns on it.
    pub fn build(self) -> anyhow::Result<Services> {
        let cfg = &self.config;
        let store = Arc::new(Store::open(&self.cache_dir)?);
        // Compressed OCI layers unpack next to the cache, not in a temp dir that may be RAM.
        crate::source::oci_packed::spool_in(&self.cache_dir);
        drop_stale_sizes(&store, self.manifest)?;
        let mut sources = SourceRegistry::new(&cfg.fetch)?.with_oci(cfg.oci.clone());
        if let Some(fixed) = self.sources {
            sources = sources.with_sources(fixed);
        }
        let sources = Arc::new(sources);
        let files = file_contexts(self.manifest, &sources);
        let fetcher = Fetcher::new(store.clone(), cfg.fetch.clone());
        let peers = if self.peers {
            peers_of(&sources, cfg)?
        } else {
            Peers::default()
        };
        let (sha256, fingerprints) = self
            .compiled
            .unwrap_or_else(|| (Digest([0; 32]), BTreeMap::new()));
        let policy = Arc::new(crate::trust::gate::policy_of(cfg)?);
        let trust = crate::trust::gate::trust_of(&files, &policy, None);
        // Outboards travel with the manifest (docs/MANIFEST.md, "Outboards").
        if let Some(dir) = self.manifest_path.parent() {
            fetcher.outboards_from(dir.join("outboards"));
        }
        let in_force = InForceCell::new(InForce {
            manifest_path: self.manifest_path,
            sha256,
            fingerprints,
            models: self.manifest.models.clone(),
            tree: Arc::new(Tree::build(&files, None)),
            files,
            config: Arc::new(self.config.clone()),
            pending_restart: Vec::new(),
            peers: Arc::new(peers),
            policy,
            trust,
        });
        let now = in_force.clone();
        fetcher.peers_from(Box::new(move || now.get().peers.clone()));
        let control = Control::new(
            in_force.clone(),
            fetcher.clone(),
            sources.clone(),
            self.mountpoint,
        );
        Ok(Services {
            store,
            sources,
            fetcher,
            in_force,
            control,
        })
    }
}

/// Mounts and serves until SIGTERM/SIGINT or an external unmount.
pub fn run(plan: MountPlan) -> anyhow::Result<()> {
    // Chunk buffers are megabytes and short-lived: keep them in their own mappings so a freed
    // one goes back to the system at once (glibc would otherwise raise its mmap threshold and
    // keep them in arena memory), and cap the per-thread arenas. Bounded RSS is a promise.
    // SAFETY: mallopt only tunes the allocator; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    // The mountpoint and the FUSE device first: a wrong path is refused before the manifest is
    // compiled or the cache touched.
    let mountpoint = std::path::absolute(&plan.mountpoint)?;
    check_mountpoint(&mountpoint, plan.config.mount.allow_non_empty)?;
    // From its compiled form in the cache dir (a restart parses no TOML), else compiled now.
    let compiled = crate::compiled::load(
        &plan.manifest,
        &plan.cache_dir,
        crate::compiled::CompileIn::Child,
        None,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wan-io")
        .build()
        .context("starting the async runtime")?;
    let _enter = rt.enter();
    // Handlers first: a SIGTERM that arrives right after READY (systemd may send one at once)
    // must not meet the default disposition, which kills the process and leaves a dead mount.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: unmounting"),
            _ = int.recv() => tracing::info!("SIGINT: unmounting"),
        }
    };
    let services = Services::builder(&compiled.manifest, &plan.cache_dir)
        .manifest_path(&plan.manifest)
        .config(&plan.config)
        .mountpoint(Some(mountpoint.clone()))
        .compiled(compiled.sha256, compiled.fingerprints)
        .with_peers()
        .build()?;
    // What is in force holds the models; this copy was only needed to build it.
    drop(compiled.manifest);
    serve(&rt, services, plan, shutdown)?;
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    tracing::info!("stopped");
    Ok(())
}

/// Serves `services` at `plan.mountpoint` until `shutdown` resolves or the mount goes away:
/// the FUSE session, the HTTP endpoint, reload on SIGHUP, and the background loops (access
/// times, storage samples, GC on its interval and as soon as a commit crosses the high
/// watermark). Blocks; call within `rt`.
pub fn serve(
    rt: &tokio::runtime::Runtime,
    services: Services,
    plan: MountPlan,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let cfg = plan.config;
    // Before READY, like the shutdown signals: a SIGHUP must never meet the default disposition.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let fs = services.filesystem(rt.handle().clone(), &cfg, manifest_mtime(&plan.manifest));
    let Services {
        store,
        sources,
        in_force,
        control,
        fetcher: services_fetcher,
    } = services;
    store.set_gc_threshold(cfg.gc.high_bytes());
    let mountpoint = std::path::absolute(&plan.mountpoint)?;
    let http = if cfg.http.addr.is_empty() {
        None
    } else {
        let addr: std::net::SocketAddr = cfg.http.addr.parse()?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("binding the HTTP endpoint to {addr} (http.addr)"))?;
        Some(listener)
    };

    let is_root = nix::unistd::geteuid().is_root();
    let allow_other = cfg.mount.allow_other.unwrap_or(is_root);
    let mut fuse_cfg = fuser::Config::default();
    fuse_cfg.mount_options = vec![
        fuser::MountOption::FSName("wanfs".into()),
        fuser::MountOption::Subtype("wan".into()),
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoAtime,
        fuser::MountOption::DefaultPermissions,
    ];
    fuse_cfg.acl = if allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    fuse_cfg.n_threads = Some(cfg.mount.threads);
    let unmounter = Unmounter::default();
    let adapter = FuseAdapter::new(
        fs.clone(),
        rt.handle().clone(),
        cfg.mount.passthrough,
        unmounter.clone(),
    );
    let mut session = fuser::Session::new(adapter, &mountpoint, &fuse_cfg)
        .map_err(|e| mount_error(e, &mountpoint))?;
    unmounter.set(session.unmount_callable());
    let notifier = session.notifier();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    // A spawn that fails drops the session, which unmounts.
    let session_thread = std::thread::Builder::new()
        .name("wan-fuse".into())
        .spawn(move || {
            let r = session.run();
            let _ = done_tx.send(());
            r
        })?;
    raise_read_ahead(&mountpoint, cfg.mount.read_ahead_kb);
    if let Err(e) = wait_until_answering(&mountpoint) {
        // Exiting with the mount in place would leave it dead ("Transport endpoint is not
        // connected") for the next start or a human to clear.
        if let Err(u) = unmounter.unmount() {
            tracing::debug!(error = %u, "unmount after a failed start failed; detaching");
            let _ = detach(&mountpoint);
        }
        return Err(e);
    }
    let now = in_force.get();
    tracing::info!(
        mountpoint = %mountpoint.display(),
        models = now.models.len(),
        files = now.files.values().map(Vec::len).sum::<usize>(),
        bytes = now.files.values().flatten().map(|f| f.entry.size).sum::<u64>(),
        cache = %store.root().display(),
        "mounted"
    );
    trim_heap();

    sd_notify("READY=1");
    {
        // Blob files the index does not know (a lost or rebuilt index) are verified and
        // adopted in the background, so the mount is usable at once.
        let store = store.clone();
        let files = now.files.clone();
        rt.spawn_blocking(
            move || match store.adopt(files.values().flatten().map(|f| &f.entry)) {
                Ok(r) if r.blobs_adopted > 0 || r.chunks_bad > 0 => tracing::info!(
                    blobs = r.blobs_adopted,
                    chunks = r.chunks_verified,
                    bad = r.chunks_bad,
                    bytes = r.bytes,
                    "rebuilt index entries from blob files"
                ),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "could not adopt blob files into the index"),
            },
        );
    }

    // Every signed model's verdict, in the background: a read that comes first waits for its
    // own model's.
    rt.spawn(crate::trust::gate::settle_all(
        now.trust.values().cloned().collect(),
        services_fetcher.clone(),
    ));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let background = rt.spawn(control.clone().run_background(stopped(stop_rx.clone())));
    let server = http.map(|listener| {
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| cfg.http.addr.clone());
        tracing::info!(addr = %addr, "HTTP endpoint listening");
        rt.spawn(crate::http::serve(
            listener,
            control.clone(),
            cfg.http.clone(),
            stopped(stop_rx.clone()),
        ))
    });
    drop(now);
    let reloader = Reloader {
        reread: plan.reread,
        cache_dir: plan.cache_dir.clone(),
        in_force,
        sources,
        store,
        notifier,
        fetcher: services_fetcher,
    };
    rt.block_on(async {
        tokio::pin!(done_rx);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = &mut done_rx => { tracing::info!("unmounted from outside"); break }
                _ = hup.recv() => reloader.reload(),
            }
        }
    });
    // Reads the unmount cuts short fail from here on, which is no error of theirs or ours.
    fs.stop();
    crate::logging::stopping();
    sd_notify("STOPPING=1");
    let _ = stop_tx.send(true);
    rt.block_on(async {
        let _ = background.await;
        if let Some(s) = server {
            let _ = s.await;
        }
    });
    if let Err(e) = unmounter.unmount() {
        // Busy (files still open): detach lazily so the mountpoint is free at once; exiting
        // then closes the FUSE connection, and readers still holding files get errors.
        tracing::warn!(error = %e, "unmount failed; detaching the mount lazily");
        if let Err(e) = detach(&mountpoint) {
            tracing::error!(error = %format!("{e:#}"), "could not detach the mount");
        }
    }
    let t0 = std::time::Instant::now();
    while !session_thread.is_finished() && t0.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if session_thread.is_finished() {
        match session_thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "FUSE session ended with an error"),
            Err(_) => bail!("FUSE session thread panicked"),
        }
    } else {
        tracing::warn!("files are still open on the detached mount; exiting anyway");
    }
    Ok(())
}
