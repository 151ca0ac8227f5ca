//! The CLI where an operator meets it, run as the real `wan` binary: `manifest build` on file
//! names TOML or the manifest rules cannot take, `models ensure --benchmark` measuring only
//! what was really fetched, a repairing `models verify` counted and recorded once as a success,
//! and a "did you mean" hint wherever a model id is refused.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use wanfs::config::Config;

const CS: u64 = 64 * 1024;

fn build_cmd(dir: &Path, id: &str) -> Output {
    run_wan(
        &[
            "manifest".as_ref(),
            "build".as_ref(),
            dir.as_os_str(),
            "--id".as_ref(),
            id.as_ref(),
            "--source".as_ref(),
            "local://src".as_ref(),
        ],
        Duration::from_secs(60),
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn build_writes_names_with_control_characters_that_toml_and_check_read() {
    let work = workdir();
    let dir = work.path().join("tree");
    let odd = "a\u{1}b\u{7f}\"q\".bin";
    write_random(&dir.join(odd), 5000, 1);
    write_random(&dir.join("caf\u{e9}/plain.bin"), 100, 2);
    let out = build_cmd(&dir, "m@1.0.0");
    assert!(out.status.success(), "build failed:\n{}", text(&out.stderr));
    let entry = text(&out.stdout);
    let doc: toml::Table = toml::from_str(&entry)
        .unwrap_or_else(|e| panic!("TOML cannot read what build wrote ({e}):\n{entry}"));
    let paths: Vec<&str> = doc["models"]["m@1.0.0"]["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["path"].as_str().expect("path"))
        .collect();
    assert_eq!(paths, [odd, "caf\u{e9}/plain.bin"], "{entry}");
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[entry]);
    let out = run_wan(
        &["manifest".as_ref(), "check".as_ref(), manifest.as_os_str()],
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "check refused what build wrote:\n{}",
        text(&out.stderr)
    );
}

/// `wan manifest build` on a tree holding `names`: it must fail, and one stderr line must name
/// the model, every group's file (any alternative) and the rule.
#[track_caller]
fn build_refuses(names: &[&str], file_alts: &[&[&str]], rule: &str) {
    let work = workdir();
    let dir = work.path().join("tree");
    for (i, n) in names.iter().enumerate() {
        write_random(&dir.join(n), 300, i as u64);
    }
    let out = build_cmd(&dir, "m@1.0.0");
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "build accepted {names:?}:\n{}",
        text(&out.stdout)
    );
    assert!(
        !stderr.contains("No such file"),
        "{names:?}: an I/O error instead of a rule:\n{stderr}"
    );
    let ok = stderr.lines().any(|l| {
        l.contains("m@1.0.0")
            && l.to_lowercase().contains(rule)
            && file_alts
                .iter()
                .all(|alts| alts.iter().any(|a| l.contains(a)))
    });
    assert!(
        ok,
        "{names:?}: no line names the model, {file_alts:?} and {rule:?}:\n{stderr}"
    );
}

#[test]
fn build_refuses_backslash_newline_and_normalization_twins_by_rule() {
    build_refuses(&["a\\b.bin"], &[&["a\\\\b.bin", "a\\b.bin"]], "backslash");
    build_refuses(&["x\ny.bin", "ok.bin"], &[&["x\\ny.bin"]], "newline");
    build_refuses(
        &["d/caf\u{e9}.bin", "d/cafe\u{301}.bin"],
        &[&["d/caf\u{e9}.bin"], &["d/cafe"]],
        "normaliz",
    );
}

// ---------------------------------------------------------------------------------------------
// A daemon with its HTTP endpoint, and `wan models` against it.

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

struct Live {
    mount: Mount,
    http: SocketAddr,
}

impl Live {
    fn start(setup_work: &Path, manifest: &Path) -> Live {
        let http = free_addr();
        let mut config = test_config();
        config.http.addr = http.to_string();
        let mount = Mount::start(MountSpec::new(setup_work, manifest).config(config));
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect(http).is_ok()),
            "HTTP endpoint {http} never answered; log:\n{}",
            mount.log()
        );
        Live { mount, http }
    }

    /// `wan models ARGS` against this daemon.
    fn wan(&self, args: &[&str]) -> Output {
        models(&self.mount.spec, &self.http.to_string(), args)
    }

    /// GET `path`: (status code, body).
    fn get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.http).expect("connect");
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map_or("", |b| b.1).to_owned();
        (code, body)
    }

    fn metrics(&self) -> String {
        fs::read_to_string(self.mount.path(".wan/metrics")).expect("read .wan/metrics")
    }

    fn status(&self, id: &str) -> Value {
        let (code, body) = self.get(&format!("/models/{id}"));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("json")
    }
}

/// `wan models ARGS` with explicit paths and `--http http`.
fn models(spec: &MountSpec, http: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(wan_bin());
    cmd.arg("models")
        .arg("--manifest")
        .arg(&spec.manifest)
        .arg("--cache-dir")
        .arg(&spec.cache_dir)
        .arg("--http")
        .arg(http)
        .args(args)
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("WAN_") {
            cmd.env_remove(k);
        }
    }
    run_with_timeout(cmd, Duration::from_secs(90))
}

#[track_caller]
fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "exited {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(&out.stdout)))
}

/// The value of one sample line (`name` with its labels) in Prometheus text; 0 if absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

#[test]
fn benchmark_measures_what_was_fetched_and_says_when_nothing_was() {
    if no_fuse() {
        return;
    }
    let size = 6 * CS as usize + 123;
    let setup = GenSetup::new(&[("m.bin", size)], CS, 71);
    let live = Live::start(setup.work.path(), &setup.manifest);

    // One chunk is cached by a read; the ensure fetches the rest, each byte once.
    let got = read_range(&setup.mounted(&live.mount, "m.bin"), 0, 100).expect("read");
    assert_eq!(got, setup.data("m.bin")[..100]);
    wait_until(Duration::from_secs(5), || {
        live.status(GEN)["bytes_cached"].as_u64() == Some(CS)
    });
    let cached = live.status(GEN)["bytes_cached"].as_u64().unwrap();
    assert!(cached > 0 && cached < size as u64, "{cached}");
    let mark = setup.origin.request_count();
    // Every answer waits 300 ms: the time to first byte must include it.
    setup
        .origin
        .add_fault(Fault::Delay(Duration::from_millis(300)), None, None);
    let out = ok(live.wan(&["--json", "ensure", "--only", GEN, "--benchmark"]));
    setup.origin.clear_faults();
    let b = &json(&out)["benchmark"];
    let served: u64 = setup
        .origin
        .requests_since(mark)
        .iter()
        .filter(|r| r.method == "GET")
        .map(|r| {
            let (a, z) = r.range.expect("ranged GET");
            z - a + 1
        })
        .sum();
    assert_eq!(b["bytes_fetched"], size as u64 - cached, "{b:#}");
    assert_eq!(served, size as u64 - cached, "{b:#}");
    let ttfb = b["time_to_first_byte_s"]
        .as_f64()
        .expect("a time to first byte");
    assert!(
        ttfb >= 0.3,
        "time to first byte {ttfb} s < the origin's 300 ms"
    );
    assert!(b["mb_per_s"].as_f64().is_some_and(|v| v > 0.0), "{b:#}");

    // Fully cached: nothing is fetched, and the benchmark says so rather than a rate.
    let mark = setup.origin.request_count();
    let out = ok(live.wan(&["ensure", "--only", GEN, "--benchmark"]));
    let stdout = text(&out.stdout);
    assert_eq!(
        setup.origin.request_count(),
        mark,
        "a cached model was fetched"
    );
    assert!(stdout.contains("nothing fetched"), "{stdout}");
    assert!(
        !stdout.contains("MB/s"),
        "a rate for nothing fetched:\n{stdout}"
    );
    let out = ok(live.wan(&["--json", "ensure", "--only", GEN, "--benchmark"]));
    let b = &json(&out)["benchmark"];
    assert_eq!(b["bytes_fetched"], 0, "{b:#}");
    assert!(
        b["mb_per_s"].is_null() && b["time_to_first_byte_s"].is_null(),
        "{b:#}"
    );
    // --force-redownload drops the cache first: every byte is fetched and measured again.
    let out = ok(live.wan(&[
        "--json",
        "ensure",
        "--only",
        GEN,
        "--benchmark",
        "--force-redownload",
    ]));
    let b = &json(&out)["benchmark"];
    assert_eq!(b["bytes_fetched"], size as u64, "{b:#}");
    assert!(b["time_to_first_byte_s"].as_f64().is_some(), "{b:#}");
}

fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open blob");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
    f.sync_data().unwrap();
}

/// (model_errors_total{kind="verify"}, wan_integrity_failures_total).
fn verify_counts(live: &Live) -> (f64, f64) {
    let m = live.metrics();
    (
        sample(&m, "model_errors_total{kind=\"verify\"}"),
        sample(&m, "wan_integrity_failures_total"),
    )
}

/// Statuses of the `verify` events of the daily report.
fn verify_events(live: &Live) -> Value {
    let out = ok(live.wan(&["report", "--daily", "--json"]));
    let rep = json(&out);
    let mut sums = serde_json::Map::new();
    for day in rep["days"].as_object().into_iter().flat_map(|d| d.values()) {
        for (k, v) in day.as_object().unwrap() {
            if k.starts_with("verify_") {
                let n = sums.get(k).and_then(Value::as_u64).unwrap_or(0);
                sums.insert(k.clone(), (n + v["count"].as_u64().unwrap()).into());
            }
        }
    }
    Value::Object(sums)
}

#[test]
fn a_repairing_verify_counts_a_bad_chunk_once_and_records_success() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("m.bin", 4 * CS as usize)], CS, 73);
    let live = Live::start(setup.work.path(), &setup.manifest);
    ok(live.wan(&["ensure", "--only", GEN]));
    let blob = CacheView::new(&live.mount.spec.cache_dir).blob_path(&setup.file("m.bin").sha256);
    let before = verify_counts(&live);

    // A repairing verify on its own.
    flip_byte(&blob, 2 * CS + 9);
    let out = ok(live.wan(&["verify", "--only", GEN]));
    assert!(
        text(&out.stdout).contains("1 corrupt chunks"),
        "{}",
        text(&out.stdout)
    );
    let after = verify_counts(&live);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1.0, 1.0),
        "one bad chunk: (verify errors, integrity failures) grew by {:?}",
        (after.0 - before.0, after.1 - before.1)
    );
    let m = live.status(GEN);
    assert_eq!(m["state"], "COMPLETE", "{m:#}");
    assert!(m["last_error"].is_null(), "{m:#}");
    assert_eq!(m["job"]["state"], "done", "{m:#}");
    assert!(m["job"]["error"].is_null(), "{m:#}");
    let ev = verify_events(&live);
    assert_eq!(
        ev.get("verify_failed"),
        None,
        "the repair was recorded as failed: {ev}"
    );
    assert_eq!(ev["verify_success"], 1, "{ev}");

    // Found by a report-only verify, then repaired: still one bad chunk, counted once.
    flip_byte(&blob, CS + 3);
    let before = verify_counts(&live);
    let out = live.wan(&["verify", "--only", GEN, "--report-only"]);
    assert!(!out.status.success(), "report-only passed a corrupt chunk");
    ok(live.wan(&["verify", "--only", GEN]));
    let after = verify_counts(&live);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1.0, 1.0),
        "report-only then repair: (verify errors, integrity failures) grew by {:?}",
        (after.0 - before.0, after.1 - before.1)
    );
    let m = live.status(GEN);
    assert_eq!(m["state"], "COMPLETE", "{m:#}");
    assert!(m["last_error"].is_null(), "{m:#}");
    let ev = verify_events(&live);
    // The report-only run found a corrupt model: that one is a failure; the repair is not.
    assert_eq!(ev["verify_failed"], 1, "{ev}");
    assert_eq!(ev["verify_success"], 2, "{ev}");
    let got = fs::read(setup.mounted(&live.mount, "m.bin")).expect("read after repair");
    assert_bytes_eq(&got, setup.data("m.bin"), "after repair");
}

// ---------------------------------------------------------------------------------------------
// "Did you mean": a mixed-case id, asked for in the wrong case or with a typo.

const MIXED: &str = "ti2v-5B@2.2.0";

fn mixed_setup() -> (tempfile::TempDir, Origin, PathBuf) {
    let work = workdir();
    let src = work.path().join("src");
    gen_files(&src, MIXED, &[("w.bin", 3000)], 79);
    let origin = Origin::start(&src);
    let entry = manifest_build(
        &src.join(MIXED),
        MIXED,
        &BuildOpts {
            chunk_size: Some(CS),
            sources: vec![origin.base(MIXED)],
            whole_only: false,
        },
    );
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[entry]);
    (work, origin, manifest)
}

#[track_caller]
fn hints(what: &str, msg: &str, want: &str) {
    assert!(
        msg.contains("did you mean") && msg.contains(want),
        "{what}: no \"did you mean {want}\" in:\n{msg}"
    );
}

#[test]
fn a_refused_model_id_suggests_the_one_meant() {
    if no_fuse() {
        return;
    }
    let (work, _origin, manifest) = mixed_setup();
    let live = Live::start(work.path(), &manifest);
    for wrong in ["ti2v-5b@2.2.0", "TI2V-5B@2.2.0", "ti2v-5B@2.2.1"] {
        for args in [
            vec!["ensure", "--only", wrong],
            vec!["verify", "--only", wrong],
            vec!["status", "--only", wrong],
            vec!["pin", wrong],
        ] {
            let out = live.wan(&args);
            assert!(!out.status.success(), "{args:?} passed");
            hints(&format!("wan models {args:?}"), &text(&out.stderr), MIXED);
        }
        let (code, body) = live.get(&format!("/models/{wrong}"));
        assert_eq!(code, 404, "{body}");
        hints(&format!("GET /models/{wrong}"), &body, MIXED);
        let err = OpenOptions::new()
            .write(true)
            .open(live.mount.path(".wan/ensure"))
            .and_then(|mut f| f.write_all(format!("{wrong}\n").as_bytes()))
            .expect_err("an unknown id written to .wan/ensure was accepted");
        assert_eq!(errno(&err), libc::EINVAL, "{err}");
    }
    hints(".wan/ensure log", &live.mount.log(), MIXED);
    // Nothing close: no guess.
    let out = live.wan(&["ensure", "--only", "flux-dev@1.0.0"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("unknown model id") && !stderr.contains("did you mean"),
        "{stderr}"
    );
    // Without a daemon, on the cache directly: the same hint.
    let spec = live.mount.spec.clone();
    drop(live);
    let out = models(
        &spec,
        &free_addr().to_string(),
        &["ensure", "--only", "ti2v-5b@2.2.0"],
    );
    assert!(!out.status.success());
    hints("no daemon", &text(&out.stderr), MIXED);
}

// ---------------------------------------------------------------------------------------------
// Starting and stopping where an operator meets it: the mountpoint and the FUSE device, what
// an unmount logs, the log level and `WAN_*` variables, a mistyped cache dir.

/// `config` as a config file named `name` in `spec`'s work dir; its path.
fn config_file(spec: &MountSpec, name: &str, config: &Config) -> PathBuf {
    let path = spec.work.join(name);
    write_config(&path, config);
    path
}

/// `wan mount MOUNTPOINT` for `spec` with `config`, expected to give up at once (whether it
/// left a mount behind is the caller's to check).
fn mount_once(spec: &MountSpec, mountpoint: &Path, config: &Path) -> Output {
    let mut cmd = Command::new(wan_bin());
    cmd.arg("mount")
        .arg(mountpoint)
        .arg("--manifest")
        .arg(&spec.manifest)
        .arg("--cache-dir")
        .arg(&spec.cache_dir)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null());
    run_with_timeout(cmd, Duration::from_secs(30))
}

/// Unmounts whatever a test left at `path`, however it ends.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        force_unmount(&self.0);
    }
}

#[test]
fn a_mountpoint_that_is_not_an_empty_directory_is_refused_and_nothing_is_left_mounted() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("m.bin", 1000)], CS, 83);
    let spec = setup.spec(test_config());
    let config = config_file(&spec, "wan.toml", &spec.config);

    let file = spec.work.join("a-file");
    fs::write(&file, b"not a directory").unwrap();
    let _guard = Unmount(file.clone());
    let out = mount_once(&spec, &file, &config);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is not a directory"), "{stderr}");
    assert_eq!(
        mount_count(&file),
        0,
        "a failed mount on a regular file left a mount behind"
    );
    let gone = spec.work.join("no-such-dir");
    let out = mount_once(&spec, &gone, &config);
    assert!(
        text(&out.stderr).contains("does not exist"),
        "{}",
        text(&out.stderr)
    );

    // A directory holding files: refused by default, naming the way to allow it.
    let full = spec.work.join("full");
    fs::create_dir_all(&full).unwrap();
    fs::write(full.join("keep.txt"), b"mine").unwrap();
    let _guard = Unmount(full.clone());
    let out = mount_once(&spec, &full, &config);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "mounted over a non-empty directory");
    assert!(
        stderr.contains("not empty")
            && stderr.contains("keep.txt")
            && stderr.contains("--allow-non-empty")
            && stderr.contains("mount.allow_non_empty"),
        "{stderr}"
    );
    assert_eq!(mount_count(&full), 0);
    assert_eq!(fs::read(full.join("keep.txt")).unwrap(), b"mine");

    // Allowed by the config key (here as its WAN_* override): mounted over, hidden, back after.
    let mut allowed = spec.clone().env("WAN_MOUNT_ALLOW_NON_EMPTY", "true");
    allowed.mountpoint = full.clone();
    let mount = Mount::start(allowed);
    assert!(!mount.path("keep.txt").exists());
    assert!(setup.mounted(&mount, "m.bin").exists());
    assert!(mount.stop().success());
    assert_eq!(fs::read(full.join("keep.txt")).unwrap(), b"mine");
}

/// Through `mount.fuse.wan` (mount units, fstab): a non-empty mountpoint is refused, and
/// `-o nonempty` (FUSE's name for it) passes `--allow-non-empty`.
#[test]
fn the_mount_helper_refuses_a_non_empty_mountpoint_unless_nonempty() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("m.bin", 1000)], CS, 84);
    let spec = setup.spec(test_config());
    let config = config_file(&spec, "wan.toml", &spec.config);
    let helper = spec.work.join("mount.fuse.wan");
    std::os::unix::fs::symlink(wan_bin(), &helper).unwrap();
    let full = spec.work.join("full");
    fs::create_dir_all(&full).unwrap();
    fs::write(full.join("keep.txt"), b"mine").unwrap();
    let _guard = Unmount(full.clone());
    let helper_with = |options: &str| {
        let mut cmd = Command::new(&helper);
        cmd.arg("wanfs").arg(&full).arg("-o").arg(format!(
            "rw,config={},manifest={},cache_dir={}{options}",
            config.display(),
            spec.manifest.display(),
            spec.cache_dir.display()
        ));
        // mount(8) waits for the helper, not for the daemon's stderr to close: so do we.
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        cmd.status().expect("run mount.fuse.wan")
    };
    let refused = helper_with("");
    assert!(
        !refused.success(),
        "the helper mounted over a non-empty directory"
    );
    assert_eq!(mount_count(&full), 0);
    let mounted = helper_with(",nonempty");
    assert!(mounted.success(), "{mounted}");
    assert!(full.join(format!("{GEN}/m.bin")).exists());
    assert!(!full.join("keep.txt").exists(), "the files are not hidden");
    force_unmount(&full);
    assert_eq!(fs::read(full.join("keep.txt")).unwrap(), b"mine");
}

#[test]
fn an_unusable_dev_fuse_is_named_with_what_to_do() {
    let tools = ["unshare", "setpriv", "mount"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !nix::unistd::geteuid().is_root() || !tools {
        eprintln!("SKIP: needs root, unshare, setpriv and mount");
        return;
    }
    let setup = GenSetup::new(&[("m.bin", 1000)], CS, 85);
    let spec = setup.spec(test_config());
    let config = config_file(&spec, "wan.toml", &spec.config);
    // Everything the unprivileged daemon needs to get as far as mounting is open to it.
    fs::create_dir_all(&spec.mountpoint).unwrap();
    fs::create_dir_all(&spec.cache_dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for dir in [spec.work.as_path(), &spec.mountpoint, &spec.cache_dir] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
    }
    // A /dev/fuse that only root may open, in a mount namespace of its own: the real device
    // is shared with every other test, so it is never touched.
    let fake = spec.work.join("fuse-0600");
    fs::write(&fake, b"").unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o600)).unwrap();
    let _guard = Unmount(spec.mountpoint.clone());
    let script = r#"mount --bind "$1" /dev/fuse && shift && exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@""#;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .arg(&fake)
    .arg(wan_bin())
    .arg("mount")
    .arg(&spec.mountpoint)
    .arg("--manifest")
    .arg(&spec.manifest)
    .arg("--cache-dir")
    .arg(&spec.cache_dir)
    .arg("--config")
    .arg(&config)
    .stdin(Stdio::null());
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "mounted without access to /dev/fuse");
    assert!(
        stderr.contains("/dev/fuse") && stderr.contains("Permission denied"),
        "the error does not name the device:\n{stderr}"
    );
    assert!(
        stderr.contains("run wan as root") && stderr.contains("fusermount3"),
        "the error does not say what to do:\n{stderr}"
    );
    assert_eq!(mount_count(&spec.mountpoint), 0);
}

#[test]
fn an_unmount_from_outside_logs_no_warning() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("m.bin", 2 * CS as usize)], CS, 87);
    let mount = Mount::start(setup.spec(test_config()));
    let got = fs::read(setup.mounted(&mount, "m.bin")).expect("read");
    assert_bytes_eq(&got, setup.data("m.bin"), "m.bin");
    let umount = Command::new("umount")
        .arg(&mount.spec.mountpoint)
        .status()
        .expect("umount");
    assert!(umount.success());
    let log_has = |s: &str| mount.log().contains(s);
    assert!(wait_until(Duration::from_secs(10), || log_has("stopped")));
    let log = mount.log();
    assert!(log.contains("unmounted from outside"), "{log}");
    assert!(
        !log.contains(" WARN ") && !log.contains(" ERROR "),
        "an unmount logged a warning:\n{log}"
    );
    assert!(mount.stop().success());
}

#[test]
fn a_mistyped_log_level_is_refused_and_a_bad_wan_log_never_silences_the_daemon() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("m.bin", 3 * CS as usize)], CS, 81);
    let spec = setup.spec(test_config());
    for level in ["inf", "verbose!!", "wanfs=debug,inf", "wanfs=loud"] {
        let mut config = spec.config.clone();
        config.log.level = level.into();
        let bad = config_file(&spec, "bad.toml", &config);
        let out = run_wan(
            &["config".as_ref(), "check".as_ref(), bad.as_os_str()],
            Duration::from_secs(30),
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{level}: {stderr}");
        assert!(
            stderr.contains("log.level") && stderr.contains("neither a level"),
            "{level}: {stderr}"
        );
        // The daemon refuses it too, before mounting anything.
        let mnt = spec.work.join("mnt-bad-level");
        fs::create_dir_all(&mnt).unwrap();
        let _guard = Unmount(mnt.clone());
        let out = mount_once(&spec, &mnt, &bad);
        assert!(!out.status.success(), "{level}: the daemon started");
        assert!(text(&out.stderr).contains("log.level"), "{level}");
        assert_eq!(mount_count(&mnt), 0, "{level}: a mount was left behind");
    }

    // A bare word in WAN_LOG (a target name to EnvFilter) and a misspelt override: the daemon
    // says so on stderr, ignores both, and still logs what goes wrong.
    let warned = run_wan_env(
        &["config", "check"],
        &config_file(&spec, "good.toml", &spec.config),
        &[("WAN_LOG", "inf"), ("WAN_FETCH_CONECTIONS", "3")],
    );
    let stderr = text(&warned.stderr);
    assert!(warned.status.success(), "{stderr}");
    assert!(
        stderr.contains("WAN_FETCH_CONECTIONS")
            && stderr.contains("did you mean WAN_FETCH_CONNECTIONS?"),
        "{stderr}"
    );
    assert!(stderr.contains("WAN_LOG \"inf\""), "{stderr}");
    let mount = Mount::start(
        spec.clone()
            .env("WAN_LOG", "inf")
            .env("WAN_FETCH_CONECTIONS", "3"),
    );
    setup.origin.add_fault(Fault::Status(500), None, None);
    let err = read_range(&setup.mounted(&mount, "m.bin"), 0, 10).expect_err("a read passed");
    assert_eq!(errno(&err), libc::EIO, "{err}");
    let log = mount.log();
    assert!(log.contains("WAN_LOG \"inf\""), "{log}");
    assert!(
        log.contains("did you mean WAN_FETCH_CONNECTIONS?"),
        "no warning about the misspelt variable:\n{log}"
    );
    assert!(
        log.contains("read failed: EIO"),
        "the daemon did not log the failed read:\n{log}"
    );
}

/// `wan ARGS FILE` with `env` added.
fn run_wan_env(args: &[&str], file: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(wan_bin());
    cmd.args(args).arg(file).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_timeout(cmd, Duration::from_secs(30))
}

/// A stop while reads wait for the network (the kernel's read-ahead, here from `fadvise`):
/// the unmount cuts them short, which is no error: nothing at warning or error level.
#[test]
fn reads_cut_short_by_a_stop_are_not_errors() {
    if no_fuse() {
        return;
    }
    let size = 32 * CS as usize;
    let setup = GenSetup::new(&[("m.bin", size)], CS, 89);
    let mount = Mount::start(setup.spec(test_config()));
    // Every fetch waits: the stop comes while the read-ahead waits for it.
    setup
        .origin
        .add_fault(Fault::Delay(Duration::from_secs(3)), None, None);
    let f = fs::File::open(setup.mounted(&mount, "m.bin")).expect("open");
    {
        use std::os::fd::AsRawFd;
        // SAFETY: an advisory call on a descriptor we own.
        let r = unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, size as i64, libc::POSIX_FADV_WILLNEED)
        };
        assert_eq!(r, 0, "posix_fadvise");
    }
    drop(f);
    assert!(
        wait_until(Duration::from_secs(5), || setup.origin.request_count() > 0),
        "the read-ahead fetched nothing: the test proves nothing"
    );
    let work = mount.spec.work.clone();
    let status = mount.stop();
    assert!(status.success(), "{status}");
    // The one daemon's log (numbered by the harness, across the tests of this binary).
    let log_path = fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("daemon-")
        })
        .expect("a daemon log");
    let log = fs::read_to_string(&log_path).expect("daemon log");
    assert!(log.contains("SIGTERM: unmounting"), "{log}");
    let noise: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        noise.is_empty(),
        "a stop during reads logged warnings or errors:\n{}",
        noise.join("\n")
    );
}

#[test]
fn rebuild_index_refuses_a_directory_that_holds_no_cache() {
    let work = workdir();
    let typo = work.path().join("var/cache/wan2");
    let out = run_wan(
        &[
            "cache".as_ref(),
            "rebuild-index".as_ref(),
            "--cache-dir".as_ref(),
            typo.as_os_str(),
            "--manifest".as_ref(),
            fixtures().join("models.toml").as_os_str(),
        ],
        Duration::from_secs(60),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no wan cache") && stderr.contains(&*typo.to_string_lossy()),
        "{stderr}"
    );
    assert!(!typo.exists(), "a cache was made at the mistyped path");
}
