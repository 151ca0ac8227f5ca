//! The read path when sources misbehave: wrong bytes, 5xx, resets, truncation, slowness, an
//! origin that is down, and a daemon killed in the middle of fetches. Reads are either correct
//! or fail with EIO within `read_timeout_secs`; unverified bytes are never served nor stored.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use common::*;
use wanfs::config::Config;

const MIB: usize = 1024 * 1024;
const CS: u64 = 256 * 1024;
/// Tolerance above `read_timeout_secs` for an EIO to reach the reader.
const EIO_SLACK: Duration = Duration::from_millis(2500);

/// Short timeouts and one request per chunk (no read-ahead, parts as large as a chunk), so
/// every attempt of the daemon is one line of the origin's log.
fn fault_config() -> Config {
    let mut config = test_config();
    config.fetch.read_timeout_secs = 3.0;
    config.fetch.request_timeout_secs = 1.0;
    config.fetch.retries = 3;
    config.fetch.backoff_ms = 10;
    config.fetch.cooldown_secs = 1.0;
    config.fetch.readahead_chunks = 0;
    config.fetch.part_size_kib = 1024;
    config
}

fn read_timeout(config: &Config) -> Duration {
    Duration::from_secs_f64(config.fetch.read_timeout_secs)
}

/// Three 1 MiB files (four chunks each) behind one origin, mounted with [`fault_config`].
fn fault_setup(seed: u64) -> (GenSetup, Mount) {
    let setup = GenSetup::new(&[("a.bin", MIB), ("b.bin", MIB), ("c.bin", MIB)], CS, seed);
    let mount = Mount::start(setup.spec(fault_config()));
    (setup, mount)
}

/// `times` faults on a.bin, then the read of its first chunk must succeed, after exactly
/// `times` failed attempts on that range and one good one.
fn transient_then_served(setup: &GenSetup, mount: &Mount, fault: Fault, times: u64) {
    setup
        .origin
        .add_fault(fault.clone(), Some("/a.bin"), Some(times));
    let path = setup.mounted(mount, "a.bin");
    let (got, took) = timed(|| read_range(&path, 0, 64 * 1024));
    let got =
        got.unwrap_or_else(|e| panic!("read after {times} x {fault:?} failed after {took:?}: {e}"));
    assert_bytes_eq(
        &got,
        &setup.data("a.bin")[..64 * 1024],
        "a.bin after transient faults",
    );
    let attempts: Vec<Option<Fault>> = setup
        .origin
        .gets("/a.bin")
        .into_iter()
        .filter(|r| r.range == Some(chunk_range(0, CS, MIB as u64)))
        .map(|r| r.fault)
        .collect();
    let mut want = vec![Some(fault.clone()); times as usize];
    want.push(None);
    assert_eq!(attempts, want, "attempts on the first chunk of a.bin");
    assert!(
        took < read_timeout(&fault_config()),
        "transient {fault:?} took {took:?}"
    );
}

/// `fault` on every request for `rel`: the read must fail with EIO within the read timeout, after
/// at least `retries` attempts.
fn persistent_is_eio(setup: &GenSetup, mount: &Mount, fault: Fault, rel: &str) {
    let config = fault_config();
    setup
        .origin
        .add_fault(fault.clone(), Some(&format!("/{rel}")), None);
    let path = setup.mounted(mount, rel);
    let (result, took) = timed(|| read_range(&path, 0, 64 * 1024));
    assert_eio(result, &format!("{rel} with {fault:?} on every request"));
    assert!(
        took <= read_timeout(&config) + EIO_SLACK,
        "EIO for {fault:?} after {took:?}, read_timeout is {:?}",
        read_timeout(&config)
    );
    let attempts = setup.origin.gets(&format!("/{rel}")).len();
    assert!(
        attempts >= config.fetch.retries as usize,
        "{fault:?} on {rel}: {attempts} attempt(s), expected at least retries = {}",
        config.fetch.retries
    );
    assert_ne!(state(&path), "COMPLETE");
    let blob = sha256_hex(setup.data(rel));
    assert!(
        CacheView::new(&mount.spec.cache_dir)
            .present(&blob)
            .is_empty(),
        "a chunk of {rel} was marked present"
    );
}

#[test]
fn status_5xx_is_retried_then_served_or_eio() {
    if no_fuse() {
        return;
    }
    let (setup, mount) = fault_setup(21);
    transient_then_served(&setup, &mount, Fault::Status(503), 2);
    persistent_is_eio(&setup, &mount, Fault::Status(500), "b.bin");
}

#[test]
fn reset_mid_body_is_retried_then_served_or_eio() {
    if no_fuse() {
        return;
    }
    let (setup, mount) = fault_setup(22);
    transient_then_served(&setup, &mount, Fault::ResetAfter(64 * 1024), 1);
    persistent_is_eio(&setup, &mount, Fault::ResetAfter(100 * 1024), "b.bin");
}

#[test]
fn truncated_body_is_retried_then_served_or_eio() {
    if no_fuse() {
        return;
    }
    let (setup, mount) = fault_setup(23);
    transient_then_served(&setup, &mount, Fault::Truncate(64 * 1024), 1);
    persistent_is_eio(&setup, &mount, Fault::Truncate(CS as usize - 1), "b.bin");
}

#[test]
fn slow_headers_are_retried_then_served_or_eio() {
    if no_fuse() {
        return;
    }
    let (setup, mount) = fault_setup(24);
    // One attempt outlives request_timeout (1 s); the retry is served.
    transient_then_served(&setup, &mount, Fault::Delay(Duration::from_secs(2)), 1);
    persistent_is_eio(
        &setup,
        &mount,
        Fault::Delay(Duration::from_secs(60)),
        "b.bin",
    );
}

#[test]
fn stalled_body_is_retried_then_served_or_eio() {
    if no_fuse() {
        return;
    }
    let (setup, mount) = fault_setup(30);
    // The head arrives at once, the body only after request_timeout (1 s): one attempt lost.
    transient_then_served(&setup, &mount, Fault::DelayBody(Duration::from_secs(2)), 1);
    persistent_is_eio(
        &setup,
        &mount,
        Fault::DelayBody(Duration::from_secs(60)),
        "b.bin",
    );
}

#[test]
fn trickling_body_is_eio_within_read_timeout() {
    if no_fuse() {
        return;
    }
    let (setup, mount) = fault_setup(25);
    // A 256 KiB chunk at 16 KiB/s needs 16 s: no attempt can finish.
    persistent_is_eio(&setup, &mount, Fault::Trickle(16 * 1024), "c.bin");
}

/// The first source serves wrong bytes; the second is used, and only verified bytes are stored.
/// Chunk digests as `wan manifest build` writes them by default: BLAKE3.
#[test]
fn wrong_bytes_fall_back_to_next_source() {
    if no_fuse() {
        return;
    }
    wrong_bytes_fall_back(&[]);
}

/// The same with sha256 chunk digests (manifests from before BLAKE3, or `--chunk-hash sha256`).
#[test]
fn wrong_bytes_fall_back_to_next_source_sha256_chunks() {
    if no_fuse() {
        return;
    }
    wrong_bytes_fall_back(&["--chunk-hash", "sha256"]);
}

/// The same with blake3-tree chunk digests (each chunk's BLAKE3 subtree at its offset: what
/// `wan manifest build` writes by default).
#[test]
fn wrong_bytes_fall_back_to_next_source_blake3_tree_chunks() {
    if no_fuse() {
        return;
    }
    wrong_bytes_fall_back(&["--chunk-hash", "blake3-tree"]);
}

fn wrong_bytes_fall_back(build_args: &[&str]) {
    let work = workdir();
    let src = work.path().join("src");
    let files = gen_files(&src, GEN, &[("f.bin", MIB + 3)], 26);
    let bad = Origin::start(&src);
    let good = Origin::start(&src);
    bad.add_fault(Fault::Corrupt, None, None);
    let opts = BuildOpts {
        chunk_size: Some(CS),
        sources: vec![bad.base(GEN), good.base(GEN)],
        whole_only: false,
    };
    let entry = manifest_build_with(&src.join(GEN), GEN, &opts, build_args);
    let sha256_chunks = !entry.contains("chunk_hash");
    assert_eq!(sha256_chunks, build_args.contains(&"sha256"), "{entry}");
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, std::slice::from_ref(&entry));
    let mount = Mount::start(MountSpec::new(work.path(), &manifest).config(fault_config()));
    let data = data_of(&files, "f.bin");
    let path = mount.path(&format!("{GEN}/f.bin"));

    let (got, took) = timed(|| fs::read(&path));
    assert_bytes_eq(
        &got.expect("read with a corrupting first source"),
        data,
        "f.bin",
    );
    assert!(took < read_timeout(&fault_config()), "read took {took:?}");
    assert!(
        !bad.gets("/f.bin").is_empty(),
        "the first source was never tried"
    );
    let bad_ranges: BTreeSet<_> = bad.gets("/f.bin").iter().filter_map(|r| r.range).collect();
    let good_ranges: BTreeSet<_> = good.gets("/f.bin").iter().filter_map(|r| r.range).collect();
    assert!(
        bad_ranges.is_subset(&good_ranges),
        "ranges that failed verification at the first source {bad_ranges:?} were not fetched from the second {good_ranges:?}"
    );
    // Requests that delivered wrong bytes are not `ok`: they are counted as what they were.
    let requests = |source: &str, result: &str| {
        mount.metric(&format!(
            "wan_source_requests_total{{result=\"{result}\",source=\"{source}\"}}"
        ))
    };
    assert_eq!(
        requests(&bad.base(GEN), "wrong_bytes"),
        bad.gets("/f.bin").len() as f64,
        "every request to the corrupting source"
    );
    assert_eq!(requests(&bad.base(GEN), "ok"), 0.0);
    assert!(requests(&good.base(GEN), "ok") > 0.0);
    assert_eq!(requests(&good.base(GEN), "wrong_bytes"), 0.0);

    // Readers are served as soon as a chunk is verified; its commit follows.
    assert_eq!(wait_state(&path, "COMPLETE"), "COMPLETE");
    let cache = CacheView::new(&mount.spec.cache_dir);
    cache.check_consistent().expect("cache consistent");
    let record = manifest_files(&entry, GEN).remove(0);
    for row in cache.chunk_rows() {
        assert_eq!(
            row.digest, record.chunks[row.idx as usize],
            "stored digest of chunk {}",
            row.idx
        );
    }
    assert_bytes_eq(
        &fs::read(cache.blob_path(&record.sha256)).expect("blob"),
        data,
        "blob file",
    );
}

/// A chunk fetched as parallel parts (64 KiB parts of 256 KiB BLAKE3 chunks: each part hashed
/// as BLAKE3 subtrees while it lands, joined into the chunk's root after the last one), where
/// one part of one chunk comes back wrong from the first source: that chunk is refused whole
/// and fetched from the second source, every other chunk is served from the first, and only
/// the right bytes reach the reader and the cache.
#[test]
fn one_wrong_part_of_a_chunk_fetched_in_parallel_parts_is_caught() {
    if no_fuse() {
        return;
    }
    one_wrong_part_is_caught("blake3");
}

/// The same with blake3-tree chunks: each part hashed as subtrees at the chunk's offset in
/// the file plus its own, joined into the chunk's subtree, not a root.
#[test]
fn one_wrong_part_of_a_blake3_tree_chunk_fetched_in_parallel_parts_is_caught() {
    if no_fuse() {
        return;
    }
    one_wrong_part_is_caught("blake3-tree");
}

fn one_wrong_part_is_caught(chunk_hash: &str) {
    let work = workdir();
    let src = work.path().join("src");
    let files = gen_files(&src, GEN, &[("f.bin", MIB)], 29);
    let first = Origin::start(&src);
    let second = Origin::start(&src);
    // The second part of chunk 2, once.
    let bad_part = 2 * CS + 64 * 1024;
    first.add_fault_at(Fault::Corrupt, Some("/f.bin"), Some(bad_part), Some(1));
    let opts = BuildOpts {
        chunk_size: Some(CS),
        sources: vec![first.base(GEN), second.base(GEN)],
        whole_only: false,
    };
    let entry = manifest_build_with(
        &src.join(GEN),
        GEN,
        &opts,
        &["--head-size", &CS.to_string(), "--chunk-hash", chunk_hash],
    );
    assert!(
        entry.contains(&format!("chunk_hash = \"{chunk_hash}\"")),
        "{entry}"
    );
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, std::slice::from_ref(&entry));
    let mut config = fault_config();
    config.fetch.part_size_kib = 64;
    let mount = Mount::start(MountSpec::new(work.path(), &manifest).config(config));
    let data = data_of(&files, "f.bin");
    let path = mount.path(&format!("{GEN}/f.bin"));

    assert_bytes_eq(&fs::read(&path).expect("read"), data, "f.bin");
    let ranges = |o: &Origin| -> BTreeSet<(u64, u64)> {
        o.gets("/f.bin").iter().filter_map(|r| r.range).collect()
    };
    let part = 64 * 1024;
    let parts: BTreeSet<_> = (0..MIB as u64 / part)
        .map(|i| (i * part, i * part + part - 1))
        .collect();
    // Chunks are fetched as 64 KiB parts, from either source (after the wrong part the
    // first one cools down for a moment, so later chunks may go to the second).
    let (from_first, from_second) = (ranges(&first), ranges(&second));
    assert!(from_first.is_subset(&parts) && from_second.is_subset(&parts));
    assert!(
        from_first.contains(&(bad_part, bad_part + part - 1)),
        "the wrong part was never served: {from_first:?}"
    );
    let chunk2: BTreeSet<_> = parts
        .iter()
        .copied()
        .filter(|(a, _)| (2 * CS..3 * CS).contains(a))
        .collect();
    assert!(
        chunk2.is_subset(&from_second),
        "the chunk with the wrong part was not fetched again, whole, from the second source: {from_second:?}"
    );
    assert_eq!(wait_state(&path, "COMPLETE"), "COMPLETE");
    let cache = CacheView::new(&mount.spec.cache_dir);
    cache.check_consistent().expect("cache consistent");
    let record = manifest_files(&entry, GEN).remove(0);
    assert_bytes_eq(
        &fs::read(cache.blob_path(&record.sha256)).expect("blob"),
        data,
        "blob file",
    );
}

/// The only source serves wrong bytes: EIO, and nothing of it reaches the cache.
#[test]
fn wrong_bytes_from_only_source_are_eio_and_not_stored() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("f.bin", MIB)], CS, 27);
    setup.origin.add_fault(Fault::Corrupt, None, None);
    let config = fault_config();
    let mount = Mount::start(setup.spec(config.clone()));
    let path = setup.mounted(&mount, "f.bin");

    let (result, took) = timed(|| read_range(&path, 0, 4096));
    assert_eio(result, "read with a corrupting only source");
    assert!(
        took <= read_timeout(&config) + EIO_SLACK,
        "EIO after {took:?}"
    );
    assert!(
        !setup.origin.gets("/f.bin").is_empty(),
        "the source was never asked"
    );
    assert_eq!(state(&path), "NOT_PRESENT");
    assert_eq!(cached_bytes(&path), 0);

    let cache = CacheView::new(&mount.spec.cache_dir);
    let blob = sha256_hex(setup.data("f.bin"));
    assert!(
        cache.present(&blob).is_empty(),
        "a corrupt chunk was marked present"
    );
    if let Ok(bytes) = fs::read(cache.blob_path(&blob)) {
        assert!(
            bytes.iter().all(|b| *b == 0),
            "unverified bytes were written to the blob file"
        );
    }
}

/// With the origin down, cached files still read from the cache; uncached reads fail fast.
#[test]
fn origin_down_cached_reads_work_uncached_fail_fast() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("cached.bin", MIB + 17), ("uncached.bin", MIB)], CS, 28);
    let mut config = fault_config();
    config.fetch.read_timeout_secs = 20.0;
    config.fetch.request_timeout_secs = 1.0;
    config.fetch.retries = 2;
    let mount = Mount::start(setup.spec(config));
    let cached = setup.mounted(&mount, "cached.bin");
    assert_bytes_eq(
        &fs::read(&cached).expect("read while up"),
        setup.data("cached.bin"),
        "cached.bin",
    );
    assert_eq!(wait_state(&cached, "COMPLETE"), "COMPLETE");

    setup.origin.stop();
    drop_page_cache(&cached);
    assert_bytes_eq(
        &fs::read(&cached).expect("read cached file with origin down"),
        setup.data("cached.bin"),
        "cached.bin, origin down",
    );

    let (result, took) = timed(|| read_range(&setup.mounted(&mount, "uncached.bin"), 0, 4096));
    assert_eio(result, "uncached read with origin down");
    assert!(
        took < Duration::from_secs(3),
        "EIO with the origin refusing connections took {took:?} (read_timeout 20 s)"
    );
}

/// `kill -9` while chunks trickle in, then a new daemon on the same cache: the dead mount is
/// cleared, the index holds only verified chunks, and none of them is fetched again.
#[test]
fn kill9_mid_fetch_then_restart_keeps_cache_consistent() {
    if no_fuse() {
        return;
    }
    const SIZE: usize = 4 * MIB;
    let setup = GenSetup::new(&[("big.bin", SIZE)], CS, 29);
    let mut config = test_config();
    config.fetch.read_timeout_secs = 60.0;
    config.fetch.request_timeout_secs = 60.0;
    config.fetch.readahead_chunks = 0;
    config.fetch.part_size_kib = 1024;
    let mount = Mount::start(setup.spec(config));
    let path = setup.mounted(&mount, "big.bin");
    let data = setup.data("big.bin").to_vec();
    let blob = sha256_hex(&data);
    let cache = CacheView::new(&mount.spec.cache_dir);

    // Chunks 0..4 verified before the crash.
    assert_bytes_eq(
        &read_range(&path, 0, MIB).expect("read first MiB"),
        &data[..MIB],
        "first MiB",
    );
    let early: BTreeSet<u64> = (0..4).collect();
    assert!(
        wait_until(Duration::from_secs(5), || cache
            .present(&blob)
            .is_superset(&early)),
        "chunks served to a reader are not marked present: {:?}",
        cache.present(&blob)
    );

    // Chunks 8, 9 and 14 in flight, trickling, when the daemon dies.
    setup
        .origin
        .add_fault(Fault::Trickle(32 * 1024), None, None);
    let mark = setup.origin.request_count();
    let readers: Vec<_> = [(8 * CS, 2 * CS as usize), (14 * CS, 4096)]
        .into_iter()
        .map(|(off, len)| {
            let path = path.clone();
            std::thread::spawn(move || (off, read_range(&path, off, len)))
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || setup
            .origin
            .requests_since(mark)
            .len()
            >= 2),
        "the slow fetches never reached the origin"
    );
    std::thread::sleep(Duration::from_millis(300)); // let part of the bodies arrive
    let dead = mount.kill9();
    for r in readers {
        let (off, result) = r.join().expect("reader thread");
        if let Ok(bytes) = result {
            assert_bytes_eq(
                &bytes,
                &data[off as usize..off as usize + bytes.len()],
                "read interrupted by kill -9",
            );
        }
    }
    assert_eq!(
        fs::read_dir(&dead.spec.mountpoint)
            .map_err(|e| errno(&e))
            .err(),
        Some(libc::ENOTCONN),
        "the killed daemon's mount is not dead"
    );

    let checked = cache
        .check_consistent()
        .expect("cache consistent after kill -9");
    let before = cache.present(&blob);
    assert!(
        before.is_superset(&early),
        "verified chunks lost by kill -9: {before:?}"
    );
    assert!(
        before.is_disjoint(&[8, 9, 14].into()),
        "chunks still trickling when killed are marked present: {before:?}"
    );
    eprintln!("{checked} chunk rows consistent after kill -9; present: {before:?}");

    setup.origin.clear_faults();
    let restart_mark = setup.origin.request_count();
    let mount = dead.restart();
    assert_eq!(
        mount_count(&mount.spec.mountpoint),
        1,
        "the dead mount was not cleared before mounting again"
    );
    assert_bytes_eq(
        &fs::read(&path).expect("read after restart"),
        &data,
        "big.bin after restart",
    );
    assert_eq!(wait_state(&path, "COMPLETE"), "COMPLETE");

    let present_ranges: BTreeSet<_> = before
        .iter()
        .map(|c| chunk_range(*c, CS, SIZE as u64))
        .collect();
    let after: Vec<_> = setup
        .origin
        .requests_since(restart_mark)
        .into_iter()
        .filter(|r| r.path.ends_with("/big.bin"))
        .collect();
    let mut seen = BTreeSet::new();
    for r in &after {
        let (a, b) = r.range.unwrap_or((0, SIZE as u64 - 1));
        for (pa, pb) in &present_ranges {
            assert!(
                b < *pa || a > *pb,
                "after restart, range {a}-{b} refetched although chunk {pa}-{pb} was verified"
            );
        }
        assert!(
            seen.insert((a, b)),
            "after restart, range {a}-{b} fetched twice"
        );
    }
    for c in &early {
        assert_eq!(
            setup
                .origin
                .range_counts("/big.bin")
                .get(&chunk_range(*c, CS, SIZE as u64)),
            Some(&1),
            "chunk {c} fetches in total"
        );
    }
    cache
        .check_consistent()
        .expect("cache consistent after restart");
}

/// `(sum, count)` of `wan_commit_batch_chunks` in the mount's `.wan/metrics`: chunks committed
/// and group commits.
fn commit_batches(mount: &Mount) -> (u64, u64) {
    (
        mount.metric("wan_commit_batch_chunks_sum") as u64,
        mount.metric("wan_commit_batch_chunks_count") as u64,
    )
}

/// `kill -9` while an ensure commits many small chunks, several at a time (group commits: one
/// `fdatasync` per blob and one index transaction for a batch), at several moments, each time
/// restarting on the same cache. After every crash each chunk the index lists must hash on
/// disk to its digest, and none may be lost by the next crash; after a restart no chunk
/// the index listed is fetched again, and in the end the mount serves exactly the origin's
/// bytes and the file is complete.
///
/// What a `kill -9` can show: a chunk indexed before its bytes were written (a commit that
/// marks first and writes after was caught here in 6 runs of 6: the window is a chunk's
/// `pwrite`, so 256 KiB chunks and ten kills). What it cannot: a chunk indexed before its
/// `fdatasync`, since the page cache outlives the process; only a power loss would show that.
/// `store::commit`'s unit tests check that order (an injected sync failure must leave nothing
/// marked).
#[test]
fn kill9_during_group_commits_keeps_cache_consistent() {
    if no_fuse() {
        return;
    }
    const SIZE: usize = 192 * MIB;
    const SMALL: u64 = 256 * 1024;
    let setup = GenSetup::new(&[("many.bin", SIZE)], SMALL, 47);
    let data = setup.data("many.bin");
    let blob = sha256_hex(data);
    let mut config = test_config();
    config.fetch.connections = 16;
    config.fetch.readahead_chunks = 16;
    config.fetch.read_timeout_secs = 30.0;
    config.fetch.request_timeout_secs = 10.0;
    let mut mount = Mount::start(setup.spec(config));
    let cache = CacheView::new(&mount.spec.cache_dir);
    let ensure = |m: &Mount| {
        fs::write(m.path(".wan/ensure"), format!("{GEN}\n")).expect("write .wan/ensure")
    };
    let mut held = BTreeSet::new();
    let mut batched = (0, 0);
    // (origin requests before a restart, chunks indexed when the daemon before it died)
    let mut restarts = Vec::new();
    for delay_ms in [40, 5, 120, 15, 60, 10, 90, 25, 150, 30] {
        ensure(&mount);
        std::thread::sleep(Duration::from_millis(delay_ms));
        let (sum, count) = commit_batches(&mount);
        let dead = mount.kill9();
        batched = (batched.0 + sum, batched.1 + count);
        let checked = cache
            .check_consistent()
            .unwrap_or_else(|e| panic!("cache inconsistent after kill -9 at {delay_ms} ms:\n{e}"));
        let present = cache.present(&blob);
        assert!(
            present.is_superset(&held),
            "chunks indexed before an earlier kill -9 were lost: {:?}",
            held.difference(&present).collect::<Vec<_>>()
        );
        eprintln!(
            "kill -9 {delay_ms} ms into an ensure: {checked} rows consistent, {} chunks of {} \
             present; {sum} chunks in {count} group commits",
            present.len(),
            SIZE as u64 / SMALL
        );
        held = present;
        restarts.push((setup.origin.request_count(), held.clone()));
        mount = dead.restart();
    }
    assert!(
        batched.0 > batched.1,
        "no group commit held more than one chunk ({} chunks in {} commits): the test did not \
         exercise batching",
        batched.0,
        batched.1
    );
    ensure(&mount);
    let path = setup.mounted(&mount, "many.bin");
    assert_bytes_eq(
        &fs::read(&path).expect("read after the crashes"),
        data,
        "many.bin after the crashes",
    );
    assert_eq!(wait_state(&path, "COMPLETE"), "COMPLETE");
    let requests = setup.origin.requests();
    for (mark, indexed) in &restarts {
        for r in requests[*mark..]
            .iter()
            .filter(|r| r.path.ends_with("/many.bin"))
        {
            let (a, b) = r.range.unwrap_or((0, SIZE as u64 - 1));
            let hit: Vec<_> = indexed
                .iter()
                .filter(|c| {
                    let (pa, pb) = chunk_range(**c, SMALL, SIZE as u64);
                    a <= pb && b >= pa
                })
                .collect();
            assert!(
                hit.is_empty(),
                "range {a}-{b} fetched after a restart although chunks {hit:?} were indexed"
            );
        }
    }
    let checked = cache
        .check_consistent()
        .expect("cache consistent after the last restart");
    assert_eq!(checked as u64, SIZE as u64 / SMALL, "every chunk indexed");
}

/// A crash right after the mount was used: the kernel still holds the dead mount's root
/// attributes, so `stat MNT` succeeds without any daemon. The next daemon must still see the
/// mount as dead, clear it, and serve (under systemd, `Restart=` would otherwise be refused
/// for the attribute TTL, an hour).
#[test]
fn restart_at_once_after_kill9_with_root_attributes_cached() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("a.bin", MIB)], CS, 41);
    let mount = Mount::start(setup.spec(fault_config()));
    let path = setup.mounted(&mount, "a.bin");
    assert_bytes_eq(
        &read_range(&path, 0, 4096).expect("read before the crash"),
        &setup.data("a.bin")[..4096],
        "a.bin before the crash",
    );
    fs::metadata(&mount.spec.mountpoint).expect("stat the live mount");
    let dead = mount.kill9();
    assert!(
        fs::metadata(&dead.spec.mountpoint).is_ok(),
        "the dead mount's root attributes are no longer cached: the test proves nothing"
    );
    let mount = dead.restart();
    let path = setup.mounted(&mount, "a.bin");
    assert_bytes_eq(
        &read_range(&path, 0, MIB).expect("read after the restart"),
        setup.data("a.bin"),
        "a.bin after the restart",
    );
}

/// A chunk larger than the whole fetch-memory budget (`max_inflight_mib`) is fetched alone
/// with all of it, instead of waiting forever for permits that do not exist.
#[test]
fn chunk_larger_than_memory_budget_is_fetched() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("big.bin", 4 * MIB)], 2 * MIB as u64, 43);
    let mut config = fault_config();
    config.fetch.max_inflight_mib = 1;
    let mount = Mount::start(setup.spec(config));
    let path = setup.mounted(&mount, "big.bin");
    let got = read_range(&path, 0, 4 * MIB).expect("read of chunks larger than the budget");
    assert_bytes_eq(&got, setup.data("big.bin"), "big.bin");
}

/// A whole-only file whose bytes are wrong, read in 4 KiB blocks as a loader would: each
/// failed read is retried by the kernel and by the reader, and without failure memory each
/// one downloaded the whole file again (316 full downloads in 120 s were seen).
#[test]
fn corrupt_whole_only_file_is_not_downloaded_again_for_every_read() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::whole_only(&[("w.bin", 2 * MIB)], 47);
    let mut config = fault_config();
    config.fetch.cooldown_secs = 5.0;
    let mount = Mount::start(setup.spec(config));
    let path = setup.mounted(&mount, "w.bin");
    setup.origin.add_fault(Fault::Corrupt, Some("w.bin"), None);
    let mark = setup.origin.request_count();
    let start = std::time::Instant::now();
    let mut reads = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let r = read_range(&path, (reads % 512) * 4096, 4096);
        assert_eq!(
            r.map_err(|e| errno(&e)).err(),
            Some(libc::EIO),
            "a read of a file whose only source sends wrong bytes"
        );
        reads += 1;
    }
    let fetched: u64 = setup
        .origin
        .requests_since(mark)
        .iter()
        .map(|r| r.range.map_or(2 * MIB as u64, |(a, b)| b - a + 1))
        .sum();
    eprintln!("{reads} failed reads cost {fetched} origin bytes");
    assert!(reads >= 10, "only {reads} reads in 3 s");
    let source = setup.origin.base(GEN);
    let requests = |result: &str| {
        mount.metric(&format!(
            "wan_source_requests_total{{result=\"{result}\",source=\"{source}\"}}"
        ))
    };
    assert!(requests("wrong_bytes") > 0.0, "a wrong whole file counted");
    assert_eq!(requests("ok"), 0.0, "a wrong whole file counted ok");
    assert!(
        fetched <= 2 * 2 * MIB as u64,
        "{reads} failed reads downloaded {fetched} bytes of a 2 MiB file in 3 s"
    );
}

/// The only source answers 503 to about half of all requests. Retries and rounds within
/// `read_timeout` must serve every read: cooling the only source down used to leave each
/// chunk a single attempt, so about half of the reads failed with EIO.
#[test]
fn flaky_only_source_serves_every_read_within_read_timeout() {
    if no_fuse() {
        return;
    }
    const N: u64 = 40;
    let setup = GenSetup::new(&[("f.bin", N as usize * CS as usize)], CS, 53);
    let mut config = fault_config();
    config.fetch.cooldown_secs = 5.0;
    config.fetch.read_timeout_secs = 10.0;
    let mount = Mount::start(setup.spec(config));
    let path = setup.mounted(&mount, "f.bin");
    setup.origin.add_fault(
        Fault::Flaky {
            status: 503,
            percent: 50,
        },
        Some("f.bin"),
        None,
    );
    let data = setup.data("f.bin");
    let mut failed = Vec::new();
    for i in 0..N {
        let off = i * CS;
        match read_range(&path, off, 4096) {
            Ok(got) => assert_bytes_eq(&got, &data[off as usize..off as usize + 4096], "flaky"),
            Err(e) => failed.push((i, e.to_string())),
        }
    }
    let refused = setup
        .origin
        .requests()
        .iter()
        .filter(|r| r.status == 503)
        .count();
    eprintln!("{refused} requests answered 503");
    assert!(refused >= 10, "the origin was not flaky: {refused} 503s");
    assert!(
        failed.is_empty(),
        "{} of {N} reads failed: {failed:?}",
        failed.len()
    );
}
