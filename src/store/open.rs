//! Opening a cache: the `v1/` layout created, its lock taken, a broken index set aside and
//! rebuilt, a cache on a read-only filesystem opened as an in-memory copy of its index, and
//! the index reconciled with the blob files on disk (rows whose file is gone are dropped).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::num::NonZeroUsize;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;

use super::blob::OPEN_BLOBS;
use super::index::{Index, now_secs};
use super::presence::BlobState;
use super::{Store, StoreError, commit, io_err};
use crate::lock_order::{self, OrderedMutex};

/// `Some(why)` when the filesystem that holds (or would hold) `cache_dir` is mounted
/// read-only.
fn read_only_fs(cache_dir: &Path) -> Option<String> {
    let mut at = cache_dir;
    while !at.exists() {
        at = at.parent()?;
    }
    let st = nix::sys::statvfs::statvfs(at).ok()?;
    st.flags()
        .contains(nix::sys::statvfs::FsFlags::ST_RDONLY)
        .then(|| format!("{} is on a read-only filesystem", at.display()))
}

impl Store {
    /// Opens (creating if needed) the cache under `cache_dir` and reconciles index and blobs.
    pub fn open(cache_dir: &Path) -> Result<Store, StoreError> {
        if let Some(why) = read_only_fs(cache_dir) {
            return Store::open_read_only(cache_dir, why);
        }
        let root = cache_dir.join("v1");
        std::fs::create_dir_all(root.join("blobs")).map_err(io_err(&root))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(&root))?;
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // flock(LOCK_EX | LOCK_NB), held as long as `lock` is open.
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked(cache_dir.display().to_string()));
        }
        let index_path = root.join("index.sqlite");
        let index = match Index::open(&index_path) {
            Ok(i) => i,
            Err(e) if index_path.exists() => {
                // A broken index is set aside, not trusted: a fresh one is rebuilt from the
                // blobs (`adopt`), re-verifying every chunk, so nothing is lost or refetched.
                let aside = root.join(format!("index.sqlite.broken-{}", now_secs()));
                tracing::error!(error = %e, aside = %aside.display(), "cache index unreadable; rebuilding it from the blobs");
                std::fs::rename(&index_path, &aside).map_err(io_err(&index_path))?;
                for ext in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(root.join(format!("index.sqlite{ext}")));
                }
                Index::open(&index_path)?
            }
            Err(e) => return Err(e.into()),
        };
        Store::assemble(root, index, Some(lock), None)
    }

    /// A cache on a read-only filesystem (see [`Store::read_only`]): its blobs are served as
    /// the index copied into memory says, and nothing is ever stored.
    fn open_read_only(cache_dir: &Path, why: String) -> Result<Store, StoreError> {
        let root = cache_dir.join("v1");
        let lock_path = root.join("lock");
        let lock = match File::open(&lock_path) {
            Ok(lock) => {
                if lock.try_lock().is_err() {
                    return Err(StoreError::Locked(cache_dir.display().to_string()));
                }
                Some(lock)
            }
            Err(_) => None,
        };
        let index = Index::open_copy_in_memory(&root.join("index.sqlite"))?;
        tracing::warn!(cache = %cache_dir.display(), reason = %why,
            "the cache is read-only: nothing will be stored; reads are served from the sources");
        Store::assemble(root, index, lock, Some(why))
    }

    fn assemble(
        root: PathBuf,
        index: Index,
        lock: Option<File>,
        read_only: Option<String>,
    ) -> Result<Store, StoreError> {
        let store = Store {
            root,
            index,
            blobs: OrderedMutex::new(lock_order::STORE_BLOBS, HashMap::new()),
            fds: OrderedMutex::new(
                lock_order::STORE_FDS,
                LruCache::new(NonZeroUsize::new(OPEN_BLOBS).unwrap()),
            ),
            opens: OrderedMutex::new(lock_order::STORE_OPENS, HashMap::new()),
            suspect: OrderedMutex::new(lock_order::STORE_SUSPECT, std::collections::HashSet::new()),
            writer: OrderedMutex::new(lock_order::STORE_WRITER, ()),
            group: commit::GroupCommit::default(),
            unforgotten: OrderedMutex::new(
                lock_order::STORE_UNFORGOTTEN,
                std::collections::HashSet::new(),
            ),
            unverified: OrderedMutex::new(lock_order::STORE_UNVERIFIED, HashMap::new()),
            refused: OrderedMutex::new(lock_order::STORE_REFUSED, HashMap::new()),
            refused_any: std::sync::atomic::AtomicBool::new(false),
            used: AtomicU64::new(0),
            gc_threshold: AtomicU64::new(0),
            gc_wake: tokio::sync::Notify::new(),
            read_only,
            _lock: lock,
        };
        store.reconcile()?;
        store.load_refused()?;
        Ok(store)
    }

    /// Opens the cache with a fresh index (the old one set aside), for `wan cache
    /// rebuild-index`; follow with `adopt`.
    pub fn open_rebuilding(cache_dir: &Path) -> Result<Store, StoreError> {
        let root = cache_dir.join("v1");
        let index_path = root.join("index.sqlite");
        if index_path.exists() {
            // Take the lock first so a running daemon's index is never moved under it.
            let probe = Store::open(cache_dir)?;
            drop(probe);
            let aside = root.join(format!("index.sqlite.old-{}", now_secs()));
            std::fs::rename(&index_path, &aside).map_err(io_err(&index_path))?;
            for ext in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(root.join(format!("index.sqlite{ext}")));
            }
        }
        Store::open(cache_dir)
    }

    /// Loads the index into memory, dropping rows whose blob file is gone or the wrong size
    /// (someone deleted or truncated it): those chunks are simply fetched again.
    fn reconcile(&self) -> Result<(), StoreError> {
        let mut blobs = self.blobs.lock();
        for row in self.index.load()? {
            let path = self.blob_path(row.digest);
            let ok = std::fs::metadata(&path)
                .map(|m| m.len() == row.layout.size)
                .unwrap_or(false);
            if !ok {
                if !row.chunks.is_empty() {
                    tracing::warn!(blob = %row.digest, path = %path.display(),
                        "blob file missing or wrong size; its {} chunks will be fetched again", row.chunks.len());
                }
                if let Err(e) = self.index.forget_blob(row.digest) {
                    // A full disk: the row stays, unloaded, until a write can delete it.
                    tracing::warn!(blob = %row.digest, error = %e, "could not delete a stale index row yet");
                    self.unforgotten.lock().insert(row.digest);
                }
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let mut st = BlobState::new(row.layout, row.last_access);
            for (idx, _) in row.chunks {
                st.set(idx);
            }
            st.whole_checked = row.whole_checked && st.complete();
            self.used.fetch_add(st.bytes(), Ordering::Relaxed);
            blobs.insert(row.digest, st);
        }
        Ok(())
    }
}
