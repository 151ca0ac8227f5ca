//! The daemon under test: spawns the real `wan mount`, waits until the mount is live, and always
//! cleans up (SIGTERM, then SIGKILL, then `umount -l`), printing the daemon log when a test fails.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wanfs::config::{Config, FetchConfig, HttpConfig, MountConfig};

use super::origin::wait_until;

/// How long a daemon gets to mount, and to exit after SIGTERM.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// The `--config` of a test daemon: the daemon's own [`Config`] with values that keep tests
/// fast. A test sets the fields it needs; [`MountSpec::spawn`] writes it with
/// [`config_toml`], so a renamed or retyped key fails to compile here, not at the daemon.
pub fn test_config() -> Config {
    Config {
        fetch: FetchConfig {
            connections: 8,
            max_inflight_mib: 64,
            read_timeout_secs: 10.0,
            request_timeout_secs: 2.0,
            retries: 3,
            backoff_ms: 10,
            cooldown_secs: 1.0,
            readahead_chunks: 4,
            part_size_kib: 1024,
            ..FetchConfig::default()
        },
        mount: MountConfig {
            passthrough: true,
            ..MountConfig::default()
        },
        // No HTTP endpoint, so parallel daemons do not fight over the default 127.0.0.1:8000.
        http: HttpConfig {
            addr: String::new(),
            ..HttpConfig::default()
        },
        ..Config::default()
    }
}

/// `config` as the text of a config file.
pub fn config_toml(config: &Config) -> String {
    toml::to_string(config).expect("a Config serializes")
}

/// Writes `config` to `path` as a config file.
pub fn write_config(path: &Path, config: &Config) {
    fs::write(path, config_toml(config))
        .unwrap_or_else(|e| panic!("write config {}: {e}", path.display()));
}

/// Everything needed to (re)start a daemon on the same mountpoint and cache.
#[derive(Clone, Debug)]
pub struct MountSpec {
    pub mountpoint: PathBuf,
    pub manifest: PathBuf,
    pub cache_dir: PathBuf,
    pub config: Config,
    /// Extra environment (e.g. `HF_ENDPOINT`, `HF_TOKEN`).
    pub env: Vec<(String, String)>,
    /// Where config files and daemon logs go.
    pub work: PathBuf,
}

impl MountSpec {
    /// A spec with `mnt/` and `cache/` under `work`, the default test config.
    pub fn new(work: &Path, manifest: &Path) -> MountSpec {
        MountSpec {
            mountpoint: work.join("mnt"),
            manifest: manifest.to_path_buf(),
            cache_dir: work.join("cache"),
            config: test_config(),
            env: Vec::new(),
            work: work.to_path_buf(),
        }
    }

    pub fn config(mut self, config: Config) -> MountSpec {
        self.config = config;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> MountSpec {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Spawns `wan mount` for this spec without waiting; stdout and stderr go to a new log file.
    /// Panics where FUSE cannot mount (the daemon checks the device before anything else): the
    /// test should have returned at its `no_fuse()`.
    pub fn spawn(&self) -> (Child, PathBuf) {
        super::fuse::assert_fuse();
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        // A dead mount left by a killed daemon stats as ENOTCONN: the directory is there.
        if let Err(e) = fs::create_dir_all(&self.mountpoint)
            && e.kind() != io::ErrorKind::AlreadyExists
        {
            panic!("create mountpoint {}: {e}", self.mountpoint.display());
        }
        fs::create_dir_all(&self.cache_dir).expect("create cache dir");
        let config = self.work.join(format!("wan-{n}.toml"));
        write_config(&config, &self.config);
        let log_path = self.work.join(format!("daemon-{n}.log"));
        let log = File::create(&log_path).expect("create daemon log");
        let mut cmd = Command::new(super::wan_bin());
        cmd.arg("mount")
            .arg(&self.mountpoint)
            .arg("--manifest")
            .arg(&self.manifest)
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .arg("--config")
            .arg(&config)
            .env(
                "WAN_LOG",
                std::env::var("WAN_TEST_LOG").unwrap_or_else(|_| "info,wanfs=debug".to_owned()),
            )
            .env_remove("HF_TOKEN")
            .env_remove("HF_ENDPOINT")
            // The suite's own variables: the daemon would warn about them as unknown.
            .env_remove("WAN_TEST_LOG")
            .env_remove("WAN_TEST_BIN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn wan mount");
        (child, log_path)
    }
}

/// A live `wan mount`. Dropping it stops the daemon and makes sure nothing stays mounted.
pub struct Mount {
    pub spec: MountSpec,
    child: Option<Child>,
    log_path: PathBuf,
    /// Set by [`Mount::kill9`]: the dead mount is handed over to a [`DeadMount`].
    handed_over: bool,
}

impl Mount {
    /// Starts the daemon and waits until the mount is live; panics with the log if it is not
    /// within 20 s.
    pub fn start(spec: MountSpec) -> Mount {
        let (child, log_path) = spec.spawn();
        let mut mount = Mount {
            spec,
            child: Some(child),
            log_path,
            handed_over: false,
        };
        mount.wait_ready();
        mount
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("daemon running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                panic!(
                    "wan mount exited with {status} before mounting; log:\n{}",
                    self.log()
                );
            }
            if mount_count(&self.spec.mountpoint) >= 1
                && fs::read_dir(&self.spec.mountpoint).is_ok()
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "wan mount not live within {READY_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `mountpoint/rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.spec.mountpoint.join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// The value of the unlabelled sample `name` in the mount's `.wan/metrics`; panics if it is
    /// missing.
    pub fn metric(&self, name: &str) -> f64 {
        let text = fs::read_to_string(self.path(".wan/metrics")).expect("read .wan/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from .wan/metrics:\n{text}"))
    }

    /// The daemon's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    /// SIGTERM, then waits for the exit; returns the status. The mount must be gone afterwards
    /// (the caller asserts on the status).
    pub fn stop(mut self) -> ExitStatus {
        let child = self.child.take().expect("daemon running");
        terminate(child, &self.log_path).expect("daemon did not exit after SIGTERM")
    }

    /// `kill -9` of the daemon, leaving its dead mount behind. The returned guard restarts a
    /// daemon on the same spec, or unmounts the dead mount if dropped.
    pub fn kill9(mut self) -> DeadMount {
        let mut child = self.child.take().expect("daemon running");
        signal(&child, libc::SIGKILL);
        child.wait().expect("wait for killed daemon");
        self.handed_over = true;
        DeadMount {
            spec: self.spec.clone(),
            log: self.log(),
            restarted: false,
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.handed_over {
            return;
        }
        if let Some(child) = self.child.take()
            && terminate(child, &self.log_path).is_none()
        {
            eprintln!("wan mount did not exit after SIGTERM; killed it");
        }
        force_unmount(&self.spec.mountpoint);
        if std::thread::panicking() {
            eprintln!(
                "---- daemon log {} ----\n{}\n---- end of daemon log ----",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// A daemon killed by SIGKILL, its mount left dead.
pub struct DeadMount {
    pub spec: MountSpec,
    /// The killed daemon's log.
    pub log: String,
    restarted: bool,
}

impl DeadMount {
    /// Starts a new daemon on the same mountpoint and cache (which must clear the dead mount).
    pub fn restart(mut self) -> Mount {
        // If this panics, `self` still owns (and unmounts) the dead mount.
        let mount = Mount::start(self.spec.clone());
        self.restarted = true;
        mount
    }
}

impl Drop for DeadMount {
    fn drop(&mut self) {
        if !self.restarted {
            force_unmount(&self.spec.mountpoint);
        }
        if std::thread::panicking() {
            eprintln!("---- killed daemon's log ----\n{}\n---- end ----", self.log);
        }
    }
}

/// SIGHUP to the daemon `pid` (a child of this test): reload its manifest and config.
pub fn hup(pid: u32) {
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: plain kill(2) on the pid of a child we have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// SIGTERM and wait; SIGKILL if it does not exit in time (returns `None` then).
fn terminate(mut child: Child, log_path: &Path) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    signal(&child, libc::SIGTERM);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "daemon (log {}) ignored SIGTERM for {EXIT_TIMEOUT:?}; SIGKILL",
        log_path.display()
    );
    signal(&child, libc::SIGKILL);
    let _ = child.wait();
    None
}

/// Lazily unmounts every mount at `mountpoint` (dead or alive) until none is left.
pub fn force_unmount(mountpoint: &Path) {
    for _ in 0..5 {
        if mount_count(mountpoint) == 0 {
            return;
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(mountpoint)
            .stderr(Stdio::null())
            .status();
        wait_until(Duration::from_secs(1), || mount_count(mountpoint) == 0);
    }
    eprintln!("could not unmount {}", mountpoint.display());
}

/// How many entries of /proc/self/mountinfo have `mountpoint` as their mount point.
pub fn mount_count(mountpoint: &Path) -> usize {
    let want = fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let want = want.to_string_lossy();
    let want_raw = mountpoint.to_string_lossy();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| *p == want || *p == want_raw)
        .count()
}

fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let oct: String = chars.by_ref().take(3).collect();
            out.push(u8::from_str_radix(&oct, 8).map(char::from).unwrap_or('?'));
        } else {
            out.push(c);
        }
    }
    out
}

/// The errno of an I/O error (0 if it has none).
pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}
