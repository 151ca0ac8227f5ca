//! `ModelFs`: the filesystem as plain methods returning plain structs.
//!
//! lookup/getattr/readdir/open/read/xattr on the manifest's tree. No fuser types here (that
//! is `fuse.rs`), so the logic is testable without `/dev/fuse`. Metadata never touches the
//! network: everything `ls`, `stat` and `find` need comes from the manifest.

mod control_files;
mod tree;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

pub use tree::{CONTROL_DIR, ControlFile, NodeKind, ROOT, Tree};

use std::collections::HashMap;
use std::sync::Mutex;

use crate::control::{Control, ControlError};
use crate::trust::gate::{Gate, GateError};

use crate::fetch::{FetchError, Fetcher, FileCtx};
use crate::in_force::InForceCell;
use crate::metrics::METRICS;
use crate::prefetch::ReadAhead;
use crate::warm::WarmReadAhead;

/// Attribute block size: large so tools (cp, dd) use large reads.
pub const BLKSIZE: u32 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub mtime: SystemTime,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: String,
}

/// What an open returns: a handle, and for a complete blob a read-only file the kernel may
/// read directly (FUSE passthrough). Control files are opened `direct_io`: their size is not
/// known in advance, and they are never mapped.
pub struct Opened {
    pub fh: u64,
    pub backing: Option<std::fs::File>,
    pub direct_io: bool,
    /// The file's cached data was found or declared corrupt and is not complete again.
    pub suspect: bool,
}

/// Every error a filesystem call can return; `errno` is the one place they map to codes.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("no such attribute")]
    NoAttr,
    #[error("attribute larger than the buffer")]
    Range,
    #[error("{0}")]
    Fetch(#[from] FetchError),
    #[error("read-only file system")]
    ReadOnly,
    #[error("{0}")]
    Control(#[from] ControlError),
    /// The model is refused under `[trust]` (`crate::trust::gate`): nothing of it is served.
    #[error("model refused under [trust] ({}): {}", .0.reason.as_label(), .0.detail)]
    Untrusted(crate::trust::Refusal),
    /// The model's `model.sig` could not be fetched: its verdict waits, the next read asks
    /// again.
    #[error("{}", .0.detail)]
    TrustUnsettled(crate::trust::Refusal),
}

impl From<GateError> for FsError {
    fn from(e: GateError) -> FsError {
        match e {
            GateError::Refused(r) => FsError::Untrusted(r),
            GateError::Unavailable(r) => FsError::TrustUnsettled(r),
            GateError::Fetch(e) => FsError::Fetch(e),
        }
    }
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            // Real I/O failures (a source's, the cache disk's) and a task that died; the
            // rest never reach a reader and say what to do instead (see `FetchError`).
            FsError::Fetch(
                FetchError::Exhausted { .. }
                | FetchError::Timeout(_)
                | FetchError::ReadBlob { .. }
                | FetchError::Store(_)
                | FetchError::TooLargeForMemory { .. }
                | FetchError::Join(_)
                // As a corrupt chunk's: the bytes are known bad, and no errno says so better.
                | FetchError::Refused { .. },
            ) => libc::EIO,
            FsError::Fetch(
                FetchError::Evicted
                | FetchError::Incomplete { .. }
                | FetchError::Skipped
                | FetchError::InMemoryOnly { .. },
            ) => libc::EAGAIN,
            FsError::Fetch(FetchError::WholeOnly { .. }) => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::Untrusted(_) => libc::EACCES,
            FsError::TrustUnsettled(_) => libc::EIO,
            FsError::Control(ControlError::Busy(..)) => libc::EBUSY,
            FsError::Control(ControlError::Failed(_)) => libc::EIO,
            FsError::Control(ControlError::UnknownModel(..) | ControlError::BadRequest(_)) => {
                libc::EINVAL
            }
        }
    }
}

/// A short name for an errno a refusal answers with, for its log line.
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EACCES => "EACCES",
        libc::EIO => "EIO",
        libc::EAGAIN => "EAGAIN",
        _ => "error",
    }
}

pub const XATTRS: [&str; 3] = ["user.wan.sha256", "user.wan.cached_bytes", "user.wan.state"];

pub struct ModelFs {
    /// The inode tree comes from what is in force (`crate::in_force`), one snapshot a request.
    in_force: Arc<InForceCell>,
    fetcher: Arc<Fetcher>,
    readahead: ReadAhead,
    mtime: SystemTime,
    uid: u32,
    gid: u32,
    passthrough: bool,
    /// Complete files read into the page cache at open, ahead of their readers.
    warm: WarmReadAhead,
    next_fh: AtomicU64,
    control: Arc<Control>,
    rt: tokio::runtime::Handle,
    /// Rendered contents of open control files, by handle.
    views: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
    /// Set once the daemon starts to stop: reads that fail from then on were cut short by the
    /// unmount, not by a source or the cache.
    stopping: std::sync::atomic::AtomicBool,
}

impl ModelFs {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_force: Arc<InForceCell>,
        fetcher: Arc<Fetcher>,
        control: Arc<Control>,
        rt: tokio::runtime::Handle,
        readahead_chunks: u32,
        mtime: SystemTime,
        passthrough: bool,
        warm_readahead: bool,
    ) -> ModelFs {
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        ModelFs {
            in_force,
            fetcher,
            readahead: ReadAhead::new(readahead_chunks),
            mtime,
            uid,
            gid,
            passthrough,
            warm: WarmReadAhead::new(warm_readahead, rt.clone()),
            next_fh: AtomicU64::new(1),
            control,
            rt,
            views: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The daemon is stopping: reads failing from now on are logged at debug and not counted.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn tree(&self) -> Arc<Tree> {
        self.in_force.get().tree.clone()
    }

    fn attr_of(&self, ino: u64) -> Result<Attr, FsError> {
        let tree = self.tree();
        let node = tree.get(ino).ok_or(FsError::NotFound)?;
        let (kind, size, perm, nlink) = match &node.kind {
            NodeKind::Dir(children) => (Kind::Dir, 0, 0o555, 2 + children.len() as u32),
            NodeKind::File(f) => (Kind::File, f.entry.size, 0o444, 1),
            NodeKind::Control(cf) if cf.writable() => (Kind::File, 0, 0o220, 1),
            NodeKind::Control(_) => (Kind::File, 0, 0o444, 1),
        };
        Ok(Attr {
            ino,
            kind,
            size,
            perm,
            nlink,
            mtime: self.mtime,
            uid: self.uid,
            gid: self.gid,
        })
    }

    /// The gate of a read of `f` under `[trust]`, without waiting.
    fn gate_now(&self, f: &Arc<FileCtx>) -> Gate {
        match self.in_force.get().trust.get(&f.model) {
            Some(t) => t.gate_now(f),
            None => Gate::Serve(f.clone()),
        }
    }

    /// The file context to serve a read of `f` by, once its model's verdict lets it.
    async fn gate(&self, f: &Arc<FileCtx>) -> Result<Arc<FileCtx>, FsError> {
        let Some(t) = self.in_force.get().trust.get(&f.model).cloned() else {
            return Ok(f.clone());
        };
        t.gate(f, &self.fetcher).await.map_err(FsError::from)
    }

    fn file(&self, ino: u64) -> Result<Arc<FileCtx>, FsError> {
        match &self.tree().get(ino).ok_or(FsError::NotFound)?.kind {
            NodeKind::File(f) => Ok(f.clone()),
            NodeKind::Dir(_) => Err(FsError::IsDir),
            NodeKind::Control(_) => Err(FsError::NoAttr),
        }
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        let ino = self.tree().lookup(parent, name).ok_or(FsError::NotFound)?;
        self.attr_of(ino)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        self.attr_of(ino)
    }

    pub fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>, FsError> {
        let tree = self.tree();
        let node = tree.get(ino).ok_or(FsError::NotFound)?;
        let NodeKind::Dir(children) = &node.kind else {
            return Err(FsError::NotDir);
        };
        let mut out = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: node.parent,
                kind: Kind::Dir,
                name: "..".into(),
            },
        ];
        for (name, &child) in children {
            out.push(DirEntry {
                ino: child,
                kind: self.attr_of(child)?.kind,
                name: name.clone(),
            });
        }
        Ok(out)
    }

    fn control_file(&self, ino: u64) -> Option<ControlFile> {
        match self.tree().get(ino)?.kind {
            NodeKind::Control(cf) => Some(cf),
            _ => None,
        }
    }

    /// Opens a file; `write` is whether it is opened for writing (only control files may be).
    pub fn open(&self, ino: u64, write: bool) -> Result<Opened, FsError> {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Some(cf) = self.control_file(ino) {
            if write && !cf.writable() {
                return Err(FsError::ReadOnly);
            }
            if !write {
                let view = control_files::render(&self.control, &self.rt, cf);
                self.views.lock().unwrap().insert(fh, Arc::new(view));
            }
            return Ok(Opened {
                fh,
                backing: None,
                direct_io: true,
                suspect: false,
            });
        }
        if write {
            return Err(FsError::ReadOnly);
        }
        let f = self.file(ino)?;
        // A refused model's files do not open; one whose verdict is not settled opens without
        // passthrough (its reads wait for the verdict).
        let served = match self.gate_now(&f) {
            Gate::Refused(r) => return Err(FsError::Untrusted(r)),
            Gate::Serve(s) => Some(s),
            Gate::Wait => None,
        };
        let store = self.fetcher.store();
        // The blob is opened only for what uses it: passthrough, or warm read-ahead.
        let wanted = self.passthrough || self.warm.wants(f.entry.size);
        let complete = match served {
            Some(s) if f.entry.size > 0 && wanted => store.open_complete_ro(&s.entry),
            _ => None,
        };
        if let Some(blob) = &complete {
            self.warm.opened(f.entry.sha256, blob, f.entry.size);
        }
        let backing = complete.filter(|_| self.passthrough);
        // A complete blob never checked whole (a cache older than the check) is checked now,
        // in the background; until then it is served by the daemon, not passed through.
        self.fetcher.check_in_background(&f);
        store.opened(f.entry.sha256);
        Ok(Opened {
            fh,
            backing,
            direct_io: false,
            suspect: store.is_suspect(f.entry.sha256),
        })
    }

    /// A write to a control file: one command, validated now, run in the background.
    pub fn write(&self, ino: u64, data: &[u8]) -> Result<usize, FsError> {
        let cf = self.control_file(ino).ok_or(FsError::ReadOnly)?;
        match control_files::write(&self.control, &self.rt, cf, data) {
            Ok(what) => {
                tracing::info!(file = %format!(".wan/{}", cf.name()), "{what}");
                Ok(data.len())
            }
            Err(e) => {
                tracing::warn!(
                    file = %format!(".wan/{}", cf.name()),
                    input = %crate::logging::untrusted(String::from_utf8_lossy(data).trim()),
                    error = %crate::logging::untrusted(&e.to_string()),
                    "control write refused"
                );
                Err(e.into())
            }
        }
    }

    /// Truncation (`echo > file` opens with O_TRUNC) is accepted on writable control files.
    pub fn truncate(&self, ino: u64) -> Result<Attr, FsError> {
        match self.control_file(ino) {
            Some(cf) if cf.writable() => self.attr_of(ino),
            _ => Err(FsError::ReadOnly),
        }
    }

    pub fn release(&self, ino: u64, fh: u64) {
        if self.views.lock().unwrap().remove(&fh).is_some() {
            return;
        }
        if let Ok(f) = self.file(ino) {
            self.fetcher.store().released(f.entry.sha256);
        }
        self.readahead.forget(fh);
    }

    fn note_read(&self, f: &Arc<FileCtx>, fh: u64, offset: u64, size: u32) {
        let ahead = self
            .readahead
            .on_read(fh, f.entry.layout(), offset, size as u64);
        if !ahead.is_empty() {
            self.fetcher.read_ahead(f, ahead);
        }
    }

    /// Serves a read from the cache alone if it can (a local pread; never the network).
    pub fn read_cached(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Option<Result<bytes::Bytes, FsError>> {
        if let Some(view) = self.views.lock().unwrap().get(&fh) {
            let start = (offset as usize).min(view.len());
            let end = (start + size as usize).min(view.len());
            return Some(Ok(bytes::Bytes::copy_from_slice(&view[start..end])));
        }
        if self.control_file(ino).is_some() {
            return Some(Ok(bytes::Bytes::new()));
        }
        let f = match self.file(ino) {
            Ok(f) => f,
            Err(e) => return Some(Err(e)),
        };
        let f = match self.gate_now(&f) {
            Gate::Serve(s) => s,
            Gate::Refused(r) => return Some(Err(FsError::Untrusted(r))),
            Gate::Wait => return None,
        };
        let r = self.fetcher.read_cached(&f, offset, size)?;
        METRICS.cache_hits.inc();
        self.note_read(&f, fh, offset, size);
        Some(r.map_err(FsError::from))
    }

    /// Serves a read, fetching missing chunks; bounded by `read_timeout`.
    pub async fn read(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<bytes::Bytes, FsError> {
        let f = self.file(ino)?;
        let f = match self.gate(&f).await {
            Ok(s) => s,
            Err(e) => {
                // The refusal itself was logged once, when the verdict was settled.
                tracing::debug!(model = %f.model, file = %f.entry.path, error = %e,
                    "read refused: {}", crate::fs::errno_name(e.errno()));
                return Err(e);
            }
        };
        METRICS.cache_misses.inc();
        let t0 = std::time::Instant::now();
        self.note_read(&f, fh, offset, size);
        match self.fetcher.read(&f, offset, size).await {
            Ok(v) => {
                METRICS
                    .first_byte_seconds
                    .observe(t0.elapsed().as_secs_f64());
                Ok(v)
            }
            Err(e) if self.stopping() => {
                tracing::debug!(model = %f.model, file = %f.entry.path, offset, size, error = %e,
                    "read cut short: the daemon is stopping");
                Err(e.into())
            }
            Err(e) => {
                let counter = match e {
                    FetchError::Timeout(_) => "read_timeout",
                    _ => "read",
                };
                METRICS.errors.with_label_values(&[counter]).inc();
                tracing::error!(model = %f.model, file = %f.entry.path, offset, size, error = %e, "read failed: EIO");
                Err(e.into())
            }
        }
    }

    pub fn getxattr(&self, ino: u64, name: &str) -> Result<Vec<u8>, FsError> {
        let f = self.file(ino).map_err(|_| FsError::NoAttr)?;
        let store = self.fetcher.store();
        let v = match name {
            "user.wan.sha256" => f.entry.sha256.to_hex(),
            "user.wan.cached_bytes" => store.cached_bytes(&f.entry).to_string(),
            "user.wan.state" => store.state(&f.entry).as_str().to_string(),
            _ => return Err(FsError::NoAttr),
        };
        Ok(v.into_bytes())
    }

    pub fn listxattr(&self, ino: u64) -> Vec<u8> {
        if self.file(ino).is_err() {
            return Vec::new();
        }
        XATTRS.iter().flat_map(|n| n.bytes().chain([0])).collect()
    }

    /// (files, total bytes) for statfs.
    pub fn totals(&self) -> (u64, u64) {
        let tree = self.tree();
        let files = tree.live_files();
        (files.len() as u64, files.iter().map(|f| f.entry.size).sum())
    }
}
