//! The fuser adapter: the only fuser user. Thin: each callback calls `ModelFs` and turns the
//! plain result into a reply; errno mapping is `FsError::errno`.
//!
//! Reads that the cache can serve are answered on the dispatch thread (a local pread); reads
//! that need a fetch are answered from a tokio task, so the dispatch thread never waits on the
//! network. fuser replies are `Send`, and dropping one unanswered sends EIO.
//!
//! The mount is unmounted once, by the daemon's stop or by the session's end, whichever comes
//! first ([`Unmounter`]).
//!
//! Passthrough: the kernel (fs/fuse/iomode.c) refuses, with EIO at open, to mix cached and
//! passthrough opens of one inode, and all passthrough opens of an inode must share one
//! backing id. So we track per inode: the shared `BackingId` and its open count, or the count
//! of cached opens; a new open follows whatever mode the inode is already in. The kernel also
//! refuses FOPEN_KEEP_CACHE on a passthrough open (it is outside FOPEN_PASSTHROUGH_MASK); the
//! backing file's own page cache serves that role there.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::fs::{Attr, BLKSIZE, FsError, Kind, ModelFs};
use crate::metrics::METRICS;

/// Content and metadata are immutable while mounted, so the kernel may cache them for long.
const TTL: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct InodeIo {
    cached_opens: u32,
    passthrough: Option<(Arc<BackingId>, u32)>,
}

enum HandleMode {
    Cached,
    Passthrough,
}

/// The mount's unmounter, shared by the daemon (which unmounts at shutdown or after a failed
/// start) and the session's end (`destroy`): whichever comes first takes it, so the mount is
/// unmounted once. Unmounted from outside (`umount`, a mount unit's stop), the session ends
/// first and `destroy` takes it quietly; otherwise fuser would try again as the session drops
/// and log `Failed to umount filesystem: Invalid argument` at every such stop.
#[derive(Clone, Default)]
pub struct Unmounter(Arc<Mutex<Option<fuser::SessionUnmounter>>>);

impl Unmounter {
    pub fn set(&self, u: fuser::SessionUnmounter) {
        *self.0.lock().unwrap() = Some(u);
    }

    /// Unmounts, unless that was done already.
    pub fn unmount(&self) -> std::io::Result<()> {
        match self.0.lock().unwrap().take() {
            Some(mut u) => u.unmount(),
            None => Ok(()),
        }
    }
}

pub struct FuseAdapter {
    fs: Arc<ModelFs>,
    rt: tokio::runtime::Handle,
    passthrough: bool,
    io: Mutex<HashMap<u64, InodeIo>>,
    handles: Mutex<HashMap<u64, (u64, HandleMode)>>,
    /// The read latency histogram, resolved once: reads are the hot path.
    read_seconds: prometheus::Histogram,
    unmounter: Unmounter,
}

impl FuseAdapter {
    pub fn new(
        fs: Arc<ModelFs>,
        rt: tokio::runtime::Handle,
        passthrough: bool,
        unmounter: Unmounter,
    ) -> FuseAdapter {
        FuseAdapter {
            fs,
            rt,
            passthrough,
            io: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            read_seconds: METRICS.fuse_seconds.with_label_values(&["read"]),
            unmounter,
        }
    }
}

impl FuseAdapter {
    fn reply_passthrough(&self, fh: u64, ino: u64, id: &BackingId, reply: ReplyOpen) {
        self.handles
            .lock()
            .unwrap()
            .insert(fh, (ino, HandleMode::Passthrough));
        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
    }
}

/// The one place a filesystem error becomes a reply code: counted by operation in
/// `wan_fuse_errors_total` and logged at debug, unless it is a normal negative answer
/// ([`is_answer`]). The read path also logs an EIO at error level with the file and its
/// cause, and a refused control write its input, bounded: only they know those.
fn fail(op: &'static str, ino: u64, e: &FsError) -> Errno {
    let code = e.errno();
    if !is_answer(op, code) {
        METRICS.fuse_errors.with_label_values(&[op]).inc();
        // Not the error's text: it may carry a client's input (a control-file write), which
        // the code that knows its context logs, bounded.
        tracing::debug!(op, ino, errno = code, "FUSE request failed");
    }
    Errno::from_i32(code)
}

/// Whether `code` from `op` answers a question rather than reports a failure: a lookup's
/// ENOENT is how `stat` and shells ask whether a name exists, and a getxattr's ENODATA
/// (ENOATTR) how `ls`, `getfattr` and `cp` ask whether an attribute exists (one `ls -l` asks
/// for a handful per file: security.selinux, system.posix_acl_access, …).
fn is_answer(op: &str, code: i32) -> bool {
    matches!(
        (op, code),
        ("lookup", libc::ENOENT) | ("getxattr", libc::ENODATA)
    )
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: match a.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// Filesystem methods that change the namespace, each answering EROFS: one line per method
/// rather than a body each.
macro_rules! read_only {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $reply:ty;)*) => {
        $(
            #[allow(clippy::too_many_arguments)]
            fn $name(&self, _req: &Request, $($arg: $ty,)* reply: $reply) {
                reply.error(Errno::EROFS);
            }
        )*
    };
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if self.passthrough {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!(
                    "kernel does not offer FUSE passthrough; the daemon serves every read"
                );
                self.passthrough = false;
            }
        }
        Ok(())
    }

    /// The session is over: every dispatch thread saw the connection end. Called by fuser
    /// before it drops the session's own unmount handle.
    fn destroy(&mut self) {
        if let Err(e) = self.unmounter.unmount() {
            // EINVAL: unmounted from outside already, which is what ended the session.
            tracing::debug!(error = %e, "session ended; the mount was already gone");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = METRICS
            .fuse_seconds
            .with_label_values(&["lookup"])
            .start_timer();
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(fail("lookup", parent.0, &e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = METRICS
            .fuse_seconds
            .with_label_values(&["getattr"])
            .start_timer();
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(fail("getattr", ino.0, &e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timer = METRICS
            .fuse_seconds
            .with_label_values(&["open"])
            .start_timer();
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        let opened = match self.fs.open(ino.0, write) {
            Ok(o) => o,
            Err(e) => return reply.error(fail("open", ino.0, &e)),
        };
        let fh = opened.fh;
        if opened.direct_io {
            return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
        }
        let mut io = self.io.lock().unwrap();
        let state = io.entry(ino.0).or_default();
        if let Some((id, n)) = &mut state.passthrough {
            if opened.suspect {
                // The kernel makes every open of this inode share the backing file, whose
                // bytes are now known bad: refuse rather than serve them.
                drop(io);
                self.fs.release(ino.0, fh);
                tracing::error!(
                    ino = ino.0,
                    "refused an open: the cached file was found corrupt while other processes hold it open in passthrough mode; it opens again once they close it"
                );
                return reply.error(Errno::EIO);
            }
            *n += 1;
            let id = id.clone();
            drop(io);
            return self.reply_passthrough(fh, ino.0, &id, reply);
        }
        if state.cached_opens == 0
            && self.passthrough
            && let Some(file) = opened.backing
        {
            match reply.open_backing(&file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    state.passthrough = Some((id.clone(), 1));
                    drop(io);
                    return self.reply_passthrough(fh, ino.0, &id, reply);
                }
                Err(e) => {
                    tracing::debug!(ino = ino.0, error = %e, "passthrough refused; serving reads")
                }
            }
        }
        state.cached_opens += 1;
        drop(io);
        self.handles
            .lock()
            .unwrap()
            .insert(fh, (ino.0, HandleMode::Cached));
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let timer = self.read_seconds.start_timer();
        if let Some(r) = self.fs.read_cached(ino.0, fh.0, offset, size) {
            drop(timer);
            return match r {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(fail("read", ino.0, &e)),
            };
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.read(ino.0, fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                // Cut short by the unmount (the kernel's read-ahead, mostly): not an error.
                Err(e) if fs.stopping() => reply.error(Errno::from_i32(e.errno())),
                Err(e) => reply.error(fail("read", ino.0, &e)),
            }
            drop(timer);
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = METRICS
            .fuse_seconds
            .with_label_values(&["release"])
            .start_timer();
        self.fs.release(ino.0, fh.0);
        if let Some((ino, mode)) = self.handles.lock().unwrap().remove(&fh.0) {
            let mut io = self.io.lock().unwrap();
            if let Some(state) = io.get_mut(&ino) {
                match mode {
                    HandleMode::Cached => state.cached_opens = state.cached_opens.saturating_sub(1),
                    HandleMode::Passthrough => {
                        if let Some((_, n)) = &mut state.passthrough {
                            *n -= 1;
                            if *n == 0 {
                                // Dropping the last reference closes the backing id.
                                state.passthrough = None;
                            }
                        }
                    }
                }
                if state.cached_opens == 0 && state.passthrough.is_none() {
                    io.remove(&ino);
                }
            }
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timer = METRICS
            .fuse_seconds
            .with_label_values(&["readdir"])
            .start_timer();
        let entries = match self.fs.readdir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(fail("readdir", ino.0, &e)),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let kind = match e.kind {
                Kind::Dir => FileType::Directory,
                Kind::File => FileType::RegularFile,
            };
            if reply.add(INodeNo(e.ino), (i + 1) as u64, kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = METRICS
            .fuse_seconds
            .with_label_values(&["statfs"])
            .start_timer();
        let (files, bytes) = self.fs.totals();
        reply.statfs(
            bytes.div_ceil(BLKSIZE as u64),
            0,
            0,
            files,
            0,
            BLKSIZE,
            255,
            BLKSIZE,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timer = METRICS
            .fuse_seconds
            .with_label_values(&["getxattr"])
            .start_timer();
        let value = match self.fs.getxattr(ino.0, &name.to_string_lossy()) {
            Ok(v) => v,
            Err(e) => return reply.error(fail("getxattr", ino.0, &e)),
        };
        xattr_reply(&value, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = METRICS
            .fuse_seconds
            .with_label_values(&["listxattr"])
            .start_timer();
        xattr_reply(&self.fs.listxattr(ino.0), size, reply);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        match self.fs.write(ino.0, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(fail("write", ino.0, &e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = match size {
            Some(0) => self.fs.truncate(ino.0),
            _ => Err(FsError::ReadOnly),
        };
        match r {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(fail("setattr", ino.0, &e)),
        }
    }

    // The namespace is the manifest's: nothing can be created, removed or renamed.
    read_only! {
        mknod(_p: INodeNo, _n: &OsStr, _m: u32, _u: u32, _r: u32) -> ReplyEntry;
        mkdir(_p: INodeNo, _n: &OsStr, _m: u32, _u: u32) -> ReplyEntry;
        unlink(_p: INodeNo, _n: &OsStr) -> ReplyEmpty;
        rmdir(_p: INodeNo, _n: &OsStr) -> ReplyEmpty;
        symlink(_p: INodeNo, _n: &OsStr, _t: &std::path::Path) -> ReplyEntry;
        rename(_p: INodeNo, _n: &OsStr, _np: INodeNo, _nn: &OsStr, _f: fuser::RenameFlags) -> ReplyEmpty;
        link(_i: INodeNo, _np: INodeNo, _nn: &OsStr) -> ReplyEntry;
        create(_p: INodeNo, _n: &OsStr, _m: u32, _u: u32, _f: i32) -> fuser::ReplyCreate;
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Terminal ioctls (isatty probes) and the like: not a tty, nothing to do.
        reply.error(Errno::ENOTTY);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Only reached without default_permissions; refuse writes, allow the rest.
        if mask.bits() & libc::W_OK != 0 {
            reply.error(Errno::EROFS)
        } else {
            reply.ok()
        }
    }
}

fn xattr_reply(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() <= size as usize {
        reply.data(value);
    } else {
        reply.error(Errno::from_i32(FsError::Range.errno()));
    }
}

/// Modification time reported for every node: the manifest's, so it is stable across restarts.
pub fn manifest_mtime(path: &std::path::Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}
