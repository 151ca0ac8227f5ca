//! `chunk_hash = "blake3-tree"` through a real mount: files built by `wan manifest build` (its
//! default hash) on the aligned layout (a small head, then doubling chunks, then full ones),
//! whose chunk lists merge into each file's BLAKE3 hash, read back exactly from cold at random
//! offsets and whole, with chunks fetched as parallel parts (each hashed as subtrees at its
//! offset in the file), and stored under the digests the manifest lists.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::*;
use wanfs::chunk::{Digest, blake3_tree_root};

const K: u64 = 1024;
/// Head 16 KiB, chunk 256 KiB: 16, 16, 32, 64, 128, then 256 KiB chunks, the 1 MiB / 8 MiB
/// default scaled down so a MiB crosses every step of the ramp.
const HEAD: u64 = 16 * K;
const CS: u64 = 256 * K;

#[test]
fn a_blake3_tree_file_reads_back_exactly_at_any_offset() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let src = work.path().join("src");
    let sizes = [
        ("a.bin", 5 * CS as usize + 12_345),
        ("ramp.bin", 3 * HEAD as usize + 7),
        ("one.bin", 3000),
        ("empty.bin", 0),
    ];
    let files = gen_files(&src, GEN, &sizes, 41);
    let origin = Origin::start(&src);
    // The CLI's default hash: no --chunk-hash given to it.
    let entry = run_wan(
        &[
            "manifest",
            "build",
            &src.join(GEN).to_string_lossy(),
            "--id",
            GEN,
            "--chunk-size",
            &CS.to_string(),
            "--head-size",
            &HEAD.to_string(),
            "--source",
            &origin.base(GEN),
        ],
        std::time::Duration::from_secs(60),
    );
    assert!(entry.status.success(), "{entry:?}");
    let entry = String::from_utf8(entry.stdout).expect("utf-8");
    for f in manifest_files(&entry, GEN) {
        assert_eq!(f.chunk_hash.as_deref(), Some("blake3-tree"), "{}", f.path);
        let data = data_of(&files, &f.path);
        let layout = f.layout();
        let chunks: Vec<Digest> = f.chunks.iter().map(|c| c.parse().expect("hex")).collect();
        assert_eq!(
            blake3_tree_root(&layout, &chunks),
            Some(Digest(*blake3::hash(data).as_bytes())),
            "{}: the chunk list merges into the file's BLAKE3",
            f.path
        );
    }
    let a = manifest_files(&entry, GEN)
        .into_iter()
        .find(|f| f.path == "a.bin")
        .expect("a.bin");
    let ramp: Vec<u64> = a.chunk_ranges().iter().map(|r| r.end - r.start).collect();
    let mut want: Vec<u64> = [1, 1, 2, 4, 8, 16, 16, 16, 16].map(|h| h * HEAD).to_vec();
    want.push(12_345);
    assert_eq!(ramp, want, "a.bin's chunks");
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, std::slice::from_ref(&entry));
    let mut config = test_config();
    // 64 KiB parts: a 256 KiB chunk lands as four parts side by side, each hashed as BLAKE3
    // subtrees at the chunk's offset plus its own.
    config.fetch.part_size_kib = 64;
    let mount = Mount::start(MountSpec::new(work.path(), &manifest).config(config));

    // Cold reads at pseudo-random offsets and lengths, across every step of the ramp.
    let a_data = data_of(&files, "a.bin");
    let fd = fs::File::open(mount.path(&format!("{GEN}/a.bin"))).expect("open a.bin");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..40 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = x % a_data.len() as u64;
        let len = ((x >> 32) % (3 * CS)).min(a_data.len() as u64 - off) as usize;
        let mut got = vec![0u8; len];
        fd.read_exact_at(&mut got, off)
            .unwrap_or_else(|e| panic!("read {len} at {off}: {e}"));
        assert_bytes_eq(
            &got,
            &a_data[off as usize..off as usize + len],
            &format!("a.bin {len} bytes at {off}"),
        );
    }
    for (rel, data) in &files {
        let got = fs::read(mount.path(&format!("{GEN}/{rel}"))).expect("read through mount");
        assert_bytes_eq(&got, data, rel);
    }
    let path = mount.path(&format!("{GEN}/a.bin"));
    assert_eq!(wait_state(&path, "COMPLETE"), "COMPLETE");
    // Stored under the digests the manifest lists, chunk by chunk, the blob exact.
    let cache = CacheView::new(&mount.spec.cache_dir);
    let rows: Vec<_> = cache
        .chunk_rows()
        .into_iter()
        .filter(|r| r.blob == a.sha256)
        .collect();
    assert_eq!(rows.len(), a.chunks.len());
    for row in rows {
        assert_eq!(row.digest, a.chunks[row.idx as usize], "chunk {}", row.idx);
    }
    assert_bytes_eq(
        &fs::read(cache.blob_path(&a.sha256)).expect("blob"),
        a_data,
        "a.bin's blob file",
    );
}
