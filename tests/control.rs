//! The control plane end to end, against real `wan mount` daemons: the `.wan/` control files,
//! every HTTP route (and the rule that mutations need loopback or the bearer token), every
//! `wan models` command with a daemon and without one, the metrics text checked by `promtool`,
//! GC under a quota with a pinned model and while eight readers stream, the daily report after
//! real downloads, and a model walking NOT_PRESENT → PARTIAL → COMPLETE → CORRUPT → COMPLETE.
//!
//! The daemons are spawned by [`Daemon`] below rather than `common::Mount`, because these tests
//! pick a free HTTP port per start (retrying when another test took it) and wait for the
//! endpoint; their config is a serialized `Config`, as `common::Mount`'s is. Everything else
//! (origin, manifests, cache view) comes from `common`.
//! Each test has its own temp dir, mountpoint, cache and HTTP port, so they run in parallel.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use wanfs::config::Config;

const KIB: usize = 1024;
const CS: u64 = 256 * 1024;

/// Bytes of each fixture model, each blob counted once (the VAE is shared by t2v and i2v, and
/// the two `config.json` of a model are identical).
const T2V_BYTES: u64 = 2_624_256;
const I2V_OWN_BYTES: u64 = 1_181_073;
const TI2V_BYTES: u64 = 574_366;
const ALL_BYTES: u64 = T2V_BYTES + I2V_OWN_BYTES + TI2V_BYTES;

// ---------------------------------------------------------------------------------------------
// Harness: a daemon with a config of our own, the CLI, an HTTP client.
// ---------------------------------------------------------------------------------------------

/// What a test daemon is configured with.
#[derive(Clone, Debug)]
struct Opts {
    /// The loopback address the HTTP endpoint binds to.
    http_ip: &'static str,
    /// The daemon's configuration but for `http.addr`, which [`Daemon::start`] picks.
    config: Config,
    /// Extra environment of the daemon (e.g. `WAN_HTTP_TOKEN`).
    env: Vec<(String, String)>,
}

impl Default for Opts {
    fn default() -> Self {
        let mut config = Config::default();
        let f = &mut config.fetch;
        f.connections = 8;
        f.read_timeout_secs = 20.0;
        f.request_timeout_secs = 5.0;
        f.retries = 2;
        f.backoff_ms = 10;
        f.cooldown_secs = 1.0;
        f.readahead_chunks = 4;
        config.mount.passthrough = true;
        config.mount.read_ahead_kb = 1024;
        config.http.token_env = "WAN_HTTP_TOKEN".into();
        Opts {
            http_ip: "127.0.0.1",
            config,
            env: Vec::new(),
        }
    }
}

impl Opts {
    fn env(mut self, key: &str, value: &str) -> Opts {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// A port nobody listens on right now (on any address: see `common::free_port`).
fn free_port(_ip: &str) -> u16 {
    common::free_port()
}

/// Writes a config file for `opts` with the HTTP endpoint at `addr`; returns its path.
fn config_file(work: &Path, name: &str, opts: &Opts, addr: &str) -> PathBuf {
    let path = work.join(name);
    let mut config = opts.config.clone();
    config.http.addr = addr.to_owned();
    write_config(&path, &config);
    path
}

/// A `wan mount` with its HTTP endpoint. Dropping it stops the daemon (SIGTERM, then SIGKILL)
/// and makes sure nothing stays mounted; a failing test prints the daemon log.
struct Daemon {
    mnt: PathBuf,
    cache: PathBuf,
    manifest: PathBuf,
    config: PathBuf,
    http: SocketAddr,
    log_path: PathBuf,
    child: Option<Child>,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

impl Daemon {
    /// Mounts `manifest` at `work/mnt` with the cache in `work/cache`; returns once the mount
    /// is live and the HTTP endpoint answers (panics with the log after 30 s).
    fn start(work: &Path, manifest: &Path, opts: &Opts) -> Daemon {
        assert_fuse();
        let mnt = work.join("mnt");
        let cache = work.join("cache");
        fs::create_dir_all(&mnt).expect("mountpoint");
        fs::create_dir_all(&cache).expect("cache dir");
        for attempt in 0.. {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let http: SocketAddr = format!("{}:{}", opts.http_ip, free_port(opts.http_ip))
                .parse()
                .unwrap();
            let config = config_file(work, &format!("wan-{n}.toml"), opts, &http.to_string());
            let log_path = work.join(format!("daemon-{n}.log"));
            let log = File::create(&log_path).expect("daemon log");
            let mut cmd = Command::new(wan_bin());
            cmd.arg("mount")
                .arg(&mnt)
                .arg("--manifest")
                .arg(manifest)
                .arg("--cache-dir")
                .arg(&cache)
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log fd"))
                .stderr(log);
            // Hermetic: no WAN_* setting of the caller's environment reaches the daemon.
            for (k, _) in std::env::vars() {
                if k.starts_with("WAN_") || k == "HF_TOKEN" || k == "HF_ENDPOINT" {
                    cmd.env_remove(k);
                }
            }
            cmd.env(
                "WAN_LOG",
                std::env::var("WAN_TEST_LOG").unwrap_or_else(|_| "info,wanfs=debug".into()),
            );
            for (k, v) in &opts.env {
                cmd.env(k, v);
            }
            let mut d = Daemon {
                mnt: mnt.clone(),
                cache: cache.clone(),
                manifest: manifest.to_path_buf(),
                config,
                http,
                log_path,
                child: Some(cmd.spawn().expect("spawn wan mount")),
            };
            match d.wait_ready() {
                Ok(()) => return d,
                // Someone took the port between our probe and the daemon's bind: try another.
                Err(log) if log.contains("binding the HTTP endpoint") && attempt < 3 => continue,
                Err(log) => panic!("wan mount did not come up; log:\n{log}"),
            }
        }
        unreachable!()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let child = self.child.as_mut().expect("child");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                force_unmount(&self.mnt);
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            if mount_count(&self.mnt) >= 1
                && fs::read_dir(&self.mnt).is_ok()
                && self.log().contains("HTTP endpoint listening")
                && TcpStream::connect_timeout(&self.http, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("not ready within 30 s:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `mountpoint/rel`.
    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// `mountpoint/.wan/name`.
    fn ctl(&self, name: &str) -> PathBuf {
        self.mnt.join(".wan").join(name)
    }

    /// The CLI aimed at this daemon (with every path explicit).
    fn cli(&self) -> Cli {
        Cli {
            config: self.config.clone(),
            manifest: self.manifest.clone(),
            cache: self.cache.clone(),
            http: Some(self.http.to_string()),
        }
    }

    /// An HTTP client from 127.0.0.1.
    fn api(&self) -> Api {
        Api::new(self.http, None)
    }

    /// SIGTERM and wait; the mount must be gone afterwards.
    fn stop(mut self) -> ExitStatus {
        let status = terminate(self.child.take().expect("running"));
        assert_eq!(
            mount_count(&self.mnt),
            0,
            "{} still mounted after the daemon exited",
            self.mnt.display()
        );
        status.expect("daemon ignored SIGTERM")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.take()
            && terminate(child).is_none()
        {
            eprintln!("wan mount ignored SIGTERM; killed");
        }
        force_unmount(&self.mnt);
        if std::thread::panicking() {
            eprintln!(
                "---- daemon log {} ----\n{}\n---- end of daemon log ----",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// SIGTERM, wait up to 15 s, then SIGKILL (returns `None` then).
fn terminate(mut child: Child) -> Option<ExitStatus> {
    if let Ok(Some(s)) = child.try_wait() {
        return Some(s);
    }
    // SAFETY: kill(2) on the pid of a child we have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// `wan models` with explicit paths; `http: None` leaves the address to the config file.
#[derive(Clone, Debug)]
struct Cli {
    config: PathBuf,
    manifest: PathBuf,
    cache: PathBuf,
    http: Option<String>,
}

/// What a `wan models` run printed and how it exited.
struct Ran {
    args: Vec<String>,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// Panics (with the output) unless it exited 0.
    #[track_caller]
    fn ok(self) -> Ran {
        assert_eq!(
            self.code, 0,
            "wan models {:?} exited {}\nstdout:\n{}\nstderr:\n{}",
            self.args, self.code, self.stdout, self.stderr
        );
        self
    }

    /// Panics unless it exited 2, with clap's usage line (docs/CONTROL.md: usage errors).
    #[track_caller]
    fn usage_error(self) -> Ran {
        assert!(
            self.code == 2 && self.stderr.contains("Usage:"),
            "wan models {:?} exited {}, not as a usage error\nstderr:\n{}",
            self.args,
            self.code,
            self.stderr
        );
        self
    }

    /// Panics unless it exited non-zero.
    #[track_caller]
    fn fails(self) -> Ran {
        assert_ne!(
            self.code, 0,
            "wan models {:?} should have failed\nstdout:\n{}\nstderr:\n{}",
            self.args, self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "wan models {:?} did not print JSON ({e}):\n{}",
                self.args, self.stdout
            )
        })
    }
}

impl Cli {
    fn run(&self, args: &[&str]) -> Ran {
        let mut cmd = Command::new(wan_bin());
        cmd.arg("models")
            .arg("--config")
            .arg(&self.config)
            .arg("--manifest")
            .arg(&self.manifest)
            .arg("--cache-dir")
            .arg(&self.cache);
        if let Some(h) = &self.http {
            cmd.arg("--http").arg(h);
        }
        cmd.args(args).stdin(Stdio::null());
        for (k, _) in std::env::vars() {
            if k.starts_with("WAN_") {
                cmd.env_remove(k);
            }
        }
        let out = run_with_timeout(cmd, Duration::from_secs(90));
        Ran {
            args: args.iter().map(|s| s.to_string()).collect(),
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `wan models --json status`, as a list.
    fn statuses(&self) -> Vec<Value> {
        let r = self.run(&["--json", "status"]);
        r.json()
            .as_array()
            .cloned()
            .expect("status --json is a list")
    }

    /// The status of one model, through `wan models --json status --only ID` (whatever its
    /// exit code: a corrupt model exits 1).
    fn status(&self, id: &str) -> Value {
        let r = self.run(&["--json", "status", "--only", id]);
        let v = r.json();
        assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
        v[0].clone()
    }
}

/// An HTTP response.
struct Resp {
    status: u16,
    content_type: String,
    text: String,
}

impl Resp {
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): HTTP {} {}", self.status, self.text))
    }

    /// Asserts the status and returns the JSON body.
    #[track_caller]
    fn expect(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "body: {}", self.text);
        self.json()
    }
}

/// A blocking HTTP client (reqwest on a small runtime), optionally bound to a local address.
struct Api {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
}

impl Api {
    fn new(addr: SocketAddr, local: Option<IpAddr>) -> Api {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = reqwest::Client::builder()
            .local_address(local)
            .timeout(Duration::from_secs(90))
            .no_proxy()
            .build()
            .expect("client");
        Api {
            rt,
            client,
            base: format!("http://{addr}"),
        }
    }

    fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        self.rt.block_on(async {
            let r = req.send().await.expect("HTTP request");
            let status = r.status().as_u16();
            let content_type = r
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let text = r.text().await.expect("HTTP body");
            Resp {
                status,
                content_type,
                text,
            }
        })
    }

    fn get(&self, path: &str) -> Resp {
        self.send(self.client.get(format!("{}{path}", self.base)))
    }

    /// POST with an optional JSON body and bearer token.
    fn post(&self, path: &str, body: Option<Value>, token: Option<&str>) -> Resp {
        let mut req = self.client.post(format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        self.send(req)
    }

    fn model(&self, id: &str) -> Value {
        self.get(&format!("/models/{id}")).expect(200)
    }

    /// Polls `/models/{id}` until `pred` holds (30 s); returns the status that matched.
    #[track_caller]
    fn wait_model(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(Duration::from_secs(30), || {
            last = self.model(id);
            pred(&last)
        });
        assert!(ok, "{id}: not {what} within 30 s; last status: {last:#}");
        last
    }

    /// Waits until `id` is in `state` with no job running.
    #[track_caller]
    fn wait_state(&self, id: &str, state: &str) -> Value {
        self.wait_model(id, state, |m| {
            m["state"] == state && m["job"]["state"] != "running"
        })
    }

    /// `current.used_bytes` of the storage report.
    fn used_bytes(&self) -> u64 {
        self.get("/report/storage?days=1").expect(200)["current"]["used_bytes"]
            .as_u64()
            .expect("used_bytes")
    }

    /// Events of `kind` for `model` with `status`, among the last 10,000.
    fn count_events(&self, kind: &str, model: &str, status: &str) -> usize {
        let ev = self.get("/events?limit=10000").expect(200);
        ev.as_array()
            .expect("events list")
            .iter()
            .filter(|e| e["kind"] == kind && e["model"] == model && e["status"] == status)
            .count()
    }
}

/// Writes `text` to a control file in one `write(2)`.
fn ctl_write(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all(text.as_bytes())
}

/// Asserts that writing `text` to a control file fails with EINVAL.
#[track_caller]
fn assert_einval(path: &Path, text: &str) {
    match ctl_write(path, text) {
        Ok(()) => panic!("writing {text:?} to {} succeeded", path.display()),
        Err(e) => assert_eq!(
            errno(&e),
            libc::EINVAL,
            "writing {text:?} to {}: {e}",
            path.display()
        ),
    }
}

/// Reads a control file.
#[track_caller]
fn ctl_read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[track_caller]
fn ctl_json(path: &Path) -> Value {
    let text = ctl_read(path);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON ({e}):\n{text}", path.display()))
}

/// A manifest of the demo fixtures (local sources), copied into `work` so relative paths and
/// the cache stay per test.
fn fixture_manifest(work: &Path) -> PathBuf {
    let text = fs::read_to_string(fixtures().join("models.toml")).expect("fixtures manifest");
    let abs = fixture_models();
    let text = text.replace("local://models/", &format!("local://{}/", abs.display()));
    let path = work.join("models.toml");
    fs::write(&path, text).expect("write manifest");
    path
}

/// The source bytes of a fixture file.
fn fixture_bytes(id: &str, rel: &str) -> Vec<u8> {
    fs::read(fixture_models().join(id).join(rel)).expect("fixture file")
}

/// Every file of a fixture model, relative paths.
fn fixture_files(id: &str) -> Vec<String> {
    let root = fixture_models().join(id);
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).expect("read_dir").flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(
                    e.path()
                        .strip_prefix(&root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

/// Reads a whole mounted file after dropping its page cache, so the bytes come from the
/// daemon (or the passthrough blob), not from an earlier read.
fn read_fresh(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    // SAFETY: fadvise on an fd we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

fn ids_of(list: &[Value]) -> BTreeSet<String> {
    list.iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect()
}

/// Sum of `field` of `key` (e.g. `download_success`) over every day of a daily report.
fn report_sum(report: &Value, key: &str, field: &str) -> u64 {
    report["days"]
        .as_object()
        .expect("days object")
        .values()
        .map(|d| d[key][field].as_u64().unwrap_or(0))
        .sum()
}

// ---------------------------------------------------------------------------------------------
// .wan/ control files
// ---------------------------------------------------------------------------------------------

/// Reading a write file tells how to use it, as a shell line: filled in (the first of each
/// `a|b` choice, a model for `MODEL_ID...`, no optional flags), it is accepted. `gc` takes a
/// mode, not a model.
#[test]
fn write_files_say_what_they_take() {
    if no_fuse() {
        return;
    }
    // A write file's mode is 0220: the kernel lets a user's read fail before the daemon sees it.
    if not_root("reading a write-only control file") {
        return;
    }
    let work = workdir();
    let manifest = fixture_manifest(work.path());
    let d = Daemon::start(work.path(), &manifest, &Opts::default());
    for name in [
        "ensure",
        "verify",
        "gc",
        "pin",
        "unpin",
        "evict",
        "mark-corrupted",
    ] {
        let usage = ctl_read(&d.ctl(name));
        let arg = usage
            .strip_prefix("write to act: echo \"")
            .and_then(|r| r.split_once(&format!("\" > .wan/{name}\n")))
            .map(|(arg, _)| arg)
            .unwrap_or_else(|| panic!(".wan/{name} says {usage:?}"));
        let filled: Vec<String> = arg
            .split(' ')
            .filter(|w| !w.starts_with('['))
            .map(|w| match w {
                "MODEL_ID..." => TI2V.to_owned(),
                w => w.split('|').next().unwrap().to_owned(),
            })
            .collect();
        assert_eq!(name == "gc", !arg.contains("MODEL_ID"), "{name}: {usage}");
        ctl_write(&d.ctl(name), &filled.join(" "))
            .unwrap_or_else(|e| panic!(".wan/{name} said {usage:?}; {filled:?} was refused: {e}"));
        d.api()
            .wait_model(TI2V, "its job to end", |m| m["job"]["state"] != "running");
    }
}

/// EBUSY means a job of any kind already runs for the model, a second verify included; only a
/// second ensure of a model that is ensuring is accepted (and left to the one running).
#[test]
fn a_write_for_a_model_with_a_job_running_is_busy_but_a_second_ensure() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("a.bin", 2 * CS as usize)], CS, 4502);
    let d = Daemon::start(setup.work.path(), &setup.manifest, &Opts::default());
    let api = d.api();
    let busy = |name: &str| match ctl_write(&d.ctl(name), GEN) {
        Ok(()) => panic!(".wan/{name} accepted {GEN} while a job runs"),
        Err(e) => assert_eq!(errno(&e), libc::EBUSY, ".wan/{name}: {e}"),
    };
    let idle = || api.wait_model(GEN, "idle", |m| m["job"]["state"] != "running");
    // Every request takes 2 s, so each job below runs at least that long.
    setup
        .origin
        .add_fault(Fault::Delay(Duration::from_secs(2)), None, None);
    ctl_write(&d.ctl("ensure"), GEN).expect("an ensure");
    ctl_write(&d.ctl("ensure"), GEN).expect("a second ensure is left to the first");
    busy("verify");
    busy("evict");
    assert_eq!(idle()["job"]["state"], "done");
    // A repairing verify fetches the chunk it finds corrupt: slowly.
    let blob = CacheView::new(&d.cache).blob_path(&setup.file("a.bin").sha256);
    flip_byte(&blob, 10);
    ctl_write(&d.ctl("verify"), GEN).expect("a verify");
    busy("verify");
    busy("ensure");
    assert_eq!(idle()["job"]["state"], "done");
}

#[test]
fn control_files_read_and_write() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let manifest = fixture_manifest(work.path());
    let secret = "tok-7f3a-SECRET-do-not-print";
    let d = Daemon::start(
        work.path(),
        &manifest,
        &Opts::default().env("WAN_HTTP_TOKEN", secret),
    );
    let api = d.api();

    // The directory: exactly the documented files, read ones 0444, write ones 0220.
    let reads = ["status", "health", "metrics", "config", "events"];
    let writes = [
        "ensure",
        "verify",
        "gc",
        "pin",
        "unpin",
        "evict",
        "mark-corrupted",
    ];
    let names: BTreeSet<String> = fs::read_dir(d.path(".wan"))
        .expect("read .wan")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = reads.iter().chain(&writes).map(|s| s.to_string()).collect();
    assert_eq!(names, want);
    for r in reads {
        let mode = fs::metadata(d.ctl(r)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o444, ".wan/{r} mode {mode:o}");
    }
    for w in writes {
        let mode = fs::metadata(d.ctl(w)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o220, ".wan/{w} mode {mode:o}");
    }
    // The models are listed next to .wan, nothing fetched.
    for id in [T2V, I2V, TI2V] {
        assert!(d.path(id).is_dir(), "{id} listed");
    }

    // status: JSON summary + every model NOT_PRESENT; t2v pinned by the manifest.
    let st = ctl_json(&d.ctl("status"));
    assert_eq!(st["summary"]["total"], 3, "{st:#}");
    assert_eq!(st["summary"]["not_present"], 3, "{st:#}");
    for id in [T2V, I2V, TI2V] {
        assert_eq!(st["models"][id]["state"], "NOT_PRESENT", "{id}: {st:#}");
        assert_eq!(st["models"][id]["bytes_cached"], 0);
    }
    assert_eq!(st["models"][T2V]["pinned"], true);
    assert_eq!(st["models"][I2V]["pinned"], false);

    // health, config (secret masked), metrics.
    let health = ctl_json(&d.ctl("health"));
    assert_eq!(health["status"], "healthy", "{health:#}");
    for check in ["cache_writable", "index", "disk"] {
        assert_eq!(health["checks"][check]["ok"], true, "{check}: {health:#}");
    }
    let config_text = ctl_read(&d.ctl("config"));
    assert!(
        !config_text.contains(secret),
        "the token leaked:\n{config_text}"
    );
    let config: Value = serde_json::from_str(&config_text).expect("config is JSON");
    assert_eq!(config["http"]["token"], "***", "{config:#}");
    assert_eq!(config["http"]["token_env"], "WAN_HTTP_TOKEN");
    assert_eq!(config["http"]["addr"], d.http.to_string());
    assert_eq!(config["mount"]["read_ahead_kb"], 1024);
    let metrics = ctl_read(&d.ctl("metrics"));
    assert!(
        metrics.contains("# TYPE model_storage_bytes_used gauge"),
        "{metrics}"
    );

    // A read-only control file cannot be written.
    assert!(ctl_write(&d.ctl("status"), "x\n").is_err());
    // Bad ids, modes and options fail the write with EINVAL, and the log says why.
    for w in [
        "ensure",
        "verify",
        "pin",
        "unpin",
        "evict",
        "mark-corrupted",
    ] {
        assert_einval(&d.ctl(w), "nope@9.9.9\n");
        assert_einval(&d.ctl(w), "\n");
    }
    assert_einval(&d.ctl("gc"), "everything\n");
    assert_einval(&d.ctl("gc"), "auto aggressive\n");
    assert_einval(&d.ctl("gc"), "auto --now\n");
    assert_einval(&d.ctl("verify"), &format!("{TI2V} --bogus\n"));
    assert_einval(&d.ctl("ensure"), &format!("{TI2V} nope@9.9.9\n"));
    let log = d.log();
    assert!(
        log.contains("control write refused") && log.contains("nope@9.9.9"),
        "no log line explains the refusal:\n{log}"
    );
    assert!(log.contains("everything"), "{log}");
    // None of those started anything.
    assert_eq!(ctl_json(&d.ctl("status"))["summary"]["not_present"], 3);

    // ensure: the write returns at once, the model becomes COMPLETE, its bytes are right.
    ctl_write(&d.ctl("ensure"), &format!("{T2V}\n")).expect("write .wan/ensure");
    api.wait_state(T2V, "COMPLETE");
    for rel in fixture_files(T2V) {
        let got = fs::read(d.path(&format!("{T2V}/{rel}"))).expect("read");
        assert_bytes_eq(&got, &fixture_bytes(T2V, &rel), &rel);
    }
    let st = ctl_json(&d.ctl("status"));
    assert_eq!(st["models"][T2V]["files_complete"], 8, "{st:#}");
    assert_eq!(st["models"][T2V]["job"]["kind"], "ensure");
    // The shared VAE makes i2v partly present.
    assert_eq!(st["models"][I2V]["state"], "PARTIAL", "{st:#}");

    // events: JSON lines, with the downloads of t2v.
    let events = ctl_read(&d.ctl("events"));
    let parsed: Vec<Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        parsed
            .iter()
            .any(|e| e["kind"] == "download" && e["model"] == T2V && e["status"] == "success"),
        "{events}"
    );
    assert!(
        parsed
            .iter()
            .any(|e| e["kind"] == "ensure" && e["model"] == T2V),
        "{events}"
    );

    // verify --report-only: runs, finds nothing, records the time.
    ctl_write(&d.ctl("verify"), &format!("--report-only {T2V}\n")).expect("write .wan/verify");
    let m = api.wait_model(T2V, "verified", |m| {
        !m["last_verified"].is_null() && m["job"]["kind"] == "verify" && m["job"]["state"] == "done"
    });
    assert_eq!(m["state"], "COMPLETE", "{m:#}");
    assert_eq!(m["job"]["bad_chunks"], 0);

    // pin / unpin.
    ctl_write(&d.ctl("pin"), &format!("{I2V}\n")).expect("pin");
    assert_eq!(api.model(I2V)["pinned"], true);
    ctl_write(&d.ctl("unpin"), &format!("{I2V} {T2V}\n")).expect("unpin two");
    assert_eq!(api.model(I2V)["pinned"], false);
    assert_eq!(api.model(T2V)["pinned"], false);
    ctl_write(&d.ctl("pin"), &format!("{T2V}\n")).expect("pin");
    assert_eq!(api.model(T2V)["pinned"], true);

    // evict: ti2v's data goes.
    ctl_write(&d.ctl("ensure"), &format!("{TI2V}\n")).expect("ensure");
    api.wait_state(TI2V, "COMPLETE");
    ctl_write(&d.ctl("evict"), &format!("{TI2V}\n")).expect("evict");
    let m = api.model(TI2V);
    assert_eq!(m["state"], "NOT_PRESENT", "{m:#}");
    assert_eq!(m["bytes_cached"], 0);

    // gc: a dry run removes nothing; aggressive removes unpinned models, never pinned ones.
    ctl_write(&d.ctl("ensure"), &format!("{TI2V} {I2V}\n")).expect("ensure");
    api.wait_state(TI2V, "COMPLETE");
    api.wait_state(I2V, "COMPLETE");
    ctl_write(&d.ctl("gc"), "aggressive --dry-run\n").expect("gc dry run");
    wait_until(Duration::from_secs(10), || {
        d.log().contains("gc from .wan/gc finished")
    });
    assert_eq!(api.model(TI2V)["state"], "COMPLETE");
    let finished = || d.log().matches("gc from .wan/gc finished").count();
    let before = finished();
    ctl_write(&d.ctl("gc"), "aggressive\n").expect("gc");
    // The pass evicts blob after blob: what is left is told once it has finished.
    assert!(
        wait_until(Duration::from_secs(20), || finished() > before),
        "gc never finished:\n{}",
        d.log()
    );
    api.wait_state(TI2V, "NOT_PRESENT");
    // i2v keeps only the VAE it shares with the pinned t2v.
    let m = api.wait_state(I2V, "PARTIAL");
    assert_eq!(m["bytes_cached"], 262_336, "{m:#}");
    assert_eq!(api.model(T2V)["state"], "COMPLETE");
    ctl_write(&d.ctl("gc"), "auto\n").expect("gc auto");
    ctl_write(&d.ctl("gc"), "deep-clean --dry-run\n").expect("gc deep-clean dry run");

    // mark-corrupted: CORRUPT with a reason, data dropped; ensure brings it back.
    ctl_write(&d.ctl("mark-corrupted"), &format!("{T2V}\n")).expect("mark-corrupted");
    let m = api.model(T2V);
    assert_eq!(m["state"], "CORRUPT", "{m:#}");
    assert!(m["last_error"].is_string(), "{m:#}");
    assert_eq!(m["bytes_cached"], 0, "{m:#}");
    let st = ctl_json(&d.ctl("status"));
    assert_eq!(st["summary"]["corrupt"], 1, "{st:#}");
    ctl_write(&d.ctl("ensure"), &format!("{T2V}\n")).expect("ensure");
    let m = api.wait_state(T2V, "COMPLETE");
    assert!(m["last_error"].is_null(), "{m:#}");
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

#[test]
fn http_routes() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let manifest = fixture_manifest(work.path());
    let secret = "tok-91c2-SECRET";
    let d = Daemon::start(
        work.path(),
        &manifest,
        &Opts::default().env("WAN_HTTP_TOKEN", secret),
    );
    let api = d.api();

    // GET /health
    let r = api.get("/health");
    let h = r.expect(200);
    assert_eq!(h["status"], "healthy", "{h:#}");
    for check in [
        "mount",
        "cache_writable",
        "index",
        "disk",
        "disk_watermark",
        "sources",
    ] {
        let c = &h["checks"][check];
        assert_eq!(c["ok"], true, "{check}: {h:#}");
        assert!(c["critical"].is_boolean() && c["detail"].is_string(), "{c}");
    }

    // GET /health/models
    let hm = api.get("/health/models").expect(200);
    assert_eq!(
        hm["summary"],
        json!({"total": 3, "complete": 0, "partial": 0, "not_present": 3, "corrupt": 0, "verifying": 0, "untrusted": 0}),
        "{hm:#}"
    );
    assert_eq!(hm["models"][T2V]["state"], "NOT_PRESENT");

    // GET /config: the token is masked.
    let r = api.get("/config");
    assert!(!r.text.contains(secret), "token leaked: {}", r.text);
    let c = r.expect(200);
    assert_eq!(c["http"]["token"], "***");
    assert_eq!(c["cache_dir"], d.cache.display().to_string());
    assert_eq!(c["mountpoint"], d.mnt.display().to_string());
    assert!(c["sources"][T2V].is_array(), "{c:#}");

    // GET /models and /models/{id}
    let all = api.get("/models").expect(200);
    let all = all.as_array().expect("list").clone();
    assert_eq!(
        ids_of(&all),
        [T2V, I2V, TI2V].iter().map(|s| s.to_string()).collect()
    );
    let m = api.model(T2V);
    assert_eq!(m["id"], T2V);
    assert_eq!(m["bytes_total"], 2_624_424);
    assert_eq!(m["files"], 8);
    let e = api.get("/models/nope@1.0.0").expect(404);
    assert!(e["error"].as_str().unwrap().contains("nope@1.0.0"), "{e}");

    // POST /models/{id}/ensure → 202, then COMPLETE.
    let r = api.post(&format!("/models/{T2V}/ensure"), None, None);
    assert_eq!(r.expect(202)["started"], json!([T2V]));
    api.wait_state(T2V, "COMPLETE");
    let downloads = api.count_events("download", T2V, "success");
    assert_eq!(downloads, 7, "t2v has 7 distinct files");
    // ?force=true fetches everything again.
    api.post(&format!("/models/{T2V}/ensure?force=true"), None, None)
        .expect(202);
    wait_until(Duration::from_secs(30), || {
        api.count_events("download", T2V, "success") >= 2 * downloads
    });
    api.wait_state(T2V, "COMPLETE");
    assert_eq!(api.count_events("download", T2V, "success"), 2 * downloads);
    api.post("/models/nope@1.0.0/ensure", None, None)
        .expect(404);

    // POST /models/{id}/verify?report_only=true
    api.post(
        &format!("/models/{T2V}/verify?report_only=true"),
        None,
        None,
    )
    .expect(202);
    let m = api.wait_model(T2V, "verified", |m| {
        !m["last_verified"].is_null() && m["job"]["kind"] == "verify" && m["job"]["state"] == "done"
    });
    assert_eq!(m["state"], "COMPLETE");

    // pin / unpin
    let m = api
        .post(&format!("/models/{I2V}/pin"), None, None)
        .expect(200);
    assert_eq!(m["pinned"], true, "{m:#}");
    assert_eq!(api.model(I2V)["pinned"], true);
    let m = api
        .post(&format!("/models/{I2V}/unpin"), None, None)
        .expect(200);
    assert_eq!(m["pinned"], false);
    api.post("/models/nope@1.0.0/pin", None, None).expect(404);

    // POST /ensure and /verify with a JSON body.
    let r = api.post("/ensure", Some(json!({"ids": [TI2V, I2V]})), None);
    assert_eq!(r.expect(202)["started"], json!([TI2V, I2V]));
    api.wait_state(TI2V, "COMPLETE");
    api.wait_state(I2V, "COMPLETE");
    api.post("/ensure", Some(json!({"ids": ["nope@1.0.0"]})), None)
        .expect(404);
    let r = api.post(
        "/verify",
        Some(json!({"ids": [TI2V], "report_only": false})),
        None,
    );
    assert_eq!(r.expect(202)["started"], json!([TI2V]));
    api.wait_model(TI2V, "verified", |m| {
        !m["last_verified"].is_null() && m["job"]["state"] == "done"
    });

    // POST /models/{id}/evict
    let r = api
        .post(&format!("/models/{TI2V}/evict"), None, None)
        .expect(200);
    assert_eq!(r["freed_bytes"], TI2V_BYTES, "{r}");
    assert_eq!(api.model(TI2V)["state"], "NOT_PRESENT");

    // POST /models/{id}/mark-corrupted and /mark-corrupted
    let r = api
        .post(&format!("/models/{I2V}/mark-corrupted"), None, None)
        .expect(200);
    assert_eq!(r["marked"], json!([I2V]));
    assert_eq!(api.model(I2V)["state"], "CORRUPT");
    api.post("/mark-corrupted", Some(json!({"ids": []})), None)
        .expect(400);
    api.post(
        "/mark-corrupted",
        Some(json!({"ids": ["nope@1.0.0"]})),
        None,
    )
    .expect(404);
    let r = api
        .post("/mark-corrupted", Some(json!({"ids": [TI2V]})), None)
        .expect(200);
    assert_eq!(r["marked"], json!([TI2V]));
    let hm = api.get("/health/models").expect(200);
    assert_eq!(hm["summary"]["corrupt"], 2, "{hm:#}");
    assert_eq!(hm["summary"]["complete"], 0, "{hm:#}");
    // mark-corrupted drops the shared VAE too: t2v is no longer complete.
    assert_eq!(hm["models"][T2V]["state"], "PARTIAL", "{hm:#}");
    api.post("/ensure", Some(json!({"ids": [T2V, I2V, TI2V]})), None)
        .expect(202);
    for id in [T2V, I2V, TI2V] {
        api.wait_state(id, "COMPLETE");
    }

    // POST /gc: dry runs list without removing; aggressive spares pinned models; deep-clean
    // also removes orphan blob files and re-verifies what stays.
    let before = api.used_bytes();
    assert_eq!(before, ALL_BYTES);
    let g = api
        .post("/gc?mode=auto&dry_run=true", None, None)
        .expect(200);
    assert_eq!(g["mode"], "auto");
    assert_eq!(g["dry_run"], true);
    assert_eq!(g["removed"], json!([]), "no quota: nothing to do");
    let g = api
        .post("/gc?mode=aggressive&dry_run=true", None, None)
        .expect(200);
    assert_eq!(g["freed_bytes"], I2V_OWN_BYTES + TI2V_BYTES, "{g:#}");
    assert_eq!(api.used_bytes(), before, "a dry run removed something");
    let g = api.post("/gc?mode=aggressive", None, None).expect(200);
    assert_eq!(g["dry_run"], false);
    assert_eq!(g["used_before"], ALL_BYTES);
    assert_eq!(g["used_after"], T2V_BYTES, "{g:#}");
    for item in g["removed"].as_array().unwrap() {
        assert!(
            !item["models"].as_array().unwrap().contains(&json!(T2V)),
            "a blob of the pinned model was removed: {item}"
        );
    }
    assert_eq!(api.model(T2V)["state"], "COMPLETE");
    assert_eq!(api.model(TI2V)["state"], "NOT_PRESENT");
    let orphan = CacheView::new(&d.cache).blob_path(&"ab".repeat(32));
    fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    fs::write(&orphan, b"left over by a lost index").unwrap();
    let g = api
        .post("/gc?mode=deep-clean&dry_run=true", None, None)
        .expect(200);
    assert_eq!(g["orphans_removed"], 1, "{g:#}");
    assert!(orphan.exists(), "a dry run removed the orphan");
    let g = api.post("/gc?mode=deep-clean", None, None).expect(200);
    assert_eq!(g["mode"], "deep-clean");
    assert_eq!(g["orphans_removed"], 1, "{g:#}");
    assert!(!orphan.exists(), "deep-clean left the orphan");
    assert!(g["reverified_bytes"].as_u64().unwrap() > 0, "{g:#}");
    assert_eq!(g["bad_chunks"], 0);
    assert_eq!(api.model(T2V)["state"], "COMPLETE");
    let e = api.post("/gc?mode=everything", None, None).expect(400);
    assert!(e["error"].as_str().unwrap().contains("everything"), "{e}");

    // GET /events?limit=N
    let ev = api.get("/events?limit=3").expect(200);
    let ev = ev.as_array().expect("list");
    assert_eq!(ev.len(), 3);
    for e in ev {
        for k in ["ts", "kind", "model", "status", "bytes"] {
            assert!(!e[k].is_null(), "event without {k}: {e}");
        }
    }

    // GET /report/daily and /report/storage
    let rep = api.get("/report/daily?days=1").expect(200);
    assert!(
        report_sum(&rep, "download_success", "count") >= 7,
        "{rep:#}"
    );
    assert!(report_sum(&rep, "evict_success", "count") >= 1, "{rep:#}");
    let st = api.get("/report/storage?days=30").expect(200);
    assert_eq!(st["current"]["used_bytes"], T2V_BYTES, "{st:#}");
    assert_eq!(st["current"]["per_model"][T2V], 2_624_424, "{st:#}");
    assert!(st["current"]["capacity_bytes"].as_u64().unwrap() > 0);

    // GET /metrics
    let r = api.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(
        r.content_type.starts_with("text/plain"),
        "{}",
        r.content_type
    );
    assert!(
        r.text.contains(&format!(
            "model_downloads_total{{model=\"{T2V}\",status=\"success\"}}"
        )),
        "{}",
        r.text
    );
    assert!(
        r.text
            .contains(&format!("model_storage_bytes_used {T2V_BYTES}")),
        "{}",
        r.text
    );
}

#[test]
fn http_mutations_need_loopback_or_token() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let manifest = fixture_manifest(work.path());
    let token = "tok-2b9e-SECRET";
    let mut opts = Opts::default().env("WAN_HTTP_TOKEN", token);
    opts.http_ip = "127.0.0.2";
    let d = Daemon::start(work.path(), &manifest, &opts);
    // A client whose address is 127.0.0.2: loopback, but not 127.0.0.1, so it counts as remote.
    let remote = Api::new(d.http, Some("127.0.0.2".parse().unwrap()));
    let local = Api::new(d.http, Some("127.0.0.1".parse().unwrap()));

    // Reads are open.
    for path in [
        "/health",
        "/health/models",
        "/config",
        "/metrics",
        "/models",
        "/events?limit=5",
        "/report/daily?days=1",
        "/report/storage?days=30",
    ] {
        assert_eq!(remote.get(path).status, 200, "GET {path}");
    }
    assert_eq!(remote.get(&format!("/models/{I2V}")).status, 200);

    // Every mutation is refused without the token, or with a wrong one, and does nothing.
    let mutations: Vec<(String, Option<Value>)> = vec![
        (format!("/models/{TI2V}/ensure"), None),
        (format!("/models/{TI2V}/ensure?force=true"), None),
        (format!("/models/{TI2V}/verify?report_only=true"), None),
        (format!("/models/{I2V}/pin"), None),
        (format!("/models/{T2V}/unpin"), None),
        (format!("/models/{TI2V}/evict"), None),
        (format!("/models/{TI2V}/mark-corrupted"), None),
        ("/ensure".into(), Some(json!({"ids": [TI2V]}))),
        ("/verify".into(), Some(json!({"ids": [TI2V]}))),
        ("/mark-corrupted".into(), Some(json!({"ids": [TI2V]}))),
        ("/gc?mode=aggressive".into(), None),
        ("/gc?mode=auto&dry_run=true".into(), None),
    ];
    for (path, body) in &mutations {
        for tok in [None, Some("wrong"), Some("")] {
            let r = remote.post(path, body.clone(), tok);
            assert_eq!(r.status, 403, "POST {path} with token {tok:?}: {}", r.text);
            assert!(r.json()["error"].is_string());
        }
    }
    assert!(
        d.log().contains("refused a mutating HTTP call"),
        "{}",
        d.log()
    );
    let hm = remote.get("/health/models").expect(200);
    assert_eq!(
        hm["summary"]["not_present"], 3,
        "a refused call acted: {hm:#}"
    );
    assert_eq!(hm["models"][I2V]["pinned"], false);
    assert_eq!(hm["models"][T2V]["pinned"], true);

    // With the token: accepted, and it acts.
    let m = remote
        .post(&format!("/models/{I2V}/pin"), None, Some(token))
        .expect(200);
    assert_eq!(m["pinned"], true);
    remote
        .post(&format!("/models/{TI2V}/ensure"), None, Some(token))
        .expect(202);
    remote.wait_state(TI2V, "COMPLETE");
    remote
        .post("/verify", Some(json!({"ids": [TI2V]})), Some(token))
        .expect(202);
    remote.wait_model(TI2V, "verified", |m| {
        !m["last_verified"].is_null() && m["job"]["state"] == "done"
    });
    remote
        .post("/gc?mode=auto&dry_run=true", None, Some(token))
        .expect(200);
    let r = remote
        .post(&format!("/models/{TI2V}/evict"), None, Some(token))
        .expect(200);
    assert_eq!(r["freed_bytes"], TI2V_BYTES);

    // From 127.0.0.1 itself no token is needed.
    let m = local
        .post(&format!("/models/{I2V}/unpin"), None, None)
        .expect(200);
    assert_eq!(m["pinned"], false);
    local.post("/gc?mode=aggressive", None, None).expect(200);
}

#[test]
fn promtool_accepts_the_metrics() {
    if no_fuse() {
        return;
    }
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("promtool is not installed: apt-get install -y prometheus");
    let setup = GenSetup::new(&[("a.bin", 600 * KIB), ("b.json", 3 * KIB)], CS, 4101);
    let d = Daemon::start(setup.work.path(), &setup.manifest, &Opts::default());
    let api = d.api();
    // Fill every family with samples: downloads, a cache hit and miss, a verify that finds a
    // corrupt chunk, an eviction, a failing source.
    let got = read_fresh(&d.path(&format!("{GEN}/a.bin"))).expect("read");
    assert_bytes_eq(&got, setup.data("a.bin"), "a.bin");
    d.cli().run(&["ensure", "--only", GEN]).ok();
    let blob = CacheView::new(&d.cache).blob_path(&setup.file("a.bin").sha256);
    flip_byte(&blob, 10);
    d.cli()
        .run(&["verify", "--only", GEN, "--report-only"])
        .fails();
    d.cli().run(&["verify", "--only", GEN]).ok();
    api.post("/gc?mode=aggressive", None, None).expect(200);
    setup.origin.stop();
    assert!(read_fresh(&d.path(&format!("{GEN}/b.json"))).is_err());

    let texts = [
        ("GET /metrics", api.get("/metrics").text),
        (".wan/metrics", ctl_read(&d.ctl("metrics"))),
    ];
    for (what, text) in texts {
        for name in [
            "model_downloads_total",
            "model_download_duration_seconds",
            "model_errors_total",
            "model_storage_bytes_used",
            "model_storage_capacity_bytes",
            "model_downloads_active",
            "wan_cache_hits_total",
            "wan_cache_misses_total",
            "wan_chunks_fetched_total",
            "wan_cache_skipped_bytes_total",
            "wan_source_bytes_total",
            "wan_source_requests_total",
            "wan_time_to_first_byte_seconds",
            "wan_fuse_request_seconds",
            "wan_integrity_failures_total",
            "wan_evictions_total",
            "wan_evicted_bytes_total",
            "wan_commit_batch_chunks",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{what}: {name} missing:\n{text}"
            );
        }
        assert!(
            text.contains("model_errors_total{kind=\"verify\"}"),
            "{what}:\n{text}"
        );
        let mut child = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        // No lint accepted: a warning (exit 3) fails as an error does.
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "promtool check metrics refused {what} ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------------

#[test]
fn cli_against_a_live_daemon() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let manifest = fixture_manifest(work.path());
    let d = Daemon::start(work.path(), &manifest, &Opts::default());
    let cli = d.cli();
    let api = d.api();

    // list
    let out = cli.run(&["list"]).ok().stdout;
    let t2v_line = out
        .lines()
        .find(|l| l.starts_with(T2V))
        .expect("t2v listed");
    assert!(t2v_line.contains("[pinned]"), "{out}");
    assert!(out.lines().any(|l| l.starts_with(TI2V)), "{out}");
    let list = cli.run(&["--json", "list"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 3, "{list:#}");

    // status and its filters
    let out = cli.run(&["status"]).ok().stdout;
    assert_eq!(out.matches("NOT_PRESENT").count(), 3, "{out}");
    let st = cli.statuses();
    assert_eq!(st.len(), 3);
    let only = cli.run(&["--json", "status", "--only", TI2V]).ok().json();
    assert_eq!(
        ids_of(only.as_array().unwrap()),
        BTreeSet::from([TI2V.to_owned()])
    );
    let crit = cli
        .run(&["status", "--critical-only", "--json"])
        .ok()
        .json();
    assert_eq!(
        ids_of(crit.as_array().unwrap()),
        BTreeSet::from([T2V.to_owned()])
    );
    let failed = cli.run(&["status", "--failed-only", "--json"]).ok().json();
    assert_eq!(failed, json!([]));
    let r = cli.run(&["status", "--only", "nope@1.0.0"]).fails();
    assert!(r.stderr.contains("nope@1.0.0"), "{}", r.stderr);

    // ensure: --only, --model-list, --all, --benchmark, --force-redownload
    cli.run(&["ensure"]).usage_error();
    let r = cli.run(&["ensure", "--only", "nope@1.0.0"]).fails();
    assert!(r.stderr.contains("nope@1.0.0"), "{}", r.stderr);
    let out = cli.run(&["ensure", "--only", TI2V]).ok().stdout;
    assert!(
        out.contains("COMPLETE") && out.contains("ensure done"),
        "{out}"
    );
    let list_file = work.path().join("models.txt");
    fs::write(&list_file, format!("# the image model\n{I2V}\n\n")).unwrap();
    let r = cli
        .run(&[
            "--json",
            "ensure",
            "--model-list",
            list_file.to_str().unwrap(),
        ])
        .ok();
    let v = r.json();
    assert_eq!(v["models"][0]["id"], I2V, "{v:#}");
    assert_eq!(v["models"][0]["state"], "COMPLETE", "{v:#}");
    let out = cli.run(&["ensure", "--all", "--benchmark"]).ok().stdout;
    assert!(
        out.contains("MB/s") && out.contains("time to first byte"),
        "{out}"
    );
    let st = cli.statuses();
    assert!(st.iter().all(|m| m["state"] == "COMPLETE"), "{st:#?}");
    let before = api.count_events("download", TI2V, "success");
    assert_eq!(before, 4);
    cli.run(&["ensure", "--only", TI2V, "--force-redownload"])
        .ok();
    assert_eq!(api.count_events("download", TI2V, "success"), 2 * before);
    assert_eq!(cli.status(TI2V)["state"], "COMPLETE");

    // verify
    let out = cli.run(&["verify", "--all"]).ok().stdout;
    assert_eq!(out.matches("0 corrupt chunks").count(), 3, "{out}");
    cli.run(&["verify", "--only", TI2V, "--report-only"]).ok();
    cli.run(&["verify", "--model-list", list_file.to_str().unwrap()])
        .ok();
    assert!(!cli.status(I2V)["last_verified"].is_null());
    cli.run(&["verify", "--only", "nope@1.0.0"]).fails();

    // gc: dry runs remove nothing; aggressive spares the pinned t2v (and the VAE it shares).
    let v = cli.run(&["--json", "gc", "--dry-run"]).ok().json();
    assert_eq!(v["mode"], "auto");
    assert_eq!(v["removed"], json!([]), "no quota, nothing due: {v:#}");
    let v = cli
        .run(&["--json", "gc", "--aggressive", "--dry-run"])
        .ok()
        .json();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["freed_bytes"], I2V_OWN_BYTES + TI2V_BYTES, "{v:#}");
    assert!(cli.statuses().iter().all(|m| m["state"] == "COMPLETE"));
    let out = cli.run(&["gc", "--aggressive"]).ok().stdout;
    assert!(out.contains("gc aggressive: removed"), "{out}");
    assert_eq!(cli.status(TI2V)["state"], "NOT_PRESENT");
    assert_eq!(cli.status(I2V)["state"], "PARTIAL");
    assert_eq!(cli.status(T2V)["state"], "COMPLETE");
    let v = cli.run(&["--json", "gc", "--deep-clean"]).ok().json();
    assert_eq!(v["mode"], "deep-clean");
    assert!(v["reverified_bytes"].as_u64().unwrap() > 0, "{v:#}");
    cli.run(&["gc", "--auto"]).ok();
    cli.run(&["gc", "--auto", "--aggressive"]).usage_error();

    // report
    let rep = cli.run(&["report", "--daily", "--json"]).ok().json();
    assert!(
        report_sum(&rep, "download_success", "count") >= 11,
        "{rep:#}"
    );
    assert!(report_sum(&rep, "evict_success", "count") >= 1, "{rep:#}");
    let st = cli
        .run(&["report", "--storage", "--last-30-days", "--json"])
        .ok()
        .json();
    assert_eq!(st["current"]["used_bytes"], api.used_bytes(), "{st:#}");
    assert_eq!(st["current"]["used_bytes"], T2V_BYTES);

    // pin / unpin
    let out = cli.run(&["pin", I2V]).ok().stdout;
    assert!(out.contains("pinned = true"), "{out}");
    assert_eq!(api.model(I2V)["pinned"], true);
    let crit = cli
        .run(&["--json", "status", "--critical-only"])
        .ok()
        .json();
    assert_eq!(crit.as_array().unwrap().len(), 2);
    cli.run(&["unpin", I2V]).ok();
    assert_eq!(api.model(I2V)["pinned"], false);
    cli.run(&["pin", "nope@1.0.0"]).fails();
    cli.run(&["unpin", "nope@1.0.0"]).fails();

    // mark-corrupted: status then exits 1 and --failed-only shows the model.
    cli.run(&["mark-corrupted"]).usage_error();
    cli.run(&["mark-corrupted", "--only", "nope@1.0.0"]).fails();
    cli.run(&["mark-corrupted", "--only", TI2V]).ok();
    let r = cli.run(&["status"]).fails();
    assert!(r.stdout.contains("CORRUPT"), "{}", r.stdout);
    let failed = cli
        .run(&["--json", "status", "--failed-only"])
        .fails()
        .json();
    assert_eq!(
        ids_of(failed.as_array().unwrap()),
        BTreeSet::from([TI2V.to_owned()])
    );
    cli.run(&[
        "mark-corrupted",
        "--model-list",
        list_file.to_str().unwrap(),
    ])
    .ok();
    assert_eq!(cli.status(I2V)["state"], "CORRUPT");
    cli.run(&["ensure", "--only", &format!("{TI2V},{I2V}")])
        .ok();
    cli.run(&["status"]).ok();

    // Without --http the address comes from the config file: still the daemon (opening the
    // cache directly would fail on its lock).
    let mut from_config = cli.clone();
    from_config.http = None;
    let st = from_config.statuses();
    assert_eq!(st.len(), 3);

    // SIGTERM: a clean exit, nothing left mounted.
    assert!(d.stop().success());
}

#[test]
fn cli_without_a_daemon_works_on_the_cache() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let manifest = fixture_manifest(work.path());
    let cache = work.path().join("cache");
    // Nobody listens at the configured address: the CLI opens the cache itself.
    let dead = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let config = config_file(work.path(), "direct.toml", &Opts::default(), &dead);
    let cli = Cli {
        config,
        manifest: manifest.clone(),
        cache: cache.clone(),
        http: None,
    };

    let st = cli.statuses();
    assert_eq!(st.len(), 3);
    assert!(st.iter().all(|m| m["state"] == "NOT_PRESENT"), "{st:#?}");
    cli.run(&["list"]).ok();

    let out = cli.run(&["ensure", "--only", TI2V]).ok().stdout;
    assert!(out.contains("COMPLETE"), "{out}");
    cli.run(&["ensure", "--only", T2V]).ok();
    cli.run(&["ensure", "--only", "nope@1.0.0"]).fails();
    assert_eq!(cli.status(TI2V)["state"], "COMPLETE");
    assert_eq!(cli.status(T2V)["state"], "COMPLETE");
    let view = CacheView::new(&cache);
    assert_eq!(view.check_consistent(), Ok(21), "16 t2v + 5 ti2v chunks");

    cli.run(&["pin", I2V]).ok();
    assert_eq!(cli.status(I2V)["pinned"], true);
    cli.run(&["unpin", T2V]).ok();
    cli.run(&["pin", T2V]).ok();

    let g = cli.run(&["--json", "gc", "--aggressive"]).ok().json();
    assert_eq!(g["freed_bytes"], TI2V_BYTES, "{g:#}");
    assert_eq!(cli.status(TI2V)["state"], "NOT_PRESENT");
    assert_eq!(cli.status(T2V)["state"], "COMPLETE");
    let out = cli.run(&["verify", "--all"]).ok().stdout;
    assert!(out.contains("0 corrupt chunks"), "{out}");
    let rep = cli.run(&["report", "--daily", "--json"]).ok().json();
    assert_eq!(report_sum(&rep, "download_success", "count"), 11, "{rep:#}");
    let st = cli
        .run(&["report", "--storage", "--last-30-days", "--json"])
        .ok()
        .json();
    assert_eq!(st["current"]["used_bytes"], T2V_BYTES, "{st:#}");

    cli.run(&["mark-corrupted", "--only", TI2V]).ok();
    assert_eq!(cli.status(TI2V)["state"], "CORRUPT");
    cli.run(&["status"]).fails();
    cli.run(&["ensure", "--only", TI2V]).ok();
    cli.run(&["status"]).ok();

    // A daemon started on that cache sees what the CLI did (states, pins).
    let d = Daemon::start(work.path(), &manifest, &Opts::default());
    let api = d.api();
    assert_eq!(api.model(T2V)["state"], "COMPLETE");
    assert_eq!(api.model(TI2V)["state"], "COMPLETE");
    assert_eq!(api.model(I2V)["pinned"], true);
    let got = fs::read(d.path(&format!("{TI2V}/Wan2.2_VAE.safetensors"))).unwrap();
    assert_bytes_eq(
        &got,
        &fixture_bytes(TI2V, "Wan2.2_VAE.safetensors"),
        "after direct ensure",
    );
    // While it runs, a CLI that cannot reach it does not touch the cache behind its back.
    let r = cli.run(&["status"]).fails();
    assert!(r.stderr.contains("locked"), "{}", r.stderr);
}

// ---------------------------------------------------------------------------------------------
// States, verify, reports
// ---------------------------------------------------------------------------------------------

/// Flips one byte of a file on disk (as a failing disk would).
fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
    f.sync_data().unwrap();
}

#[test]
fn states_walk_from_not_present_to_corrupt_and_back() {
    if no_fuse() {
        return;
    }
    let big = 8 * CS as usize + 1234;
    let setup = GenSetup::new(
        &[("model.safetensors", big), ("config.json", 700)],
        CS,
        4201,
    );
    let mut opts = Opts::default();
    opts.config.fetch.readahead_chunks = 0;
    opts.config.mount.read_ahead_kb = 128;
    let d = Daemon::start(setup.work.path(), &setup.manifest, &opts);
    let cli = d.cli();
    let api = d.api();
    let file = d.path(&format!("{GEN}/model.safetensors"));
    let total = (big + 700) as u64;

    // NOT_PRESENT
    let m = cli.status(GEN);
    assert_eq!(m["state"], "NOT_PRESENT", "{m:#}");
    assert_eq!(m["bytes_total"], total);
    assert_eq!(setup.origin.request_count(), 0);

    // PARTIAL: one small read fetches one chunk.
    let f = File::open(&file).unwrap();
    // SAFETY: fadvise on an fd we own; no kernel read-ahead for this read.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let got = read_range_in(&f, 100, 4096).unwrap();
    assert_bytes_eq(&got, &setup.data("model.safetensors")[100..4196], "chunk 0");
    drop(f);
    let m = api.wait_model(GEN, "PARTIAL", |m| m["bytes_cached"].as_u64() > Some(0));
    assert_eq!(m["state"], "PARTIAL", "{m:#}");
    assert!(m["bytes_cached"].as_u64().unwrap() < total, "{m:#}");
    assert_eq!(cli.status(GEN)["state"], "PARTIAL");

    // COMPLETE: ensure fetches the rest.
    cli.run(&["ensure", "--only", GEN]).ok();
    let m = cli.status(GEN);
    assert_eq!(m["state"], "COMPLETE", "{m:#}");
    assert_eq!(m["bytes_cached"], total);
    assert_eq!(m["files_complete"], 2);
    let view = CacheView::new(&d.cache);
    assert_eq!(view.check_consistent(), Ok(10));

    // A byte of chunk 5 goes bad on disk.
    let blob = view.blob_path(&setup.file("model.safetensors").sha256);
    let bad_at = 5 * CS + 777;
    flip_byte(&blob, bad_at);
    let failures_before = metric_value(&api.get("/metrics").text, "wan_integrity_failures_total");

    // verify --report-only finds it: exit 1, CORRUPT with a reason, counted.
    let r = cli.run(&["verify", "--only", GEN, "--report-only"]).fails();
    assert!(
        r.stdout.contains("CORRUPT") && r.stdout.contains("1 corrupt chunks"),
        "{}",
        r.stdout
    );
    let m = cli.status(GEN);
    assert_eq!(m["state"], "CORRUPT", "{m:#}");
    assert!(
        m["last_error"].as_str().unwrap_or("").contains("corrupt"),
        "{m:#}"
    );
    cli.run(&["status"]).fails();
    let failed = cli
        .run(&["--json", "status", "--failed-only"])
        .fails()
        .json();
    assert_eq!(failed[0]["id"], GEN);
    assert_eq!(
        api.get("/health/models").expect(200)["summary"]["corrupt"],
        1
    );
    let failures = metric_value(&api.get("/metrics").text, "wan_integrity_failures_total");
    assert_eq!(failures, failures_before + 1.0);
    assert!(
        d.log().contains("integrity failure"),
        "no log line for the bad chunk"
    );
    // Report-only fetched nothing.
    let mark = setup.origin.request_count();

    // verify (repair): the bad chunk, and only it, is fetched again; COMPLETE.
    let r = cli.run(&["verify", "--only", GEN]).ok();
    assert!(r.stdout.contains("1 corrupt chunks"), "{}", r.stdout);
    let m = cli.status(GEN);
    assert_eq!(m["state"], "COMPLETE", "{m:#}");
    assert!(m["last_error"].is_null(), "{m:#}");
    let refetched: Vec<(u64, u64)> = setup
        .origin
        .requests_since(mark)
        .iter()
        .filter(|r| r.method == "GET")
        .map(|r| r.range.expect("a ranged GET"))
        .collect();
    assert!(!refetched.is_empty(), "nothing was fetched again");
    for (a, b) in &refetched {
        assert!(
            *a >= 5 * CS && *b < 6 * CS,
            "fetched {a}..={b}, outside the bad chunk: {refetched:?}"
        );
    }
    assert_eq!(view.check_consistent(), Ok(10));
    // The bytes through the mount are right again.
    let got = read_fresh(&file).unwrap();
    assert_bytes_eq(&got, setup.data("model.safetensors"), "after repair");
    let got = read_fresh(&d.path(&format!("{GEN}/config.json"))).unwrap();
    assert_bytes_eq(&got, setup.data("config.json"), "config.json");
    // And a verify now finds nothing.
    let out = cli.run(&["verify", "--only", GEN]).ok().stdout;
    assert!(out.contains("0 corrupt chunks"), "{out}");
}

#[test]
fn a_chunk_found_corrupt_by_report_only_is_not_served() {
    if no_fuse() {
        return;
    }
    // verify --report-only fetches nothing, but once it knows a cached chunk is bad, readers
    // must get the right bytes (fetched again) or EIO, never the bad byte.
    let mut bad = Vec::new();
    for passthrough in [true, false] {
        let setup = GenSetup::new(&[("m.bin", 3 * CS as usize)], CS, 4211);
        let mut opts = Opts::default();
        opts.config.mount.passthrough = passthrough;
        let work = setup.work.path().join(format!("pt-{passthrough}"));
        fs::create_dir_all(&work).unwrap();
        let d = Daemon::start(&work, &setup.manifest, &opts);
        let cli = d.cli();
        cli.run(&["ensure", "--only", GEN]).ok();
        let blob = CacheView::new(&d.cache).blob_path(&setup.file("m.bin").sha256);
        flip_byte(&blob, CS + 5);
        cli.run(&["verify", "--only", GEN, "--report-only"]).fails();
        assert_eq!(cli.status(GEN)["state"], "CORRUPT");
        match read_fresh(&d.path(&format!("{GEN}/m.bin"))) {
            Ok(got) if got == setup.data("m.bin") => {}
            Ok(got) => bad.push(format!(
                "passthrough = {passthrough}: bad byte served at {:?}",
                got.iter()
                    .zip(setup.data("m.bin"))
                    .position(|(a, b)| a != b)
            )),
            Err(e) if errno(&e) == libc::EIO => {}
            Err(e) => bad.push(format!("passthrough = {passthrough}: {e}")),
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// The value of an unlabelled sample in Prometheus text (0 if absent).
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

/// What `wan models` prints is what is so: `status --critical-only` with nothing pinned fails
/// rather than passing vacuously; a verify of a COMPLETE model ends at 100 % (t2v holds two
/// identical configs, checked once); today's storage row includes what was fetched since the
/// daemon's first hourly sample (taken at start, of an empty cache).
#[test]
fn cli_output_tells_the_truth() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let manifest = fixture_manifest(work.path());
    let unpinned = fs::read_to_string(&manifest)
        .unwrap()
        .replace("pinned = true\n", "");
    fs::write(&manifest, unpinned).unwrap();
    let d = Daemon::start(work.path(), &manifest, &Opts::default());
    let cli = d.cli();

    let r = cli.run(&["status", "--critical-only"]).fails();
    assert!(r.stderr.contains("no model is pinned"), "{}", r.stderr);
    let r = cli.run(&["--json", "status", "--critical-only"]).fails();
    assert_eq!(r.json(), json!([]));
    cli.run(&["pin", T2V]).ok();
    cli.run(&["status", "--critical-only"]).ok();

    cli.run(&["ensure", "--only", T2V]).ok();
    let r = cli.run(&["verify", "--only", T2V]).ok();
    let last = r
        .stderr
        .lines()
        .rfind(|l| l.starts_with(&format!("verify {T2V}:")))
        .unwrap_or_else(|| panic!("no progress line:\n{}", r.stderr));
    assert!(
        last.contains(": 100% ") && last.ends_with("(done)"),
        "a finished verify of a COMPLETE model: {last}"
    );

    let st = cli.run(&["--json", "report", "--storage"]).ok().json();
    let used = st["current"]["used_bytes"].as_u64().unwrap();
    assert_eq!(used, T2V_BYTES, "{st:#}");
    let (day, today) = st["days"]
        .as_object()
        .and_then(|d| d.iter().next_back())
        .unwrap_or_else(|| panic!("no day rows: {st:#}"));
    assert_eq!(today["max_used"].as_u64(), Some(used), "{day}: {st:#}");
    let table = cli.run(&["report", "--storage"]).ok().stdout;
    let row = table
        .lines()
        .find(|l| l.starts_with(day.as_str()))
        .unwrap_or_else(|| panic!("no row for {day}:\n{table}"));
    assert!(row.contains("2.5 MiB"), "today's max: {row}");
}

#[test]
fn daily_report_shows_real_downloads() {
    if no_fuse() {
        return;
    }
    let sizes = [
        ("a.bin", 600 * KIB + 5),
        ("b.bin", 300 * KIB),
        ("c.json", 999),
    ];
    let setup = GenSetup::new(&sizes, CS, 4301);
    let total: u64 = sizes.iter().map(|(_, s)| *s as u64).sum();
    let d = Daemon::start(setup.work.path(), &setup.manifest, &Opts::default());
    let cli = d.cli();
    let api = d.api();

    let rep = cli.run(&["report", "--daily", "--json"]).ok().json();
    assert_eq!(report_sum(&rep, "download_success", "count"), 0, "{rep:#}");

    cli.run(&["ensure", "--only", GEN]).ok();
    assert!(
        !setup.origin.gets("").is_empty(),
        "nothing came from the origin"
    );
    let rep = cli.run(&["report", "--daily", "--json"]).ok().json();
    assert_eq!(report_sum(&rep, "download_success", "count"), 3, "{rep:#}");
    assert_eq!(
        report_sum(&rep, "download_success", "bytes"),
        total,
        "{rep:#}"
    );
    assert_eq!(report_sum(&rep, "ensure_success", "count"), 1, "{rep:#}");
    assert_eq!(report_sum(&rep, "download_failed", "count"), 0, "{rep:#}");
    // The same through HTTP.
    let http = api.get("/report/daily?days=1").expect(200);
    assert_eq!(http["days"], rep["days"]);

    let st = cli
        .run(&["report", "--storage", "--last-30-days", "--json"])
        .ok()
        .json();
    assert_eq!(st["current"]["used_bytes"], total, "{st:#}");
    assert_eq!(st["current"]["per_model"][GEN], total, "{st:#}");

    // An eviction and a failed download show up too.
    api.post(&format!("/models/{GEN}/evict"), None, None)
        .expect(200);
    setup.origin.stop();
    cli.run(&["ensure", "--only", GEN]).fails();
    let rep = cli.run(&["report", "--daily", "--json"]).ok().json();
    assert_eq!(report_sum(&rep, "evict_success", "count"), 1, "{rep:#}");
    assert_eq!(report_sum(&rep, "evict_success", "bytes"), total, "{rep:#}");
    assert!(report_sum(&rep, "download_failed", "count") >= 1, "{rep:#}");
    assert_eq!(report_sum(&rep, "ensure_failed", "count"), 1, "{rep:#}");
    assert!(d.log().contains("download failed"), "{}", d.log());
}

#[test]
fn daily_report_counts_verified_bytes() {
    if no_fuse() {
        return;
    }
    // The report's `bytes` are bytes for every kind of event, verify included.
    let setup = GenSetup::new(&[("a.bin", 3 * CS as usize + 10)], CS, 4401);
    let d = Daemon::start(setup.work.path(), &setup.manifest, &Opts::default());
    let cli = d.cli();
    cli.run(&["ensure", "--only", GEN]).ok();
    cli.run(&["verify", "--only", GEN]).ok();
    let rep = cli.run(&["report", "--daily", "--json"]).ok().json();
    assert_eq!(report_sum(&rep, "verify_success", "count"), 1, "{rep:#}");
    assert_eq!(
        report_sum(&rep, "verify_success", "bytes"),
        3 * CS + 10,
        "verify_success.bytes should be the bytes verified: {rep:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------------

#[test]
fn health_is_unhealthy_over_the_quota_and_recovers_after_gc() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let manifest = fixture_manifest(work.path());
    let mut opts = Opts::default();
    opts.config.gc.max_bytes = 1_000_000;
    opts.config.gc.interval_secs = 3600.0;
    let d = Daemon::start(work.path(), &manifest, &opts);
    let api = d.api();
    let cli = d.cli();
    assert_eq!(api.get("/health").expect(200)["status"], "healthy");

    // The pinned t2v alone is over the quota, and GC may not evict it.
    cli.run(&["ensure", "--only", T2V]).ok();
    let g = cli.run(&["--json", "gc", "--auto"]).ok().json();
    assert_eq!(g["removed"], json!([]), "a pinned blob was removed: {g:#}");
    let h = api.get("/health").expect(503);
    assert_eq!(h["status"], "unhealthy", "{h:#}");
    assert_eq!(h["checks"]["disk"]["ok"], false, "{h:#}");
    assert_eq!(h["checks"]["disk_watermark"]["ok"], false, "{h:#}");
    assert_eq!(ctl_json(&d.ctl("health"))["status"], "unhealthy");

    // Unpinned, auto GC brings usage under the low watermark and health back.
    cli.run(&["unpin", T2V]).ok();
    let g = cli.run(&["--json", "gc", "--auto"]).ok().json();
    assert!(
        g["used_after"].as_u64().unwrap() <= 800_000,
        "over the low watermark: {g:#}"
    );
    assert!(api.used_bytes() <= 800_000);
    let h = api.get("/health").expect(200);
    assert_eq!(h["status"], "healthy", "{h:#}");
}

/// Reads 4 KiB at the start of chunk `idx` without kernel read-ahead.
fn read_chunk_start(path: &Path, idx: u64) -> std::io::Result<Vec<u8>> {
    let f = File::open(path)?;
    // SAFETY: fadvise on an fd we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    read_range_in(&f, idx * CS, 4096)
}

#[test]
fn health_is_degraded_while_a_source_fails() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(
        &[("a.bin", 300 * KIB), ("b.bin", 4 * CS as usize + 10)],
        CS,
        4501,
    );
    let mut opts = Opts::default();
    opts.config.fetch.cooldown_secs = 60.0;
    opts.config.fetch.read_timeout_secs = 5.0;
    opts.config.fetch.readahead_chunks = 0;
    let d = Daemon::start(setup.work.path(), &setup.manifest, &opts);
    let api = d.api();
    let a = d.path(&format!("{GEN}/a.bin"));
    assert_bytes_eq(&read_fresh(&a).unwrap(), setup.data("a.bin"), "a.bin");
    assert_eq!(api.get("/health").expect(200)["status"], "healthy");

    // Every chunk read fails: the source cools down and health says so.
    setup.origin.stop();
    let b = d.path(&format!("{GEN}/b.bin"));
    for idx in 0..5 {
        let err = read_chunk_start(&b, idx).expect_err("origin is down");
        assert_eq!(errno(&err), libc::EIO, "chunk {idx}: {err}");
    }
    let h = api.get("/health").expect(200);
    assert_eq!(h["status"], "degraded", "{h:#}");
    assert_eq!(h["checks"]["sources"]["ok"], false, "{h:#}");
    assert_eq!(h["checks"]["sources"]["critical"], false);
    assert_eq!(ctl_json(&d.ctl("health"))["status"], "degraded");
    // Cached data is still served.
    assert_bytes_eq(
        &read_fresh(&a).unwrap(),
        setup.data("a.bin"),
        "cached a.bin",
    );
}

/// A source that accepts requests and never answers (a hung proxy): the read fails with EIO at
/// `read_timeout_secs`, and the source counts as failing, so health turns `degraded` (the
/// runbook's "stuck fetches" once said health could stay `healthy`).
#[test]
fn health_is_degraded_while_a_source_hangs() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("a.bin", 2 * CS as usize)], CS, 4503);
    let mut opts = Opts::default();
    opts.config.fetch.read_timeout_secs = 1.0;
    opts.config.fetch.readahead_chunks = 0;
    let d = Daemon::start(setup.work.path(), &setup.manifest, &opts);
    let api = d.api();
    assert_eq!(api.get("/health").expect(200)["status"], "healthy");
    setup
        .origin
        .add_fault(Fault::Delay(Duration::from_secs(30)), None, None);
    let a = d.path(&format!("{GEN}/a.bin"));
    let err = read_chunk_start(&a, 0).expect_err("the source hangs");
    assert_eq!(errno(&err), libc::EIO, "{err}");
    let h = api.get("/health").expect(200);
    assert_eq!(h["status"], "degraded", "{h:#}");
    assert_eq!(h["checks"]["sources"]["ok"], false, "{h:#}");
}

#[test]
fn health_is_degraded_when_every_read_of_a_small_model_fails() {
    if no_fuse() {
        return;
    }
    // The only source of a one-chunk model is down: every read fails with EIO. Health must not
    // say "healthy, no source is failing" however few distinct chunks were tried.
    let setup = GenSetup::new(&[("tiny.json", 2000)], CS, 4502);
    let mut opts = Opts::default();
    opts.config.fetch.cooldown_secs = 60.0;
    opts.config.fetch.read_timeout_secs = 5.0;
    let d = Daemon::start(setup.work.path(), &setup.manifest, &opts);
    let api = d.api();
    setup.origin.stop();
    let p = d.path(&format!("{GEN}/tiny.json"));
    for _ in 0..5 {
        let err = read_fresh(&p).expect_err("origin is down");
        assert_eq!(errno(&err), libc::EIO, "{err}");
    }
    let h = api.get("/health").expect(200);
    assert_eq!(h["status"], "degraded", "{h:#}");
    assert_eq!(h["checks"]["sources"]["ok"], false, "{h:#}");
}

#[test]
fn credentials_in_source_urls_are_never_shown() {
    if no_fuse() {
        return;
    }
    // A mirror URL with credentials in it: /config masks it, and so must every other view that
    // names a source (metrics labels, health details), since reads are open to any client.
    let work = workdir();
    let src = work.path().join("src");
    let files = gen_files(
        &src,
        GEN,
        &[("a.bin", 300 * KIB), ("b.bin", 4 * CS as usize)],
        4701,
    );
    let origin = Origin::start(&src);
    let base = origin
        .base(GEN)
        .replace("http://", "http://mirror:hunter2@");
    let opts = BuildOpts {
        chunk_size: Some(CS),
        sources: vec![base],
        whole_only: false,
    };
    let entry = manifest_build(&src.join(GEN), GEN, &opts);
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[entry]);
    let mut opts = Opts::default();
    opts.config.fetch.cooldown_secs = 60.0;
    opts.config.fetch.readahead_chunks = 0;
    let d = Daemon::start(work.path(), &manifest, &opts);
    let api = d.api();
    let got = read_fresh(&d.path(&format!("{GEN}/a.bin"))).expect("read through the mirror");
    assert_bytes_eq(&got, data_of(&files, "a.bin"), "a.bin");
    // Make the source fail so health names it.
    origin.stop();
    for idx in 0..4 {
        let _ = read_chunk_start(&d.path(&format!("{GEN}/b.bin")), idx);
    }
    assert_eq!(api.get("/health").json()["status"], "degraded");
    let views = [
        ("GET /config", api.get("/config").text),
        ("GET /metrics", api.get("/metrics").text),
        ("GET /health", api.get("/health").text),
        ("GET /events", api.get("/events?limit=1000").text),
        (".wan/config", ctl_read(&d.ctl("config"))),
        (".wan/metrics", ctl_read(&d.ctl("metrics"))),
        (".wan/health", ctl_read(&d.ctl("health"))),
        (".wan/events", ctl_read(&d.ctl("events"))),
        (".wan/status", ctl_read(&d.ctl("status"))),
    ];
    let leaks: Vec<String> = views
        .iter()
        .filter(|(_, text)| text.contains("hunter2"))
        .map(|(what, text)| {
            let line = text.lines().find(|l| l.contains("hunter2")).unwrap_or("");
            format!("{what}: {}", line.trim())
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "the source password is shown:\n{}",
        leaks.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// GC
// ---------------------------------------------------------------------------------------------

#[test]
fn gc_under_a_quota_keeps_the_pinned_model() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let manifest = fixture_manifest(work.path());
    // Above the high watermark (4.05 MB) with everything, under the limit itself.
    const MAX: u64 = 4_500_000;
    let low = (MAX as f64 * 0.8) as u64;
    let mut opts = Opts::default();
    opts.config.gc.max_bytes = MAX;
    opts.config.gc.high_watermark = 0.9;
    opts.config.gc.low_watermark = 0.8;
    opts.config.gc.interval_secs = 3600.0;
    let d = Daemon::start(work.path(), &manifest, &opts);
    let api = d.api();
    let cli = d.cli();

    // Auto GC runs as soon as a commit crosses the high watermark: the other models are
    // pinned while they are fetched, so it finds nothing to evict then, and unpinning them
    // wakes nothing (the interval is an hour): the GCs below see the cache above the mark.
    for id in [I2V, TI2V] {
        cli.run(&["pin", id]).ok();
    }
    cli.run(&["ensure", "--all"]).ok();
    for id in [I2V, TI2V] {
        cli.run(&["unpin", id]).ok();
    }
    assert_eq!(api.used_bytes(), ALL_BYTES);
    assert!(ALL_BYTES > (MAX as f64 * 0.9) as u64 && ALL_BYTES < MAX);
    let h = api.get("/health").expect(200);
    assert_eq!(h["status"], "degraded", "above the high watermark: {h:#}");
    assert_eq!(h["checks"]["disk_watermark"]["ok"], false);

    // A dry run says what would go, and removes nothing.
    let dry = cli
        .run(&["--json", "gc", "--auto", "--dry-run"])
        .ok()
        .json();
    assert!(!dry["removed"].as_array().unwrap().is_empty(), "{dry:#}");
    assert!(dry["used_after"].as_u64().unwrap() <= low, "{dry:#}");
    assert_eq!(api.used_bytes(), ALL_BYTES);

    let g = cli.run(&["--json", "gc", "--auto"]).ok().json();
    let used_after = g["used_after"].as_u64().unwrap();
    assert!(used_after <= low, "not under the low watermark: {g:#}");
    assert_eq!(api.used_bytes(), used_after);
    let removed = g["removed"].as_array().unwrap();
    assert!(!removed.is_empty());
    // Down to the low watermark, not further: without the last blob removed it was above.
    let last = removed.last().unwrap()["bytes"].as_u64().unwrap();
    assert!(used_after + last > low, "evicted more than needed: {g:#}");
    let view = CacheView::new(&d.cache);
    for item in removed {
        assert!(
            !item["models"].as_array().unwrap().contains(&json!(T2V)),
            "a blob of the pinned model was removed: {item}"
        );
        let blob = item["blob"].as_str().unwrap();
        assert!(!view.blob_path(blob).exists(), "{blob} still on disk");
    }
    // Least recently used first.
    let times: Vec<u64> = removed
        .iter()
        .map(|i| i["last_access"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "not LRU: {times:?}");
    let t2v = api.model(T2V);
    assert_eq!(t2v["state"], "COMPLETE", "{t2v:#}");
    assert_eq!(t2v["bytes_cached"], 2_624_424);
    for rel in fixture_files(T2V) {
        let got = read_fresh(&d.path(&format!("{T2V}/{rel}"))).unwrap();
        assert_bytes_eq(&got, &fixture_bytes(T2V, &rel), &rel);
    }
    assert!(view.check_consistent().is_ok());
    assert_eq!(api.get("/health").expect(200)["status"], "healthy");
    assert!(
        api.count_events("evict", TI2V, "success") + api.count_events("evict", I2V, "success") > 0
    );

    // A model pinned at run time is spared too; aggressive takes everything else. (The
    // ensure crosses the high watermark again: i2v is pinned while it is fetched, or auto GC
    // would evict its blobs under the ensure.)
    cli.run(&["pin", TI2V]).ok();
    cli.run(&["pin", I2V]).ok();
    cli.run(&["ensure", "--all"]).ok();
    cli.run(&["unpin", I2V]).ok();
    let g = cli.run(&["--json", "gc", "--aggressive"]).ok().json();
    assert_eq!(g["used_after"], T2V_BYTES + TI2V_BYTES, "{g:#}");
    assert_eq!(api.model(TI2V)["state"], "COMPLETE");
    assert_eq!(api.model(T2V)["state"], "COMPLETE");
    assert_eq!(api.model(I2V)["state"], "PARTIAL");
}

#[test]
fn gc_runs_by_itself_above_the_high_watermark() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let manifest = fixture_manifest(work.path());
    const MAX: u64 = 4_000_000;
    let mut opts = Opts::default();
    opts.config.gc.max_bytes = MAX;
    opts.config.gc.interval_secs = 0.2;
    let d = Daemon::start(work.path(), &manifest, &opts);
    let api = d.api();
    let cli = d.cli();
    cli.run(&["ensure", "--only", &format!("{T2V},{TI2V}")])
        .ok();
    cli.run(&["ensure", "--only", I2V]).ok();
    // GC wakes when a commit crosses the high watermark, possibly before the last chunks
    // of the ensure land; it takes usage down to the low mark, and what lands after may
    // leave it between the two marks, where no GC is due.
    let high = (MAX as f64 * 0.9) as u64;
    let mut used = 0;
    let ok = wait_until(Duration::from_secs(20), || {
        used = api.used_bytes();
        used <= high && d.log().contains("gc completed mode=Auto")
    });
    assert!(ok, "usage {used} never went under {high} by itself");
    assert!(ALL_BYTES > high, "the test must cross the high watermark");
    assert!(
        d.log().contains("crossed the high watermark"),
        "{}",
        d.log()
    );
    assert_eq!(api.model(T2V)["state"], "COMPLETE");
    assert!(CacheView::new(&d.cache).check_consistent().is_ok());
}

/// Eight readers read whole files of an unpinned model over and over, comparing every byte,
/// while GC (aggressive, through `.wan/gc` and HTTP alternately) evicts whatever is not open.
fn gc_while_readers_stream(passthrough: bool, seed: u64) {
    const FILES: usize = 12;
    const READERS: usize = 8;
    let names: Vec<String> = (0..FILES).map(|i| format!("shard-{i:02}.bin")).collect();
    let specs: Vec<(&str, usize)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), 3 * CS as usize - 100 * i))
        .collect();
    let setup = GenSetup::new(&specs, CS, seed);
    let mut opts = Opts::default();
    opts.config.mount.passthrough = passthrough;
    let d = Daemon::start(setup.work.path(), &setup.manifest, &opts);
    let api = d.api();

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let data: Arc<Vec<(PathBuf, Vec<u8>)>> = Arc::new(
        names
            .iter()
            .map(|n| (d.path(&format!("{GEN}/{n}")), setup.data(n).to_vec()))
            .collect(),
    );
    let readers: Vec<_> = (0..READERS)
        .map(|t| {
            let (stop, rounds, errors, data) =
                (stop.clone(), rounds.clone(), errors.clone(), data.clone());
            std::thread::spawn(move || {
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (path, want) = &data[(t * 5 + round) % data.len()];
                    round += 1;
                    match read_fresh(path) {
                        Ok(got) if got == *want => {}
                        Ok(got) => {
                            let at = got.iter().zip(want).position(|(a, b)| a != b);
                            errors.lock().unwrap().push(format!(
                                "{}: {} bytes, want {}, first difference at {at:?}",
                                path.display(),
                                got.len(),
                                want.len()
                            ));
                        }
                        Err(e) => errors
                            .lock()
                            .unwrap()
                            .push(format!("{}: {e}", path.display())),
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let started = Instant::now();
    let mut gcs = 0;
    let mut evicted = 0;
    let mut orphans = 0;
    while started.elapsed() < Duration::from_secs(4) || gcs < 20 {
        match gcs % 3 {
            0 => ctl_write(&d.ctl("gc"), "aggressive\n").expect("write .wan/gc"),
            1 => {
                let g = api.post("/gc?mode=aggressive", None, None).expect(200);
                evicted += g["removed"].as_array().unwrap().len();
            }
            _ => {
                // deep-clean also removes blob files the index does not name: never one
                // that is being fetched right now.
                let g = api.post("/gc?mode=deep-clean", None, None).expect(200);
                evicted += g["removed"].as_array().unwrap().len();
                assert_eq!(g["bad_chunks"], 0, "{g:#}");
                orphans += g["orphans_removed"].as_u64().unwrap();
            }
        }
        gcs += 1;
        std::thread::sleep(Duration::from_millis(30));
        if !errors.lock().unwrap().is_empty() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader panicked");
    }
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} bad reads, first: {:#?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let rounds = rounds.load(Ordering::Relaxed);
    assert!(
        rounds >= 3 * READERS as u64,
        "only {rounds} whole-file reads"
    );
    assert!(evicted > 0, "GC never evicted anything in {gcs} runs");
    let gets = setup.origin.gets("").len();
    assert!(
        gets > 3 * FILES,
        "evicted files were never fetched again ({gets} GETs)"
    );
    // Consistent once quiet: a GC started by the last `.wan/gc` write may still be evicting
    // (the blob file goes before its rows), and read-ahead may still be committing.
    let view = CacheView::new(&d.cache);
    wait_until(Duration::from_secs(10), || view.check_consistent().is_ok());
    if let Err(e) = view.check_consistent() {
        panic!("cache inconsistent after GC under load:\n{e}");
    }
    assert!(!d.log().contains("gc from .wan/gc failed"), "{}", d.log());
    eprintln!(
        "{rounds} whole-file reads, {gcs} GC runs, {evicted} blobs evicted over HTTP, \
         {orphans} orphan files removed, {gets} GETs"
    );
}

#[test]
fn gc_while_8_readers_stream_passthrough() {
    if no_fuse() {
        return;
    }
    gc_while_readers_stream(true, 4601);
}

#[test]
fn gc_while_8_readers_stream_daemon_reads() {
    if no_fuse() {
        return;
    }
    gc_while_readers_stream(false, 4602);
}

#[test]
fn require_token_applies_to_loopback_clients_too() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let manifest = fixture_manifest(work.path());
    let token = "tok-loopback-7f1c";
    let opts = Opts::default()
        .env("WAN_HTTP_TOKEN", token)
        .env("WAN_HTTP_REQUIRE_TOKEN", "true");
    let d = Daemon::start(work.path(), &manifest, &opts);
    let local = Api::new(d.http, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(local.get("/health").status, 200, "reads stay open");
    assert_eq!(
        local.post(&format!("/models/{I2V}/pin"), None, None).status,
        403
    );
    assert_eq!(
        local
            .post(&format!("/models/{I2V}/pin"), None, Some("wrong"))
            .status,
        403
    );
    assert_eq!(local.get(&format!("/models/{I2V}")).json()["pinned"], false);
    local
        .post(&format!("/models/{I2V}/pin"), None, Some(token))
        .expect(200);
    assert_eq!(local.get(&format!("/models/{I2V}")).json()["pinned"], true);
}

/// An ensure holds the blob it fills as an open file does: a GC while it runs (an aggressive
/// one here; auto GC is woken by the ensure's own commits at the high watermark) spares it, and
/// the ensure completes.
#[test]
fn gc_during_an_ensure_spares_the_blob_being_filled() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("slow.bin", 6 << 20)], 1 << 20, 77);
    // About 1 MiB/s: the ensure takes seconds, and the GC below lands in the middle of it.
    setup.origin.add_fault(Fault::Trickle(1 << 20), None, None);
    let d = Daemon::start(setup.work.path(), &setup.manifest, &Opts::default());
    let api = d.api();
    let cli = d.cli();
    let ensure = std::thread::spawn(move || cli.run(&["ensure", "--only", GEN]));
    assert!(
        wait_until(Duration::from_secs(10), || api.used_bytes() >= 1 << 20),
        "the ensure stored nothing"
    );
    let g = api.post("/gc?mode=aggressive", None, None).expect(200);
    assert_eq!(
        g["removed"].as_array().map(Vec::len),
        Some(0),
        "GC removed the blob an ensure is filling: {g:#}"
    );
    let ran = ensure.join().unwrap();
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    assert_eq!(api.model(GEN)["state"], "COMPLETE");
}
