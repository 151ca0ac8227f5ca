//! One owner for a chunk's life in the fetcher: the fetches in flight (a chunk's, or a whole
//! file's), those that failed lately, the verified chunks and whole-only files that wait in
//! memory for their readers, and when each file's download started, in one [`ChunkTable`]
//! behind one lock, after nydus's `BlobStateMap` and mini-redis's `Shared { state:
//! Mutex<State> }`. A decision that reads several of them (join a fetch or start one, wait for a
//! file's head, leave a chunk held in memory to its reader) is taken under that one lock, so it
//! never sees half of another's change.
//!
//! A chunk's life, by [`FetchKey`]: absent → in flight (`flights`: readers await `served`, an
//! ensure awaits `stored`) → served (kept in `landed` for its reader, when there is room) →
//! stored or skipped ([`Outcome`]), and out of `flights` → present in the store, or, on
//! failure, in `failed` for the cool-down. A whole-only file goes the same way under
//! `FetchKey::Whole`, and is held in `whole_in_memory` where the cache cannot store it. The
//! whole-file check of a complete blob (`check.rs`) is single-flight under `FetchKey::Check`.
//!
//! Lock order: the table comes before the store's locks (deciding whether to start a fetch
//! looks at presence, `Store::has_chunk`, under it) and is never held across an await or any
//! I/O (see `crate::lock_order`). The tasks that fetch are `Fetcher::start_chunk`'s and
//! `Fetcher::ensure_whole`'s; how memory is kept is `landed.rs`'s and `whole::WholeInMemory`'s.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, Shared};

use crate::chunk::{Digest, VerifiedChunk};

use super::FetchError;
use super::landed::Landed;
use super::whole::WholeInMemory;

/// What a fetch is of: one chunk of a blob (by index), or a whole-only file's blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum FetchKey {
    Chunk(Digest, u64),
    Whole(Digest),
    /// The whole-file check of a complete blob (`check.rs`).
    Check(Digest),
}

pub(super) type SharedFetch = Shared<BoxFuture<'static, Result<VerifiedChunk, FetchError>>>;
pub(super) type SharedStored = Shared<BoxFuture<'static, Result<Outcome, FetchError>>>;
pub(super) type SharedWhole = Shared<BoxFuture<'static, Result<(), FetchError>>>;

/// What became of a verified chunk once its readers had it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Durable and indexed (committed, or adopted from the blob file).
    Stored,
    /// Served and deliberately not cached: the cache disk is behind
    /// (`fetch.when_cache_behind = "skip"`).
    Skipped,
}

/// A chunk fetch in flight: readers await `served` (the verified bytes); an ensure awaits
/// `stored` (durable and indexed, or skipped), instead of polling the index.
#[derive(Clone)]
pub(super) struct InFlight {
    pub(super) served: SharedFetch,
    pub(super) stored: SharedStored,
}

/// What a reader of a chunk does, as [`ChunkTable::join`] decides.
pub(super) enum Join {
    /// The chunk's last fetch failed within the cool-down: that error, at once.
    Failed(FetchError),
    /// The store holds it: read it there.
    Present,
    /// A fetch is under way: await it.
    InFlight(InFlight),
    /// None of these: the caller starts the fetch and puts it in the table
    /// ([`ChunkTable::insert_chunk`]) before it lets the lock go.
    Start,
}

/// A fetch in flight, of what its key names.
enum Flight {
    Chunk(InFlight),
    Whole(SharedWhole),
}

pub(super) struct ChunkTable {
    flights: HashMap<FetchKey, Flight>,
    /// Fetches that failed, and when: one asked for again within the cool-down fails at once
    /// with the same error instead of waiting out another `read_timeout` (the kernel retries a
    /// failed read immediately, with a smaller size; a whole file would be downloaded again).
    failed: HashMap<FetchKey, (Instant, FetchError)>,
    /// Verified chunks no reader has finished with yet, served from memory.
    pub(super) landed: Landed,
    /// Whole-only files the cache could not store, served from memory.
    pub(super) whole_in_memory: WholeInMemory,
    /// When each blob's download started (its first fetch), for the `download completed`
    /// line and metric; taken when the blob is complete.
    started: HashMap<Digest, Instant>,
}

impl ChunkTable {
    pub(super) fn new(landed: Landed, whole_in_memory: WholeInMemory) -> ChunkTable {
        ChunkTable {
            flights: HashMap::new(),
            failed: HashMap::new(),
            landed,
            whole_in_memory,
            started: HashMap::new(),
        }
    }

    /// Single-flight for chunk `idx` of `blob`: one look, under the table's lock, at whether it
    /// failed lately, is `present` in the store, or is in flight. The fetch task keeps the
    /// chunk in flight until its commit has made it present, and remembers a failure before it
    /// leaves (see `Fetcher::start_chunk`), so a reader never finds it in none of these while a
    /// fetch of it is still of use: at most one fetch of a chunk runs at once, and one per
    /// generation of it (until an eviction drops it) or per cool-down after a failure.
    pub(super) fn join(
        &self,
        blob: Digest,
        idx: u64,
        cooldown: Duration,
        present: impl FnOnce() -> bool,
    ) -> Join {
        if let Some(e) = self.recently_failed(FetchKey::Chunk(blob, idx), cooldown) {
            return Join::Failed(e);
        }
        if present() {
            return Join::Present;
        }
        match self.chunk(blob, idx) {
            Some(f) => Join::InFlight(f.clone()),
            None => Join::Start,
        }
    }

    /// Chunk `idx` of `blob`'s fetch, if one is in flight.
    pub(super) fn chunk(&self, blob: Digest, idx: u64) -> Option<&InFlight> {
        match self.flights.get(&FetchKey::Chunk(blob, idx))? {
            Flight::Chunk(f) => Some(f),
            Flight::Whole(_) => unreachable!("a chunk key holds a chunk's fetch"),
        }
    }

    /// The whole-file fetch of `blob`, if one is in flight.
    pub(super) fn whole(&self, blob: Digest) -> Option<&SharedWhole> {
        match self.flights.get(&FetchKey::Whole(blob))? {
            Flight::Whole(f) => Some(f),
            Flight::Chunk(_) => unreachable!("a whole key holds a whole file's fetch"),
        }
    }

    /// The whole-file check of `blob`, if one is under way (a check is a whole file's work,
    /// kept as one).
    pub(super) fn check(&self, blob: Digest) -> Option<&SharedWhole> {
        match self.flights.get(&FetchKey::Check(blob))? {
            Flight::Whole(f) => Some(f),
            Flight::Chunk(_) => unreachable!("a check key holds a check"),
        }
    }

    pub(super) fn insert_check(&mut self, blob: Digest, f: SharedWhole) {
        self.flights.insert(FetchKey::Check(blob), Flight::Whole(f));
    }

    /// Whether any chunk of `blob` is being fetched.
    pub(super) fn any_chunk_of(&self, blob: Digest) -> bool {
        self.flights
            .keys()
            .any(|k| matches!(k, FetchKey::Chunk(b, _) if *b == blob))
    }

    pub(super) fn insert_chunk(&mut self, blob: Digest, idx: u64, f: InFlight) {
        self.flights
            .insert(FetchKey::Chunk(blob, idx), Flight::Chunk(f));
    }

    pub(super) fn insert_whole(&mut self, blob: Digest, f: SharedWhole) {
        self.flights.insert(FetchKey::Whole(blob), Flight::Whole(f));
    }

    /// The fetch of `key` has ended (stored, skipped or failed): the next one asked for starts
    /// afresh.
    pub(super) fn finish(&mut self, key: FetchKey) {
        self.flights.remove(&key);
    }

    /// The error of a fetch of `key` that failed less than `cooldown` ago.
    pub(super) fn recently_failed(&self, key: FetchKey, cooldown: Duration) -> Option<FetchError> {
        let (t, e) = self.failed.get(&key)?;
        (t.elapsed() < cooldown).then(|| e.clone())
    }

    /// Remembers a failed fetch; entries older than `cooldown` are dropped here, off the
    /// per-read path.
    pub(super) fn remember_failure(&mut self, key: FetchKey, e: &FetchError, cooldown: Duration) {
        self.failed.retain(|_, (t, _)| t.elapsed() < cooldown);
        self.failed.insert(key, (Instant::now(), e.clone()));
    }

    /// Notes that `blob`'s download is under way (from its first fetch on).
    pub(super) fn started(&mut self, blob: Digest) {
        self.started.entry(blob).or_insert_with(Instant::now);
    }

    /// When `blob`'s download started, once: the caller reports it complete.
    pub(super) fn take_started(&mut self, blob: Digest) -> Option<Instant> {
        self.started.remove(&blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn table() -> ChunkTable {
        ChunkTable::new(
            Landed::new(1 << 20, Duration::from_secs(5)),
            WholeInMemory::new(1 << 20, Duration::from_secs(60)),
        )
    }

    fn in_flight() -> InFlight {
        InFlight {
            served: futures::future::pending().boxed().shared(),
            stored: futures::future::pending().boxed().shared(),
        }
    }

    /// A whole file's fetch and its chunks' never share a key: a failed whole-file fetch is
    /// remembered for the blob, not for a chunk of it (it was `u64::MAX` once).
    #[test]
    fn whole_and_chunk_keys_are_apart() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let mut t = table();
        t.insert_chunk(a, 3, in_flight());
        t.insert_whole(b, futures::future::pending().boxed().shared());
        assert!(t.chunk(a, 3).is_some() && t.chunk(a, 0).is_none());
        assert!(t.whole(b).is_some() && t.whole(a).is_none());
        assert!(
            t.any_chunk_of(a) && !t.any_chunk_of(b),
            "a whole fetch is no chunk's"
        );
        t.finish(FetchKey::Chunk(a, 3));
        assert!(!t.any_chunk_of(a));

        let cool = Duration::from_secs(60);
        t.remember_failure(FetchKey::Whole(a), &FetchError::Evicted, cool);
        assert!(t.recently_failed(FetchKey::Whole(a), cool).is_some());
        for idx in [0, u64::MAX] {
            assert!(t.recently_failed(FetchKey::Chunk(a, idx), cool).is_none());
        }
    }

    /// A failure counts for the cool-down and no longer; old ones are dropped as new ones come.
    #[test]
    fn failures_expire_after_the_cool_down() {
        let a = Digest::of(b"a");
        let mut t = table();
        let cool = Duration::from_millis(30);
        t.remember_failure(FetchKey::Chunk(a, 0), &FetchError::Skipped, cool);
        assert!(matches!(
            t.recently_failed(FetchKey::Chunk(a, 0), cool),
            Some(FetchError::Skipped)
        ));
        std::thread::sleep(Duration::from_millis(40));
        assert!(t.recently_failed(FetchKey::Chunk(a, 0), cool).is_none());
        t.remember_failure(FetchKey::Chunk(a, 1), &FetchError::Skipped, cool);
        assert_eq!(t.failed.len(), 1, "the expired entry was dropped");
    }

    /// Shuttle explores schedules of three readers, the fetches they start and an evictor,
    /// through the table's own `join`, with the steps of `Fetcher::start_chunk`'s task: a fetch
    /// that succeeds commits (the chunk is present) and then leaves the table; one that fails
    /// is remembered and then leaves. Whatever the interleaving, no two fetches of the chunk
    /// run at once, and none starts in a generation of the chunk (until an eviction drops it)
    /// that another fetch already started in: leaving before committing, or before the failure
    /// is remembered, would start a second one.
    #[test]
    fn single_flight_holds_whatever_the_schedule_of_readers_failures_and_evictions() {
        for first_fails in [false, true] {
            shuttle::check_random(move || race(first_fails), 1500);
        }
    }

    /// One schedule of [`single_flight_holds_whatever_the_schedule_of_readers_failures_and_evictions`].
    fn race(first_fails: bool) {
        use shuttle::sync::Mutex;
        use std::sync::Arc;

        /// The store, as far as one chunk goes: present or not, and which generation of it.
        #[derive(Default)]
        struct Disk {
            present: bool,
            generation: u64,
        }
        /// The fetches: how many run, and the generation each started in.
        #[derive(Default)]
        struct Fetches {
            running: usize,
            started_in: Vec<u64>,
        }
        let blob = Digest::of(b"blob");
        let key = FetchKey::Chunk(blob, 0);
        let cool = Duration::from_secs(600);
        let table = Arc::new(Mutex::new(table()));
        let disk = Arc::new(Mutex::new(Disk::default()));
        let fetches = Arc::new(Mutex::new(Fetches::default()));
        let mut threads = Vec::new();
        for _ in 0..3 {
            let (table, disk, fetches) = (table.clone(), disk.clone(), fetches.clone());
            threads.push(shuttle::thread::spawn(move || {
                for _ in 0..2 {
                    let mut t = table.lock().unwrap();
                    let mut generation = 0;
                    let join = t.join(blob, 0, cool, || {
                        let d = disk.lock().unwrap();
                        generation = d.generation;
                        d.present
                    });
                    let Join::Start = join else {
                        continue;
                    };
                    t.insert_chunk(blob, 0, in_flight());
                    let fails = {
                        let mut f = fetches.lock().unwrap();
                        assert_eq!(f.running, 0, "two fetches of one chunk at once");
                        assert!(
                            !f.started_in.contains(&generation),
                            "a second fetch in generation {generation}: {:?}",
                            f.started_in
                        );
                        f.running += 1;
                        f.started_in.push(generation);
                        first_fails && f.started_in.len() == 1
                    };
                    drop(t);
                    // The requests: anything may happen meanwhile.
                    shuttle::thread::yield_now();
                    if fails {
                        table.lock().unwrap().remember_failure(
                            key,
                            &FetchError::Timeout(cool),
                            cool,
                        );
                    } else {
                        disk.lock().unwrap().present = true;
                    }
                    let mut t = table.lock().unwrap();
                    fetches.lock().unwrap().running -= 1;
                    t.finish(key);
                }
            }));
        }
        let evictor = {
            let disk = disk.clone();
            shuttle::thread::spawn(move || {
                for _ in 0..2 {
                    let mut d = disk.lock().unwrap();
                    if d.present {
                        d.present = false;
                        d.generation += 1;
                    }
                    drop(d);
                    shuttle::thread::yield_now();
                }
            })
        };
        for t in threads {
            t.join().unwrap();
        }
        evictor.join().unwrap();
        assert!(!fetches.lock().unwrap().started_in.is_empty());
    }

    #[test]
    fn a_download_starts_once_and_is_reported_once() {
        let a = Digest::of(b"a");
        let mut t = table();
        t.started(a);
        let t0 = t.started[&a];
        std::thread::sleep(Duration::from_millis(2));
        t.started(a);
        assert_eq!(t.started[&a], t0, "a later fetch keeps the first start");
        assert_eq!(t.take_started(a), Some(t0));
        assert_eq!(t.take_started(a), None);
    }
}
