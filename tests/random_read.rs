//! Random reads of cold chunks through outboards (`wan manifest build --outboards`): a 4 KiB
//! read of a cold `blake3-tree` chunk is answered from the one 64 KiB sub-block it falls in,
//! fetched by one ranged request and verified against the outboard (itself checked against
//! the chunk's digest), without waiting for the 8 MiB chunk; the chunk is then fetched behind
//! it and lands in the cache. A tampered outboard or sub-block is never served: the read
//! falls back to the whole chunk.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SIZE: usize = 24 * MIB as usize;
/// Chunk 5 of the aligned layout (head 1 MiB, chunks 8 MiB): bytes 16..24 MiB.
const CHUNK: u64 = 5;
const CHUNK_AT: u64 = 16 * MIB;
const GRAIN: u64 = 64 * KIB;

struct Setup {
    work: tempfile::TempDir,
    origin: Origin,
    data: Vec<u8>,
    manifest: PathBuf,
    sha: String,
}

/// A 24 MiB model built `blake3-tree` with outboards in `work/outboards`, next to the
/// manifest, served by a test origin.
fn setup() -> Setup {
    let work = workdir();
    let src = work.path().join("src");
    let data = write_random(&src.join(GEN).join("model.bin"), SIZE, 21);
    let origin = Origin::start(&src);
    let opts = BuildOpts {
        chunk_size: Some(8 * MIB),
        sources: vec![origin.base(GEN)],
        whole_only: false,
    };
    let outboards = work.path().join("outboards");
    let entry = manifest_build_with(
        &src.join(GEN),
        GEN,
        &opts,
        &[
            "--chunk-hash",
            "blake3-tree",
            "--outboards",
            outboards.to_str().unwrap(),
        ],
    );
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, std::slice::from_ref(&entry));
    let file = &manifest_files(&entry, GEN)[0];
    assert_eq!(file.layout().range(CHUNK), CHUNK_AT..CHUNK_AT + 8 * MIB);
    let ob = outboards.join(format!("{}.wanobao", file.sha256));
    let len = std::fs::metadata(&ob)
        .expect("the build wrote the outboard")
        .len();
    assert_eq!(len, 24 + (SIZE as u64 / GRAIN) * 32);
    Setup {
        sha: file.sha256.clone(),
        work,
        origin,
        data,
        manifest,
    }
}

/// 4 KiB at `off` of a file opened for random reads (no kernel read-ahead).
fn read_4k(path: &Path, off: u64) -> Vec<u8> {
    let f = File::open(path).expect("open");
    // SAFETY: a plain advice call on an fd we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    read_range_in(&f, off, 4096).expect("read")
}

/// The ranges asked of model.bin, in the order they came.
fn ranges(origin: &Origin) -> Vec<(u64, u64)> {
    origin
        .gets("model.bin")
        .into_iter()
        .filter_map(|r| r.range)
        .collect()
}

#[test]
fn a_cold_4k_read_waits_for_its_sub_block_only_then_the_chunk_lands() {
    if no_fuse() {
        return;
    }
    let s = setup();
    // The chunk's first request (its first part starts at the chunk) is held back for 1.5 s
    // (within the test config's 2 s request timeout): a read that waited for the chunk would
    // take that long.
    s.origin.add_fault_at(
        Fault::Delay(Duration::from_millis(1500)),
        Some("model.bin"),
        Some(CHUNK_AT),
        Some(1),
    );
    let mount = Mount::start(MountSpec::new(s.work.path(), &s.manifest));
    let path = mount.path(&format!("{GEN}/model.bin"));
    let off = CHUNK_AT + GRAIN + 100 * KIB % GRAIN;
    let (got, took) = timed(|| read_4k(&path, off));
    assert_bytes_eq(
        &got,
        &s.data[off as usize..off as usize + 4096],
        "4 KiB of a cold chunk",
    );
    assert!(
        took < Duration::from_millis(1000),
        "the read waited for the whole chunk: {took:?}\n{}",
        mount.log()
    );
    let sub = (CHUNK_AT + GRAIN, CHUNK_AT + 2 * GRAIN - 1);
    let asked = ranges(&s.origin);
    assert_eq!(
        asked.first(),
        Some(&sub),
        "the first request is the sub-block: {asked:?}"
    );
    // Then the chunk is fetched behind it, and committed.
    let cache = CacheView::new(&s.work.path().join("cache"));
    assert!(
        wait_until(Duration::from_secs(10), || cache
            .present(&s.sha)
            .contains(&CHUNK)),
        "chunk {CHUNK} never landed: {:?}\n{}",
        ranges(&s.origin),
        mount.log()
    );
    assert_eq!(mount.metric("wan_sub_block_reads_total"), 1.0);
    // Served from the cache now, and right everywhere in the chunk.
    let mark = s.origin.request_count();
    for off in [CHUNK_AT, CHUNK_AT + 3 * MIB + 5, CHUNK_AT + 8 * MIB - 4096] {
        let got = read_4k(&path, off);
        assert_bytes_eq(&got, &s.data[off as usize..off as usize + 4096], "warm");
    }
    assert!(s.origin.requests_since(mark).is_empty());
}

#[test]
fn a_tampered_outboard_or_sub_block_is_never_served() {
    if no_fuse() {
        return;
    }
    let s = setup();
    // One value of chunk 5's outboard flipped: the outboard does not merge into the chunk's
    // digest, so the read takes the whole chunk and no sub-block is asked for.
    let ob = s
        .work
        .path()
        .join("outboards")
        .join(format!("{}.wanobao", s.sha));
    let mut raw = std::fs::read(&ob).unwrap();
    let at = 24 + (CHUNK_AT / GRAIN + 3) as usize * 32;
    raw[at] ^= 1;
    std::fs::write(&ob, &raw).unwrap();
    let mount = Mount::start(MountSpec::new(s.work.path(), &s.manifest));
    let path = mount.path(&format!("{GEN}/model.bin"));
    let off = CHUNK_AT + 5 * GRAIN;
    let got = read_4k(&path, off);
    assert_bytes_eq(
        &got,
        &s.data[off as usize..off as usize + 4096],
        "tampered outboard",
    );
    let asked = ranges(&s.origin);
    assert!(
        asked.iter().all(|(a, b)| b - a + 1 > GRAIN),
        "a sub-block was fetched with a refused outboard: {asked:?}"
    );
    assert!(mount.log().contains("outboard refused"), "{}", mount.log());

    // A sound outboard (chunk 4's), but the origin flips a byte of the sub-block: refused by
    // its value, and the read is answered from the whole chunk, right.
    let c4 = 8 * MIB;
    let off = c4 + 2 * GRAIN + 17;
    s.origin.add_fault_at(
        Fault::Corrupt,
        Some("model.bin"),
        Some(c4 + 2 * GRAIN),
        Some(1),
    );
    let mark = s.origin.request_count();
    let got = read_4k(&path, off);
    assert_bytes_eq(
        &got,
        &s.data[off as usize..off as usize + 4096],
        "tampered sub-block",
    );
    let asked: Vec<_> = s
        .origin
        .requests_since(mark)
        .into_iter()
        .filter_map(|r| r.fault.clone().map(|f| (f, r.range)))
        .collect();
    assert_eq!(
        asked,
        [(Fault::Corrupt, Some((c4 + 2 * GRAIN, c4 + 3 * GRAIN - 1)))],
        "the corrupt sub-block was asked for once"
    );
    assert!(mount.log().contains("integrity failure"), "{}", mount.log());
}
