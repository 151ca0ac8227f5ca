//! The local content-addressed cache: blob files plus the chunk index.
//!
//! Layout (pinned by a test):
//! ```text
//! <cache_dir>/v1/blobs/ab/abcdef…   one sparse file per distinct content, named by its sha256
//! <cache_dir>/v1/index.sqlite       present-and-verified chunks, model states, history (index.rs)
//! <cache_dir>/v1/lock               flock: one process writes a cache at a time
//! ```
//! A chunk commit is verify (by the caller: only a `VerifiedChunk` is accepted) → `pwrite` →
//! `fdatasync` → index row → in-memory bit. Readers consult the in-memory bits only, so a chunk
//! is visible exactly when it is durable and indexed. The last three steps are a group commit
//! (`commit.rs`): the chunks written while one is in progress are synced (once per blob file)
//! and indexed (one transaction) together, each still in that order, each with its own result.
//! A crash at any point leaves at worst chunks written but not indexed, which are found and
//! re-verified from the file (`adopt.rs`), never trusted blindly. Identical files in several
//! models share one blob because blobs are named by content.
//!
//! Eviction never races a reader into wrong bytes: a reader checks presence and takes the
//! blob's file handle in one step under the `blobs` lock, and eviction unlinks the file (never
//! punches holes), so a reader that got a handle keeps reading the old, verified bytes. Each
//! blob state carries a generation; a commit whose blob was evicted meanwhile is dropped.
//!
//! Submodules: `open` (opening a cache: lock, broken or read-only index, reconcile),
//! `presence` (the per-blob bitmap readers consult), `blob` (blob file I/O), `commit` (group
//! commit: the queue of written chunks, sync, index, bits), `checked` (the whole-file check of
//! complete blobs, and the blobs it refused), `unverified` (whole-only files
//! written first and verified whole), `adopt` (blob files the index does not list, orphans),
//! `index` (SQLite, the only rusqlite user), `gc` (which blobs a GC removes).
//! This file holds `Store`, its locks and the operations that change presence.
//!
//! Locks, in the only order they may be taken (`crate::lock_order` names them, and a debug
//! build panics on a lock taken against it, or twice):
//! 1. the fetcher's `ChunkTable` (fetch/flight.rs), when a caller holds it: it asks
//!    [`Store::has_chunk`] and [`Store::is_complete`] under it, so nothing here may call up;
//! 2. `writer`: every index write with the matching change of `blobs` (create, mark, drop,
//!    evict, adopt); SQLite writes and unlinks happen under it;
//! 3. `blobs`: presence, taken by every cache hit; held for no I/O but opening a blob file
//!    that exists (and unlinking an orphan);
//! 4. leaves, never held while taking another: `fds`, `opens`, `suspect`, `unforgotten`,
//!    `unverified`, `refused`. The index's connection and the group commit's queue are leaves too
//!    (untracked: a `Condvar` needs the plain mutex); the group commit takes `writer` only
//!    after letting its queue go.

mod adopt;
mod blob;
mod checked;
mod commit;
pub mod gc;
pub mod index;
mod open;
mod presence;
mod unverified;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;

use crate::chunk::{Digest, VerifiedChunk};
use crate::lock_order::OrderedMutex;
use crate::manifest::FileEntry;
pub use blob::PeerMiss;
use index::{Index, IndexError};
use presence::BlobState;

pub use adopt::AdoptReport;
pub use checked::{CheckToken, Refusal, WholeCheck, entry_fingerprint};
pub use index::now_secs;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("cache {0} is in use by another wan process (its lock is held)")]
    Locked(String),
    #[error("blob {0} was evicted while being written; it will be fetched again")]
    Evicted(Digest),
    /// The sync or the index write of a group commit failed: every chunk of the batch gets it.
    #[error("{0} (group commit)")]
    GroupCommit(Arc<StoreError>),
    /// A manifest entry names a blob the cache holds at another size. A sha256 names one
    /// content of one size, so one of the two descriptions lies; the blob is left as it is
    /// (shrinking or growing it in place would cut short a reader of the other), and the
    /// entry is refused until the blob is evicted.
    #[error(
        "blob {digest} is cached with {cached} bytes, but the manifest lists it with {listed}: \
         one of the two descriptions is wrong; the entry is refused and the blob left as it is"
    )]
    SizeConflict {
        digest: Digest,
        cached: u64,
        listed: u64,
    },
}

/// Refuses `f` when the cache holds its blob at another size (a chunk layout that differs
/// at the same size is only another grid over the same bytes: the state is replaced).
fn conflict(st: Option<&BlobState>, f: &FileEntry) -> Result<(), StoreError> {
    match st {
        Some(st) if st.layout.size != f.size => Err(StoreError::SizeConflict {
            digest: f.sha256,
            cached: st.layout.size,
            listed: f.size,
        }),
        _ => Ok(()),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |err| StoreError::Io {
        path: path.display().to_string(),
        err,
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

/// Chunks of one blob to mark present, written while the blob was of `generation`.
struct Marks<'a> {
    blob: Digest,
    generation: u64,
    chunks: &'a [(u64, Digest)],
}

/// One blob, for GC and reports.
#[derive(Debug, Clone)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
    pub cached_bytes: u64,
    pub last_access: u64,
    pub open: bool,
}

pub struct Store {
    root: PathBuf,
    index: Index,
    blobs: OrderedMutex<HashMap<Digest, BlobState>>,
    fds: OrderedMutex<LruCache<Digest, Arc<File>>>,
    opens: OrderedMutex<HashMap<Digest, u32>>,
    /// Blobs with data found or declared corrupt that are not complete again yet.
    suspect: OrderedMutex<std::collections::HashSet<Digest>>,
    /// Serializes every change of the index together with the matching change of `blobs`
    /// (create, mark, drop, evict). SQLite writes and unlinks happen under this lock only,
    /// never under `blobs`, which cache hits take: a hit never waits on the disk or SQLite.
    writer: OrderedMutex<()>,
    /// Chunks written and waiting to be synced and indexed together (`commit.rs`).
    group: commit::GroupCommit,
    /// Evicted blobs whose index rows could not be deleted (a full disk: SQLite needs space
    /// to delete). Their files are gone; the rows are deleted before the blob is created
    /// again, and dropped at the next start anyway (their file is missing).
    unforgotten: OrderedMutex<std::collections::HashSet<Digest>>,
    /// Per blob, a count bumped after every unverified write (`write_unverified`, under
    /// `writer`). Adoption reads a blob's chunks back and marks them present (under `writer`)
    /// only if this did not move meanwhile, so unverified bytes written over what it verified
    /// (a whole-file fetch racing an index rebuild) are never marked present.
    unverified: OrderedMutex<HashMap<Digest, u64>>,
    /// Blobs refused by their whole-file check, by sha256, with the entry refused
    /// (`checked.rs`); `refused_any` lets a read skip the lock while there is none.
    refused: OrderedMutex<HashMap<Digest, Refusal>>,
    refused_any: std::sync::atomic::AtomicBool,
    /// Present bytes of every blob, kept as a running total (changed with the bits, under
    /// `blobs`): `used_bytes` at no cost, and a commit can tell it crossed auto GC's threshold.
    used: AtomicU64,
    /// Auto GC's threshold in bytes (`gc.high_watermark × gc.max_bytes`; 0 = none), set by
    /// the daemon. A commit that crosses it wakes `gc_wake` at once: with only the
    /// `gc.interval_secs` tick, a burst of reads could fill the disk before GC looked.
    gc_threshold: AtomicU64,
    gc_wake: tokio::sync::Notify,
    /// Why nothing can be stored, when the cache's filesystem is mounted read-only: the
    /// index is then a copy in memory and every write fails, so reads are served from the
    /// sources and from memory, and health says so.
    read_only: Option<String>,
    /// The flock on `v1/lock` (none on a read-only filesystem without one: nothing can
    /// write that cache anyway).
    _lock: Option<File>,
}

impl Store {
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Why nothing can be stored, if the cache's filesystem is mounted read-only.
    pub fn read_only(&self) -> Option<&str> {
        self.read_only.as_deref()
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// `v1/blobs/ab/abcdef…`
    pub fn blob_path(&self, d: Digest) -> PathBuf {
        let hex = d.to_hex();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    fn with_state<T>(&self, f: &FileEntry, g: impl FnOnce(Option<&BlobState>) -> T) -> T {
        let blobs = self.blobs.lock();
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

    pub fn last_access(&self, f: &FileEntry) -> Option<u64> {
        self.with_state(f, |s| s.map(|s| s.last_access))
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

    /// Creates the blob's index row and sparse file if needed (idempotent); returns its file
    /// and the generation a later commit must still find.
    fn prepare(&self, f: &FileEntry) -> Result<(Arc<File>, u64), StoreError> {
        if let Some(generation) = self.prepared(f)? {
            return Ok((self.fd(f.sha256, Some(f.size))?, generation));
        }
        let _w = self.writer.lock();
        self.prepare_locked(f)
    }

    /// The generation of `f`'s blob state if there is one of its layout; an error if the
    /// cache holds the blob at another size.
    fn prepared(&self, f: &FileEntry) -> Result<Option<u64>, StoreError> {
        let blobs = self.blobs.lock();
        let st = blobs.get(&f.sha256);
        conflict(st, f)?;
        Ok(st.filter(|s| s.layout == f.layout()).map(|s| s.generation))
    }

    /// [`Store::prepare`] with `writer` held by the caller.
    fn prepare_locked(&self, f: &FileEntry) -> Result<(Arc<File>, u64), StoreError> {
        if let Some(generation) = self.prepared(f)? {
            return Ok((self.fd(f.sha256, Some(f.size))?, generation));
        }
        // Rows an eviction could not delete must go first: they would name chunks of the new
        // (empty) file as present after a restart.
        self.retry_forgets()?;
        // Index row first: a blob file is never on disk without a row naming it.
        self.index.upsert_blob(f.sha256, f.layout())?;
        let existed = self.blob_path(f.sha256).exists();
        let fd = self.fd(f.sha256, Some(f.size))?;
        let mut st = BlobState::new(f.layout(), now_secs());
        st.fresh = !existed;
        let generation = st.generation;
        // A state of another layout (a manifest changed the chunk size) is replaced.
        if let Some(old) = self.blobs.lock().insert(f.sha256, st) {
            self.used.fetch_sub(old.bytes(), Ordering::Relaxed);
        }
        Ok((fd, generation))
    }

    /// The cached size of `f`'s blob where it is not `f.size` (see
    /// [`StoreError::SizeConflict`]); `None` when the cache does not hold the blob or agrees.
    pub fn size_conflict(&self, f: &FileEntry) -> Option<u64> {
        let blobs = self.blobs.lock();
        match conflict(blobs.get(&f.sha256), f) {
            Err(StoreError::SizeConflict { cached, .. }) => Some(cached),
            _ => None,
        }
    }

    /// Deletes the index rows of evicted blobs that a full disk kept. Under `writer`.
    fn retry_forgets(&self) -> Result<(), StoreError> {
        let pending: Vec<Digest> = self.unforgotten.lock().iter().copied().collect();
        for d in pending {
            self.index.forget_blob(d)?;
            self.unforgotten.lock().remove(&d);
        }
        Ok(())
    }
    /// Stores a verified chunk durably and marks it present. Blocking. The chunk is written
    /// here, then synced and indexed in a group commit with the chunks committing at the same
    /// time (`commit.rs`); returns when that is done. A failed write fails only this chunk.
    pub fn commit_chunk(
        &self,
        f: &FileEntry,
        idx: u64,
        chunk: &VerifiedChunk,
    ) -> Result<bool, StoreError> {
        if self.has_chunk(f, idx) {
            return Ok(false);
        }
        let (fd, generation) = self.prepare(f)?;
        let path = self.blob_path(f.sha256);
        let start = f.layout().range(idx).start;
        blob::write_chunk(&fd, &path, chunk.bytes(), start).map_err(io_err(&path))?;
        self.group_commit(commit::Pending {
            blob: f.sha256,
            generation,
            idx,
            digest: chunk.digest(),
            fd,
        })?;
        Ok(self.is_complete(f))
    }

    /// Marks chunks present: index rows first, then the in-memory bits readers look at.
    /// Under `writer`, held by the caller, so the blob cannot be evicted between the check
    /// and the bits.
    fn mark_locked(
        &self,
        f: &FileEntry,
        generation: u64,
        chunks: &[(u64, Digest)],
    ) -> Result<(), StoreError> {
        let marks = Marks {
            blob: f.sha256,
            generation,
            chunks,
        };
        match self.mark_many_locked(&[marks])?[..] {
            [true] => Ok(()),
            _ => Err(StoreError::Evicted(f.sha256)),
        }
    }

    /// Marks chunks of several blobs present, each entry only if its blob is still of its
    /// generation (not evicted since its chunks were written): their index rows in one
    /// transaction, then the in-memory bits. Returns, per entry, whether it was marked.
    /// `writer` held by the caller, so no eviction slips between the check and the bits.
    fn mark_many_locked(&self, marks: &[Marks]) -> Result<Vec<bool>, StoreError> {
        let live: Vec<bool> = {
            let blobs = self.blobs.lock();
            marks
                .iter()
                .map(|m| {
                    blobs
                        .get(&m.blob)
                        .is_some_and(|s| s.generation == m.generation)
                })
                .collect()
        };
        let rows: Vec<(Digest, &[(u64, Digest)])> = marks
            .iter()
            .zip(&live)
            .filter(|(_, live)| **live)
            .map(|(m, _)| (m.blob, m.chunks))
            .collect();
        if rows.is_empty() {
            return Ok(live);
        }
        self.index.mark_present_many(&rows)?;
        let mut blobs = self.blobs.lock();
        let mut added = 0;
        for (d, chunks) in rows {
            let st = blobs.get_mut(&d).expect("checked under writer");
            added += chunks.iter().map(|(idx, _)| st.set(*idx)).sum::<u64>();
            st.touch();
            if st.complete() {
                self.suspect.lock().remove(&d);
            }
        }
        drop(blobs);
        self.grew(added);
        Ok(live)
    }

    /// Marks a blob's on-disk data as not to be trusted until it is complete again.
    pub fn mark_suspect(&self, d: Digest) {
        self.suspect.lock().insert(d);
    }

    pub fn is_suspect(&self, d: Digest) -> bool {
        self.suspect.lock().contains(&d)
    }

    /// Forgets one chunk (found corrupt on disk): it will be fetched again. The index row goes
    /// first, so a crash right after cannot bring the chunk back as present.
    pub fn drop_chunk(&self, f: &FileEntry, idx: u64) -> Result<(), StoreError> {
        self.mark_suspect(f.sha256);
        let _w = self.writer.lock();
        if !self.blobs.lock().contains_key(&f.sha256) {
            return Ok(());
        }
        self.index.forget_chunk(f.sha256, idx)?;
        if let Some(st) = self.blobs.lock().get_mut(&f.sha256) {
            self.used.fetch_sub(st.clear(idx), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Removes a blob and returns the bytes it held. Readers stop seeing it first; then the
    /// file is unlinked (open handles keep reading the old, verified bytes), then its index
    /// rows go. Unlinking before touching the index is what lets GC free a full disk, where
    /// SQLite cannot write until space is freed: rows it cannot delete now are kept in
    /// `unforgotten` and deleted later; a row whose file is gone is dropped at start anyway.
    pub fn evict(&self, d: Digest) -> Result<u64, StoreError> {
        let _w = self.writer.lock();
        let freed = {
            let mut blobs = self.blobs.lock();
            let freed = blobs.remove(&d).map_or(0, |s| s.bytes());
            self.used.fetch_sub(freed, Ordering::Relaxed);
            self.fds.lock().pop(&d);
            freed
        };
        let path = self.blob_path(d);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        if let Err(e) = self.index.forget_blob(d) {
            tracing::warn!(blob = %d, error = %e, "evicted blob's index rows kept for now (deleted later)");
            self.unforgotten.lock().insert(d);
        } else if let Err(e) = self.retry_forgets() {
            tracing::debug!(error = %e, "index rows of earlier evictions still kept");
        }
        Ok(freed)
    }

    /// Every blob the cache knows, for GC and reports.
    pub fn blobs(&self) -> Vec<BlobInfo> {
        let blobs = self.blobs.lock();
        let opens = self.opens.lock();
        blobs
            .iter()
            .map(|(d, st)| BlobInfo {
                digest: *d,
                size: st.layout.size,
                cached_bytes: st.bytes(),
                last_access: st.last_access,
                open: opens.get(d).is_some_and(|n| *n > 0),
            })
            .collect()
    }

    /// Bytes of verified data held: the running total, so a metrics scrape or a health check
    /// does not walk every blob's bitmap under `blobs`, the lock every cache hit takes.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// What the running total must equal: every blob's present bytes, summed.
    #[cfg(test)]
    fn used_bytes_summed(&self) -> u64 {
        self.blobs.lock().values().map(BlobState::bytes).sum()
    }

    /// Counts `added` bytes of newly present chunks; wakes auto GC if they crossed its
    /// threshold. Only a crossing wakes it: a cache that GC cannot bring down (everything
    /// pinned or open) must not run GC again at every commit.
    fn grew(&self, added: u64) {
        if added == 0 {
            return;
        }
        let before = self.used.fetch_add(added, Ordering::Relaxed);
        let limit = self.gc_threshold.load(Ordering::Relaxed);
        if limit > 0 && before <= limit && before + added > limit {
            self.gc_wake.notify_one();
        }
    }

    /// Sets auto GC's threshold in bytes (0: none), at start and on reload; wakes GC at once
    /// if usage is already past it.
    pub fn set_gc_threshold(&self, bytes: u64) {
        self.gc_threshold.store(bytes, Ordering::Relaxed);
        if bytes > 0 && self.used.load(Ordering::Relaxed) > bytes {
            self.gc_wake.notify_one();
        }
    }

    /// Resolves when a commit crosses the threshold set by [`Store::set_gc_threshold`] (a
    /// wake-up that came while nobody waited is kept for the next waiter).
    pub fn gc_wake(&self) -> &tokio::sync::Notify {
        &self.gc_wake
    }

    /// Counts opens of a blob through the mount (open blobs are spared by aggressive GC).
    pub fn opened(&self, d: Digest) {
        *self.opens.lock().entry(d).or_default() += 1;
    }

    pub fn released(&self, d: Digest) {
        let mut opens = self.opens.lock();
        if let Some(n) = opens.get_mut(&d) {
            *n -= 1;
            if *n == 0 {
                opens.remove(&d);
            }
        }
    }

    /// Writes last-access times changed since the last flush (they drive LRU eviction).
    pub fn flush_access_times(&self) -> Result<(), StoreError> {
        let dirty: Vec<(Digest, u64)> = {
            let mut blobs = self.blobs.lock();
            blobs
                .iter_mut()
                .filter(|(_, s)| s.access_dirty)
                .map(|(d, s)| {
                    s.access_dirty = false;
                    (*d, s.last_access)
                })
                .collect()
        };
        if !dirty.is_empty() {
            self.index.set_last_access(&dirty)?;
        }
        Ok(())
    }

    /// The digest of every present chunk as recorded at commit (for re-verification).
    pub fn chunk_digests(&self, f: &FileEntry) -> Result<HashMap<u64, Digest>, StoreError> {
        Ok(self.index.chunk_digests(f.sha256)?.into_iter().collect())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::chunk::Layout;
    use crate::manifest::Verification;
    use bytes::Bytes;
    use std::os::unix::fs::FileExt;

    /// Verifies chunk `idx` of `f` (whose bytes are `data`) and commits it to `s`.
    pub(in crate::store) fn commit(s: &Store, f: &FileEntry, data: &[u8], idx: u64) {
        let r = f.layout().range(idx);
        let c = VerifiedChunk::verify(
            f.check(idx),
            f.verification.chunk(idx).unwrap(),
            Bytes::copy_from_slice(&data[r.start as usize..r.end as usize]),
        )
        .unwrap();
        s.commit_chunk(f, idx, &c).unwrap();
    }

    pub(in crate::store) fn entry(data: &[u8], chunk_size: u64) -> FileEntry {
        let layout = Layout::new(data.len() as u64, chunk_size);
        FileEntry {
            path: "f".into(),
            size: data.len() as u64,
            sha256: Digest::of(data),
            chunk_size,
            head_size: chunk_size,
            chunk_hash: crate::chunk::ChunkHash::Sha256,
            verification: Verification::Chunked(
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

    /// A blob is named by its sha256 once and keeps its size: an entry that lists the same
    /// sha256 at another size is refused and never resizes the file (a reader of the blob,
    /// e.g. a passthrough open, would be cut short or see zeros).
    #[test]
    fn an_entry_of_another_size_never_touches_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        let f = entry(&data, 30);
        let s = Store::open(dir.path()).unwrap();
        commit(&s, &f, &data, 0);
        commit(&s, &f, &data, 3);
        let mut liar = entry(&data[..50], 30);
        liar.sha256 = f.sha256;
        assert_eq!(s.size_conflict(&liar), Some(100));
        assert_eq!(s.size_conflict(&f), None);
        let c = VerifiedChunk::verify(
            liar.chunk_hash,
            liar.verification.chunk(1).unwrap(),
            Bytes::copy_from_slice(&data[30..50]),
        )
        .unwrap();
        assert!(matches!(
            s.commit_chunk(&liar, 1, &c),
            Err(StoreError::SizeConflict {
                cached: 100,
                listed: 50,
                ..
            })
        ));
        assert!(matches!(
            s.write_unverified(&liar, 0, &data[..50]),
            Err(StoreError::SizeConflict { .. })
        ));
        assert_eq!(std::fs::metadata(s.blob_path(f.sha256)).unwrap().len(), 100);
        assert!(s.has_chunk(&f, 0) && s.has_chunk(&f, 3));
        // Once the blob is gone, the other size may take the name.
        s.evict(f.sha256).unwrap();
        assert_eq!(s.size_conflict(&liar), None);
        s.commit_chunk(&liar, 1, &c).unwrap();
        assert_eq!(std::fs::metadata(s.blob_path(f.sha256)).unwrap().len(), 50);
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
            commit(&s, &f, &data, 1);
            assert_eq!(s.state(&f), CacheState::Partial);
            assert_eq!(s.cached_bytes(&f), 30);
        }
        let s = Store::open(dir.path()).unwrap();
        assert!(s.has_chunk(&f, 1) && !s.has_chunk(&f, 0));
        let mut buf = [0u8; 10];
        s.reader(&f, [1])
            .unwrap()
            .read_exact_at(&mut buf, 35)
            .unwrap();
        assert_eq!(&buf, &data[35..45]);
    }

    /// A cache hit takes only the `blobs` lock: it must not wait while an eviction or a
    /// commit waits on SQLite (or on unlinking a large file).
    #[test]
    fn cache_hit_does_not_wait_on_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(dir.path()).unwrap());
        let data: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        let other: Vec<u8> = data.iter().map(|b| b ^ 1).collect();
        let (f, g) = (entry(&data, 1024), entry(&other, 1024));
        for (e, d) in [(&f, &data), (&g, &other)] {
            commit(&s, e, d, 0);
        }
        let stalled = s.index().stall();
        let (s2, g2) = (s.clone(), g.clone());
        let evicting = std::thread::spawn(move || s2.evict(g2.sha256));
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (tx, rx) = std::sync::mpsc::channel();
        let (s3, f3) = (s.clone(), f.clone());
        std::thread::spawn(move || {
            let _ = tx.send(s3.reader(&f3, [0]).is_some() && s3.has_chunk(&f3, 0));
        });
        let hit = rx.recv_timeout(std::time::Duration::from_secs(2));
        drop(stalled);
        assert_eq!(hit, Ok(true), "a cache hit waited on the index");
        assert_eq!(evicting.join().unwrap().unwrap(), 1024);
        assert!(!s.has_chunk(&g, 0));
    }

    #[test]
    fn whole_file_verification_refuses_wrong_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let data = vec![5u8; 50];
        let mut f = entry(&data, 16);
        f.verification = Verification::Whole;
        s.write_unverified(&f, 0, &[6u8; 50]).unwrap();
        assert_ne!(s.verify_whole(&f, None).unwrap(), f.sha256);
        assert_eq!(s.state(&f), CacheState::NotPresent);
        s.write_unverified(&f, 0, &data).unwrap();
        assert_eq!(s.verify_whole(&f, None).unwrap(), f.sha256);
        assert_eq!(s.state(&f), CacheState::Complete);
    }

    /// The running total that decides when GC is woken follows every change of presence,
    /// and only a commit that crosses the threshold wakes it.
    #[test]
    fn usage_total_follows_presence_and_wakes_gc_on_crossing() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        let f = entry(&data, 30);
        let commit = |s: &Store, idx: u64| commit(s, &f, &data, idx);
        let woken = |s: &Store| {
            let n = s.gc_wake().notified();
            futures::pin_mut!(n);
            futures::FutureExt::now_or_never(n).is_some()
        };
        {
            let s = Store::open(dir.path()).unwrap();
            s.set_gc_threshold(50);
            commit(&s, 0);
            assert_eq!(s.used.load(Ordering::Relaxed), s.used_bytes_summed());
            assert!(!woken(&s), "woken under the threshold");
            commit(&s, 1);
            assert_eq!(s.used.load(Ordering::Relaxed), 60);
            assert!(woken(&s), "not woken on crossing the threshold");
            commit(&s, 3);
            assert!(!woken(&s), "woken again without crossing");
            s.drop_chunk(&f, 1).unwrap();
            assert_eq!(s.used.load(Ordering::Relaxed), s.used_bytes_summed());
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.used.load(Ordering::Relaxed), 40);
        s.set_gc_threshold(30);
        assert!(
            woken(&s),
            "not woken when the threshold is set under the usage"
        );
        s.evict(f.sha256).unwrap();
        assert_eq!(s.used.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn missing_blob_file_is_forgotten_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![1u8; 10];
        let f = entry(&data, 10);
        let path;
        {
            let s = Store::open(dir.path()).unwrap();
            let c = VerifiedChunk::verify(
                f.chunk_hash,
                f.verification.chunk(0).unwrap(),
                Bytes::from(data.clone()),
            )
            .unwrap();
            s.commit_chunk(&f, 0, &c).unwrap();
            path = s.blob_path(f.sha256);
        }
        std::fs::remove_file(path).unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.state(&f), CacheState::NotPresent);
    }
}
