//! Operations: systemd units pass `systemd-analyze verify`, READY=1 reaches systemd only once
//! the mount answers, SIGHUP reloads manifest and config (and refuses a bad one), the
//! `mount.fuse.wan` helper, `wan config check` and WAN_* overrides, a lost index rebuilt
//! from the blobs without fetching anything again, and auto GC woken by the high watermark.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use wanfs::config::Config;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn wait_log(m: &Mount, needle: &str) {
    let t0 = Instant::now();
    while !m.log().contains(needle) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no {needle:?} in log:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["wan22.service", "data-models.mount"] {
        let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
        // Point ExecStart at the binary under test so the check of the command applies to it.
        let text = text.replace("/usr/local/bin/wan", &wan_bin().to_string_lossy());
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains(unit)).collect();
        assert!(out.status.success() && ours.is_empty(), "{unit}: {stderr}");
    }
}

#[test]
fn notify_ready_only_when_mounted_and_sighup_reloads_manifest() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let sock_path = work.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let manifest = work.path().join("models.toml");
    let full = std::fs::read_to_string(fixtures().join("models.toml")).unwrap();
    let abs = full.replace(
        "local://models/",
        &format!("file://{}/", fixture_models().display()),
    );
    std::fs::write(&manifest, &abs).unwrap();

    let spec =
        MountSpec::new(work.path(), &manifest).env("NOTIFY_SOCKET", &sock_path.to_string_lossy());
    let (mut child, log) = spec.spawn();
    let next = || {
        let mut buf = [0u8; 256];
        match sock.recv(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) => panic!(
                "no notification within 60 s ({e}); daemon log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    };
    assert_eq!(next(), "READY=1");
    // READY means usable: the models are listed at that moment.
    let listed = std::fs::read_dir(&spec.mountpoint).unwrap().count();
    assert!(
        listed >= 3,
        "READY before the mount answered ({listed} entries)"
    );

    // Drop ti2v from the manifest and add nothing: SIGHUP → it disappears, others stay.
    let cut = abs.find("[models.\"ti2v-5B@2.2.0\"]").unwrap();
    std::fs::write(&manifest, &abs[..cut]).unwrap();
    hup(child.id());
    assert_eq!(next(), "RELOADING=1");
    assert_eq!(next(), "READY=1");
    assert!(
        !spec.mountpoint.join("ti2v-5B@2.2.0").exists(),
        "removed model still visible"
    );
    assert!(
        spec.mountpoint
            .join("t2v-A14B@2.2.0/configuration.json")
            .exists()
    );

    // A broken manifest is refused; the running one stays.
    std::fs::write(&manifest, "schema_version = 1\n[models.\"bad id\"]\n").unwrap();
    hup(child.id());
    assert_eq!(next(), "RELOADING=1");
    assert_eq!(next(), "READY=1");
    let data = std::fs::read(spec.mountpoint.join("i2v-A14B@2.2.0/configuration.json")).unwrap();
    assert_eq!(
        data,
        std::fs::read(fixture_models().join("i2v-A14B@2.2.0/configuration.json")).unwrap()
    );

    // The model comes back with the full manifest.
    std::fs::write(&manifest, &abs).unwrap();
    hup(child.id());
    assert_eq!(next(), "RELOADING=1");
    assert_eq!(next(), "READY=1");
    assert!(spec.mountpoint.join("ti2v-5B@2.2.0/config.json").exists());

    // SAFETY: our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "daemon exit: {status}");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log.is_empty() || log.contains("reload refused"),
        "refusal not logged:\n{log}"
    );
}

#[test]
fn reload_refuses_a_bad_config_and_keeps_serving() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let m = Mount::start(MountSpec::new(work.path(), &fixtures().join("models.toml")));
    wait_log(&m, "mounted");
    let cfg = m.spec.work.join("wan.toml");
    let cfg = if cfg.exists() {
        cfg
    } else {
        find_config(&m.spec.work)
    };
    // A typo, then values out of range that once panicked the daemon (a dead mount).
    let bad = [
        ("[fetch]\nconections = 3\n", "conections"),
        ("[gc]\nmax_bytes = 10000000000000000000\n", "gc.max_bytes"),
        (
            "[fetch]\nbackoff_ms = 9223372036854775808\n",
            "fetch.backoff_ms",
        ),
        (
            "[fetch]\nread_timeout_secs = 1e300\n",
            "fetch.read_timeout_secs",
        ),
        ("[mount]\nthreads = 20000\n", "mount.threads"),
    ];
    for (i, (text, key)) in bad.into_iter().enumerate() {
        std::fs::write(&cfg, text).unwrap();
        let out = run_wan(
            &["config", "check", &cfg.to_string_lossy()],
            Duration::from_secs(10),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1) && err.contains(key) && !err.contains("panicked"),
            "wan config check on {text:?}: {:?} {err}",
            out.status
        );
        hup(m.pid());
        assert!(
            wait_until(Duration::from_secs(10), || m
                .log()
                .matches("reload refused")
                .count()
                > i),
            "reload of {text:?} not refused:\n{}",
            m.log()
        );
        assert!(
            m.log().contains(key) && !m.log().contains("panicked"),
            "the bad key {key} is named:\n{}",
            m.log()
        );
        let p = m.path("t2v-A14B@2.2.0/configuration.json");
        assert_eq!(
            std::fs::read(p).unwrap(),
            std::fs::read(fixture_models().join("t2v-A14B@2.2.0/configuration.json")).unwrap(),
            "after refusing {text:?}"
        );
    }
}

fn find_config(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "toml")
                && std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .contains("[fetch]")
        })
        .expect("the harness writes a config file")
}

#[test]
fn mount_helper_mounts_in_the_background() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let helper = work.path().join("mount.fuse.wan");
    std::os::unix::fs::symlink(wan_bin(), &helper).unwrap();
    let mnt = work.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let cfg = work.path().join("wan.toml");
    let mut config = Config {
        manifest: Some(fixtures().join("models.toml")),
        cache_dir: Some(work.path().join("cache")),
        ..Config::default()
    };
    config.http.addr = String::new();
    write_config(&cfg, &config);
    let out = Command::new(&helper)
        .arg("wanfs")
        .arg(&mnt)
        .arg("-o")
        .arg(format!("rw,config={},_netdev", cfg.display()))
        // mount(8) waits for the helper to exit, not for its output to close (the daemon it
        // starts keeps stderr, for the journal): so do we.
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(out.success(), "helper failed: {out}");
    assert!(
        mnt.join("t2v-A14B@2.2.0").is_dir(),
        "not mounted after the helper returned"
    );
    let n = mount_count(&mnt);
    assert_eq!(n, 1);
    force_unmount(&mnt);
}

#[test]
fn config_check_names_bad_keys_and_env_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[gc]\nmax_bytes = 1000\n[log]\nformat = \"json\"\n").unwrap();
    let out = run_wan(
        &["config", "check", &good.to_string_lossy()],
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[gc]\nhigh_watermark = 0.5\nlow_watermark = 0.7\n").unwrap();
    let out = run_wan(
        &["config", "check", &bad.to_string_lossy()],
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("watermark"));
    let mut cmd = Command::new(wan_bin());
    cmd.args(["config", "check", &good.to_string_lossy()])
        .env("WAN_FETCH_RETRIES", "lots");
    let out = run_with_timeout(cmd, Duration::from_secs(10));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("WAN_") && err.contains("retries"), "{err}");
}

#[test]
fn lost_index_is_rebuilt_without_fetching_again() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("w.bin", 3 << 20)], 1 << 20, 9);
    let m = Mount::start(setup.spec(test_config()));
    let f = setup.mounted(&m, "w.bin");
    assert_bytes_eq(
        &std::fs::read(&f).unwrap(),
        setup.data("w.bin"),
        "first read",
    );
    let spec = m.spec.clone();
    assert!(m.stop().success());
    let before = setup.origin.request_count();
    // Lose the index entirely (as if the disk holding it failed).
    let index = spec.cache_dir.join("v1/index.sqlite");
    std::fs::write(&index, b"garbage, not a database").unwrap();
    let _ = std::fs::remove_file(spec.cache_dir.join("v1/index.sqlite-wal"));
    let m = Mount::start(spec);
    wait_log(&m, "rebuilt index entries");
    let f = setup.mounted(&m, "w.bin");
    assert_eq!(state(&f), "COMPLETE");
    assert_bytes_eq(
        &std::fs::read(&f).unwrap(),
        setup.data("w.bin"),
        "after rebuild",
    );
    assert_eq!(
        setup.origin.request_count(),
        before,
        "the rebuild fetched something again"
    );
}

#[test]
fn json_logs_to_a_file_reopened_on_sighup_with_downloads_greppable() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let logfile = work.path().join("wan.log");
    let spec = MountSpec::new(work.path(), &fixtures().join("models.toml"))
        .env("WAN_LOG_FORMAT", "json")
        .env("WAN_LOG_FILE", &logfile.to_string_lossy());
    let m = Mount::start(spec);
    let f = m.path("ti2v-5B@2.2.0/config.json");
    std::fs::read(&f).unwrap();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&logfile)
        .unwrap_or_default()
        .contains("download completed")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no download line in {}",
            logfile.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&logfile).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("download completed"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(v["fields"]["model"], "ti2v-5B@2.2.0", "{line}");
    assert_eq!(v["fields"]["file"], "config.json", "{line}");
    assert!(
        v["fields"]["bytes"].as_u64().unwrap() > 0 && v["fields"].get("seconds").is_some(),
        "{line}"
    );
    // logrotate: move the file away, SIGHUP, and the daemon writes to a new one.
    let rotated = work.path().join("wan.log.1");
    std::fs::rename(&logfile, &rotated).unwrap();
    hup(m.pid());
    let t0 = Instant::now();
    while !std::fs::read_to_string(&logfile)
        .unwrap_or_default()
        .contains("reload")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "log file not reopened after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !std::fs::read_to_string(&rotated)
            .unwrap()
            .contains("reloaded")
    );
}

/// Reads racing the rebuild of a lost index: each chunk whose bytes are in the blob file is
/// verified from the file, not fetched again (files read last-first, against the rebuild's
/// order, so the reads reach blobs the rebuild has not got to yet).
#[test]
fn reads_racing_a_lost_index_rebuild_fetch_nothing() {
    if no_fuse() {
        return;
    }
    let files = [
        ("a.bin", 24 << 20),
        ("b.bin", 24 << 20),
        ("c.bin", 24 << 20),
        ("d.bin", 24 << 20),
    ];
    let setup = GenSetup::new(&files, 256 << 10, 11);
    let m = Mount::start(setup.spec(test_config()));
    for (name, _) in files {
        let got = std::fs::read(setup.mounted(&m, name)).unwrap();
        assert_bytes_eq(&got, setup.data(name), name);
    }
    let spec = m.spec.clone();
    assert!(m.stop().success());
    let before = setup.origin.request_count();
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(spec.cache_dir.join(format!("v1/index.sqlite{ext}")));
    }
    let m = Mount::start(spec);
    for (name, _) in files.iter().rev() {
        let got = std::fs::read(setup.mounted(&m, name)).unwrap();
        assert_bytes_eq(&got, setup.data(name), name);
    }
    let refetched = setup.origin.requests_since(before);
    assert!(
        refetched.is_empty(),
        "{} requests for bytes already in the cache, e.g. {:?}",
        refetched.len(),
        refetched.first()
    );
}

/// Auto GC runs as soon as reads push usage past the high watermark, not at the next
/// `gc.interval_secs` tick (an hour here): a burst of cold reads must not fill the disk.
#[test]
fn gc_runs_soon_after_reads_cross_the_high_watermark() {
    if no_fuse() {
        return;
    }
    const MIB: usize = 1 << 20;
    let names = ["a.bin", "b.bin", "c.bin", "d.bin"];
    let setup = GenSetup::new(&names.map(|n| (n, MIB)), MIB as u64, 17);
    // High watermark 2.7 MiB, low 1.5 MiB: the third file read crosses it.
    let max = 3 * MIB as u64;
    let low = max / 2;
    let mut cfg = test_config();
    cfg.gc.max_bytes = max;
    cfg.gc.high_watermark = 0.9;
    cfg.gc.low_watermark = 0.5;
    cfg.gc.interval_secs = 3600.0;
    let m = Mount::start(setup.spec(cfg));
    let used = || -> u64 {
        names
            .iter()
            .map(|n| cached_bytes(&setup.mounted(&m, n)))
            .sum()
    };
    for n in &names[..2] {
        assert_bytes_eq(
            &std::fs::read(setup.mounted(&m, n)).unwrap(),
            setup.data(n),
            n,
        );
    }
    assert!(
        wait_until(Duration::from_secs(10), || used() == 2 * MIB as u64),
        "two files not cached: {} bytes",
        used()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(used(), 2 * MIB as u64, "GC ran under the high watermark");
    let t0 = Instant::now();
    assert_bytes_eq(
        &std::fs::read(setup.mounted(&m, "c.bin")).unwrap(),
        setup.data("c.bin"),
        "c.bin",
    );
    assert!(
        wait_until(Duration::from_secs(5), || used() <= low),
        "usage {} still above the low watermark {low} {:?} after crossing the high one:\n{}",
        used(),
        t0.elapsed(),
        m.log()
    );
    assert!(
        m.log().contains("crossed the high watermark"),
        "{}",
        m.log()
    );
    // What is left still reads back right, from the cache or fetched again.
    for n in names {
        assert_bytes_eq(
            &std::fs::read(setup.mounted(&m, n)).unwrap(),
            setup.data(n),
            n,
        );
    }
}

/// A file name from the manifest (a Hub listing can carry any Unicode) with a line separator
/// and a right-to-left override: the log line that names it stays one line, reads in order,
/// and names it escaped, in full.
#[test]
fn names_from_the_manifest_reach_the_log_escaped() {
    if no_fuse() {
        return;
    }
    let name = "odd\u{2028}name\u{202e}.bin";
    let setup = GenSetup::new(&[(name, 4096)], 1 << 20, 31);
    let m = Mount::start(setup.spec(test_config()));
    let got = std::fs::read(setup.mounted(&m, name)).unwrap();
    assert_bytes_eq(&got, setup.data(name), "odd name");
    wait_log(&m, "download completed");
    let log = m.log();
    assert!(
        !log.contains(['\u{2028}', '\u{202e}']),
        "a raw separator or override in the log:\n{log:?}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("download completed")
                && l.contains(r"file=odd\u{2028}name\u{202e}.bin")),
        "{log}"
    );
}

/// A `wan mount MNT --config FILE` whose manifest and cache come from the file (no flags), so
/// a reload can change the manifest path. Dropping it stops the daemon and unmounts.
struct ConfigOnlyDaemon {
    child: std::process::Child,
    mnt: PathBuf,
    log: PathBuf,
}

impl ConfigOnlyDaemon {
    fn start(work: &Path, config: &Path) -> ConfigOnlyDaemon {
        assert_fuse();
        let mnt = work.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let log = work.join("daemon.log");
        let child = Command::new(wan_bin())
            .arg("mount")
            .arg(&mnt)
            .arg("--config")
            .arg(config)
            .env("WAN_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = ConfigOnlyDaemon { child, mnt, log };
        assert!(
            wait_until(Duration::from_secs(20), || mount_count(&d.mnt) >= 1
                && std::fs::read_dir(&d.mnt).is_ok()),
            "not mounted:\n{}",
            d.log()
        );
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn config(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.mnt.join(".wan/config")).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for ConfigOnlyDaemon {
    fn drop(&mut self) {
        // SAFETY: our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if !wait_until(Duration::from_secs(15), || {
            self.child.try_wait().ok().flatten().is_some()
        }) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        force_unmount(&self.mnt);
        if std::thread::panicking() {
            eprintln!("---- daemon log ----\n{}", self.log());
        }
    }
}

/// A reload that changes keys only a restart applies (`[fetch]`, `[http]`, `[log]`,
/// `mountpoint`) warns naming each, and `/config` (`.wan/config`) keeps showing the values in
/// force, the waiting sections listed under `pending_restart`; a new `manifest` path applies
/// at once, and `/config` shows it.
#[test]
fn config_view_shows_the_values_in_force_after_a_reload() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let manifest = |name: &str| {
        let text = std::fs::read_to_string(fixtures().join("models.toml")).unwrap();
        let abs = text.replace(
            "local://models/",
            &format!("file://{}/", fixture_models().display()),
        );
        let path = work.path().join(name);
        std::fs::write(&path, abs).unwrap();
        path
    };
    let (first, second) = (manifest("models.toml"), manifest("models-2.toml"));
    let cfg = work.path().join("wan.toml");
    let mut config = Config {
        manifest: Some(first.clone()),
        cache_dir: Some(work.path().join("cache")),
        ..Config::default()
    };
    config.fetch.connections = 8;
    config.http.addr = String::new();
    config.gc.max_bytes = 1_000_000_000;
    write_config(&cfg, &config);
    let d = ConfigOnlyDaemon::start(work.path(), &cfg);
    let before = d.config();
    assert_eq!(
        before["pending_restart"],
        serde_json::json!([]),
        "{before:#}"
    );
    assert_eq!(before["manifest"], first.display().to_string());

    config.mountpoint = Some("/elsewhere".into());
    config.manifest = Some(second.clone());
    config.fetch.connections = 9;
    config.http.addr = "127.0.0.1:1".into();
    config.gc.max_bytes = 2_000_000_000;
    config.log.format = "json".into();
    write_config(&cfg, &config);
    hup(d.child.id());
    assert!(
        wait_until(Duration::from_secs(20), || d
            .log()
            .contains("reloaded configuration and manifest")),
        "no reload:\n{}",
        d.log()
    );
    let warned = d
        .log()
        .lines()
        .find(|l| l.contains("apply at the next restart"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no warning:\n{}", d.log()));
    for section in ["[fetch]", "[http]", "[log]", "mountpoint"] {
        assert!(warned.contains(section), "{section} not named: {warned}");
    }
    let after = d.config();
    assert_eq!(after["fetch"]["connections"], 8, "{after:#}");
    assert_eq!(after["http"]["addr"], "", "{after:#}");
    assert_eq!(after["log"]["format"], "text", "{after:#}");
    assert_eq!(after["mountpoint"], d.mnt.display().to_string());
    assert_eq!(
        after["gc"]["max_bytes"], 2_000_000_000u64,
        "applied at once"
    );
    assert_eq!(
        after["manifest"],
        second.display().to_string(),
        "applied at once"
    );
    assert_eq!(
        after["pending_restart"],
        serde_json::json!(["[fetch]", "[http]", "[log]", "mountpoint"]),
        "{after:#}"
    );
}
