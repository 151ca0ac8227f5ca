//! Wiring for `wan mount`: config, manifest, store, sources, fetcher, filesystem, FUSE session,
//! signals and shutdown. Owns the process lifecycle, no filesystem logic.
//!
//! `Services::builder` is the one place the parts a cache is worked with are wired (the CLI's
//! no-daemon backend uses it through `Services::build`, tests/reftest.rs with an in-memory
//! origin); `serve` mounts them and runs the endpoint, reload and background loops until a
//! shutdown future resolves; `run` is `wan mount`: both, with SIGTERM/SIGINT as shutdown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::config::Config;
use crate::control::Control;
use crate::fetch::Fetcher;
use crate::file_ctx::{FileCtx, file_contexts};
use crate::fs::{ModelFs, Tree};
use crate::fuse::{FuseAdapter, Unmounter, manifest_mtime};
use crate::manifest::Manifest;
use crate::source::SourceRegistry;
use crate::store::Store;

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
/// them, the file contexts of every model and the `Control` vocabulary over all of it. Built
/// the same way by the daemon and by the CLI when no daemon runs (`cmd.rs`).
pub struct Services {
    pub store: Arc<Store>,
    pub sources: Arc<SourceRegistry>,
    pub fetcher: Arc<Fetcher>,
    pub files: BTreeMap<String, Vec<Arc<FileCtx>>>,
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
        }
    }

    /// The filesystem over these services, as [`serve`] mounts it: the inode tree of every
    /// model, read-ahead and passthrough as `cfg` says, `mtime` for the directories.
    pub fn filesystem(
        &self,
        rt: tokio::runtime::Handle,
        cfg: &Config,
        mtime: std::time::SystemTime,
    ) -> Arc<ModelFs> {
        Arc::new(ModelFs::new(
            Tree::build(&self.files, None),
            self.fetcher.clone(),
            self.control.clone(),
            rt,
            cfg.fetch.readahead_chunks,
            mtime,
            cfg.mount.passthrough,
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
        drop_stale_sizes(&store, self.manifest)?;
        let mut sources = SourceRegistry::new(&cfg.fetch)?;
        if let Some(fixed) = self.sources {
            sources = sources.with_sources(fixed);
        }
        let sources = Arc::new(sources);
        let files = file_contexts(self.manifest, &sources);
        let fetcher = Fetcher::new(store.clone(), cfg.fetch.clone());
        let control = Control::new(
            self.manifest,
            self.manifest_path,
            files.clone(),
            fetcher.clone(),
            sources.clone(),
            self.config.clone(),
            self.mountpoint,
        );
        Ok(Services {
            store,
            sources,
            fetcher,
            files,
            control,
        })
    }
}

/// A file of a manifest whose blob the cache holds at another size (see
/// [`crate::store::StoreError::SizeConflict`]).
struct SizeConflict {
    model: String,
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
fn drop_stale_sizes(store: &Store, manifest: &Manifest) -> anyhow::Result<()> {
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
    let services = Services::build(
        &compiled.manifest,
        &plan.manifest,
        &plan.cache_dir,
        &plan.config,
        Some(mountpoint.clone()),
    )?;
    serve(&rt, services, plan, compiled, shutdown)?;
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    tracing::info!("stopped");
    Ok(())
}

/// Serves `services` at `plan.mountpoint` until `shutdown` resolves or the mount goes away:
/// the FUSE session, the HTTP endpoint, reload on SIGHUP, and the background loops (access
/// times, storage samples, GC on its interval and as soon as a commit crosses the high
/// watermark). `compiled` is the manifest `services` were built from. Blocks; call within
/// `rt`.
pub fn serve(
    rt: &tokio::runtime::Runtime,
    services: Services,
    plan: MountPlan,
    compiled: crate::compiled::Compiled,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let cfg = plan.config;
    // Before READY, like the shutdown signals: a SIGHUP must never meet the default disposition.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let manifest = compiled.manifest;
    let fs = services.filesystem(rt.handle().clone(), &cfg, manifest_mtime(&plan.manifest));
    let Services {
        store,
        sources,
        fetcher,
        files,
        control,
    } = services;
    fetcher.set_peers(peer_handles(&sources, &cfg)?, cfg.peers.cooldown());
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
    tracing::info!(
        mountpoint = %mountpoint.display(),
        models = manifest.models.len(),
        files = manifest.file_count(),
        bytes = manifest.total_bytes(),
        cache = %store.root().display(),
        "mounted"
    );
    // The catalog holds the models; this copy was only needed to build it.
    drop(manifest);
    trim_heap();

    sd_notify("READY=1");
    {
        // Blob files the index does not know (a lost or rebuilt index) are verified and
        // adopted in the background, so the mount is usable at once.
        let store = store.clone();
        let files = files.clone();
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
    let reloader = Reloader {
        reread: plan.reread,
        cache_dir: plan.cache_dir.clone(),
        current: std::sync::Mutex::new(InForce {
            sha256: compiled.sha256,
            fingerprints: compiled.fingerprints,
            files,
        }),
        config: std::sync::Mutex::new(cfg.clone()),
        sources,
        fetcher,
        store,
        fs: fs.clone(),
        control: control.clone(),
        notifier,
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

/// Gives glibc's free memory back to the system: building the catalog and the tree leaves
/// freed temporaries in the heap that would otherwise count as resident for the daemon's life.
fn trim_heap() {
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
}

/// The manifest in force, as far as a reload needs it to see what changed.
struct InForce {
    sha256: crate::chunk::Digest,
    fingerprints: std::collections::BTreeMap<String, crate::chunk::Digest>,
    files: BTreeMap<String, Vec<Arc<FileCtx>>>,
}

/// What SIGHUP needs: re-read config and manifest, swap them in, or keep the old ones.
struct Reloader {
    reread: Box<dyn Fn() -> anyhow::Result<(Config, PathBuf)> + Send>,
    cache_dir: PathBuf,
    current: std::sync::Mutex<InForce>,
    /// The configuration in force: only `[gc]`, `[peers]` (and the manifest) change on reload.
    config: std::sync::Mutex<Config>,
    sources: Arc<SourceRegistry>,
    fetcher: Arc<Fetcher>,
    store: Arc<Store>,
    fs: Arc<ModelFs>,
    control: Arc<Control>,
    notifier: fuser::Notifier,
}

impl Reloader {
    /// New and removed models, sources and GC limits apply at once; a bad config or manifest
    /// is refused with a log line and the old ones stay in force. Also reopens the log file.
    fn reload(&self) {
        sd_notify("RELOADING=1");
        crate::logging::reopen();
        let prev_sha = self.current.lock().unwrap().sha256;
        let attempt = (self.reread)().and_then(|(cfg, manifest_path)| {
            let compiled = crate::compiled::load(
                &manifest_path,
                &self.cache_dir,
                crate::compiled::CompileIn::Child,
                Some(&prev_sha),
            )?;
            refuse_size_conflicts(&self.store, &compiled.manifest, &manifest_path)?;
            Ok((cfg, manifest_path, compiled))
        });
        match attempt {
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "reload refused: the running configuration and manifest stay in force"
            ),
            Ok((cfg, manifest_path, compiled)) => {
                let manifest = compiled.manifest;
                let mut current = self.current.lock().unwrap();
                // Only models whose compiled form changed get new file contexts (and so new
                // inodes where content changed); the others keep theirs as they are.
                let changed: Manifest = Manifest {
                    models: manifest
                        .models
                        .iter()
                        .filter(|(id, _)| {
                            current.fingerprints.get(*id) != compiled.fingerprints.get(*id)
                                || !current.files.contains_key(*id)
                        })
                        .map(|(id, m)| (id.clone(), m.clone()))
                        .collect(),
                };
                let mut fresh = file_contexts(&changed, &self.sources);
                let files: std::collections::BTreeMap<_, _> = manifest
                    .models
                    .keys()
                    .map(|id| {
                        let kept = fresh.remove(id).or_else(|| current.files.get(id).cloned());
                        (id.clone(), kept.unwrap_or_default())
                    })
                    .collect();
                // Not the hash alone: the same text moved to another directory resolves its
                // `local://` sources elsewhere, which changes fingerprints, not the hash.
                let unchanged_manifest =
                    changed.models.is_empty() && current.files.keys().eq(manifest.models.keys());
                tracing::debug!(
                    changed = changed.models.len(),
                    models = manifest.models.len(),
                    "reload: models whose manifest entry changed"
                );
                *current = InForce {
                    sha256: compiled.sha256,
                    fingerprints: compiled.fingerprints,
                    files: files.clone(),
                };
                drop(current);
                let mut in_force = self.config.lock().unwrap();
                let mut later = Vec::new();
                if in_force.fetch != cfg.fetch {
                    later.push("[fetch]");
                }
                if in_force.mount != cfg.mount {
                    later.push("[mount]");
                }
                if in_force.http != cfg.http {
                    later.push("[http]");
                }
                if in_force.log != cfg.log {
                    later.push("[log]");
                }
                if cfg.mountpoint.is_some() && in_force.mountpoint != cfg.mountpoint {
                    later.push("mountpoint");
                }
                if cfg.cache_dir.as_ref().is_some_and(|c| *c != self.cache_dir) {
                    later.push("cache_dir");
                }
                if !later.is_empty() {
                    tracing::warn!(
                        sections = %later.join(", "),
                        "reload: these changes apply at the next restart; the running values stay in force"
                    );
                }
                in_force.gc = cfg.gc.clone();
                self.store.set_gc_threshold(cfg.gc.high_bytes());
                if in_force.peers != cfg.peers {
                    match peer_handles(&self.sources, &cfg) {
                        Ok(peers) => {
                            tracing::info!(peers = peers.len(), "reload: peers replaced");
                            self.fetcher.set_peers(peers, cfg.peers.cooldown());
                            in_force.peers = cfg.peers.clone();
                        }
                        Err(e) => tracing::error!(error = %format!("{e:#}"),
                            "reload: the new peers could not be set up; the old ones stay in force"),
                    }
                }
                let models = manifest.models.len();
                // The catalog takes the manifest (no copy) and lets the old one go before the
                // next tree is built: the reload's peak memory holds one catalog, not two.
                self.control
                    .reload(manifest, files.clone(), in_force.clone());
                drop(in_force);
                let later = later.into_iter().map(String::from).collect();
                self.control.set_loaded(manifest_path.clone(), later);
                let (removed, stale) = if unchanged_manifest {
                    (Vec::new(), Vec::new())
                } else {
                    let tree = self.fs.next_tree(&files);
                    self.fs.replace_tree(tree)
                };
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
                    manifest = %manifest_path.display(),
                    models,
                    removed = ?removed,
                    "reloaded configuration and manifest"
                );
                trim_heap();
            }
        }
        sd_notify("READY=1");
    }
}

/// The handles of the configured peers; they send the fleet's token (`http.token_env`).
fn peer_handles(
    sources: &SourceRegistry,
    cfg: &Config,
) -> anyhow::Result<Vec<Arc<crate::source::SourceHandle>>> {
    let token = std::env::var(&cfg.http.token_env)
        .ok()
        .filter(|t| !t.is_empty());
    sources.peers(&cfg.peers, token)
}

/// Tells systemd (Type=notify) about our state, if it is listening.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        std::os::unix::net::SocketAddr::from_pathname(&path)
    };
    let sent = addr.and_then(|a| {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        sock.send_to_addr(msg.as_bytes(), &a)
    });
    if let Err(e) = sent {
        tracing::warn!(socket = %path, error = %e, "could not notify systemd");
    }
}

/// Waits (≤ 10 s) until the mount answers a `stat`, so READY means usable.
fn wait_until_answering(mountpoint: &Path) -> anyhow::Result<()> {
    let mp = mountpoint.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read_dir(&mp).map(|_| ()));
    });
    match rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!(
            "the new mount at {} does not answer: {e}",
            mountpoint.display()
        ),
        Err(_) => bail!(
            "the new mount at {} did not answer within 10 s",
            mountpoint.display()
        ),
    }
}

/// One line of /proc/self/mountinfo that matters here.
struct MountEntry {
    dev: String,
    fstype: String,
}

/// Undoes the octal escapes of /proc/self/mountinfo (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a FUSE filesystem is mounted at `path`.
pub fn is_fuse_mount(path: &Path) -> bool {
    mount_at(path).is_some_and(|m| m.fstype.starts_with("fuse"))
}

/// The last (topmost) mount at `path`, if any.
fn mount_at(path: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    text.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        if unescape(fields.get(4)?) != want {
            return None;
        }
        Some(MountEntry {
            dev: fields.get(2)?.to_string(),
            fstype: fields.get(sep + 1)?.to_string(),
        })
    })
}

/// Detaches the mount at `path` lazily: `umount2(MNT_DETACH)` as root, else `fusermount3 -u -z`.
fn detach(path: &Path) -> anyhow::Result<()> {
    if nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).is_ok() {
        return Ok(());
    }
    let status = std::process::Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(path)
        .status()
        .context("running fusermount3 -u -z")?;
    if !status.success() {
        bail!("could not detach the mount at {}", path.display());
    }
    Ok(())
}

/// What opening a mountpoint's root says about the daemon behind it.
#[derive(Debug)]
enum Probe {
    Answers,
    Dead,
    Silent,
    Error(std::io::Error),
}

/// Opens the directory, which the kernel always forwards to the daemon (`OPENDIR`): a `stat`
/// is answered from the kernel's attribute cache (TTL up to an hour) even when the daemon is
/// gone, so it cannot tell a dead mount from a live one.
fn probe_mount(path: &Path, timeout: std::time::Duration) -> Probe {
    let p = path.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    // A hung daemon blocks the open in the kernel; the thread is left behind in that case.
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::File::open(&p).map(|_| ()));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => Probe::Answers,
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOTCONN) => Probe::Dead,
        Ok(Err(e)) => Probe::Error(e),
        Err(_) => Probe::Silent,
    }
}

/// A daemon killed with SIGKILL leaves its mount behind ("Transport endpoint is not
/// connected"); detach it so we can mount again. A live mount is refused instead.
fn clear_stale_mount(path: &Path) -> anyhow::Result<()> {
    let Some(entry) = mount_at(path) else {
        return Ok(());
    };
    if !entry.fstype.starts_with("fuse") {
        return Ok(());
    }
    match probe_mount(path, std::time::Duration::from_secs(5)) {
        Probe::Dead => {
            tracing::warn!(mountpoint = %path.display(), "clearing a dead mount left by a previous daemon");
            detach(path)
        }
        Probe::Answers => bail!(
            "{} is already mounted ({}) and answering: is another wan daemon running?",
            path.display(),
            entry.fstype
        ),
        Probe::Silent => bail!(
            "{} is mounted ({}) by a daemon that does not answer within 5 s; \
             stop it, or clear the mount with `umount -l {}`",
            path.display(),
            entry.fstype,
            path.display()
        ),
        Probe::Error(e) => bail!(
            "{} is mounted ({}) and opening it fails: {e}",
            path.display(),
            entry.fstype
        ),
    }
}

/// Refuses a mountpoint that cannot be served as the operator expects, and a FUSE device that
/// cannot be opened, before anything is mounted, compiled or cached: a dead mount left by a
/// killed daemon is cleared first (it is not "non-empty"), then the path must be a directory,
/// empty unless `allow_non_empty` (mounting over files hides them), and `/dev/fuse` usable.
fn check_mountpoint(mountpoint: &Path, allow_non_empty: bool) -> anyhow::Result<()> {
    clear_stale_mount(mountpoint)?;
    let mp = mountpoint.display();
    let meta = match std::fs::metadata(mountpoint) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mountpoint {mp} does not exist: create it (`install -d {mp}`) or name another")
        }
        Err(e) => bail!("mountpoint {mp}: {e}"),
    };
    if !meta.is_dir() {
        bail!("mountpoint {mp} is not a directory: mount on an empty directory");
    }
    if !allow_non_empty {
        let mut entries =
            std::fs::read_dir(mountpoint).with_context(|| format!("reading mountpoint {mp}"))?;
        if let Some(first) = entries.next() {
            let first = first.map_or_else(
                |e| e.to_string(),
                |e| e.file_name().to_string_lossy().into_owned(),
            );
            bail!(
                "mountpoint {mp} is not empty (it holds {:?}{}): mounting over it would hide its \
                 files. Mount on an empty directory, or pass --allow-non-empty (config: \
                 mount.allow_non_empty = true) to hide them while mounted",
                crate::logging::untrusted(&first),
                if entries.next().is_some() {
                    ", …"
                } else {
                    ""
                }
            );
        }
    }
    check_fuse_device()
}

/// The FUSE device every mount opens, root or not (a non-root mount opens it before handing
/// it to fusermount3).
const FUSE_DEVICE: &str = "/dev/fuse";

/// Opens the FUSE device as the mount will: fuser's own error on failure ("Permission denied
/// (os error 13)") names neither the device nor what to do.
fn check_fuse_device() -> anyhow::Result<()> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(FUSE_DEVICE)
    {
        Ok(_) => Ok(()),
        Err(e) => bail!("{}", fuse_device_problem(&e)),
    }
}

/// What an unusable `/dev/fuse` means, and the fixes for the case at hand.
fn fuse_device_problem(e: &std::io::Error) -> String {
    let fix = match e.kind() {
        std::io::ErrorKind::NotFound => {
            "the FUSE module is not loaded or the device was not made: `modprobe fuse` and \
             install fuse3; in a container, pass the device in (`--device /dev/fuse`)"
        }
        std::io::ErrorKind::PermissionDenied => {
            "run wan as root, or let this user read and write the device (it is normally mode \
             0666; non-root mounts also need fuse3's setuid fusermount3); in a container, pass \
             the device in (`--device /dev/fuse`) and allow it in the device cgroup"
        }
        _ => "check the device (`ls -l /dev/fuse`, a character device 10:229) and dmesg",
    };
    format!("cannot open {FUSE_DEVICE} to mount: {e}. To fix: {fix}")
}

/// `fuser::Session::new`'s error, with the cause and fix where it is a known one: a non-root
/// mount without fusermount3, or one the kernel refuses.
fn mount_error(e: std::io::Error, mountpoint: &Path) -> anyhow::Error {
    let mp = mountpoint.display();
    let is_root = nix::unistd::geteuid().is_root();
    let on_path = |bin: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
    };
    if !is_root && !on_path("fusermount3") && !on_path("fusermount") {
        return anyhow::anyhow!(
            "mounting {mp}: {e}. A non-root mount needs fusermount3 (setuid root, from the \
             fuse3 package): install fuse3, or run wan as root"
        );
    }
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        return anyhow::anyhow!(
            "mounting {mp}: {e}. Run wan as root; a non-root mount needs fuse3's setuid \
             fusermount3, write access to {mp}, and for allow_other `user_allow_other` in \
             /etc/fuse.conf; in a container, CAP_SYS_ADMIN (or fusermount3) and the device \
             (`--device /dev/fuse`)"
        );
    }
    anyhow::anyhow!("mounting {mp}: {e}")
}

/// FUSE asks the kernel for 128 KiB requests by default; a larger bdi read-ahead makes the
/// kernel send up to 1 MiB requests (capped by /proc/sys/fs/fuse/max_pages_limit) and keep
/// more of them in flight, which is what sequential model loading wants.
fn raise_read_ahead(mountpoint: &Path, kb: u32) {
    let Some(entry) = mount_at(mountpoint) else {
        return;
    };
    let path = format!("/sys/class/bdi/{}/read_ahead_kb", entry.dev);
    match std::fs::write(&path, kb.to_string()) {
        Ok(()) => tracing::debug!(path, kb, "raised kernel read-ahead"),
        Err(e) => tracing::info!(path, error = %e, "could not raise kernel read-ahead (not root?)"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_unescape() {
        assert_eq!(super::unescape("/a\\040b"), "/a b");
        assert_eq!(super::unescape("/plain"), "/plain");
        assert_eq!(super::unescape("/end\\"), "/end\\");
    }
}
