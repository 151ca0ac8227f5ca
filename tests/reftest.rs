//! Reference-model test of the read path, in process: no root, no `/dev/fuse`, no network.
//!
//! As mountpoint-s3's reftests do, a proptest drives the real `Store` (in a tempdir), `Fetcher`,
//! `Control` and `ModelFs`, built by the daemon's own `Services::builder`, through random
//! sequences of operations, with a `MockSource` as the origin (given to the builder as every
//! model's source), and compares every byte served with a plain `Vec<u8>` per file. Reads go
//! the way `fuse.rs` sends them: `read_cached` first, then the async `read`.
//!
//! The manifest holds two models: chunked files with 4, 16 and 64 KiB chunks (1, 2 and 8
//! request parts of 8 KiB per chunk), a whole-only file (only a whole-file sha256), an empty
//! file, one file listed by both models under different paths (one shared blob), and a
//! `blake3-tree` file on the aligned layout (4, 4, 8, 16, then 32 KiB chunks, each a BLAKE3
//! subtree at its offset, the larger ones hashed part by part as they land).
//!
//! Operations: reads at random offsets and lengths (some past the end of the file), sequential
//! reads on one handle (these grow the read-ahead window), several reads at once on tokio
//! tasks, eviction of a model (`Control::evict`) and aggressive GC (`Control::gc`), dropping a
//! chunk (`Store::drop_chunk`, what verify uses), a byte flipped in a blob file followed by a
//! verify job (report-only or repairing), an ensure job (plain or forced), faults injected into
//! the origin, a slow origin, a restart (everything dropped and reopened on the same directory,
//! as the daemon does), a crash (the runtime shut down with fetches in flight), a lost index
//! (deleted, or overwritten with garbage, then a restart that adopts the blob files, before the
//! first read or, as `daemon.rs` does, in the background while reads run), an eviction or
//! dropped chunk racing running reads, and passthrough opens (the blob file a complete blob
//! hands to the kernel, read at open and again at every later passthrough open while it stays
//! open, whatever was evicted or dropped meanwhile).
//!
//! Invariants checked after every operation:
//! 1. Every byte served equals the model. With wrong bytes injected a read returns the right
//!    bytes or an error, never wrong bytes.
//! 2. A read (or ensure, or repairing verify) fails only while an injected fault may be in
//!    play: from its injection until the origin has consumed every pending fault, the fetcher
//!    has gone idle and the cool-down (failure memory, source cool-down) has passed. Outside
//!    that, every read succeeds at its first attempt.
//! 3. Origin fetches: counted as the requests the mock answered with the right bytes
//!    (`Outcome::Delivered`; failed, corrupted and abandoned requests are not counted), per
//!    request range of a blob, per *generation* of its chunk. A generation ends when the chunk
//!    is dropped or its blob evicted, or at a crash (a fetch may have been delivered and not
//!    committed); for a whole-only file, dropping one chunk ends the generation of the whole
//!    blob, since it can only be fetched again whole. A restart and a lost index do not end a
//!    generation: committed chunks must survive both without a fetch. Each range is delivered
//!    at most once per generation, however many readers, read-ahead or models (dedup) want it.
//!    The one exception is a generation during which a fault was injected, for a chunk fetched
//!    in several requests (several parts, or a whole-only file): when one part fails for good,
//!    the parts already delivered are thrown away with it and fetched again.
//!
//! Evictions, dropped chunks, verify and ensure jobs, restarts and lost indexes happen with the
//! fetcher idle (every fetch task finished), so generations have exact boundaries. `Race` and
//! `Crash` are the exceptions by design, and so is a background adoption: there only the bytes
//! are checked, and deliveries are not counted until the fetcher (and the adoption) is idle
//! again. (A read racing the adoption verifies the chunk from the blob file instead.)
//!
//! Bugs this test found, fixed, and kept in its reach: a whole-only file with a dropped chunk
//! served wrong bytes after a lying refetch (`droppable`); a whole-only file evicted during a
//! read failed that read (`Op::Race`); an eviction racing a background adoption served zeros
//! (`Op::Race`); a repairing verify whose refetch failed reported 0 bad chunks
//! (`Op::CorruptOnDisk`).
//!
//! `PROPTEST_CASES=N` runs more cases (default 64); `RUST_LOG=wanfs=debug` shows the daemon's
//! log for a failing case.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use proptest::prelude::*;

use wanfs::chunk::{ChunkCheck, ChunkHash, Digest, Layout};
use wanfs::config::{Config, FetchConfig};
use wanfs::control::{Control, GcMode, JobState, Work};
use wanfs::daemon::Services;
use wanfs::fetch::Fetcher;
use wanfs::fs::{ModelFs, ROOT};
use wanfs::manifest::{FileEntry, Manifest, Model, ModelId, Verification};
use wanfs::source::SourceHandle;
use wanfs::source::mock::{Fault, MockSource, Outcome};
use wanfs::store::{Store, StoreError};

const KIB: u64 = 1024;
/// Request part size: 4 KiB chunks take one request, 16 KiB two, 64 KiB eight.
const PART_KIB: u64 = 8;
const MODELS: [&str; 2] = ["alpha@1.0.0", "beta@1.0.0"];

/// One file of the manifest, and its content (the model).
struct Spec {
    model: usize,
    path: &'static str,
    data: Bytes,
    chunk_size: u64,
    /// The first chunk's size (`chunk_size`: a uniform grid).
    head: u64,
    whole_only: bool,
    /// Index of its blob (files with equal content share one).
    blob: usize,
}

impl Spec {
    fn layout(&self) -> Layout {
        let kind = self.chunk_hash().layout_kind();
        Layout::of(kind, self.data.len() as u64, self.chunk_size, self.head)
    }

    /// The shared blob's chunks are BLAKE3, blob 5's blake3-tree, the others sha256: one
    /// manifest, every hash.
    fn chunk_hash(&self) -> ChunkHash {
        match self.blob {
            _ if self.whole_only => ChunkHash::Sha256,
            1 => ChunkHash::Blake3,
            5 => ChunkHash::Blake3Tree,
            _ => ChunkHash::Sha256,
        }
    }

    /// Whether one chunk is fetched in more than one request.
    fn multi_request(&self) -> bool {
        self.whole_only || self.chunk_size > PART_KIB * KIB
    }

    fn entry(&self) -> FileEntry {
        let layout = self.layout();
        let chunk_hash = self.chunk_hash();
        let verification = if self.whole_only {
            Verification::Whole
        } else {
            Verification::Chunked(
                (0..layout.count())
                    .map(|i| {
                        let r = layout.range(i);
                        ChunkCheck::of(chunk_hash, &layout, i)
                            .digest(&self.data[r.start as usize..r.end as usize])
                    })
                    .collect(),
            )
        };
        FileEntry {
            path: self.path.into(),
            size: self.data.len() as u64,
            sha256: Digest::of(&self.data),
            chunk_size: self.chunk_size,
            head_size: self.head,
            chunk_hash,
            verification,
        }
    }
}

/// Deterministic bytes that differ from chunk to chunk (a flipped byte is always wrong).
fn bytes(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn specs() -> &'static [Spec] {
    static SPECS: OnceLock<Vec<Spec>> = OnceLock::new();
    SPECS.get_or_init(|| {
        let t5 = bytes(2, 70_000);
        vec![
            Spec {
                model: 0,
                path: "a.bin",
                data: bytes(1, 45_000),
                chunk_size: 4 * KIB,
                head: 4 * KIB,
                whole_only: false,
                blob: 0,
            },
            Spec {
                model: 0,
                path: "shared/t5.bin",
                data: t5.clone(),
                chunk_size: 16 * KIB,
                head: 16 * KIB,
                whole_only: false,
                blob: 1,
            },
            Spec {
                model: 0,
                path: "whole.bin",
                data: bytes(3, 30_000),
                chunk_size: 8 * KIB,
                head: 8 * KIB,
                whole_only: true,
                blob: 2,
            },
            Spec {
                model: 0,
                path: "empty.bin",
                data: Bytes::new(),
                chunk_size: 4 * KIB,
                head: 4 * KIB,
                whole_only: false,
                blob: 3,
            },
            Spec {
                model: 1,
                path: "b.bin",
                data: bytes(4, 2 * 65_536 + 100),
                chunk_size: 64 * KIB,
                // A small first chunk, as `wan manifest build` gives large files.
                head: 4 * KIB,
                whole_only: false,
                blob: 4,
            },
            Spec {
                model: 1,
                path: "enc/t5.bin",
                data: t5,
                chunk_size: 16 * KIB,
                head: 16 * KIB,
                whole_only: false,
                blob: 1,
            },
            Spec {
                model: 1,
                path: "tree.bin",
                data: bytes(5, 3 * 32_768 + 5_000),
                chunk_size: 32 * KIB,
                // The aligned layout of `blake3-tree`: 4, 4, 8, 16, then 32 KiB.
                head: 4 * KIB,
                whole_only: false,
                blob: 5,
            },
        ]
    })
}

fn manifest() -> Manifest {
    let mut models = BTreeMap::new();
    for (m, id) in MODELS.iter().enumerate() {
        let id: ModelId = id.parse().unwrap();
        models.insert(
            id.clone(),
            Model {
                id,
                description: String::new(),
                pinned: false,
                sources: Vec::new(),
                files: specs()
                    .iter()
                    .filter(|s| s.model == m)
                    .map(Spec::entry)
                    .collect(),
            },
        );
    }
    Manifest { models }
}

/// How long a failed chunk fails fast and a failing source is skipped: short, so the window
/// in which a consumed fault still matters costs milliseconds, but not zero, so that code runs.
const COOLDOWN: Duration = Duration::from_millis(20);

/// Short timeouts and backoff so injected faults cost milliseconds.
fn fetch_config() -> FetchConfig {
    FetchConfig {
        connections: 8,
        max_inflight_mib: 4,
        read_timeout_secs: 5.0,
        request_timeout_secs: 0.1,
        retries: 3,
        backoff_ms: 1,
        cooldown_secs: COOLDOWN.as_secs_f64(),
        readahead_chunks: 4,
        part_size_kib: PART_KIB,
        // Every chunk read is cached: the model counts one fetch per chunk and generation.
        when_cache_behind: wanfs::config::WhenCacheBehind::Wait,
    }
}

/// A stalled request waits this long: past the request timeout, so it is a timeout.
const STALL: Duration = Duration::from_millis(150);

/// One run of the daemon: what `daemon.rs` wires together (`Services::builder`, and the
/// filesystem `serve` mounts), minus FUSE and HTTP.
struct Daemon {
    store: Arc<Store>,
    fetcher: Arc<Fetcher>,
    control: Arc<Control>,
    fs: Arc<ModelFs>,
    /// Inode of each spec.
    inos: Vec<u64>,
    /// An open handle on each spec (read-ahead is tracked per handle).
    fhs: Vec<u64>,
    /// Handles opened in passthrough mode, with the blob file the kernel would read: (spec,
    /// handle, file).
    backings: Vec<(usize, u64, std::fs::File)>,
    /// References to the fetcher when no fetch task is running (each task holds one).
    idle_refs: usize,
    /// The adoption of blob files running in the background, if any.
    adopting: Option<tokio::task::JoinHandle<Result<(), StoreError>>>,
    /// Declared last: dropped after everything that spawns on it.
    rt: tokio::runtime::Runtime,
}

impl Daemon {
    /// `adopt_in_background`: as `daemon.rs` does, so reads race the adoption of blob files a
    /// lost index no longer names; otherwise they are adopted before the first read.
    fn start(dir: &Path, mock: &MockSource, adopt_in_background: bool) -> Daemon {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        let manifest = manifest();
        let cfg = Config {
            fetch: fetch_config(),
            ..Config::default()
        };
        // The daemon's own wiring, with a fresh handle on the mock per run, as a restarted
        // daemon builds fresh sources (fresh health).
        let services = build_services(dir, &manifest, &cfg, mock);
        let entries: Vec<_> = manifest
            .models
            .values()
            .flat_map(|m| m.files.clone())
            .collect();
        let adopting = if adopt_in_background {
            let store = services.store.clone();
            Some(rt.spawn_blocking(move || store.adopt(&entries).map(drop)))
        } else {
            services.store.adopt(&entries).unwrap();
            None
        };
        // Passthrough on, as mounted by default: `open` hands out the blob file of a complete
        // blob, which `Op::Passthrough` reads as the kernel would.
        assert!(cfg.mount.passthrough);
        let fs = services.filesystem(rt.handle().clone(), &cfg, SystemTime::UNIX_EPOCH);
        let Services {
            store,
            fetcher,
            control,
            ..
        } = services;
        let inos: Vec<u64> = specs().iter().map(|s| lookup(&fs, s)).collect();
        let idle_refs = Arc::strong_count(&fetcher);
        let mut d = Daemon {
            store,
            fetcher,
            control,
            fs,
            inos,
            fhs: Vec::new(),
            backings: Vec::new(),
            idle_refs,
            adopting,
            rt,
        };
        d.open_all();
        d
    }

    fn open_all(&mut self) {
        self.fhs = self
            .inos
            .iter()
            .map(|ino| self.fs.open(*ino, false).unwrap().fh)
            .collect();
    }

    fn release_all(&mut self) {
        for (ino, fh) in self.inos.iter().zip(self.fhs.drain(..)) {
            self.fs.release(*ino, fh);
        }
        for (spec, fh, _) in self.backings.drain(..) {
            self.fs.release(self.inos[spec], fh);
        }
    }

    /// Waits until every fetch task has finished (committed, or failed). A fetch that never
    /// ends is a hang: the test fails.
    fn quiesce(&self) {
        self.wait_adopted();
        let t0 = Instant::now();
        while Arc::strong_count(&self.fetcher) > self.idle_refs {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "fetch tasks still running after 20 s ({} references to the fetcher, {} when idle)",
                Arc::strong_count(&self.fetcher),
                self.idle_refs
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until a background adoption has finished.
    fn wait_adopted(&self) {
        let t0 = Instant::now();
        while self.adopting.as_ref().is_some_and(|h| !h.is_finished()) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "adoption still running after 20 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// No fetch task and no adoption running.
    fn idle(&self) -> bool {
        Arc::strong_count(&self.fetcher) == self.idle_refs
            && self.adopting.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Drops the daemon; `graceful` lets every fetch finish first, otherwise the runtime is shut
    /// down under them (a crash, as far as one process can have one).
    fn stop(mut self, graceful: bool) {
        if graceful {
            self.quiesce();
            self.release_all();
        }
        if let Some(h) = self.adopting.take()
            && graceful
        {
            self.rt.block_on(h).unwrap().expect("adopting blob files");
        }
        let Daemon {
            store,
            fetcher,
            control,
            fs,
            rt,
            ..
        } = self;
        drop((fs, control, fetcher, store));
        rt.shutdown_timeout(Duration::from_secs(5));
    }

    /// A read as `fuse.rs` makes it: from the cache if every chunk is there, else fetched.
    fn read(&self, spec: usize, offset: u64, len: u32) -> Result<Bytes, String> {
        let (fs, ino, fh) = (self.fs.clone(), self.inos[spec], self.fhs[spec]);
        self.rt.block_on(fuse_read(fs, ino, fh, offset, len))
    }

    /// Starts `reads` at once on the runtime, as concurrent FUSE requests (call within it).
    fn spawn_reads(&self, reads: &[ReadOp]) -> Vec<tokio::task::JoinHandle<Result<Bytes, String>>> {
        reads
            .iter()
            .map(|r| {
                let (fs, ino, fh) = (self.fs.clone(), self.inos[r.spec], self.fhs[r.spec]);
                tokio::spawn(fuse_read(fs, ino, fh, r.offset(), r.len))
            })
            .collect()
    }
}

async fn fuse_read(
    fs: Arc<ModelFs>,
    ino: u64,
    fh: u64,
    offset: u64,
    len: u32,
) -> Result<Bytes, String> {
    if let Some(r) = fs.read_cached(ino, fh, offset, len) {
        return r.map_err(|e| e.to_string());
    }
    fs.read(ino, fh, offset, len)
        .await
        .map_err(|e| e.to_string())
}

/// `Services::builder` over the cache in `dir` with `mock` as every model's origin, waiting for
/// the previous run's lock: its last blocking commits may still hold a reference to its store
/// for a moment after its runtime is gone.
fn build_services(dir: &Path, manifest: &Manifest, cfg: &Config, mock: &MockSource) -> Services {
    let t0 = Instant::now();
    loop {
        let source = Arc::new(SourceHandle::new("mock".into(), Box::new(mock.clone())));
        let built = Services::builder(manifest, dir)
            .manifest_path(&dir.join("models.toml"))
            .config(cfg)
            .sources(vec![source])
            .build();
        match built {
            Ok(services) => return services,
            Err(e)
                if matches!(e.downcast_ref(), Some(StoreError::Locked(_)))
                    && t0.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("reopening the store: {e:#}"),
        }
    }
}

/// The inode of a spec's file, by walking the tree from the root as the kernel does.
fn lookup(fs: &ModelFs, s: &Spec) -> u64 {
    let mut ino = fs.lookup(ROOT, MODELS[s.model]).unwrap().ino;
    for part in s.path.split('/') {
        ino = fs.lookup(ino, part).unwrap().ino;
    }
    let attr = fs.getattr(ino).unwrap();
    assert_eq!(attr.size, s.data.len() as u64, "{}", s.path);
    ino
}

#[derive(Debug, Clone, Copy)]
enum FaultKind {
    Fail,
    Corrupt,
    Stall,
}

/// A read: `at` and `len` are scaled to the file so most reads land inside it.
#[derive(Debug, Clone, Copy)]
struct ReadOp {
    spec: usize,
    at: u64,
    len: u32,
}

impl ReadOp {
    /// An offset up to a chunk past the end of the file.
    fn offset(&self) -> u64 {
        let s = &specs()[self.spec];
        self.at % (s.data.len() as u64 + s.chunk_size + 1)
    }
}

/// What a `Race` removes under running reads.
#[derive(Debug, Clone, Copy)]
enum RaceTarget {
    Model(usize),
    Chunk { spec: usize, chunk: u64 },
}

#[derive(Debug, Clone)]
enum Op {
    Read(ReadOp),
    /// A read where the handle's previous read ended (sequential: read-ahead).
    ReadNext {
        spec: usize,
        len: u32,
    },
    /// Several reads at once; with `same`, all of them the first one (single-flight).
    Concurrent {
        reads: Vec<ReadOp>,
        same: bool,
    },
    Evict {
        model: usize,
    },
    /// Every handle closed, aggressive GC, handles reopened.
    Gc,
    DropChunk {
        spec: usize,
        chunk: u64,
    },
    /// A passthrough open: if the blob is complete, its file is read as the kernel would, and
    /// kept open; every passthrough file still open is read again.
    Passthrough {
        spec: usize,
    },
    /// One byte of a present chunk flipped in its blob file, then a verify of its model
    /// (`repair`: the bad chunk is fetched again; else it is dropped).
    CorruptOnDisk {
        spec: usize,
        chunk: u64,
        repair: bool,
    },
    /// Reads started, then after `after_us` an eviction or a dropped chunk while they run.
    Race {
        reads: Vec<ReadOp>,
        target: RaceTarget,
        after_us: u64,
    },
    /// An ensure job run to completion (`force`: the model's blobs are evicted first).
    Ensure {
        model: usize,
        force: bool,
    },
    Fault {
        kind: FaultKind,
        n: u32,
    },
    Delay {
        ms: u64,
    },
    Restart,
    Crash,
    /// The index deleted (or overwritten with garbage), then a restart; with `background`,
    /// blob files are adopted while reads run, as the daemon does.
    IndexLoss {
        delete: bool,
        background: bool,
    },
}

fn read_op() -> impl Strategy<Value = ReadOp> {
    let len = prop_oneof![
        3 => 1u32..4096,
        2 => 1u32..70_000,
        1 => 1u32..200_000,
    ];
    (0..specs().len(), any::<u64>(), len).prop_map(|(spec, at, len)| ReadOp { spec, at, len })
}

/// Specs `DropChunk` may pick: files with at least one chunk, whole-only ones included (a
/// dropped chunk of a whole-only file once let a lying refetch overwrite chunks still served:
/// Read(whole.bin, all); DropChunk(whole.bin, 1); Fault(Corrupt, 1); Read(whole.bin, 9000+10);
/// Read(whole.bin, 0+8192) returned the corrupted bytes).
fn droppable() -> Vec<usize> {
    specs()
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.data.is_empty())
        .map(|(i, _)| i)
        .collect()
}

/// Specs with at least one chunk.
fn nonempty() -> Vec<usize> {
    specs()
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.data.is_empty())
        .map(|(i, _)| i)
        .collect()
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => read_op().prop_map(Op::Read),
        5 => (0..specs().len(), prop_oneof![1u32..4096, 1u32..40_000])
            .prop_map(|(spec, len)| Op::ReadNext { spec, len }),
        3 => (prop::collection::vec(read_op(), 2..6), any::<bool>())
            .prop_map(|(reads, same)| Op::Concurrent { reads, same }),
        1 => (0..MODELS.len()).prop_map(|model| Op::Evict { model }),
        1 => Just(Op::Gc),
        2 => (0..specs().len()).prop_map(|spec| Op::Passthrough { spec }),
        2 => (prop::sample::select(droppable()), any::<u64>()).prop_map(|(spec, c)| Op::DropChunk {
            spec,
            chunk: c % specs()[spec].layout().count(),
        }),
        2 => (prop::sample::select(nonempty()), any::<u64>(), any::<bool>()).prop_map(
            |(spec, c, repair)| Op::CorruptOnDisk {
                spec,
                chunk: c % specs()[spec].layout().count(),
                repair,
            }
        ),
        1 => (0..MODELS.len(), any::<bool>()).prop_map(|(model, force)| Op::Ensure { model, force }),
        2 => (
            prop::collection::vec(read_op(), 1..5),
            prop_oneof![
                (0..MODELS.len()).prop_map(RaceTarget::Model),
                (prop::sample::select(droppable()), any::<u64>()).prop_map(|(spec, c)| {
                    RaceTarget::Chunk { spec, chunk: c % specs()[spec].layout().count() }
                }),
            ],
            0u64..3000,
        )
            .prop_map(|(reads, target, after_us)| Op::Race { reads, target, after_us }),
        2 => prop_oneof![
            (1u32..=4).prop_map(|n| Op::Fault { kind: FaultKind::Fail, n }),
            (1u32..=2).prop_map(|n| Op::Fault { kind: FaultKind::Corrupt, n }),
            Just(Op::Fault { kind: FaultKind::Stall, n: 1 }),
        ],
        1 => prop_oneof![Just(0u64), 1u64..4].prop_map(|ms| Op::Delay { ms }),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
        1 => (any::<bool>(), any::<bool>())
            .prop_map(|(delete, background)| Op::IndexLoss { delete, background }),
    ]
}

/// The model, the system under test, and the bookkeeping for the invariants.
struct Harness {
    dir: tempfile::TempDir,
    mock: MockSource,
    daemon: Option<Daemon>,
    /// Where each spec's handle will read next (`ReadNext`).
    next: Vec<u64>,
    /// How much of the mock's log has been counted.
    seen: usize,
    /// Deliveries in the current generation, by (blob, request start).
    delivered: HashMap<(usize, u64), u32>,
    /// Chunks, by (blob, chunk index), whose current generation saw a fault injected.
    tainted: HashSet<(usize, u64)>,
    /// A fault may be in play: reads may fail (invariant 2).
    faults: bool,
    /// Blobs whose deliveries are not counted for now (removed under running fetches, or read
    /// while a background adoption runs), until everything is idle and a new generation starts.
    racing: HashSet<usize>,
    /// Whole-only blobs with a chunk found corrupt on disk, until their next generation: the
    /// refetch of the dropped chunk is checked with the whole file, and when that check fails
    /// the blob is evicted and fetched whole once more (correct bytes, one extra download).
    whole_repairs: HashSet<usize>,
    /// Spec that serves each path the mock sees.
    by_path: HashMap<&'static str, usize>,
}

impl Harness {
    /// `in_memory`: the cache in tmpfs when there is one, where `fdatasync` costs nothing, so
    /// hundreds of cases fit in seconds; otherwise on the disk of the temporary directory,
    /// where chunks take the `O_DIRECT` commit path.
    fn new(in_memory: bool) -> Harness {
        let shm = Path::new("/dev/shm");
        let dir = if in_memory && shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let mock = MockSource::new();
        for s in specs() {
            mock.insert(s.path, s.data.clone());
        }
        let daemon = Some(Daemon::start(dir.path(), &mock, false));
        Harness {
            dir,
            mock,
            daemon,
            next: vec![0; specs().len()],
            seen: 0,
            delivered: HashMap::new(),
            tainted: HashSet::new(),
            faults: false,
            racing: HashSet::new(),
            whole_repairs: HashSet::new(),
            by_path: specs()
                .iter()
                .enumerate()
                .map(|(i, s)| (s.path, i))
                .collect(),
        }
    }

    fn d(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    /// Invariant 1, and invariant 2 for a read that failed.
    fn check_read(&self, r: ReadOp, got: Result<Bytes, String>) {
        let s = &specs()[r.spec];
        let off = r.offset();
        let size = s.data.len() as u64;
        let (start, end) = (off.min(size), (off + r.len as u64).min(size));
        match got {
            Ok(b) => {
                let want = &s.data[start as usize..end as usize];
                if b[..] != *want {
                    let first = b.iter().zip(want).position(|(a, b)| a != b);
                    // Where the wrong bytes came from: zeros (a hole), or the 64 bytes at the
                    // first difference found in some spec's data (which spec, at which offset).
                    let source = first.map_or_else(String::new, |i| {
                        let probe = &b[i..(i + 64).min(b.len())];
                        let zeros = probe.iter().all(|x| *x == 0);
                        let hits: Vec<_> = specs()
                            .iter()
                            .enumerate()
                            .filter_map(|(k, sp)| {
                                let p = sp.data.windows(probe.len()).position(|w| w == probe)?;
                                Some((k, p))
                            })
                            .collect();
                        let last = b.iter().zip(want).rposition(|(a, b)| a != b);
                        format!(
                            "; there zeros={zeros}, found in specs (index, offset) {hits:?}; \
                             last difference at {:?}",
                            last.map(|i| off + i as u64)
                        )
                    });
                    panic!(
                        "WRONG BYTES from {} at {off}+{}: got {} bytes, want {}, first difference at {:?}{source}",
                        s.path,
                        r.len,
                        b.len(),
                        want.len(),
                        first.map(|i| off + i as u64)
                    );
                }
            }
            Err(e) => assert!(
                self.faults,
                "read of {} at {off}+{} failed with no fault in play: {e}",
                s.path, r.len
            ),
        }
    }

    /// Ends invariant 2's fault window once every injected fault is consumed and the fetches
    /// that might have met one are over.
    fn settle_faults(&mut self) {
        if self.faults && self.mock.pending_faults() == 0 {
            self.d().quiesce();
            // A failure is remembered (the chunk fails fast, the source cools down) this long.
            std::thread::sleep(COOLDOWN + Duration::from_millis(5));
            self.faults = false;
        }
    }

    /// Invariant 3: counts deliveries logged since the last call.
    fn count_fetches(&mut self) {
        let log = self.mock.log_since(self.seen);
        self.seen += log.len();
        for req in log {
            if req.outcome != Outcome::Delivered {
                continue;
            }
            let s = &specs()[self.by_path[req.path.as_str()]];
            let chunk = s.layout().covering(req.range.start, 1).start;
            let n = self.delivered.entry((s.blob, req.range.start)).or_default();
            *n += 1;
            let excused = (s.multi_request() && self.tainted.contains(&(s.blob, chunk)))
                || self.racing.contains(&s.blob)
                || self.whole_repairs.contains(&s.blob);
            assert!(
                *n <= 1 || excused,
                "{} bytes {:?} (chunk {chunk}) fetched {} times in one generation",
                s.path,
                req.range,
                *n
            );
        }
    }

    /// Starts a new generation for chunks `chunks` of `blob`.
    fn new_generation(&mut self, blob: usize, chunks: impl IntoIterator<Item = u64>) {
        let s = specs().iter().find(|s| s.blob == blob).unwrap();
        for c in chunks {
            let r = s.layout().range(c);
            self.delivered
                .retain(|(b, start), _| !(*b == blob && r.contains(start)));
            self.tainted.remove(&(blob, c));
            if self.faults {
                self.tainted.insert((blob, c));
            }
        }
    }

    fn new_blob_generation(&mut self, blob: usize) {
        self.whole_repairs.remove(&blob);
        let s = specs().iter().find(|s| s.blob == blob).unwrap();
        self.new_generation(blob, 0..s.layout().count());
    }

    fn taint_all(&mut self) {
        for s in specs() {
            for c in 0..s.layout().count() {
                self.tainted.insert((s.blob, c));
            }
        }
    }

    /// Ends the uncounted window of blobs in `racing` once nothing runs any more: a new
    /// generation for each starts.
    fn end_races(&mut self) {
        self.count_fetches();
        for b in std::mem::take(&mut self.racing) {
            self.new_blob_generation(b);
        }
    }

    /// `lose_index`: Some(delete) deletes the index (or overwrites it with garbage) before the
    /// restart; `adopt_in_background` then lets reads race the adoption.
    fn restart(&mut self, graceful: bool, lose_index: Option<bool>, adopt_in_background: bool) {
        self.daemon.take().unwrap().stop(graceful);
        self.end_races();
        if !graceful {
            // A fetch may have been delivered and not committed.
            for b in specs().iter().map(|s| s.blob).collect::<HashSet<_>>() {
                self.new_blob_generation(b);
            }
        }
        let v1 = self.dir.path().join("v1");
        match lose_index {
            Some(true) => {
                for ext in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(v1.join(format!("index.sqlite{ext}")));
                }
            }
            Some(false) => std::fs::write(v1.join("index.sqlite"), b"not a database").unwrap(),
            None => {}
        }
        self.daemon = Some(Daemon::start(
            self.dir.path(),
            &self.mock,
            adopt_in_background,
        ));
        if adopt_in_background {
            // A read racing the adoption adopts its chunk from the blob file itself (and the
            // adoption then skips the rest of that blob): not counted until it is over.
            self.racing = specs().iter().map(|s| s.blob).collect();
        }
        self.next.iter_mut().for_each(|n| *n = 0);
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Read(r) => {
                self.settle_faults();
                let got = self.d().read(r.spec, r.offset(), r.len);
                self.check_read(*r, got);
            }
            Op::ReadNext { spec, len } => {
                self.settle_faults();
                let size = specs()[*spec].data.len() as u64;
                let at = if self.next[*spec] >= size {
                    0
                } else {
                    self.next[*spec]
                };
                let r = ReadOp {
                    spec: *spec,
                    at,
                    len: *len,
                };
                let got = self.d().read(*spec, at, *len);
                if got.is_ok() {
                    self.next[*spec] = at + *len as u64;
                }
                self.check_read(r, got);
            }
            Op::Concurrent { reads, same } => {
                self.settle_faults();
                let reads: Vec<ReadOp> = if *same {
                    vec![reads[0]; reads.len()]
                } else {
                    reads.clone()
                };
                let d = self.d();
                let results = d.rt.block_on(async {
                    let tasks = d.spawn_reads(&reads);
                    let mut out = Vec::new();
                    for t in tasks {
                        out.push(t.await.unwrap());
                    }
                    out
                });
                for (r, got) in reads.iter().zip(results) {
                    self.check_read(*r, got);
                }
            }
            Op::Evict { model } => {
                self.d().quiesce();
                self.count_fetches();
                self.d().control.evict(MODELS[*model], true).unwrap();
                let blobs: HashSet<usize> = specs()
                    .iter()
                    .filter(|s| s.model == *model)
                    .map(|s| s.blob)
                    .collect();
                for b in blobs {
                    self.new_blob_generation(b);
                }
            }
            Op::Gc => {
                self.d().quiesce();
                self.count_fetches();
                let d = self.daemon.as_mut().unwrap();
                d.release_all();
                d.rt.block_on(d.control.gc(GcMode::Aggressive, false))
                    .unwrap();
                assert_eq!(d.store.used_bytes(), 0, "aggressive GC with nothing open");
                d.open_all();
                self.next.iter_mut().for_each(|n| *n = 0);
                for b in specs().iter().map(|s| s.blob).collect::<HashSet<_>>() {
                    self.new_blob_generation(b);
                }
            }
            Op::DropChunk { spec, chunk } => {
                self.d().quiesce();
                self.count_fetches();
                let s = &specs()[*spec];
                self.d().store.drop_chunk(&s.entry(), *chunk).unwrap();
                if s.whole_only {
                    self.new_blob_generation(s.blob);
                    self.whole_repairs.insert(s.blob);
                } else {
                    self.new_generation(s.blob, [*chunk]);
                }
            }
            Op::CorruptOnDisk {
                spec,
                chunk,
                repair,
            } => {
                self.d().quiesce();
                self.count_fetches();
                let s = &specs()[*spec];
                let d = self.d();
                if !d.store.has_chunk(&s.entry(), *chunk) {
                    return;
                }
                let r = s.layout().range(*chunk);
                flip_byte(&d.store.blob_path(s.entry().sha256), (r.start + r.end) / 2);
                // A passthrough file cannot be revoked: its reader sees the corruption until it
                // closes the file (docs/SEMANTICS.md). Close them here, as that reader would.
                let d = self.daemon.as_mut().unwrap();
                let (gone, kept) = std::mem::take(&mut d.backings)
                    .into_iter()
                    .partition(|(sp, _, _)| specs()[*sp].blob == s.blob);
                d.backings = kept;
                for (sp, fh, _) in gone {
                    d.fs.release(d.inos[sp], fh);
                }
                // The chunk's bytes on disk are wrong from here: a new generation either way.
                if s.whole_only {
                    self.new_blob_generation(s.blob);
                    self.whole_repairs.insert(s.blob);
                } else {
                    self.new_generation(s.blob, [*chunk]);
                }
                let d = self.d();
                let work = Work::Verify {
                    report_only: !*repair,
                };
                let job =
                    d.rt.block_on(d.control.run_now(MODELS[s.model], work))
                        .unwrap();
                // Counted even when the repair's refetch fails.
                assert!(
                    job.bad_chunks >= 1,
                    "verify missed a flipped byte in {} chunk {chunk}: {job:?}",
                    s.path
                );
                assert!(
                    job.state == JobState::Done || (*repair && self.faults),
                    "verify failed with no fault in play: {job:?}"
                );
            }
            Op::Passthrough { spec } => {
                let d = self.daemon.as_mut().unwrap();
                let opened = d.fs.open(d.inos[*spec], false).unwrap();
                match opened.backing {
                    Some(file) => d.backings.push((*spec, opened.fh, file)),
                    None => d.fs.release(d.inos[*spec], opened.fh),
                }
                // Eviction unlinks a blob file and never punches holes in it, so a file handed
                // out for passthrough keeps its verified bytes whatever happens to the cache.
                for (spec, _, file) in &d.backings {
                    let want = &specs()[*spec].data;
                    let mut got = vec![0u8; want.len()];
                    std::os::unix::fs::FileExt::read_exact_at(file, &mut got, 0).unwrap();
                    assert!(
                        got[..] == want[..],
                        "WRONG BYTES in the passthrough file of {}",
                        specs()[*spec].path
                    );
                }
            }
            Op::Race {
                reads,
                target,
                after_us,
            } => {
                self.settle_faults();
                // Evictions race the background adoption too (an eviction between its verify
                // and its marks once left zeros marked present in a new, empty blob file).
                let blobs: HashSet<usize> = match *target {
                    RaceTarget::Model(m) => specs()
                        .iter()
                        .filter(|s| s.model == m)
                        .map(|s| s.blob)
                        .collect(),
                    RaceTarget::Chunk { spec, .. } => [specs()[spec].blob].into(),
                };
                self.racing.extend(blobs.iter().copied());
                let d = self.d();
                let results = d.rt.block_on(async {
                    let tasks = d.spawn_reads(reads);
                    tokio::time::sleep(Duration::from_micros(*after_us)).await;
                    let (control, store) = (d.control.clone(), d.store.clone());
                    let target = *target;
                    tokio::task::spawn_blocking(move || match target {
                        RaceTarget::Model(m) => control.evict(MODELS[m], true).map(drop).unwrap(),
                        RaceTarget::Chunk { spec, chunk } => {
                            store.drop_chunk(&specs()[spec].entry(), chunk).unwrap()
                        }
                    })
                    .await
                    .unwrap();
                    let mut out = Vec::new();
                    for t in tasks {
                        out.push(t.await.unwrap());
                    }
                    out
                });
                for (r, got) in reads.iter().zip(results) {
                    self.check_read(*r, got);
                }
                self.d().quiesce();
                self.end_races();
            }
            Op::Ensure { model, force } => {
                self.d().quiesce();
                self.count_fetches();
                if *force {
                    let blobs: HashSet<usize> = specs()
                        .iter()
                        .filter(|s| s.model == *model)
                        .map(|s| s.blob)
                        .collect();
                    for b in blobs {
                        self.new_blob_generation(b);
                    }
                }
                self.settle_faults();
                let d = self.d();
                let job =
                    d.rt.block_on(
                        d.control
                            .run_now(MODELS[*model], Work::Ensure { force: *force }),
                    )
                    .unwrap();
                assert!(
                    job.state == JobState::Done || self.faults,
                    "ensure failed with no fault in play: {job:?}"
                );
                if job.state == JobState::Done {
                    for s in specs().iter().filter(|s| s.model == *model) {
                        assert!(
                            d.store.is_complete(&s.entry()),
                            "{} not complete after ensure",
                            s.path
                        );
                    }
                }
            }
            Op::Fault { kind, n } => {
                let fault = match kind {
                    FaultKind::Fail => Fault::Fail,
                    FaultKind::Corrupt => Fault::Corrupt,
                    FaultKind::Stall => Fault::Stall(STALL),
                };
                self.mock.inject(fault, *n);
                self.faults = true;
                self.taint_all();
            }
            Op::Delay { ms } => self.mock.set_delay(Duration::from_millis(*ms)),
            Op::Restart => self.restart(true, None, false),
            Op::Crash => self.restart(false, None, false),
            Op::IndexLoss { delete, background } => self.restart(true, Some(*delete), *background),
        }
        if !self.racing.is_empty() && self.d().idle() {
            self.end_races();
        }
        self.count_fetches();
    }

    fn finish(mut self) {
        // The origin healthy again: every byte of every file must be readable.
        self.mock.set_delay(Duration::ZERO);
        if self.mock.pending_faults() > 0 {
            // Let reads consume what they can; faults left then have nothing to fire on.
            for spec in 0..specs().len() {
                let _ = self.d().read(spec, 0, u32::MAX);
            }
            self.d().quiesce();
            self.mock.clear_faults();
        }
        self.settle_faults();
        assert!(!self.faults);
        for spec in 0..specs().len() {
            let r = ReadOp {
                spec,
                at: 0,
                len: u32::MAX,
            };
            let got = self.d().read(spec, 0, u32::MAX);
            self.check_read(r, got);
        }
        self.count_fetches();
        self.daemon.take().unwrap().stop(true);
    }
}

/// Flips one byte of a file in place (disk corruption under the cache).
fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
}

fn run(ops: &[Op], in_memory: bool) {
    let mut h = Harness::new(in_memory);
    for op in ops {
        h.apply(op);
    }
    h.finish();
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 512,
        ..ProptestConfig::default()
    })]

    #[test]
    fn read_path_matches_the_model(ops in prop::collection::vec(op(), 20..50)) {
        init_logging();
        run(&ops, true);
    }
}

/// The daemon's log, only when `RUST_LOG` asks for it (injected faults log errors by design).
fn init_logging() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// A fixed sequence touching every operation once, so a plain `cargo test` run exercises each
/// path whatever the random cases draw.
#[test]
fn every_operation_once() {
    init_logging();
    let r = |spec, at, len| Op::Read(ReadOp { spec, at, len });
    run(
        &[
            r(0, 0, 10_000),
            Op::ReadNext {
                spec: 4,
                len: 40_000,
            },
            Op::ReadNext {
                spec: 4,
                len: 40_000,
            },
            Op::ReadNext {
                spec: 4,
                len: 40_000,
            },
            r(2, 100, 5),
            r(5, 20_000, 30_000),
            r(1, 0, 70_000),
            Op::Concurrent {
                reads: vec![
                    ReadOp {
                        spec: 0,
                        at: 20_000,
                        len: 9000
                    };
                    4
                ],
                same: true,
            },
            Op::Fault {
                kind: FaultKind::Corrupt,
                n: 2,
            },
            r(0, 40_000, 5000),
            r(0, 40_000, 5000),
            Op::Fault {
                kind: FaultKind::Fail,
                n: 4,
            },
            r(4, 0, 200_000),
            Op::Fault {
                kind: FaultKind::Stall,
                n: 1,
            },
            r(0, 30_000, 100),
            Op::DropChunk { spec: 1, chunk: 2 },
            r(5, 0, 70_000),
            Op::Evict { model: 1 },
            r(1, 0, 70_000),
            Op::Passthrough { spec: 1 },
            Op::Evict { model: 0 },
            Op::Passthrough { spec: 5 },
            Op::Delay { ms: 2 },
            Op::Restart,
            r(1, 0, 70_000),
            Op::IndexLoss {
                delete: true,
                background: false,
            },
            r(0, 0, 45_000),
            Op::IndexLoss {
                delete: false,
                background: true,
            },
            r(2, 0, 30_000),
            Op::CorruptOnDisk {
                spec: 0,
                chunk: 0,
                repair: false,
            },
            r(0, 0, 100),
            Op::CorruptOnDisk {
                spec: 2,
                chunk: 3,
                repair: true,
            },
            r(2, 0, 30_000),
            Op::Ensure {
                model: 0,
                force: false,
            },
            Op::Race {
                reads: vec![
                    ReadOp {
                        spec: 4,
                        at: 0,
                        len: 131_172,
                    },
                    ReadOp {
                        spec: 5,
                        at: 0,
                        len: 70_000,
                    },
                ],
                target: RaceTarget::Model(1),
                after_us: 200,
            },
            Op::Race {
                reads: vec![ReadOp {
                    spec: 0,
                    at: 0,
                    len: 45_000,
                }],
                target: RaceTarget::Chunk { spec: 0, chunk: 3 },
                after_us: 100,
            },
            Op::Ensure {
                model: 1,
                force: true,
            },
            Op::Gc,
            r(3, 0, 1),
            Op::Crash,
            r(4, 70_000, 1),
        ],
        false,
    );
}

/// The fetch counter bites: a blob evicted behind the model's back is fetched again, and
/// invariant 3 reports it. (Guards against a checker that silently counts nothing.)
#[test]
#[should_panic(expected = "fetched 2 times in one generation")]
fn a_refetch_the_model_did_not_expect_is_caught() {
    let mut h = Harness::new(true);
    // The whole first chunk: a read to a chunk's end lets the in-memory copy go, so the second
    // read must go to the (evicted) cache.
    let r = ReadOp {
        spec: 0,
        at: 0,
        len: 4 * KIB as u32,
    };
    h.apply(&Op::Read(r));
    h.d().quiesce();
    h.d().store.evict(specs()[0].entry().sha256).unwrap();
    h.apply(&Op::Read(r));
}
