//! A cache filesystem that fills up (another process's logs, a core dump): reads keep being
//! served while nothing can be stored, and GC can always free space, although the index
//! itself cannot write until it does. The cache sits on a small tmpfs (needs root).

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::*;

const MIB: usize = 1024 * 1024;
const CS: u64 = 256 * 1024;

/// A tmpfs of `mib` MiB at `dir`, unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &Path, mib: usize) -> Option<SmallFs> {
        fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={}", mib * MIB), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallFs(dir.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes zeros to `path` until the filesystem says ENOSPC; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    let block = vec![0u8; 64 * 1024];
    let mut n = 0;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    n
}

#[test]
fn full_cache_disk_keeps_serving_and_gc_frees_it() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(
        &[("a.bin", 8 * MIB), ("b.bin", 8 * MIB), ("c.bin", 2 * MIB)],
        CS,
        61,
    );
    let cache_fs = setup.work.path().join("cachefs");
    let Some(_tmpfs) = SmallFs::mount(&cache_fs, 24) else {
        eprintln!("SKIP: cannot mount a tmpfs here (not root?)");
        return;
    };
    let mut spec = setup.spec(test_config());
    spec.cache_dir = cache_fs.join("cache");
    let mount = Mount::start(spec);
    for f in ["a.bin", "b.bin"] {
        let got = fs::read(setup.mounted(&mount, f)).expect("read before the disk fills");
        assert_bytes_eq(&got, setup.data(f), f);
    }
    let cache = CacheView::new(&mount.spec.cache_dir);
    assert!(
        wait_until(Duration::from_secs(10), || {
            ["a.bin", "b.bin"]
                .iter()
                .all(|f| cache.present(&sha256_hex(setup.data(f))).len() == 32)
        }),
        "a.bin and b.bin not cached"
    );
    let filled = fill(&cache_fs.join("filler"));
    eprintln!("filled the cache filesystem with {filled} more bytes");

    // Nothing can be stored now, but a cold read is still served (verified, not cached).
    let c = setup.mounted(&mount, "c.bin");
    let got = fs::read(&c).expect("a cold read on a full cache disk");
    assert_bytes_eq(&got, setup.data("c.bin"), "c.bin on a full disk");

    // GC frees space although the index cannot write until it has.
    fs::write(mount.path(".wan/gc"), "aggressive\n").expect("write .wan/gc");
    assert!(
        wait_until(Duration::from_secs(20), || mount
            .log()
            .contains("gc from .wan/gc")),
        "gc never finished:\n{}",
        mount.log()
    );
    assert!(
        !mount.log().contains("gc from .wan/gc failed"),
        "gc failed on a full disk:\n{}",
        mount.log()
    );
    let (_, free) = wanfs::control::statvfs(&cache_fs).expect("statvfs of the cache filesystem");
    assert!(free >= 12 * MIB as u64, "only {free} bytes free after GC");

    // And the cache works again: the next cold read is stored, the index answers.
    drop_page_cache(&c);
    let got = fs::read(&c).expect("read after GC");
    assert_bytes_eq(&got, setup.data("c.bin"), "c.bin after GC");
    let want = sha256_hex(setup.data("c.bin"));
    assert!(
        wait_until(Duration::from_secs(10), || cache.present(&want).len() == 8),
        "c.bin not cached after GC freed space"
    );
    let health = fs::read_to_string(mount.path(".wan/health")).expect("read .wan/health");
    assert!(!health.contains("unhealthy"), "{health}");

    // A restart on the same cache finds it consistent.
    drop(mount);
    cache
        .check_consistent()
        .expect("cache consistent after a full disk");
}

/// Whole-only files on a full cache disk: they cannot be written, even unverified, but one no
/// larger than `max_inflight_mib` is fetched into memory, verified whole and served (a 17-byte
/// config file failed with `database or disk is full`); a larger one fails with EIO and a log
/// line that says why. Nothing of them is marked present.
#[test]
fn full_cache_disk_serves_small_whole_only_files_from_memory() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::whole_only(
        &[
            ("config.json", 17),
            ("w.bin", 3 * MIB),
            ("big.bin", 6 * MIB),
        ],
        62,
    );
    let cache_fs = setup.work.path().join("cachefs");
    let Some(_tmpfs) = SmallFs::mount(&cache_fs, 8) else {
        eprintln!("SKIP: cannot mount a tmpfs here (not root?)");
        return;
    };
    let mut config = test_config();
    config.fetch.max_inflight_mib = 4;
    let mut spec = setup.spec(config);
    spec.cache_dir = cache_fs.join("cache");
    let mount = Mount::start(spec);
    fill(&cache_fs.join("filler"));
    for f in ["config.json", "w.bin"] {
        let got = fs::read(setup.mounted(&mount, f)).expect("a whole-only file on a full disk");
        assert_bytes_eq(&got, setup.data(f), f);
        assert_eq!(state(&setup.mounted(&mount, f)), "NOT_PRESENT", "{f}");
    }
    assert_eio(fs::read(setup.mounted(&mount, "big.bin")), "big.bin");
    let log = mount.log();
    assert!(
        log.contains("serving it from memory")
            && log.contains("larger than fetch.max_inflight_mib"),
        "{log}"
    );
    drop(mount);
    CacheView::new(&cache_fs.join("cache"))
        .check_consistent()
        .expect("cache consistent");
}

/// A cache on a filesystem mounted read-only (a remount after disk errors, a read-only image):
/// the daemon still mounts, serves what the cache holds, serves the rest from the origin
/// without storing it (whole-only files from memory), and health names the cause. An empty
/// read-only cache directory mounts too.
#[test]
fn read_only_cache_keeps_serving_and_says_so() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("a.bin", 2 * MIB), ("b.bin", 2 * MIB)], CS, 63);
    let cache_fs = setup.work.path().join("cachefs");
    let Some(_tmpfs) = SmallFs::mount(&cache_fs, 24) else {
        eprintln!("SKIP: cannot mount a tmpfs here (not root?)");
        return;
    };
    let mut spec = setup.spec(test_config());
    spec.cache_dir = cache_fs.join("cache");
    fs::create_dir_all(cache_fs.join("empty")).unwrap();
    let mount = Mount::start(spec.clone());
    let got = fs::read(setup.mounted(&mount, "a.bin")).unwrap();
    assert_bytes_eq(&got, setup.data("a.bin"), "a.bin");
    wait_state(&setup.mounted(&mount, "a.bin"), "COMPLETE");
    assert!(mount.stop().success());

    let remount = |opt: &str| {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&cache_fs)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount {opt}");
    };
    remount("ro");
    let mount = Mount::start(spec.clone());
    let served = setup.origin.request_count();
    let got = fs::read(setup.mounted(&mount, "a.bin")).expect("a cached file");
    assert_bytes_eq(&got, setup.data("a.bin"), "a.bin from the read-only cache");
    assert_eq!(
        setup.origin.request_count(),
        served,
        "a.bin came from the cache"
    );
    let b = setup.mounted(&mount, "b.bin");
    let got = fs::read(&b).expect("a cold file on a read-only cache");
    assert_bytes_eq(&got, setup.data("b.bin"), "b.bin from the origin");
    assert_eq!(state(&b), "NOT_PRESENT");
    let health = fs::read_to_string(mount.path(".wan/health")).unwrap();
    assert!(health.contains("read-only"), "{health}");
    drop(mount);

    let mut empty = spec.clone();
    empty.cache_dir = cache_fs.join("empty");
    let mount = Mount::start(empty);
    let got = fs::read(setup.mounted(&mount, "b.bin")).expect("an empty read-only cache");
    assert_bytes_eq(&got, setup.data("b.bin"), "b.bin, empty read-only cache");
    drop(mount);
    remount("rw");
}
