//! The local content-addressed cache: blob files plus the chunk index.
//!
//! Layout (pinned by a test):
//! ```text
//! <cache_dir>/v1/blobs/ab/abcdef…   one sparse file per distinct content, named by its sha256
//! <cache_dir>/v1/index.sqlite       present-and-verified chunks (see index.rs)
//! <cache_dir>/v1/lock               flock: one daemon per cache
//! ```
//! A chunk commit is verify (by the caller: only a `VerifiedChunk` is accepted) → `pwrite` →
//! `fdatasync` → index row → in-memory bit. Readers consult the in-memory bits only, so a chunk
//! is visible exactly when it is durable and indexed. Identical files in several models share
//! one blob because blobs are named by content.

pub mod index;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::num::NonZeroUsize;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use sha2::{Digest as _, Sha256};

use crate::chunk::{Digest, Layout, VerifiedChunk};
use crate::manifest::FileEntry;
use index::{Index, IndexError};

/// Open blob files kept around; beyond this the least recently used is closed.
const OPEN_BLOBS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("cache {0} is in use by another wan process (its lock is held)")]
    Locked(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |err| StoreError::Io {
        path: path.display().to_string(),
        err,
    }
}

/// What the cache holds of one blob.
struct BlobState {
    layout: Layout,
    present: Vec<u64>,
    count: u64,
}

impl BlobState {
    fn new(layout: Layout) -> BlobState {
        BlobState {
            layout,
            present: vec![0; layout.count().div_ceil(64) as usize],
            count: 0,
        }
    }
    fn has(&self, idx: u64) -> bool {
        idx < self.layout.count() && self.present[(idx / 64) as usize] & (1 << (idx % 64)) != 0
    }
    fn set(&mut self, idx: u64) {
        if idx < self.layout.count() && !self.has(idx) {
            self.present[(idx / 64) as usize] |= 1 << (idx % 64);
            self.count += 1;
        }
    }
    fn complete(&self) -> bool {
        self.count == self.layout.count()
    }
    fn bytes(&self) -> u64 {
        if self.complete() {
            return self.layout.size;
        }
        (0..self.layout.count())
            .filter(|i| self.has(*i))
            .map(|i| {
                let r = self.layout.range(i);
                r.end - r.start
            })
            .sum()
    }
}

/// How much of a file the cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheState {
    NotPresent,
    Partial,
    Complete,
}

impl CacheState {
    pub fn as_str(&self) -> &'static str {
        match self {
            CacheState::NotPresent => "NOT_PRESENT",
            CacheState::Partial => "PARTIAL",
            CacheState::Complete => "COMPLETE",
        }
    }
}

pub struct Store {
    root: PathBuf,
    index: Index,
    blobs: Mutex<HashMap<Digest, BlobState>>,
    fds: Mutex<LruCache<Digest, Arc<File>>>,
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the cache under `cache_dir` and reconciles index and blobs.
    pub fn open(cache_dir: &Path) -> Result<Store, StoreError> {
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
        // SAFETY: flock on a valid fd we own.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(StoreError::Locked(cache_dir.display().to_string()));
        }
        let index = Index::open(&root.join("index.sqlite"))?;
        let store = Store {
            root,
            index,
            blobs: Mutex::new(HashMap::new()),
            fds: Mutex::new(LruCache::new(NonZeroUsize::new(OPEN_BLOBS).unwrap())),
            _lock: lock,
        };
        store.reconcile()?;
        Ok(store)
    }

    /// Loads the index into memory, dropping rows whose blob file is gone or the wrong size
    /// (someone deleted or truncated it): those chunks are simply fetched again.
    fn reconcile(&self) -> Result<(), StoreError> {
        let mut blobs = self.blobs.lock().unwrap();
        for row in self.index.load()? {
            let path = self.blob_path(row.digest);
            let ok = std::fs::metadata(&path)
                .map(|m| m.len() == row.size)
                .unwrap_or(false);
            if !ok {
                if !row.chunks.is_empty() {
                    tracing::warn!(blob = %row.digest, path = %path.display(),
                        "blob file missing or wrong size; its {} chunks will be fetched again", row.chunks.len());
                }
                self.index.forget_blob(row.digest)?;
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let mut st = BlobState::new(Layout::new(row.size, row.chunk_size));
            for (idx, _) in row.chunks {
                st.set(idx);
            }
            blobs.insert(row.digest, st);
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `v1/blobs/ab/abcdef…`
    pub fn blob_path(&self, d: Digest) -> PathBuf {
        let hex = d.to_hex();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    fn with_state<T>(&self, f: &FileEntry, g: impl FnOnce(Option<&BlobState>) -> T) -> T {
        let blobs = self.blobs.lock().unwrap();
        let st = blobs.get(&f.sha256).filter(|s| s.layout == f.layout());
        g(st)
    }

    /// Whether chunk `idx` of `f` is present and verified.
    pub fn has_chunk(&self, f: &FileEntry, idx: u64) -> bool {
        self.with_state(f, |s| s.is_some_and(|s| s.has(idx)))
    }

    /// The chunks in `range` that are not present.
    pub fn missing(&self, f: &FileEntry, range: std::ops::Range<u64>) -> Vec<u64> {
        self.with_state(f, |s| {
            range.filter(|i| !s.is_some_and(|s| s.has(*i))).collect()
        })
    }

    pub fn is_complete(&self, f: &FileEntry) -> bool {
        f.size == 0 || self.with_state(f, |s| s.is_some_and(BlobState::complete))
    }

    pub fn cached_bytes(&self, f: &FileEntry) -> u64 {
        self.with_state(f, |s| s.map_or(0, BlobState::bytes))
    }

    pub fn state(&self, f: &FileEntry) -> CacheState {
        if self.is_complete(f) {
            CacheState::Complete
        } else if self.with_state(f, |s| s.is_some_and(|s| s.count > 0)) {
            CacheState::Partial
        } else {
            CacheState::NotPresent
        }
    }

    /// Creates the blob's index row and sparse file if needed (idempotent).
    fn prepare(&self, f: &FileEntry) -> Result<Arc<File>, StoreError> {
        {
            let blobs = self.blobs.lock().unwrap();
            if blobs.get(&f.sha256).is_some_and(|s| s.layout == f.layout()) {
                drop(blobs);
                return self.fd(f.sha256, f.size);
            }
        }
        // Index row first: a blob file is never on disk without a row naming it.
        self.index.upsert_blob(f.sha256, f.size, f.chunk_size)?;
        let fd = self.fd(f.sha256, f.size)?;
        let mut blobs = self.blobs.lock().unwrap();
        let st = blobs
            .entry(f.sha256)
            .or_insert_with(|| BlobState::new(f.layout()));
        if st.layout != f.layout() {
            *st = BlobState::new(f.layout());
        }
        Ok(fd)
    }

    /// The blob's file, opened read-write and created sparse at its full size if new.
    fn fd(&self, d: Digest, size: u64) -> Result<Arc<File>, StoreError> {
        if let Some(f) = self.fds.lock().unwrap().get(&d) {
            return Ok(f.clone());
        }
        let path = self.blob_path(d);
        std::fs::create_dir_all(path.parent().unwrap()).map_err(io_err(&path))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        if file.metadata().map_err(io_err(&path))?.len() != size {
            file.set_len(size).map_err(io_err(&path))?;
        }
        let file = Arc::new(file);
        self.fds.lock().unwrap().put(d, file.clone());
        Ok(file)
    }

    /// A fresh read-only handle on a blob (for FUSE passthrough).
    pub fn open_blob_ro(&self, d: Digest) -> std::io::Result<File> {
        File::open(self.blob_path(d))
    }

    /// Reads present bytes of `f` at `offset`. Blocking; call only for present chunks.
    pub fn read_at(&self, f: &FileEntry, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let fd = self.prepare_read(f)?;
        fd.read_exact_at(buf, offset)
            .map_err(io_err(&self.blob_path(f.sha256)))
    }

    fn prepare_read(&self, f: &FileEntry) -> Result<Arc<File>, StoreError> {
        self.fd(f.sha256, f.size)
    }

    /// Stores a verified chunk durably and marks it present. Blocking.
    pub fn commit_chunk(
        &self,
        f: &FileEntry,
        idx: u64,
        chunk: &VerifiedChunk,
    ) -> Result<(), StoreError> {
        if self.has_chunk(f, idx) {
            return Ok(());
        }
        let fd = self.prepare(f)?;
        let path = self.blob_path(f.sha256);
        let start = f.layout().range(idx).start;
        fd.write_all_at(chunk.bytes(), start)
            .map_err(io_err(&path))?;
        fd.sync_data().map_err(io_err(&path))?;
        self.index
            .mark_present(f.sha256, &[(idx, chunk.digest())])?;
        self.blobs
            .lock()
            .unwrap()
            .get_mut(&f.sha256)
            .expect("prepared above")
            .set(idx);
        Ok(())
    }

    /// Writes not-yet-verified bytes of a file fetched whole. They stay invisible until
    /// `verify_whole` checks the whole file. Blocking.
    pub fn write_unverified(
        &self,
        f: &FileEntry,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let fd = self.prepare(f)?;
        fd.write_all_at(data, offset)
            .map_err(io_err(&self.blob_path(f.sha256)))
    }

    /// Hashes a blob written by `write_unverified`; if it matches, makes it durable and marks
    /// every chunk present (with the chunk digests computed here). Returns the actual digest.
    pub fn verify_whole(&self, f: &FileEntry) -> Result<Digest, StoreError> {
        let fd = self.prepare(f)?;
        let path = self.blob_path(f.sha256);
        let layout = f.layout();
        let mut whole = Sha256::new();
        let mut chunks = Vec::with_capacity(layout.count() as usize);
        let mut buf = vec![0u8; (1 << 20).min(f.chunk_size) as usize];
        for idx in 0..layout.count() {
            let r = layout.range(idx);
            let mut chunk = Sha256::new();
            let mut off = r.start;
            while off < r.end {
                let n = (r.end - off).min(buf.len() as u64) as usize;
                fd.read_exact_at(&mut buf[..n], off)
                    .map_err(io_err(&path))?;
                whole.update(&buf[..n]);
                chunk.update(&buf[..n]);
                off += n as u64;
            }
            chunks.push((idx, Digest(chunk.finalize().into())));
        }
        let actual = Digest(whole.finalize().into());
        if actual != f.sha256 {
            return Ok(actual);
        }
        fd.sync_data().map_err(io_err(&path))?;
        self.index.mark_present(f.sha256, &chunks)?;
        let mut blobs = self.blobs.lock().unwrap();
        let st = blobs.get_mut(&f.sha256).expect("prepared above");
        for (idx, _) in chunks {
            st.set(idx);
        }
        Ok(actual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(data: &[u8], chunk_size: u64) -> FileEntry {
        let layout = Layout::new(data.len() as u64, chunk_size);
        FileEntry {
            path: "f".into(),
            size: data.len() as u64,
            sha256: Digest::of(data),
            chunk_size,
            chunks: Some(
                (0..layout.count())
                    .map(|i| {
                        let r = layout.range(i);
                        Digest::of(&data[r.start as usize..r.end as usize])
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn on_disk_layout_is_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let d = Digest::of(b"x");
        let hex = d.to_hex();
        assert_eq!(
            s.blob_path(d),
            dir.path().join("v1/blobs").join(&hex[..2]).join(&hex)
        );
        assert!(dir.path().join("v1/index.sqlite").exists());
    }

    #[test]
    fn commit_survives_reopen_and_lock_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        let f = entry(&data, 30);
        {
            let s = Store::open(dir.path()).unwrap();
            assert!(matches!(
                Store::open(dir.path()),
                Err(StoreError::Locked(_))
            ));
            let c = VerifiedChunk::verify(
                f.chunks.as_ref().unwrap()[1],
                Bytes::copy_from_slice(&data[30..60]),
            )
            .unwrap();
            s.commit_chunk(&f, 1, &c).unwrap();
            assert_eq!(s.state(&f), CacheState::Partial);
            assert_eq!(s.cached_bytes(&f), 30);
        }
        let s = Store::open(dir.path()).unwrap();
        assert!(s.has_chunk(&f, 1) && !s.has_chunk(&f, 0));
        let mut buf = [0u8; 10];
        s.read_at(&f, 35, &mut buf).unwrap();
        assert_eq!(&buf, &data[35..45]);
    }

    #[test]
    fn whole_file_verification_refuses_wrong_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let data = vec![5u8; 50];
        let mut f = entry(&data, 16);
        f.chunks = None;
        s.write_unverified(&f, 0, &[6u8; 50]).unwrap();
        assert_ne!(s.verify_whole(&f).unwrap(), f.sha256);
        assert_eq!(s.state(&f), CacheState::NotPresent);
        s.write_unverified(&f, 0, &data).unwrap();
        assert_eq!(s.verify_whole(&f).unwrap(), f.sha256);
        assert_eq!(s.state(&f), CacheState::Complete);
    }

    #[test]
    fn missing_blob_file_is_forgotten_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![1u8; 10];
        let f = entry(&data, 10);
        let path;
        {
            let s = Store::open(dir.path()).unwrap();
            let c = VerifiedChunk::verify(f.chunks.as_ref().unwrap()[0], Bytes::from(data.clone()))
                .unwrap();
            s.commit_chunk(&f, 0, &c).unwrap();
            path = s.blob_path(f.sha256);
        }
        std::fs::remove_file(path).unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.state(&f), CacheState::NotPresent);
    }
}
