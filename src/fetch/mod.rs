//! The read path: cache → single-flight fetch → sources; verify; commit; serve.
//!
//! - A missing chunk is fetched once however many readers want it: the first reader spawns a
//!   task and parks a shared future in `inflight`; later readers await the same future. The
//!   task runs to completion even if its readers give up, so the bytes still land in the cache.
//! - A chunk is fetched as parallel parts (`part_size_kib`) to cut time to first byte, then
//!   verified against its digest (the file's `chunk_hash`) on a blocking thread before anything
//!   else sees it; only a `VerifiedChunk` can be committed or served.
//! - A chunk fetched for a reader stays in memory (`landed.rs`) until the reads that follow
//!   were served from it; with `when_cache_behind = "skip"` and the cache disk behind, such a
//!   chunk is served and not cached.
//! - Sources are tried in priority order; a part is retried with exponential backoff and full
//!   jitter; a source that keeps failing, or sends wrong bytes, cools down and is tried last.
//! - Budgets: `connections` bounds requests in flight; read-ahead may use all but a quarter of
//!   them, so an on-demand read always finds a free connection; `max_inflight_mib` bounds the
//!   bytes held in fetch buffers, so memory is bounded however many files are open.
//! - A small read of a cold `blake3-tree` chunk whose file has an outboard is answered from
//!   the 64 KiB sub-blocks it covers, each verified on its own (`sub_block.rs`); the chunk is
//!   fetched behind them.
//! - Files listed with only a whole-file sha256 are fetched whole (chunk-sized parts in
//!   parallel, written unverified and invisible), hashed, and then made visible all at once.
//!
//! This file owns the `Fetcher`, the read path, the fetch tasks and committing; `flight.rs`
//! owns every fetch's state (in flight, failed lately, landed in memory, started) in one
//! `ChunkTable` behind one lock, so single-flight is one look at one table; `attempt.rs` asks
//! the sources for one range (order, parts, retries, peers, health); `whole.rs` handles
//! whole-only files; `check.rs` checks complete blobs whole against their sha256 and refuses
//! those that fail; `landed.rs` keeps verified chunks for their readers; `error.rs` says
//! why a fetch failed (`FetchError`, `SourceFailure`), typed. `FileCtx` lives in
//! `crate::file_ctx` and is re-exported here.
//!
//! Locks, in the order they may be taken: the `ChunkTable`, then the store's (see
//! store/mod.rs). None is held across an await; the semaphores above are awaited with no
//! lock held.

use std::collections::HashMap;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::bufpool::BufPool;
use crate::chunk::{Digest, VerifiedChunk};
use crate::config::FetchConfig;
use crate::lock_order::{self, OrderedGuard, OrderedMutex};
use crate::manifest::{DEFAULT_HEAD_SIZE, Verification};
use crate::metrics::METRICS;
use crate::source::SourceHandle;
use crate::store::Store;

mod attempt;
mod check;
mod error;
mod flight;
mod landed;
mod sub_block;
mod whole;

pub use error::{FailureKind, FetchError, SourceFailure};
use flight::{ChunkTable, FetchKey, InFlight, Join, Outcome, SharedFetch};

pub use crate::file_ctx::{FileCtx, file_contexts};

/// Other wanfs daemons asked for every chunk before the manifest's sources (`[peers]`), and
/// how long one that failed is skipped.
#[derive(Default)]
pub struct Peers {
    pub handles: Vec<Arc<SourceHandle>>,
    pub cooldown: Duration,
}

/// Reads the peers in force (see [`Fetcher::peers_from`]).
pub type PeersNow = Box<dyn Fn() -> Arc<Peers> + Send + Sync>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Priority {
    OnDemand,
    ReadAhead,
}

/// Free chunk buffers are let go after this long without a fetch: long enough that a reader
/// pausing between tensors keeps them, short enough that an idle daemon's RSS drops soon.
const BUF_IDLE: Duration = Duration::from_secs(10);
/// Head-chunk buffers kept made and touched (`BufPool::with_reserve`): a file's first read
/// waits for its head, and two let a header read and another file's run side by side.
const HEAD_BUFS: usize = 2;

/// How long a chunk waits for its file's small head chunk in flight (see `start_chunk`): a head
/// is one 1 MiB request, tens of milliseconds even from a slow origin.
const HEAD_FIRST_WAIT: Duration = Duration::from_millis(250);

/// How long the first chunk fetched of a file whose small head is missing waits for a fetch
/// of the head to start (see `start_chunk`): the kernel hands a header read and its own
/// read-ahead of the next chunk to two FUSE threads within microseconds, in either order. A
/// reader that skips the header (an mmap touching one tensor) pays this once per cold file.
const HEAD_RACE_WAIT: Duration = Duration::from_millis(5);

/// How long a landed chunk waits for its reader (see `landed`): a sequential reader gets
/// there within milliseconds; one that went elsewhere should not pin the memory.
const LANDED_TTL: Duration = Duration::from_secs(5);

/// How long a whole-only file served from memory (the cache could not store it) stays there
/// after its last read: its readers read it within seconds; one that comes back later pays
/// one more fetch of a file no larger than `max_inflight_mib`.
const WHOLE_IN_MEMORY_TTL: Duration = Duration::from_secs(60);

/// A blob counted as open (spared by GC) for as long as this lives.
struct Held<'a> {
    store: &'a Store,
    digest: Digest,
}

impl<'a> Held<'a> {
    fn new(store: &'a Store, digest: Digest) -> Held<'a> {
        store.opened(digest);
        Held { store, digest }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.store.released(self.digest);
    }
}

/// Memory permits are counted in KiB so a semaphore's u32 range covers terabytes.
fn kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).max(1) as u32
}

pub struct Fetcher {
    store: Arc<Store>,
    cfg: FetchConfig,
    connections: Arc<Semaphore>,
    readahead_connections: Arc<Semaphore>,
    /// Chunk fetches read-ahead may start at once.
    readahead_slots: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    /// All of `memory`, in KiB: a chunk larger than the whole budget takes all of it and is
    /// fetched alone, rather than waiting forever for permits that do not exist.
    memory_kib: u32,
    /// Chunk buffers, reused so a fetch does not fault in and zero fresh pages (see `bufpool`);
    /// keeps at most `max_inflight_mib` of free buffers.
    bufs: BufPool,
    /// Every chunk's and whole-only file's fetch state, under one lock (see `flight`).
    table: OrderedMutex<ChunkTable>,
    /// Bytes of verified chunks waiting for (or in) their commit: how far the cache disk is
    /// behind (`fetch.when_cache_behind`).
    committing: std::sync::atomic::AtomicU64,
    rt: tokio::runtime::Handle,
    /// The peers in force now (`[peers]`: other daemons, asked for every chunk before the
    /// manifest's sources), asked at every fetch; unset (no peers) until [`Fetcher::peers_from`].
    peers: std::sync::OnceLock<PeersNow>,
    /// Woken whenever a fetch of some file's chunk 0 starts (see `HEAD_RACE_WAIT`).
    head_started: tokio::sync::Notify,
    /// Whole-file checks hashing now: one at a time (see `check.rs`).
    whole_checks: Semaphore,
    /// Where outboards are found, and those read lately (see `sub_block.rs`).
    outboards: sub_block::Outboards,
}

/// What a chunk after a small head chunk waits for before its requests go out.
enum HeadFirst {
    Nothing,
    /// The head's fetch, in flight.
    InFlight(SharedFetch),
    /// The head is missing and nothing of the file is in flight: a header read may be a
    /// moment behind this read.
    Maybe,
}

impl Fetcher {
    /// Must be called within a tokio runtime (fetches are spawned on it).
    pub fn new(store: Arc<Store>, cfg: FetchConfig) -> Arc<Fetcher> {
        let reserve = (cfg.connections / 4).max(1);
        let bufs = BufPool::with_reserve(
            (cfg.max_inflight_mib as usize) << 20,
            DEFAULT_HEAD_SIZE as usize,
            HEAD_BUFS,
        );
        bufs.spawn_trimmer(BUF_IDLE);
        Arc::new(Fetcher {
            store,
            connections: Arc::new(Semaphore::new(cfg.connections)),
            readahead_connections: Arc::new(Semaphore::new(
                cfg.connections.saturating_sub(reserve).max(1),
            )),
            readahead_slots: Arc::new(Semaphore::new(cfg.readahead_chunks.max(1) as usize)),
            memory: Arc::new(Semaphore::new((cfg.max_inflight_mib * 1024) as usize)),
            memory_kib: (cfg.max_inflight_mib * 1024) as u32,
            bufs,
            committing: std::sync::atomic::AtomicU64::new(0),
            table: OrderedMutex::new(
                lock_order::FETCH_TABLE,
                ChunkTable::new(
                    landed::Landed::new((cfg.max_inflight_mib as usize) << 20, LANDED_TTL),
                    whole::WholeInMemory::new(
                        (cfg.max_inflight_mib as usize) << 20,
                        WHOLE_IN_MEMORY_TTL,
                    ),
                ),
            ),
            cfg,
            rt: tokio::runtime::Handle::current(),
            peers: std::sync::OnceLock::new(),
            head_started: tokio::sync::Notify::new(),
            whole_checks: Semaphore::new(1),
            outboards: Default::default(),
        })
    }

    /// Where the peers in force are read from at each fetch (`crate::in_force`), so a reload
    /// that replaces them reaches every fetch that starts after it. Set once, at wiring.
    pub fn peers_from(&self, now: PeersNow) {
        if self.peers.set(now).is_err() {
            tracing::error!("the fetcher's peers were wired twice; the first wiring stays");
        }
    }

    /// The peers in force now.
    pub(crate) fn peers(&self) -> Arc<Peers> {
        self.peers.get().map(|now| now()).unwrap_or_default()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The fetch state; never held across an await (see `flight`).
    fn table(&self) -> OrderedGuard<'_, ChunkTable> {
        self.table.lock()
    }

    /// Reads `offset..offset+size` of a file (clipped to its end), fetching what is missing.
    /// Fails with `Timeout` if that takes longer than `read_timeout`.
    pub async fn read(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, FetchError> {
        let timeout = self.cfg.read_timeout();
        match tokio::time::timeout(timeout, self.read_inner(file, offset, size)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout(timeout)),
        }
    }

    /// Serves a read from memory or the cache alone: from a landed chunk (fetched, verified,
    /// not yet read to its end), else from the blob file if every chunk it covers is present.
    /// Blocking (a local `pread`), never touches the network.
    pub fn read_cached(
        &self,
        file: &FileCtx,
        offset: u64,
        size: u32,
    ) -> Option<Result<Bytes, FetchError>> {
        let f = &file.entry;
        if let Err(e) = self.refused(f) {
            return Some(Err(e));
        }
        let end = (offset + size as u64).min(f.size);
        if offset >= end {
            return Some(Ok(Bytes::new()));
        }
        let layout = f.layout();
        // A whole-only file's blob serves its first byte only once checked whole (its chunks
        // may come from another entry): the async path waits for the check.
        if matches!(f.verification, Verification::Whole) && !self.store.is_whole_checked(f) {
            return (self.table().whole_in_memory)
                .slice(f.sha256, offset, end)
                .map(Ok);
        }
        let held = match &f.verification {
            Verification::Chunked(digests) => {
                (self.table().landed).slice(f.sha256, &layout, digests, offset, end)
            }
            Verification::Whole => (self.table().whole_in_memory).slice(f.sha256, offset, end),
        };
        if let Some(b) = held {
            return Some(Ok(b));
        }
        let fd = self
            .store
            .reader(f, layout.covering(offset, end - offset))?;
        let mut out = vec![0u8; (end - offset) as usize];
        if let Err(e) = fd.read_exact_at(&mut out, offset) {
            return Some(Err(FetchError::ReadBlob {
                blob: f.sha256,
                err: Arc::new(e),
            }));
        }
        // The chunks it covers may still be kept (a read across two of them is answered from
        // the file): what it served counts, or they would stay until they expire.
        (self.table().landed).served(f.sha256, &layout, offset, end);
        Some(Ok(Bytes::from(out)))
    }

    async fn read_inner(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, FetchError> {
        let f = &file.entry;
        let end = (offset + size as u64).min(f.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let layout = f.layout();
        let covering = layout.covering(offset, end - offset);
        // A chunk found present may be evicted before we read it; then we simply go round
        // again and fetch it (bounded by the caller's read timeout).
        loop {
            self.refused(f)?;
            let mut fetched: HashMap<u64, VerifiedChunk> = HashMap::new();
            let mut to_fetch = Vec::new();
            match &f.verification {
                Verification::Whole => {
                    if !self.store.is_whole_checked(f) {
                        match self.ensure_whole(file).await {
                            Err(FetchError::Evicted) => continue,
                            r => r?,
                        }
                        if let Some(b) = (self.table().whole_in_memory).slice(f.sha256, offset, end)
                        {
                            return Ok(b);
                        }
                    }
                    if !self.store.missing(f, covering.clone()).is_empty() {
                        // Evicted again since `ensure_whole`: a whole-only file has no chunk
                        // digests to fetch by, so it is made whole again.
                        continue;
                    }
                }
                Verification::Chunked(digests) => {
                    // A chunk still held in memory is used as is: it may be one served without
                    // being cached (`when_cache_behind = "skip"`), which a fetch would only
                    // bring again.
                    let missing = self.store.missing(f, covering.clone());
                    let table = self.table();
                    for idx in missing {
                        let r = layout.range(idx);
                        match table.landed.get(
                            f.sha256,
                            idx,
                            digests[idx as usize],
                            r.end - r.start,
                        ) {
                            Some(c) => {
                                fetched.insert(idx, c);
                            }
                            None => to_fetch.push(idx),
                        }
                    }
                }
            }
            // A small read of one cold chunk: its sub-blocks, where an outboard proves them.
            if let ([idx], 1) = (&to_fetch[..], covering.end - covering.start)
                && let Some(b) = self.read_sub_blocks(file, *idx, offset, end).await
            {
                return Ok(b);
            }
            let got: Vec<(u64, Option<VerifiedChunk>)> =
                futures::future::try_join_all(to_fetch.into_iter().map(|idx| {
                    let fut = self.chunk(file, idx, Priority::OnDemand, None);
                    async move { fut.await.map(|c| (idx, c)) }
                }))
                .await?;
            fetched.extend(got.into_iter().filter_map(|(i, c)| c.map(|c| (i, c))));
            // The common case, a read inside one freshly fetched chunk, is a slice of it.
            if covering.end - covering.start == 1
                && let Some(c) = fetched.get(&covering.start)
            {
                let r = layout.range(covering.start);
                (self.table().landed).served(f.sha256, &layout, offset, end);
                return Ok(c
                    .bytes()
                    .slice((offset - r.start) as usize..(end - r.start) as usize));
            }
            let mut out = vec![0u8; (end - offset) as usize];
            let mut from_disk = Vec::new();
            for idx in covering.clone() {
                let r = layout.range(idx);
                let (s, e) = (r.start.max(offset), r.end.min(end));
                let dst = (s - offset) as usize..(e - offset) as usize;
                match fetched.get(&idx) {
                    Some(c) => {
                        let (a, b) = ((s - r.start) as usize, (e - r.start) as usize);
                        out[dst].copy_from_slice(&c.bytes()[a..b]);
                    }
                    None => from_disk.push((idx, s, dst)),
                }
            }
            if !from_disk.is_empty() {
                let Some(fd) = self.store.reader(f, from_disk.iter().map(|(i, _, _)| *i)) else {
                    continue;
                };
                let sha = f.sha256;
                out = tokio::task::spawn_blocking(move || {
                    for (_, s, dst) in from_disk {
                        fd.read_exact_at(&mut out[dst], s)
                            .map_err(|e| FetchError::ReadBlob {
                                blob: sha,
                                err: Arc::new(e),
                            })?;
                    }
                    Ok::<_, FetchError>(out)
                })
                .await
                .map_err(FetchError::join)??;
            }
            // Every chunk it covers, from memory or the file: one record, under one lock.
            (self.table().landed).served(f.sha256, &layout, offset, end);
            return Ok(Bytes::from(out));
        }
    }

    /// Starts read-ahead fetches of `chunks` that are neither present nor in flight, as far as
    /// the read-ahead budget allows; returns at once.
    pub fn read_ahead(self: &Arc<Self>, file: &Arc<FileCtx>, chunks: Range<u64>) {
        let f = &file.entry;
        match f.verification {
            Verification::Chunked(_) => {}
            // Nothing to read ahead: its first read fetches it whole.
            Verification::Whole => return,
        }
        if self.store.refusal(f).is_some() {
            return;
        }
        for idx in self.store.missing(f, chunks) {
            let busy = {
                let t = self.table();
                t.chunk(f.sha256, idx).is_some() || t.landed.holds(f.sha256, idx)
            };
            if busy {
                continue;
            }
            let Ok(permit) = self.readahead_slots.clone().try_acquire_owned() else {
                return;
            };
            drop(self.chunk(file, idx, Priority::ReadAhead, Some(permit)));
        }
    }

    /// Fetches every missing chunk of a file (whole-only files: the whole file), adding the
    /// bytes of each chunk made present to `progress`. Runs at read-ahead priority.
    pub async fn ensure_file(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        progress: &std::sync::atomic::AtomicU64,
    ) -> Result<(), FetchError> {
        use std::sync::atomic::Ordering;
        let f = &file.entry;
        // An ensure holds its blob as an open file does: GC, woken at the high watermark by
        // this very ensure's commits, must not evict what it is filling (the ensure then
        // failed with chunks "evicted before the file was complete").
        let _held = Held::new(&self.store, f.sha256);
        self.refused(f)?;
        match f.verification {
            Verification::Chunked(_) => {}
            Verification::Whole => {
                self.ensure_whole(file).await?;
                if !self.store.is_complete(f) {
                    // Served from memory: the cache could not store it (see `whole`).
                    return Err(FetchError::InMemoryOnly {
                        path: f.path.clone(),
                    });
                }
                progress.fetch_add(f.size, Ordering::Relaxed);
                return Ok(());
            }
        }
        let layout = f.layout();
        // One look: what is counted present now is exactly what is not fetched below.
        let missing = self.store.missing(f, 0..layout.count());
        let present: u64 = f.size
            - missing
                .iter()
                .map(|i| {
                    let r = layout.range(*i);
                    r.end - r.start
                })
                .sum::<u64>();
        progress.fetch_add(present, Ordering::Relaxed);
        let parallel = (self.cfg.readahead_chunks as usize).max(2);
        futures::stream::iter(missing)
            .map(|idx| {
                let fut = self.chunk_stored(file, idx, Priority::ReadAhead);
                async move {
                    fut.await?;
                    let r = layout.range(idx);
                    progress.fetch_add(r.end - r.start, Ordering::Relaxed);
                    Ok::<(), FetchError>(())
                }
            })
            .buffer_unordered(parallel)
            .try_collect::<Vec<()>>()
            .await?;
        if self.store.is_complete(f) {
            // Ensured means checked whole too: a file whose chunks verify but whose whole
            // does not is refused here, not at some later open.
            self.check_whole(file).await
        } else {
            // Stored, then evicted or dropped before the last one was: the caller may retry.
            Err(FetchError::Incomplete {
                path: f.path.clone(),
            })
        }
    }

    /// Fetches chunk `idx` again now (after it was dropped as corrupt); resolves once it is
    /// stored, so a repair reported done leaves the file complete.
    pub async fn refetch_chunk(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        idx: u64,
    ) -> Result<(), FetchError> {
        self.chunk_stored(file, idx, Priority::OnDemand).await
    }

    /// The single-flight entry point for chunk `idx`: `None` if it is (now) present on disk.
    fn chunk(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        idx: u64,
        prio: Priority,
        permit: Option<OwnedSemaphorePermit>,
    ) -> BoxFuture<'static, Result<Option<VerifiedChunk>, FetchError>> {
        match self.start_chunk(file, idx, prio, permit, true) {
            Err(e) => futures::future::ready(Err(e)).boxed(),
            Ok(None) => futures::future::ready(Ok(None)).boxed(),
            Ok(Some(f)) => async move { f.served.await.map(Some) }.boxed(),
        }
    }

    /// Like [`Fetcher::chunk`], but resolves once the chunk is stored (durable and indexed),
    /// or with the error that kept it from being stored.
    fn chunk_stored(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        idx: u64,
        prio: Priority,
    ) -> BoxFuture<'static, Result<(), FetchError>> {
        match self.start_chunk(file, idx, prio, None, false) {
            Err(e) => futures::future::ready(Err(e)).boxed(),
            Ok(None) => futures::future::ready(Ok(())).boxed(),
            Ok(Some(f)) => async move {
                match f.stored.await? {
                    Outcome::Stored => Ok(()),
                    // An ensure or a repair wants it on disk: served is not enough.
                    Outcome::Skipped => Err(FetchError::Skipped),
                }
            }
            .boxed(),
        }
    }

    /// Joins the fetch of chunk `idx` in flight, or starts one. `None`: present on disk.
    /// `for_reader`: a reader will want the rest of the chunk soon (an on-demand read or its
    /// read-ahead), so the verified chunk is kept in `landed`; an ensure or a repair, which
    /// nobody reads, does not pin memory there.
    fn start_chunk(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        idx: u64,
        prio: Priority,
        permit: Option<OwnedSemaphorePermit>,
        for_reader: bool,
    ) -> Result<Option<InFlight>, FetchError> {
        let sha = file.entry.sha256;
        let key = FetchKey::Chunk(sha, idx);
        match file.entry.verification {
            Verification::Chunked(_) => {}
            Verification::Whole => {
                return Err(FetchError::WholeOnly {
                    path: file.entry.path.clone(),
                });
            }
        }
        // One look at the table decides: failed lately, present, in flight, or to start. A
        // chunk stays in flight until its commit has marked it present, so no reader finds
        // it neither.
        let mut table = self.table();
        match table.join(sha, idx, self.cfg.cooldown(), || {
            self.store.has_chunk(&file.entry, idx)
        }) {
            Join::Failed(e) => return Err(e),
            Join::Present => return Ok(None),
            Join::InFlight(f) => return Ok(Some(f)),
            Join::Start => {}
        }
        // A file's small head chunk goes first: the kernel sends the read-ahead of a header
        // read (chunk 1, eight parts) together with it, and those parts would otherwise share
        // the link and the origin with the one request the reader is blocked on. The two
        // reads reach us on two FUSE threads in either order, so the first chunk of a file
        // whose head is missing also waits a moment for a head fetch that may be about to
        // start (1 run in 3 of compare.sh (e) lost this race: 18 ms instead of 5).
        let head_first = if idx == 0 || file.entry.head_size >= file.entry.chunk_size {
            HeadFirst::Nothing
        } else if let Some(head) = table.chunk(sha, 0) {
            HeadFirst::InFlight(head.served.clone())
        } else if !self.store.has_chunk(&file.entry, 0)
            && !table.landed.holds(sha, 0)
            && !table.any_chunk_of(sha)
        {
            HeadFirst::Maybe
        } else {
            HeadFirst::Nothing
        };
        let this = self.clone();
        let file = file.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (stored_tx, stored_rx) = tokio::sync::oneshot::channel();
        // Spawned, so the fetch completes (and is cached) even if readers give up.
        // Readers get the chunk as soon as it is verified; the commit (pwrite, fdatasync,
        // index) follows off their path, and the chunk stays in flight until it is committed,
        // so nobody re-fetches it meanwhile. On the runtime's handle: read-ahead starts
        // fetches from FUSE threads, which are not runtime threads. The task cannot end
        // before it is in the table: ending takes the table's lock, held here until then.
        self.rt.spawn(async move {
            let done = |r: Result<Outcome, FetchError>| {
                this.table().finish(key);
                let _ = stored_tx.send(r);
            };
            if let Some(head) = this.head_to_wait_for(sha, head_first).await {
                // Bounded: a slow head must not hold the rest of the file back for long.
                let _ = tokio::time::timeout(HEAD_FIRST_WAIT, head).await;
            }
            let r = file.entry.layout().range(idx);
            let _mem = this.reserve_memory(r.end - r.start).await;
            if let Some(chunk) = this.adopt_from_disk(&file, idx).await {
                let _ = tx.send(Ok(chunk));
                return done(Ok(Outcome::Stored));
            }
            METRICS.downloads_active.inc();
            let r = this.fetch_chunk(&file, idx, prio).await;
            METRICS.downloads_active.dec();
            drop(permit);
            let chunk = match r {
                Ok(chunk) => chunk,
                Err(e) => {
                    (this.table()).remember_failure(key, &e, this.cfg.cooldown());
                    let _ = tx.send(Err(e.clone()));
                    return done(Err(e));
                }
            };
            // Only a chunk kept for its reader may skip the cache: one dropped now would be
            // fetched again when the reader gets there. Decided before it is kept, so that it
            // is kept as one no blob file will have (see `landed.rs`).
            let behind = for_reader && this.cache_is_behind(chunk.bytes().len() as u64);
            let kept = for_reader && (this.table().landed).insert(sha, idx, chunk.clone(), behind);
            let _ = tx.send(Ok(chunk.clone()));
            if kept && behind {
                METRICS.cache_skipped_bytes.inc_by(chunk.bytes().len() as u64);
                tracing::debug!(model = %file.model, file = %file.entry.path, chunk = idx,
                    "served and not cached: the cache disk is behind");
                return done(Ok(Outcome::Skipped));
            }
            let stored = this.commit(&file, idx, chunk).await;
            if let Err(e) = &stored {
                METRICS.errors.with_label_values(&["store"]).inc();
                tracing::error!(model = %file.model, file = %file.entry.path, chunk = idx, error = %e,
                    "could not store a verified chunk; it will be fetched again");
            }
            done(stored.map(|()| Outcome::Stored))
        });
        let gone = || FetchError::Join(None);
        let f = InFlight {
            served: async move { rx.await.unwrap_or_else(|_| Err(gone())) }
                .boxed()
                .shared(),
            stored: async move { stored_rx.await.unwrap_or_else(|_| Err(gone())) }
                .boxed()
                .shared(),
        };
        table.insert_chunk(sha, idx, f.clone());
        drop(table);
        if idx == 0 {
            self.head_started.notify_waiters();
        }
        Ok(Some(f))
    }

    /// The fetch of blob `sha`'s head chunk a later chunk should let go first, if any: the
    /// one in flight, or (`Maybe`) one that starts within `HEAD_RACE_WAIT`.
    async fn head_to_wait_for(&self, sha: Digest, first: HeadFirst) -> Option<SharedFetch> {
        match first {
            HeadFirst::Nothing => None,
            HeadFirst::InFlight(head) => Some(head),
            HeadFirst::Maybe => {
                let deadline = tokio::time::Instant::now() + HEAD_RACE_WAIT;
                loop {
                    let started = self.head_started.notified();
                    tokio::pin!(started);
                    // Registered before the look, so a head that starts in between still
                    // wakes us. Any file's head wakes every waiter: each looks for its own.
                    started.as_mut().enable();
                    let head = self.table().chunk(sha, 0).map(|h| h.served.clone());
                    if head.is_some() {
                        return head;
                    }
                    if tokio::time::timeout_at(deadline, started).await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// The chunk from the blob file, verified, when the index does not list it but the file
    /// holds it (see `Store::adopt_chunk`): checked before any source is asked.
    async fn adopt_from_disk(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        idx: u64,
    ) -> Option<VerifiedChunk> {
        let expected = file.entry.verification.chunk(idx)?;
        let store = self.store.clone();
        let entry = file.entry.clone();
        let chunk = tokio::task::spawn_blocking(move || store.adopt_chunk(&entry, idx, expected))
            .await
            .ok()??;
        if self.store.is_complete(&file.entry) {
            self.completed(file);
            self.check_in_background(file);
        }
        Some(chunk)
    }

    /// Holds `bytes` of fetch-buffer memory until the permit is dropped (a chunk's: after its
    /// commit). More than the whole budget takes all of it (see `memory_kib`).
    async fn reserve_memory(&self, bytes: u64) -> OwnedSemaphorePermit {
        self.memory
            .clone()
            .acquire_many_owned(kib(bytes).min(self.memory_kib))
            .await
            .expect("the memory semaphore is never closed")
    }

    /// Whether a chunk of `len` bytes fetched for a reader should skip the cache: under
    /// `when_cache_behind = "skip"`, when chunks holding more than half the fetch memory are
    /// already waiting for the disk (so fetches would soon wait for memory, and readers for
    /// the disk).
    fn cache_is_behind(&self, len: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.cfg.when_cache_behind == crate::config::WhenCacheBehind::Skip
            && self.committing.load(Ordering::Relaxed) + len > u64::from(self.memory_kib) * 1024 / 2
    }

    async fn commit(
        self: &Arc<Self>,
        file: &Arc<FileCtx>,
        idx: u64,
        chunk: VerifiedChunk,
    ) -> Result<(), FetchError> {
        use std::sync::atomic::Ordering;
        let store = self.store.clone();
        let entry = file.entry.clone();
        let len = chunk.bytes().len() as u64;
        self.committing.fetch_add(len, Ordering::Relaxed);
        let r = tokio::task::spawn_blocking(move || store.commit_chunk(&entry, idx, &chunk)).await;
        self.committing.fetch_sub(len, Ordering::Relaxed);
        r.map_err(FetchError::join)?.map_err(FetchError::store)?;
        METRICS.chunks_fetched.inc();
        tracing::debug!(model = %file.model, file = %file.entry.path, chunk = idx, bytes = len, "chunk committed");
        if self.store.is_complete(&file.entry) {
            self.completed(file);
            self.check_in_background(file);
        }
        Ok(())
    }

    fn completed(&self, file: &FileCtx) {
        let Some(t0) = self.table().take_started(file.entry.sha256) else {
            return;
        };

        let secs = t0.elapsed().as_secs_f64();
        METRICS
            .downloads
            .with_label_values(&[&file.model, "success"])
            .inc();
        METRICS
            .download_seconds
            .with_label_values(&[&file.model])
            .observe(secs);
        let event = crate::store::index::Event {
            ts: crate::store::now_secs(),
            kind: "download".into(),
            model: file.model.to_string(),
            file: file.entry.path.clone(),
            bytes: file.entry.size,
            seconds: secs,
            status: "success".into(),
            detail: String::new(),
        };
        // An SQLite write: never on a runtime thread.
        let store = self.store.clone();
        self.rt.spawn_blocking(move || {
            if let Err(e) = store.index().add_event(&event) {
                tracing::warn!(error = %e, "could not record a download event");
            }
        });
        tracing::info!(
            model = %file.model,
            file = %file.entry.path,
            bytes = file.entry.size,
            seconds = (secs * 1000.0).round() / 1000.0,
            "download completed"
        );
    }
}
