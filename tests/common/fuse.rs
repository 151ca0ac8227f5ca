//! Whether FUSE can mount here, found out once per test binary. A test that mounts begins with
//! `if no_fuse() { return; }`: where FUSE cannot mount (no `/dev/fuse`, no permission to open
//! it, a container that may not mount, a user without fusermount3) it prints `SKIP: …` and
//! passes, so `cargo test` still runs the unit tests and the reference model there.
//! `WANFS_TEST_REQUIRE_FUSE=1` (set by `.ci/run`) turns every such skip into a failure: CI
//! never skips a mount test without a word.

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

/// The variable that makes a missing FUSE fail the tests that need it instead of skipping them.
/// Not `WAN_*`: every `wan` a test runs inherits it, and warns about a `WAN_*` variable that
/// names no config key.
pub const REQUIRE_FUSE: &str = "WANFS_TEST_REQUIRE_FUSE";

/// `Ok` where a FUSE filesystem can be mounted here, else why not. Asked once per test binary:
/// the device is opened and a filesystem that answers nothing is mounted and unmounted, as
/// `wan mount` would (fuser's mount, through fusermount3 where mount(2) is not allowed).
pub fn fuse_available() -> Result<(), String> {
    static FUSE: OnceLock<Result<(), String>> = OnceLock::new();
    FUSE.get_or_init(probe).clone()
}

/// True, after printing `SKIP: <test>: FUSE cannot mount here: <why>`, where FUSE cannot
/// mount: the calling test returns. Under `WANFS_TEST_REQUIRE_FUSE` it panics instead.
#[must_use]
pub fn no_fuse() -> bool {
    match fuse_available() {
        Ok(()) => false,
        Err(why) => {
            assert!(
                !required(),
                "{REQUIRE_FUSE} is set, but FUSE cannot mount here: {why}"
            );
            skip(&format!("FUSE cannot mount here: {why}"));
            true
        }
    }
}

/// Panics unless FUSE can mount here: what a helper that mounts checks first, so a test that
/// forgot its `no_fuse()` fails saying so, not with a daemon's log.
#[track_caller]
pub fn assert_fuse() {
    if let Err(why) = fuse_available() {
        panic!(
            "FUSE cannot mount here ({why}): a test that mounts begins with \
             `if no_fuse() {{ return; }}`"
        );
    }
}

/// Prints `SKIP: <test>: <why>` past libtest's capture (which takes `eprintln!`, not writes to
/// the stderr handle), so a skip shows in a plain `cargo test`; in one write, so the line stays
/// whole among the other tests' output.
pub fn skip(why: &str) {
    let thread = std::thread::current();
    let line = format!("SKIP: {}: {why}\n", thread.name().unwrap_or("test"));
    let _ = std::io::stderr().write_all(line.as_bytes());
}

fn required() -> bool {
    std::env::var_os(REQUIRE_FUSE).is_some_and(|v| !v.is_empty() && v != "0")
}

/// A filesystem that answers nothing: only mounted and unmounted.
struct Nothing;

impl fuser::Filesystem for Nothing {}

const FUSE_DEVICE: &str = "/dev/fuse";

fn probe() -> Result<(), String> {
    // The device first: its error says more than a failed mount's.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(FUSE_DEVICE)
        .map_err(|e| format!("cannot open {FUSE_DEVICE}: {e}"))?;
    let root = nix::unistd::geteuid().is_root();
    if !root && !on_path("fusermount3") && !on_path("fusermount") {
        return Err("not root, and no fusermount3 on PATH (install fuse3)".into());
    }
    let dir = tempfile::Builder::new()
        .prefix("wanfs-fuse-probe-")
        .tempdir()
        .map_err(|e| format!("a directory to mount on: {e}"))?;
    // fuser's mount waits for the kernel's INIT; a mount that hangs is no mount to test on.
    let mnt = dir.path().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(mount_once(&mnt));
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(r) => r,
        Err(_) => Err(format!(
            "mounting a FUSE filesystem at {} did not finish within 20 s",
            dir.path().display()
        )),
    }
}

/// Mounts [`Nothing`] at `mnt` and unmounts it (dropping the session unmounts).
fn mount_once(mnt: &Path) -> Result<(), String> {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![fuser::MountOption::FSName("wanfs-test-probe".into())];
    let session = fuser::Session::new(Nothing, mnt, &cfg)
        .map_err(|e| format!("mounting a FUSE filesystem at {}: {e}", mnt.display()))?;
    drop(session);
    Ok(())
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}
