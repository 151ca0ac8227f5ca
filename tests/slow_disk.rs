//! A cache disk slower than the network (`fetch.when_cache_behind`): the daemon is put in a
//! blkio cgroup that throttles its writes to the cache's device, so commits fall behind a
//! local origin. With `skip`, a reader is served at the network's speed and chunks that came
//! while the disk was behind are not cached (counted in `wan_cache_skipped_bytes_total`);
//! `ensure` still caches every chunk. Needs root and cgroup v1 blkio; skips otherwise.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use wanfs::config::WhenCacheBehind;

const MIB: usize = 1024 * 1024;

/// A blkio cgroup limiting writes to one device; removed on drop (once the daemon is gone).
struct Throttle(PathBuf);

impl Throttle {
    fn new(dev_of: &Path, bytes_per_sec: u64) -> Option<Throttle> {
        let root = Path::new("/sys/fs/cgroup/blkio");
        if !root.join("blkio.throttle.write_bps_device").exists() {
            return None;
        }
        let dir = root.join(format!("wanfs-test-{}", std::process::id()));
        fs::create_dir_all(&dir).ok()?;
        let dev = fs::metadata(dev_of).ok()?.dev();
        let rule = format!("{}:{} {bytes_per_sec}", libc::major(dev), libc::minor(dev));
        let t = Throttle(dir);
        fs::write(t.0.join("blkio.throttle.write_bps_device"), rule).ok()?;
        Some(t)
    }

    fn add(&self, pid: u32) {
        fs::write(self.0.join("cgroup.procs"), pid.to_string())
            .expect("move the daemon into the cgroup");
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_slow_cache_disk_is_skipped_by_readers_and_filled_by_ensure() {
    if no_fuse() {
        return;
    }
    let size = 48 * MIB;
    let setup = GenSetup::new(&[("big.bin", size)], MIB as u64, 81);
    // 16 MiB/s to the cache's device: a 48 MiB read that waited for it would take 3 s.
    let Some(throttle) = Throttle::new(setup.work.path(), 16 * MIB as u64) else {
        eprintln!("SKIP: no cgroup v1 blkio throttling here (not root, or cgroup v2 only)");
        return;
    };
    let mut config = test_config();
    config.fetch.max_inflight_mib = 16;
    config.fetch.readahead_chunks = 8;
    config.fetch.when_cache_behind = WhenCacheBehind::Skip;
    let mount = Mount::start(setup.spec(config));
    throttle.add(mount.pid());
    let path = setup.mounted(&mount, "big.bin");

    let t0 = Instant::now();
    let got = fs::read(&path).expect("read with the cache disk behind");
    let took = t0.elapsed();
    assert_bytes_eq(&got, setup.data("big.bin"), "big.bin");
    let skipped = mount.metric("wan_cache_skipped_bytes_total") as u64;
    eprintln!("read {size} bytes in {took:?}; {skipped} bytes served and not cached");
    assert!(
        skipped > 0,
        "nothing was skipped although the disk was behind"
    );
    assert!(skipped < size as u64, "everything was skipped");
    // A chunk served without being cached is still held for its reader: read-ahead does not
    // fetch it again, so the origin sent each byte once.
    let again: Vec<_> = setup
        .origin
        .range_counts("big.bin")
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(again.is_empty(), "ranges fetched more than once: {again:?}");
    assert_ne!(
        wait_state(&path, "COMPLETE"),
        "COMPLETE",
        "skipped chunks were cached after all"
    );

    // What the cache holds is verified; ensure fills the rest, skipping nothing.
    fs::write(mount.path(".wan/ensure"), format!("{GEN}\n")).expect("write .wan/ensure");
    assert_eq!(wait_state(&path, "COMPLETE"), "COMPLETE", "{}", mount.log());
    assert_eq!(
        mount.metric("wan_cache_skipped_bytes_total") as u64,
        skipped
    );
    drop_page_cache(&path);
    assert_bytes_eq(
        &fs::read(&path).expect("read from the cache"),
        setup.data("big.bin"),
        "cached",
    );
    let cache = CacheView::new(&mount.spec.cache_dir);
    drop(mount);
    cache.check_consistent().expect("cache consistent");
}
