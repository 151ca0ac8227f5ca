//! The whole-file check (issue 19, "without any signature, the `sha256` line must still mean
//! something"), against real mounts over a real HTTP origin:
//!
//! - a forged entry (another content's chunks and source, the `sha256` line kept) is served
//!   chunk by chunk, and refused once the file is complete: the next read fails with EIO, the
//!   blob is gone, the failure is counted, and status says CORRUPT with the reason; the
//!   refusal survives a restart without a byte fetched again;
//! - a whole-only file whose blob is complete but never checked whole waits for the check:
//!   served when it passes, refused with no byte served when it does not;
//! - verify checks the whole file too: a rotted byte is a bad chunk (repaired, no whole-file
//!   failure), a forged entry whose chunks all pass is refused.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::mount::Mount;
use common::origin::{Origin, wait_until};
use common::*;

const SIZE: usize = 5 * 1024 * 1024 + 4321;
const CHUNK: u64 = 1024 * 1024;

/// A model whose one file `f.bin` the manifest describes with the chunks of `served` (and a
/// source that serves `served`) but with the sha256 of `named`.
struct Forged {
    work: tempfile::TempDir,
    origin: Origin,
    named: Vec<u8>,
    served: Vec<u8>,
    manifest: std::path::PathBuf,
}

impl Forged {
    fn new(seed: u64, whole_only: bool) -> Forged {
        let work = workdir();
        let src = work.path().join("src");
        let named = random_bytes(SIZE, seed);
        let served = random_bytes(SIZE, seed + 1);
        fs::create_dir_all(src.join(GEN)).unwrap();
        fs::write(src.join(GEN).join("f.bin"), &served).unwrap();
        let origin = Origin::start(&src);
        let opts = BuildOpts {
            chunk_size: Some(CHUNK),
            sources: vec![origin.base(GEN)],
            whole_only,
        };
        let entry = manifest_build(&src.join(GEN), GEN, &opts)
            .replace(&sha256_hex(&served), &sha256_hex(&named));
        let manifest = work.path().join("models.toml");
        write_manifest(&manifest, &[entry]);
        Forged {
            work,
            origin,
            named,
            served,
            manifest,
        }
    }

    fn mount(&self) -> Mount {
        Mount::start(common::mount::MountSpec::new(
            self.work.path(),
            &self.manifest,
        ))
    }

    fn cache(&self) -> CacheView {
        CacheView::new(&self.work.path().join("cache"))
    }
}

fn status(m: &Mount) -> String {
    fs::read_to_string(m.path(".wan/status")).expect("read .wan/status")
}

/// The model's entry of `.wan/status`.
fn model(m: &Mount) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&status(m)).expect("status is JSON");
    v["models"][GEN].clone()
}

#[track_caller]
fn assert_corrupt(m: &Mount) {
    let st = model(m);
    assert_eq!(st["state"], "CORRUPT", "{st:#}");
    let why = st["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("whole-file sha256 mismatch"), "{st:#}");
}

fn events(m: &Mount) -> String {
    fs::read_to_string(m.path(".wan/events")).expect("read .wan/events")
}

#[track_caller]
fn wait_metric(m: &Mount, name: &str, want: f64) {
    let ok = wait_until(Duration::from_secs(20), || m.metric(name) >= want);
    assert!(ok, "{name} did not reach {want}; log:\n{}", m.log());
}

/// Sets a cached blob's whole-file check back to "never checked", as a cache written before
/// the check existed (or one whose chunks came from another entry) holds it.
fn uncheck(cache: &Path, blob: &str) {
    let c = rusqlite::Connection::open(cache.join("v1/index.sqlite")).unwrap();
    let n = c
        .execute(
            "UPDATE blobs SET whole_checked = 0 WHERE digest = ?1",
            [blob],
        )
        .unwrap();
    assert_eq!(n, 1, "no index row for blob {blob}");
}

/// Waits until the completed blob's background check has passed (its index row says so).
#[track_caller]
fn wait_checked(cache: &Path, blob: &str) {
    let ok = wait_until(Duration::from_secs(20), || {
        let c = rusqlite::Connection::open(cache.join("v1/index.sqlite")).unwrap();
        c.query_row(
            "SELECT whole_checked FROM blobs WHERE digest = ?1",
            [blob],
            |r| r.get::<_, i64>(0),
        )
        .is_ok_and(|v| v == 1)
    });
    assert!(ok, "blob {blob} was not checked whole");
}

#[test]
fn a_forged_chunk_list_is_refused_once_the_file_is_complete() {
    if no_fuse() {
        return;
    }
    let t = Forged::new(1901, false);
    let named = sha256_hex(&t.named);
    let m = t.mount();
    let file = m.path(&format!("{GEN}/f.bin"));
    assert_eq!(m.metric("wan_whole_file_failures_total"), 0.0);
    // Chunk by chunk, every byte read verifies against the forged chunks: served, as any
    // unsigned chunked read is; completing the file starts its whole-file check.
    let _ = fs::read(&file);
    wait_metric(&m, "wan_whole_file_failures_total", 1.0);
    let blob = t.cache().blob_path(&named);
    assert!(
        wait_until(Duration::from_secs(5), || !blob.exists()),
        "the refused blob is still cached"
    );
    drop_page_cache(&file);
    assert_eio(read_range(&file, 0, 4096), "a read after the refusal");
    assert_eio(read_range(&file, SIZE as u64 - 10, 10), "the last bytes");
    assert_eq!(state(&file), "NOT_PRESENT");
    assert_corrupt(&m);
    assert!(events(&m).contains("integrity"), "events:\n{}", events(&m));
    let log = m.log();
    let line = log
        .lines()
        .find(|l| l.contains("whole file does not match its sha256"))
        .unwrap_or_else(|| panic!("no integrity line in the log:\n{log}"));
    for want in [GEN, "f.bin", named.as_str(), &sha256_hex(&t.served)] {
        assert!(line.contains(want), "{want} missing from: {line}");
    }
    // Counted once: the reads after it fail at once, they do not check again.
    assert_eq!(m.metric("wan_whole_file_failures_total"), 1.0);
    assert!(m.stop().success());

    // A restart remembers it: nothing fetched again, nothing served.
    let before = t.origin.request_count();
    let m = t.mount();
    let file = m.path(&format!("{GEN}/f.bin"));
    assert_eio(read_range(&file, 0, 4096), "a read after a restart");
    assert_eq!(
        t.origin.request_count(),
        before,
        "a refused file was fetched again"
    );
    assert_corrupt(&m);

    // ensure --force-redownload clears it: fetched and checked again, and refused again (the
    // entry still lies), counted again.
    fs::write(m.path(".wan/ensure"), format!("--force-redownload {GEN}\n"))
        .expect("write .wan/ensure");
    wait_metric(&m, "wan_whole_file_failures_total", 1.0);
    assert!(
        t.origin.request_count() > before,
        "force-redownload fetched nothing"
    );
    drop_page_cache(&file);
    assert!(
        wait_until(Duration::from_secs(20), || read_range(&file, 0, 10)
            .is_err()),
        "refused again"
    );
}

/// A whole-only file finds its blob complete but never checked whole: its reader waits for the
/// check, and gets the bytes only when it passes.
#[test]
fn a_whole_only_file_waits_for_its_check() {
    if no_fuse() {
        return;
    }
    let g = GenSetup::whole_only(&[("w.bin", SIZE)], 1902);
    let want = g.data("w.bin").to_vec();
    let sha = sha256_hex(&want);
    let cache = g.work.path().join("cache");
    {
        let m = Mount::start(g.spec(common::mount::test_config()));
        let got = fs::read(g.mounted(&m, "w.bin")).unwrap();
        assert_bytes_eq(&got, &want, "first read");
        assert!(m.stop().success());
    }
    // Never checked, bytes intact: the check passes, the bytes are served, from the cache.
    uncheck(&cache, &sha);
    let m = Mount::start(g.spec(common::mount::test_config()));
    let before = g.origin.request_count();
    let got = fs::read(g.mounted(&m, "w.bin")).unwrap();
    assert_bytes_eq(&got, &want, "after the check");
    assert_eq!(
        g.origin.request_count(),
        before,
        "a checked blob was fetched again"
    );
    assert_eq!(m.metric("wan_whole_file_failures_total"), 0.0);
    assert!(m.stop().success());

    // Never checked, and its bytes are another content's (chunks of an earlier entry): no
    // byte is served, the file is refused.
    uncheck(&cache, &sha);
    let blob = CacheView::new(&cache).blob_path(&sha);
    let other = random_bytes(SIZE, 77);
    fs::write(&blob, &other).unwrap();
    let m = Mount::start(g.spec(common::mount::test_config()));
    let file = g.mounted(&m, "w.bin");
    assert_eio(
        read_range(&file, 0, 4096),
        "a whole-only read of a bad blob",
    );
    assert_eq!(m.metric("wan_whole_file_failures_total"), 1.0);
    assert!(!blob.exists(), "the refused blob is still cached");
    assert_eio(read_range(&file, 100, 10), "a later read");
    assert_corrupt(&m);
    assert_eq!(
        g.origin.request_count(),
        before,
        "a refused file was fetched"
    );
}

fn verify_and_wait(m: &Mount) {
    fs::write(m.path(".wan/verify"), format!("{GEN}\n")).expect("write .wan/verify");
    let ok = wait_until(Duration::from_secs(30), || {
        let job = &model(m)["job"];
        job["kind"] == "verify" && job["state"] != "running"
    });
    assert!(ok, "verify did not end; status:\n{}", status(m));
}

/// A rotted byte is a bad chunk: verify repairs it, no whole-file failure. A forged entry
/// whose every chunk verifies is refused by verify's whole-file check.
#[test]
fn verify_checks_the_whole_file() {
    if no_fuse() {
        return;
    }
    let g = GenSetup::new(&[("c.bin", SIZE)], CHUNK, 1903);
    let want = g.data("c.bin").to_vec();
    let sha = sha256_hex(&want);
    let blob = CacheView::new(&g.work.path().join("cache")).blob_path(&sha);
    let m = Mount::start(g.spec(common::mount::test_config()));
    let file = g.mounted(&m, "c.bin");
    assert_bytes_eq(&fs::read(&file).unwrap(), &want, "first read");
    wait_state(&file, "COMPLETE");
    wait_checked(&g.work.path().join("cache"), &sha);
    // Rot one byte of chunk 2 on the cache disk.
    let mut bytes = fs::read(&blob).unwrap();
    bytes[2 * CHUNK as usize + 5] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    verify_and_wait(&m);
    assert_eq!(m.metric("wan_whole_file_failures_total"), 0.0);
    assert_eq!(
        fs::read(&blob).unwrap(),
        want,
        "verify did not repair the blob"
    );
    assert!(m.stop().success());

    // The forged entry: the chunks (and source) of the bytes the cache holds, with c.bin's
    // sha256 kept. Every chunk passes; the whole does not.
    let other = random_bytes(SIZE, 1904);
    let src = g.work.path().join("evil");
    fs::create_dir_all(src.join(GEN)).unwrap();
    fs::write(src.join(GEN).join("c.bin"), &other).unwrap();
    let opts = BuildOpts {
        chunk_size: Some(CHUNK),
        sources: vec![g.origin.base(GEN)],
        whole_only: false,
    };
    let entry = manifest_build(&src.join(GEN), GEN, &opts).replace(&sha256_hex(&other), &sha);
    write_manifest(&g.manifest, &[entry]);
    fs::write(&blob, &other).unwrap();
    uncheck(&g.work.path().join("cache"), &sha);
    let m = Mount::start(g.spec(common::mount::test_config()));
    verify_and_wait(&m);
    assert_eq!(m.metric("wan_whole_file_failures_total"), 1.0);
    assert!(!blob.exists(), "the refused blob is still cached");
    assert_corrupt(&m);
    assert_eio(
        read_range(&g.mounted(&m, "c.bin"), 0, 10),
        "a read of the refused file",
    );
}
