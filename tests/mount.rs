//! What a reader of a live mount sees: the tree from the manifest alone, bytes equal to the
//! source whatever the access pattern (pread, mmap, 16 readers at once), whole-only files,
//! dedup across models, and the `user.wan.*` xattrs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::path::Path;
use std::sync::{Arc, Barrier};

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// `(relative path, size)` of every file (or `None` size for a directory) under `root`.
fn tree(root: &Path) -> BTreeMap<String, Option<u64>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
            let e = e.expect("dir entry");
            let meta = fs::symlink_metadata(e.path())
                .unwrap_or_else(|err| panic!("stat {}: {err}", e.path().display()));
            let rel = e
                .path()
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            if meta.is_dir() {
                stack.push(e.path());
                out.insert(rel, None);
            } else {
                assert!(meta.is_file(), "{rel} is neither file nor directory");
                out.insert(rel, Some(meta.len()));
            }
        }
    }
    out
}

#[test]
fn listing_and_stat_work_with_origin_stopped() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let origin = Origin::start(fixture_models());
    let ids = [T2V, I2V, TI2V];
    let manifest = fixture_manifest_over(&origin, &ids, work.path());
    origin.stop();

    let mount = Mount::start(MountSpec::new(work.path(), &manifest));
    let top: BTreeSet<String> = fs::read_dir(mount.path(""))
        .expect("list mount root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(
        top,
        ids.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>()
    );

    for id in ids {
        let want = tree(&fixture_models().join(id));
        let got = tree(&mount.path(id));
        assert_eq!(
            got, want,
            "tree of {id} in the mount differs from the fixture"
        );
        for (rel, size) in &want {
            let Some(size) = size else { continue };
            let path = mount.path(&format!("{id}/{rel}"));
            let meta = fs::metadata(&path).expect("stat");
            assert_eq!(meta.len(), *size, "{id}/{rel} size");
            let source = fs::read(fixture_models().join(id).join(rel)).expect("read fixture");
            assert_eq!(
                xattr_str(&path, "user.wan.sha256"),
                sha256_hex(&source),
                "{id}/{rel} user.wan.sha256"
            );
            assert_eq!(state(&path), "NOT_PRESENT", "{id}/{rel} state");
            assert_eq!(cached_bytes(&path), 0, "{id}/{rel} cached bytes");
            let write = OpenOptions::new().write(true).open(&path);
            assert!(
                write.is_err(),
                "{id}/{rel} opened for writing on a read-only mount"
            );
        }
    }
    let missing = fs::metadata(mount.path(&format!("{T2V}/no-such-file")));
    assert_eq!(missing.map_err(|e| errno(&e)).err(), Some(libc::ENOENT));
    // What `ls -l`, `getfattr` and `cp -a` ask of every file and directory: attributes it
    // does not have are answered ENODATA.
    let ls = std::process::Command::new("ls")
        .arg("-laR")
        .arg(mount.path(T2V))
        .output()
        .expect("run ls");
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    for path in [
        mount.path(T2V),
        mount.path(&format!("{T2V}/configuration.json")),
    ] {
        for name in ["security.selinux", "system.posix_acl_access", "user.other"] {
            let got = xattr(&path, name).map_err(|e| errno(&e));
            assert_eq!(
                got.err(),
                Some(libc::ENODATA),
                "{name} of {}",
                path.display()
            );
        }
    }
    // Refused opens for writing are counted by operation; a lookup's miss and an attribute
    // that is not there are answers, not errors.
    let metrics = fs::read_to_string(mount.path(".wan/metrics")).expect("read .wan/metrics");
    let count = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    };
    // Root's opens for writing reach the daemon, which refuses them; a user's are refused by
    // the kernel first (the files are 0444 under default_permissions), unseen by the daemon.
    if nix::unistd::geteuid().is_root() {
        assert!(
            count("wan_fuse_errors_total{op=\"open\"}") >= 1.0,
            "{metrics}"
        );
    }
    assert_eq!(count("wan_fuse_errors_total{op=\"lookup\"}"), 0.0);
    assert_eq!(
        count("wan_fuse_errors_total{op=\"getxattr\"}"),
        0.0,
        "{metrics}"
    );
    assert!(
        origin.requests().is_empty(),
        "requests reached a stopped origin: {:?}",
        origin.requests()
    );

    let mountpoint = mount.spec.mountpoint.clone();
    let status = mount.stop();
    assert!(
        status.success(),
        "wan mount exited with {status} after SIGTERM"
    );
    assert_eq!(
        mount_count(&mountpoint),
        0,
        "mount left behind after SIGTERM"
    );
}

/// Random preads (offsets anywhere or near chunk boundaries, lengths up to 3 chunks, some past
/// EOF) through one mount, each compared with the source.
#[test]
fn random_reads_equal_source() {
    if no_fuse() {
        return;
    }
    const CS: u64 = 256 * 1024;
    let setup = GenSetup::new(
        &[("big.bin", 5 * MIB + 12345), ("dir/odd.bin", 1_000_003)],
        CS,
        11,
    );
    let mount = Mount::start(setup.spec(test_config()));
    let files: Vec<(File, &[u8], String)> = ["big.bin", "dir/odd.bin"]
        .iter()
        .map(|rel| {
            (
                File::open(setup.mounted(&mount, rel)).expect("open"),
                setup.data(rel),
                rel.to_string(),
            )
        })
        .collect();

    let strategy = (
        0..files.len(),
        any::<prop::sample::Index>(),
        prop::bool::ANY,
        -8192i64..8192,
        prop_oneof![1usize..4096, 4096usize..(3 * CS as usize)],
    );
    // 64 cases keep the suite fast; PROPTEST_CASES=N digs deeper.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&strategy, |(f, index, near_boundary, delta, len)| {
        let (file, data, rel) = &files[f];
        let size = data.len() as u64;
        let off = if near_boundary {
            let boundary = index.index((size / CS) as usize + 1) as u64 * CS;
            boundary.saturating_add_signed(delta).min(size)
        } else {
            index.index(size as usize + 1) as u64
        };
        let got = read_range_in(file, off, len)
            .map_err(|e| TestCaseError::fail(format!("{rel} @{off}+{len}: {e}")))?;
        let end = (off as usize + len).min(data.len());
        let want = &data[off as usize..end];
        prop_assert!(
            got == want,
            "{rel} @{off}+{len}: {} bytes, want {}; first difference at {:?}",
            got.len(),
            want.len(),
            got.iter().zip(want).position(|(a, b)| a != b)
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    CacheView::new(&mount.spec.cache_dir)
        .check_consistent()
        .expect("cache consistent");
}

#[test]
fn mmap_reads_equal_source() {
    if no_fuse() {
        return;
    }
    const CS: u64 = 256 * 1024;
    let setup = GenSetup::new(
        &[("cold.bin", 3 * MIB + 777), ("warm.bin", 2 * MIB + 5)],
        CS,
        12,
    );
    let mount = Mount::start(setup.spec(test_config()));

    // Cold: page faults drive the reads, last chunk first.
    let cold = File::open(setup.mounted(&mount, "cold.bin")).expect("open cold");
    // SAFETY: the file is read-only and immutable for the life of the mapping.
    let map = unsafe { memmap2::Mmap::map(&cold) }.expect("mmap cold file");
    let data = setup.data("cold.bin");
    assert_eq!(map.len(), data.len());
    let chunks = data.len().div_ceil(CS as usize);
    for c in (0..chunks).rev() {
        let start = c * CS as usize + 4097;
        let end = (start + 10_000).min(data.len());
        if start < end {
            assert_bytes_eq(
                &map[start..end],
                &data[start..end],
                &format!("mmap of cold.bin, chunk {c}"),
            );
        }
    }
    assert_bytes_eq(&map[..], data, "mmap of cold.bin");

    // Warm: read fully first (complete blob, passthrough where the kernel allows), then mmap.
    let warm_path = setup.mounted(&mount, "warm.bin");
    assert_bytes_eq(
        &fs::read(&warm_path).expect("read warm"),
        setup.data("warm.bin"),
        "read of warm.bin",
    );
    assert_eq!(wait_state(&warm_path, "COMPLETE"), "COMPLETE");
    let warm = File::open(&warm_path).expect("open warm");
    // SAFETY: as above.
    let map = unsafe { memmap2::Mmap::map(&warm) }.expect("mmap warm file");
    assert_bytes_eq(&map[..], setup.data("warm.bin"), "mmap of warm.bin");
}

/// 16 threads read the same cold file at once, each a different page of the same chunk at the
/// same time: the origin must see each chunk's range exactly once.
#[test]
fn concurrent_readers_fetch_each_range_once() {
    if no_fuse() {
        return;
    }
    const CS: u64 = MIB as u64;
    const READERS: usize = 16;
    let setup = GenSetup::new(&[("shared.bin", 8 * MIB)], CS, 13);
    let mut config = test_config();
    config.fetch.readahead_chunks = 0;
    config.fetch.part_size_kib = 1024;
    config.fetch.connections = 16;
    let mount = Mount::start(setup.spec(config));
    let path = setup.mounted(&mount, "shared.bin");
    let data = Arc::new(setup.data("shared.bin").to_vec());
    let barrier = Arc::new(Barrier::new(READERS));
    let threads: Vec<_> = (0..READERS)
        .map(|i| {
            let (path, data, barrier) = (path.clone(), data.clone(), barrier.clone());
            std::thread::spawn(move || {
                let file = File::open(&path).expect("open");
                barrier.wait();
                for c in 0..8u64 {
                    let off = c * CS + (i as u64) * (CS / READERS as u64);
                    let got = read_range_in(&file, off, 64 * KIB).expect("concurrent read");
                    let want = &data[off as usize..off as usize + 64 * KIB];
                    assert_bytes_eq(&got, want, &format!("reader {i} chunk {c}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread panicked");
    }
    assert_bytes_eq(
        &fs::read(&path).expect("read whole"),
        &data,
        "whole file after concurrent reads",
    );

    let size = data.len() as u64;
    let counts = setup.origin.range_counts("/shared.bin");
    let want: BTreeMap<(u64, u64), usize> = (0..8).map(|c| (chunk_range(c, CS, size), 1)).collect();
    assert_eq!(
        counts, want,
        "GETs per byte range (each chunk exactly once)"
    );
}

/// Read-ahead parts follow the origin's measured speed per request: from an origin that
/// trickles each connection, every request stays one `part_size_kib` part; from a fast one,
/// read-ahead asks for runs of parts (whole chunks), so a sequential read takes far fewer
/// requests than parts. Either way each request is a run of whole parts inside one chunk (what
/// a `slice`d cache tier relies on), and the bytes are right.
#[test]
fn read_ahead_parts_follow_the_origins_speed() {
    if no_fuse() {
        return;
    }
    const CS: u64 = 2 * MIB as u64;
    const PART: u64 = 128 * KIB as u64;
    let setup = GenSetup::new(&[("slow.bin", 6 * MIB), ("fast.bin", 48 * MIB)], CS, 29);
    let mut config = test_config();
    config.fetch.readahead_chunks = 4;
    config.fetch.part_size_kib = PART / 1024;
    // 2 MiB/s per request: a 128 KiB part takes over 60 ms, far above the 10 ms that would
    // make read-ahead join parts.
    setup
        .origin
        .add_fault(Fault::Trickle(2 << 20), Some("slow.bin"), None);
    let mount = Mount::start(setup.spec(config));

    // Reads `rel` whole through the mount and checks its bytes; returns the origin's requests
    // for it, each checked to be a run of whole parts inside one chunk.
    let read = |rel: &str| -> Vec<(u64, u64)> {
        assert_bytes_eq(
            &fs::read(setup.mounted(&mount, rel)).unwrap_or_else(|e| panic!("read {rel}: {e}")),
            setup.data(rel),
            rel,
        );
        let f = setup.file(rel);
        let chunks = f.chunk_ranges();
        let gets: Vec<(u64, u64)> = setup
            .origin
            .gets(&format!("/{rel}"))
            .iter()
            .map(|r| r.range.expect("a range request"))
            .collect();
        for &(a, b) in &gets {
            let c = chunks
                .iter()
                .find(|c| c.contains(&a))
                .unwrap_or_else(|| panic!("{rel}: request {a}-{b} starts in no chunk"));
            assert!(
                b < c.end
                    && (a - c.start) % PART == 0
                    && ((b + 1 - c.start) % PART == 0 || b + 1 == c.end),
                "{rel}: request {a}-{b} is not a run of whole parts inside chunk {c:?}"
            );
        }
        gets
    };

    let gets = read("slow.bin");
    let long: Vec<_> = gets.iter().filter(|(a, b)| b + 1 - a > PART).collect();
    assert!(
        long.is_empty(),
        "a trickling origin was asked for more than one part at a time: {long:?}"
    );

    let gets = read("fast.bin");
    let parts = (48 * MIB as u64).div_ceil(PART) as usize;
    assert!(
        gets.len() * 2 < parts,
        "a fast origin was asked {} times for a file of {parts} parts: read-ahead did not join parts",
        gets.len()
    );
}

/// On a cold file with a small head chunk, a read of chunk 1 that reaches the daemon a moment
/// before the header read (the kernel hands a header read and its own read-ahead to two FUSE
/// threads, in either order) still lets the head go first: chunk 1's requests go out only once
/// the head is answered, so the reader blocked on the header does not share the origin with
/// them. The origin holds each head's answer for a second to make the order plain (chunk 1
/// waits at most 250 ms for it). Three files, two of which must pass: one attempt delayed past
/// the daemon's 5 ms wait by a busy machine does not fail the test. Which racer's requests go
/// out first without the wait also depends on which one creates the blob file, so without it
/// this test failed in 4 of 5 runs, not every time.
#[test]
fn a_header_read_just_behind_a_read_of_chunk_1_still_goes_first() {
    if no_fuse() {
        return;
    }
    const CS: u64 = 4 * MIB as u64;
    const HOLD: std::time::Duration = std::time::Duration::from_secs(1);
    const WAITED: std::time::Duration = std::time::Duration::from_millis(200);
    let names = ["a.bin", "b.bin", "c.bin"];
    let setup = GenSetup::new(
        &[("a.bin", 9 * MIB), ("b.bin", 9 * MIB), ("c.bin", 9 * MIB)],
        CS,
        31,
    );
    assert_eq!(
        setup.file("a.bin").head_size,
        Some(MIB as u64),
        "a 1 MiB head"
    );
    setup
        .origin
        .add_fault_at(Fault::Delay(HOLD), None, Some(0), None);
    let mut config = test_config();
    config.fetch.readahead_chunks = 0;
    let mount = Mount::start(setup.spec(config));
    let mut gaps = Vec::new();
    for name in names {
        let path = setup.mounted(&mount, name);
        let f = File::open(&path).expect("open");
        let mark = setup.origin.request_count();
        std::thread::scope(|s| {
            s.spawn(|| read_range_in(&f, MIB as u64 + 4096, 4096).expect("read in chunk 1"));
            std::thread::sleep(std::time::Duration::from_millis(1));
            s.spawn(|| read_range_in(&f, 0, 4096).expect("header read"));
        });
        let requests: Vec<_> = setup
            .origin
            .requests_since(mark)
            .into_iter()
            .filter(|r| r.path.ends_with(name))
            .collect();
        let at = |head: bool| {
            requests
                .iter()
                .filter(|r| r.range.is_some_and(|(a, _)| (a == 0) == head))
                .map(|r| r.at)
                .min()
                .expect("a request")
        };
        gaps.push(at(false).saturating_duration_since(at(true)));
    }
    assert!(
        gaps.iter().filter(|g| **g >= WAITED).count() >= 2,
        "chunk 1's requests went out before the head was answered: {gaps:?} after the head's"
    );
}

/// A `--whole-only` file is fetched whole on its first read (in ranges), verified, then served.
#[test]
fn whole_only_file_is_fetched_whole_on_first_read() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::whole_only(&[("w.bin", 3 * MIB + 5), ("other.bin", 100_000)], 14);
    let record = setup.file("w.bin");
    assert!(
        record.chunk_size.is_none() && record.chunks.is_empty(),
        "--whole-only wrote chunks: {record:?}"
    );
    let mut config = test_config();
    config.fetch.part_size_kib = 256;
    let mount = Mount::start(setup.spec(config));
    let path = setup.mounted(&mount, "w.bin");
    let data = setup.data("w.bin");
    let size = data.len() as u64;
    assert_eq!(state(&path), "NOT_PRESENT");

    let off = MIB as u64 + 3;
    let got = read_range(&path, off, 4096).expect("first read of a whole-only file");
    assert_bytes_eq(&got, &data[off as usize..off as usize + 4096], "first read");

    let gets = setup.origin.gets("/w.bin");
    let mut covered: Vec<(u64, u64)> = gets
        .iter()
        .filter(|r| r.status / 100 == 2)
        .map(|r| r.range.unwrap_or((0, size - 1)))
        .collect();
    covered.sort();
    let mut next = 0;
    for (a, b) in &covered {
        assert!(
            *a <= next,
            "gap before byte {a} in the fetched ranges {covered:?}"
        );
        next = next.max(b + 1);
    }
    assert_eq!(
        next, size,
        "the first read did not fetch the whole file: {covered:?}"
    );
    assert!(
        gets.len() >= 2,
        "a 3 MiB whole-only file with 256 KiB parts was fetched in {} request(s)",
        gets.len()
    );
    assert_eq!(wait_state(&path, "COMPLETE"), "COMPLETE");
    assert_eq!(cached_bytes(&path), size);

    let before = setup.origin.request_count();
    assert_bytes_eq(&fs::read(&path).expect("read whole"), data, "whole read");
    assert_eq!(
        setup.origin.request_count(),
        before,
        "a complete file was fetched again"
    );
    let cache = CacheView::new(&mount.spec.cache_dir);
    let blob =
        fs::read(cache.blob_path(&sha256_hex(data))).expect("blob file of the whole-only file");
    assert_bytes_eq(&blob, data, "blob file");
    cache.check_consistent().expect("cache consistent");
    assert_eq!(
        state(&setup.mounted(&mount, "other.bin")),
        "NOT_PRESENT",
        "an unread file was fetched"
    );
}

/// The VAE shipped byte-identical in t2v and i2v is stored once and fetched once.
#[test]
fn identical_files_in_two_models_are_one_blob() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let origin = Origin::start(fixture_models());
    let manifest = fixture_manifest_over(&origin, &[T2V, I2V], work.path());
    let mount = Mount::start(MountSpec::new(work.path(), &manifest));
    let vae = fs::read(fixture_models().join(T2V).join(VAE)).expect("fixture VAE");
    assert_eq!(
        vae,
        fs::read(fixture_models().join(I2V).join(VAE)).expect("fixture VAE"),
        "fixtures changed"
    );
    let digest = sha256_hex(&vae);
    let (t2v_vae, i2v_vae) = (
        mount.path(&format!("{T2V}/{VAE}")),
        mount.path(&format!("{I2V}/{VAE}")),
    );

    assert_bytes_eq(&fs::read(&t2v_vae).expect("read t2v VAE"), &vae, "t2v VAE");
    assert_eq!(
        wait_state(&i2v_vae, "COMPLETE"),
        "COMPLETE",
        "the i2v VAE is the same content as the t2v VAE just read"
    );
    assert_bytes_eq(&fs::read(&i2v_vae).expect("read i2v VAE"), &vae, "i2v VAE");
    assert!(
        origin.gets(&format!("{I2V}/{VAE}")).is_empty(),
        "the i2v VAE was fetched although its content is cached"
    );

    let cache = CacheView::new(&mount.spec.cache_dir);
    assert_eq!(
        cache.blob_files(),
        vec![cache.blob_path(&digest)],
        "blob files after reading both VAEs"
    );
    assert_eq!(
        cache
            .blob_digests()
            .iter()
            .filter(|d| **d == digest)
            .count(),
        1
    );
    assert_eq!(fs::read(cache.blob_path(&digest)).expect("read blob"), vae);
}

#[test]
fn xattrs_walk_not_present_partial_complete() {
    if no_fuse() {
        return;
    }
    const CS: u64 = 256 * 1024;
    let setup = GenSetup::new(&[("x.bin", MIB + 1000)], CS, 15);
    let mut config = test_config();
    config.fetch.readahead_chunks = 0;
    let mount = Mount::start(setup.spec(config));
    let path = setup.mounted(&mount, "x.bin");
    let data = setup.data("x.bin");
    let size = data.len() as u64;

    let sha = xattr_str(&path, "user.wan.sha256");
    assert_eq!(sha, sha256_hex(data));
    assert!(
        sha.len() == 64
            && sha
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert_eq!(state(&path), "NOT_PRESENT");
    assert_eq!(cached_bytes(&path), 0);

    assert_bytes_eq(
        &read_range(&path, 0, 4096).expect("read"),
        &data[..4096],
        "first page",
    );
    assert_eq!(wait_state(&path, "PARTIAL"), "PARTIAL");
    let cached = cached_bytes(&path);
    assert!(
        cached >= CS && cached < size && cached.is_multiple_of(CS),
        "cached_bytes {cached} after reading one chunk of {CS}"
    );

    assert_bytes_eq(&fs::read(&path).expect("read all"), data, "whole file");
    assert_eq!(wait_state(&path, "COMPLETE"), "COMPLETE");
    assert_eq!(cached_bytes(&path), size);
    assert_eq!(xattr_str(&path, "user.wan.sha256"), sha);
}

/// One manifest, both chunk hashes: t2v with BLAKE3 chunk digests (what `wan manifest build`
/// wrote before blake3-tree), i2v with sha256 ones (an entry built before). Every file reads back exactly,
/// and the VAE the two ship byte-identical is still one blob, fetched once, whichever hash
/// verified it.
#[test]
fn a_manifest_mixing_chunk_hashes_serves_both_and_shares_blobs() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let origin = Origin::start(fixture_models());
    let entry = |id: &str, args: &[&str]| {
        let opts = BuildOpts {
            chunk_size: Some(65536),
            sources: vec![origin.base(id)],
            whole_only: false,
        };
        manifest_build_with(&fixture_models().join(id), id, &opts, args)
    };
    let (t2v, i2v) = (entry(T2V, &[]), entry(I2V, &["--chunk-hash", "sha256"]));
    assert!(t2v.contains("chunk_hash = \"blake3\"") && !i2v.contains("chunk_hash"));
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[t2v, i2v]);
    let mount = Mount::start(MountSpec::new(work.path(), &manifest));

    let vae = fs::read(fixture_models().join(T2V).join(VAE)).expect("fixture VAE");
    assert_bytes_eq(
        &fs::read(mount.path(&format!("{T2V}/{VAE}"))).expect("read t2v VAE"),
        &vae,
        "t2v VAE (blake3 chunks)",
    );
    let i2v_vae = mount.path(&format!("{I2V}/{VAE}"));
    assert_eq!(wait_state(&i2v_vae, "COMPLETE"), "COMPLETE");
    assert_bytes_eq(&fs::read(&i2v_vae).expect("read i2v VAE"), &vae, "i2v VAE");
    assert!(
        origin.gets(&format!("{I2V}/{VAE}")).is_empty(),
        "the i2v VAE was fetched although the same content is cached under t2v's hash"
    );
    for id in [T2V, I2V] {
        for (rel, size) in tree(&fixture_models().join(id)) {
            if size.is_none() {
                continue;
            }
            let want = fs::read(fixture_models().join(id).join(&rel)).expect("fixture");
            let got = fs::read(mount.path(&format!("{id}/{rel}"))).expect("read through mount");
            assert_bytes_eq(&got, &want, &format!("{id}/{rel}"));
        }
    }
    let cache = CacheView::new(&mount.spec.cache_dir);
    assert!(cache.check_consistent().expect("cache consistent") > 0);
}

/// A manifest in `dir` for fixture models `ids`, with 64 KiB chunks, served by `origin`.
fn fixture_manifest_over(
    origin: &Origin,
    ids: &[&str],
    dir: &std::path::Path,
) -> std::path::PathBuf {
    let entries: Vec<String> = ids
        .iter()
        .map(|id| {
            let opts = BuildOpts {
                chunk_size: Some(65536),
                sources: vec![origin.base(id)],
                whole_only: false,
            };
            manifest_build(&fixture_models().join(id), id, &opts)
        })
        .collect();
    let manifest = dir.join("models.toml");
    write_manifest(&manifest, &entries);
    manifest
}

/// `wan manifest build` gives a large file a 1 MiB first chunk: the first read of a header
/// costs the origin that one small chunk, not a whole 8 MiB one, and the rest of the file
/// (8 MiB chunks shifted by the head) reads back exactly.
#[test]
fn first_read_fetches_only_the_small_head_chunk() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("big.bin", 20 * MIB + 5)], 8 * MIB as u64, 71);
    let head = setup.file("big.bin");
    assert_eq!(
        head.chunks.len(),
        4,
        "1 MiB head + 8 + 8 + 3 MiB: {:?}",
        setup.entry
    );
    assert!(
        setup.entry.contains("head_size = 1048576"),
        "{}",
        setup.entry
    );
    let mut config = test_config();
    config.fetch.readahead_chunks = 0;
    let mount = Mount::start(setup.spec(config));
    let path = setup.mounted(&mount, "big.bin");
    let data = setup.data("big.bin");
    assert_bytes_eq(
        &read_range(&path, 0, 4096).expect("header read"),
        &data[..4096],
        "header",
    );
    let fetched: u64 = setup
        .origin
        .gets("big.bin")
        .iter()
        .map(|r| r.range.map_or(0, |(a, b)| b - a + 1))
        .sum();
    assert_eq!(
        fetched, MIB as u64,
        "a 4 KiB header read fetched {fetched} bytes"
    );
    assert_bytes_eq(&fs::read(&path).expect("whole file"), data, "big.bin");
    assert_eq!(
        wait_state(&path, "COMPLETE"),
        "COMPLETE",
        "every chunk of the shifted grid is stored"
    );
}

/// A file's small head chunk goes first: a read of chunk 1 that arrives while the head is in
/// flight (the kernel sends the read-ahead of a header read together with it) starts its
/// requests only once the head is answered, so they do not share the origin with the one
/// request the reader is blocked on.
#[test]
fn a_later_chunk_waits_for_the_head_chunk_in_flight() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("big.bin", 20 * MIB)], 8 * MIB as u64, 72);
    assert!(
        setup.entry.contains("head_size = 1048576"),
        "{}",
        setup.entry
    );
    let delay = std::time::Duration::from_millis(150);
    // The first request (the head's) sends its body late.
    setup
        .origin
        .add_fault(Fault::DelayBody(delay), Some("big.bin"), Some(1));
    let mut config = test_config();
    config.fetch.readahead_chunks = 0;
    let mount = Mount::start(setup.spec(config));
    let path = setup.mounted(&mount, "big.bin");
    let data = setup.data("big.bin").to_vec();
    let head_reader = {
        let (path, data) = (path.clone(), data.clone());
        std::thread::spawn(move || {
            assert_bytes_eq(&read_range(&path, 0, 4096).unwrap(), &data[..4096], "head");
        })
    };
    assert!(
        wait_until(std::time::Duration::from_secs(5), || setup
            .origin
            .request_count()
            >= 1),
        "the head was never requested"
    );
    let off = 2 * MIB;
    assert_bytes_eq(
        &read_range(&path, off as u64, 4096).unwrap(),
        &data[off..off + 4096],
        "chunk 1",
    );
    head_reader.join().unwrap();
    let gets = setup.origin.gets("big.bin");
    let head = gets
        .iter()
        .find(|r| r.range.is_some_and(|(a, _)| a == 0))
        .expect("a head request");
    let later: Vec<_> = gets
        .iter()
        .filter(|r| r.range.is_some_and(|(a, _)| a >= MIB as u64))
        .collect();
    assert!(!later.is_empty(), "chunk 1 was fetched");
    for r in later {
        let after = r.at.duration_since(head.at);
        assert!(
            after >= delay - std::time::Duration::from_millis(20),
            "a part of chunk 1 was requested {after:?} after the head, before the head was answered"
        );
    }
}
