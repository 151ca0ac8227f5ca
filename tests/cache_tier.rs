//! A standard HTTP cache tier between wanfs daemons and the origin, without wanfs peers: a real
//! nginx with `proxy_cache` and the `slice` module (the configuration of docs/OPERATIONS.md, "A
//! cache tier in front of the origin") proxies the test origin, and several daemons mount a
//! manifest whose source is nginx.
//!
//! - Every range a daemon asks for is whole slices (slice size = `part_size_kib`, chunk and
//!   head sizes multiples of it; read-ahead may join a chunk's slices into one request), so the
//!   origin serves each slice of the file exactly once however many daemons read it,
//!   concurrently or later, and nginx answers the later ones from its cache.
//! - A cache that stored wrong bytes (the origin corrupted one slice on its way into the cache)
//!   never reaches a reader: a daemon with only the cache tier as a source fails that chunk with
//!   EIO; a daemon that also lists the origin fetches that chunk, and only it, from the origin;
//!   once the file's slices are purged from the tier, the tier alone serves it right again.
//!
//! Where nginx (with the slice module) is not installed, each test prints SKIP and passes;
//! `.ci/run` installs it.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use common::nginx::Nginx;
use common::*;
use wanfs::config::Config;

const MIB: u64 = 1 << 20;
/// nginx's `slice`, equal to the daemons' `part_size_kib`: the rule of docs/OPERATIONS.md.
const SLICE: u64 = MIB;
/// A multiple of the slice, as is the 1 MiB head `wan manifest build` gives a large file.
const CHUNK: u64 = 4 * MIB;

/// The slices of a file of `size` bytes, as inclusive ranges: what the origin should see,
/// each once.
fn slice_grid(size: u64, slice: u64) -> Vec<(u64, u64)> {
    (0..size.div_ceil(slice))
        .map(|i| (i * slice, ((i + 1) * slice).min(size) - 1))
        .collect()
}

/// Daemon settings for this test: parts of one slice each; generous timeouts, since nginx and
/// several daemons share a small machine.
fn tier_config() -> Config {
    let mut config = test_config();
    config.fetch.part_size_kib = SLICE / 1024;
    config.fetch.request_timeout_secs = 10.0;
    config.fetch.read_timeout_secs = 30.0;
    config
}

/// The entry of `gen@1.0.0` under `src` with `sources`; asserts the layout the test relies on
/// (a 1 MiB head, then `CHUNK`s), so a change of `manifest build`'s defaults fails here.
fn entry_for(src: &Path, sources: Vec<String>) -> String {
    let opts = BuildOpts {
        chunk_size: Some(CHUNK),
        sources,
        whole_only: false,
    };
    let entry = manifest_build(&src.join(GEN), GEN, &opts);
    assert!(
        entry.contains(&format!("head_size = {MIB}")),
        "expected a 1 MiB head chunk:\n{entry}"
    );
    entry
}

#[test]
fn daemons_behind_an_nginx_slice_cache_fetch_each_slice_from_the_origin_once() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let src = work.path().join("src");
    // Not a multiple of the slice: the last slice is short, as real files' are.
    let size = 24 * MIB as usize + 12_345;
    let data = &gen_files(&src, GEN, &[("weights/model.bin", size)], 91)[0].1;
    let origin = Origin::start(&src);
    let Some(nginx) = Nginx::start(&work.path().join("nginx"), origin.addr(), SLICE) else {
        return;
    };
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[entry_for(&src, vec![nginx.base(GEN)])]);
    let daemon = |name: &str| {
        let dir = work.path().join(name);
        fs::create_dir_all(&dir).expect("daemon dir");
        Mount::start(MountSpec::new(&dir, &manifest).config(tier_config()))
    };
    let rel = format!("{GEN}/weights/model.bin");

    // Two daemons read the whole file at once on a cold cache tier: with proxy_cache_lock the
    // second asker of a slice waits for the first one's fetch instead of going to the origin.
    let (a, b) = (daemon("a"), daemon("b"));
    std::thread::scope(|s| {
        for m in [&a, &b] {
            let f = m.path(&rel);
            s.spawn(move || assert_bytes_eq(&fs::read(&f).expect("read"), data, "cold read"));
        }
    });
    let grid = slice_grid(size as u64, SLICE);
    let counts = origin.range_counts("/model.bin");
    let want: BTreeMap<(u64, u64), usize> = grid.iter().map(|r| (*r, 1)).collect();
    let served: u64 = counts
        .iter()
        .map(|((a, b), n)| (b - a + 1) * *n as u64)
        .sum();
    eprintln!(
        "origin: {} requests, {served} bytes for a {size}-byte file read by 2 daemons",
        origin.gets("/model.bin").len()
    );
    assert_eq!(
        counts, want,
        "the origin should serve each slice of the file exactly once"
    );
    assert!(served as f64 <= 1.1 * size as f64);
    let ab = nginx.requests();
    let after_ab = ab.len();
    let asked: u64 = ab.iter().map(|(_, n)| n).sum();
    assert!(
        asked >= 2 * size as u64,
        "both daemons should have read every byte through nginx: {asked} bytes in {after_ab} requests"
    );

    // A third daemon, later: every range it asks for is a cache hit; the origin sees nothing.
    let mark = origin.request_count();
    let c = daemon("c");
    let f = c.path(&rel);
    for (off, len) in [(3 * MIB + 77, 5 * MIB as usize), (20 * MIB, MIB as usize)] {
        let got = read_range(&f, off, len).expect("ranged read");
        assert_bytes_eq(&got, &data[off as usize..off as usize + len], "warm range");
    }
    assert_bytes_eq(&fs::read(&f).expect("read"), data, "warm read");
    let later = nginx.requests()[after_ab..].to_vec();
    let asked: u64 = later.iter().map(|(_, n)| n).sum();
    assert!(
        asked >= size as u64 && later.iter().all(|(s, _)| s == "HIT"),
        "the third daemon should be served from the cache: {later:?}"
    );
    assert_eq!(
        origin.requests_since(mark).len(),
        0,
        "the origin saw requests from the third daemon: {:?}",
        origin.requests_since(mark)
    );
}

#[test]
fn wrong_bytes_in_the_cache_tier_never_reach_a_reader() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let src = work.path().join("src");
    let size = 9 * MIB as usize;
    let data = &gen_files(&src, GEN, &[("weights/model.bin", size)], 92)[0].1;
    let origin = Origin::start(&src);
    // The same files straight from an origin, without the cache: a fallback source.
    let direct = Origin::start(&src);
    let Some(nginx) = Nginx::start(&work.path().join("nginx"), origin.addr(), SLICE) else {
        return;
    };
    // Poison one slice: the origin flips a byte of its answer, nginx caches it as it came.
    // Slice 2 (2..3 MiB) lies in chunk 1 (1..5 MiB, after the 1 MiB head).
    let path = format!("/{GEN}/weights/model.bin");
    origin.add_fault(Fault::Corrupt, Some("model.bin"), Some(1));
    let (status, body) = nginx.get_range(&path, 2 * MIB, 3 * MIB - 1);
    assert_eq!(status, 206);
    assert_eq!(body.len() as u64, MIB);
    assert_ne!(
        body,
        data[2 * MIB as usize..3 * MIB as usize],
        "the slice should be cached corrupt"
    );
    let (chunk1_first, chunk1_last) = (MIB, 5 * MIB - 1);

    // Only the cache tier as a source: the poisoned chunk fails with EIO, the others are served.
    let only_tier = work.path().join("only-tier.toml");
    write_manifest(&only_tier, &[entry_for(&src, vec![nginx.base(GEN)])]);
    let dir = work.path().join("x");
    fs::create_dir_all(&dir).expect("daemon dir");
    let x = Mount::start(MountSpec::new(&dir, &only_tier).config(tier_config()));
    let f = x.path(&format!("{GEN}/weights/model.bin"));
    assert_eio(read_range(&f, 2 * MIB, 4096), "read of the poisoned chunk");
    let got = read_range(&f, 5 * MIB, 4 * MIB as usize).expect("read of a clean chunk");
    assert_bytes_eq(&got, &data[5 * MIB as usize..], "clean chunk");
    assert!(
        x.log().contains("integrity failure"),
        "the daemon should log the wrong bytes:\n{}",
        x.log()
    );
    drop(x);

    // The cache tier first, the origin second: every byte right, and only the poisoned chunk
    // comes from the origin directly. The tier sent wrong bytes, so it cools down for
    // `cooldown_secs` and is then used again. Neither the kernel's nor the daemon's read-ahead
    // may fetch another chunk during that cool-down (it would rightly go to the origin).
    let with_origin = work.path().join("with-origin.toml");
    write_manifest(
        &with_origin,
        &[entry_for(&src, vec![nginx.base(GEN), direct.base(GEN)])],
    );
    let dir = work.path().join("y");
    fs::create_dir_all(&dir).expect("daemon dir");
    let mut config = tier_config();
    config.fetch.readahead_chunks = 0;
    let y = Mount::start(MountSpec::new(&dir, &with_origin).config(config.clone()));
    let f = y.path(&format!("{GEN}/weights/model.bin"));
    let file = fs::File::open(&f).expect("open");
    // SAFETY: fadvise on an fd we own; RANDOM turns the kernel's read-ahead off for it.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    assert_eq!(rc, 0, "posix_fadvise RANDOM");
    let len = (chunk1_last - chunk1_first + 1) as usize;
    let got = read_range_in(&file, chunk1_first, len).expect("read of the poisoned chunk");
    assert_bytes_eq(
        &got,
        &data[chunk1_first as usize..chunk1_first as usize + len],
        "poisoned chunk, with a fallback",
    );
    let fallback = direct.gets("/model.bin");
    assert!(
        !fallback.is_empty(),
        "the poisoned chunk must come from the origin"
    );
    for r in &fallback {
        let (a, b) = r.range.expect("a ranged request");
        assert!(
            a >= chunk1_first && b <= chunk1_last,
            "only chunk 1 should come from the origin directly, got {a}-{b}"
        );
    }
    std::thread::sleep(Duration::from_secs_f64(config.fetch.cooldown_secs + 0.5));
    let mark = direct.request_count();
    assert_bytes_eq(&fs::read(&f).expect("read"), data, "whole file");
    assert_eq!(
        direct.requests_since(mark).len(),
        0,
        "after its cool-down the cache tier should serve the rest"
    );
    drop((file, y));

    // The remedy of docs/OPERATIONS.md, as written there: drop the file's slices from the tier.
    // A daemon with only the tier as a source then reads every byte.
    let purge = format!(
        "grep -rlaF 'KEY: {path}bytes=' {} | xargs -r rm -v",
        nginx.cache_dir().display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &purge])
        .output()
        .expect("run the purge");
    let removed = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(
        out.status.success() && removed == size.div_ceil(SLICE as usize),
        "{purge}: removed {removed} files: {out:?}"
    );
    let dir = work.path().join("z");
    fs::create_dir_all(&dir).expect("daemon dir");
    let z = Mount::start(MountSpec::new(&dir, &only_tier).config(tier_config()));
    let f = z.path(&format!("{GEN}/weights/model.bin"));
    assert_bytes_eq(&fs::read(&f).expect("read"), data, "after the purge");
}
