//! A Debian container whose PID 1 is a real systemd, booted by
//! `../shared/systemd-ct/systemd-ct.sh` (`WAN_SYSTEMD_CT` overrides the path), for
//! tests/systemd.rs and tests/package.rs: boot, run scripts inside, look at the mount at
//! `/data/models`, and power off when dropped (also when a check panics).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::run_for;

/// Where systemd-ct.sh keeps each container's root filesystem.
pub const MACHINES: &str = "/var/lib/machines";
/// Where both tests mount (docs/OPERATIONS.md §1).
pub const MNT: &str = "/data/models";

/// `../shared/systemd-ct/systemd-ct.sh` (or `$WAN_SYSTEMD_CT`).
pub fn systemd_ct_script() -> PathBuf {
    std::env::var_os("WAN_SYSTEMD_CT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/systemd-ct/systemd-ct.sh")
        })
}

/// Why no container can boot here (not root, no script), checked before anything is built.
pub fn cannot_boot() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (systemd-nspawn)".into());
    }
    let script = systemd_ct_script();
    (!script.exists()).then(|| format!("no {}", script.display()))
}

/// One container run at a time on a host (every checkout shares the image); held until dropped.
pub fn host_lock() -> File {
    let lock =
        File::create(std::env::temp_dir().join("wanfs-systemd-test.lock")).expect("lock file");
    lock.lock().expect("locking the container");
    lock
}

/// The container `name`; powered off when dropped (and its root deleted, for a throw-away copy).
pub struct SystemdCt {
    name: &'static str,
    /// `env -i` before every script: PATH and whatever else the test needs.
    env: &'static [&'static str],
    /// How long [`SystemdCt::ok`] lets a script run.
    ok_limit: Duration,
    delete_root: bool,
}

impl SystemdCt {
    pub fn new(name: &'static str, env: &'static [&'static str], ok_limit: Duration) -> Self {
        SystemdCt {
            name,
            env,
            ok_limit,
            delete_root: false,
        }
    }

    /// Also deletes the container's root filesystem when dropped.
    pub fn deleting_root(mut self) -> Self {
        self.delete_root = true;
        self
    }

    /// Its root filesystem, seen from here.
    pub fn root(&self) -> PathBuf {
        Path::new(MACHINES).join(self.name)
    }

    /// A path inside the container, seen from here.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    fn ctl(&self, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(systemd_ct_script()).args(args);
        c
    }

    /// Powers it off (a no-op if it is not running); false if that did not finish in time.
    pub fn down(&self) -> bool {
        run_for(self.ctl(&["down", self.name]), Duration::from_secs(60)).is_some()
    }

    /// Boots it, with `host` at /host if given (building the image on first use); why not, if
    /// it did not.
    pub fn up(&self, host: Option<&Path>) -> Result<(), String> {
        let host = host.map(|h| h.to_string_lossy().into_owned());
        let mut args = vec!["up", self.name];
        args.extend(host.as_deref());
        match run_for(self.ctl(&args), Duration::from_secs(600)) {
            Some(o) if o.status.success() => Ok(()),
            Some(o) => Err(format!(
                "the container did not boot ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            None => Err("the container did not boot within 600 s".into()),
        }
    }

    fn exec(&self, script_flags: &str, script: &str) -> Command {
        let mut args = vec!["exec", self.name, "env", "-i"];
        args.extend(self.env);
        args.extend(["sh", script_flags, script]);
        self.ctl(&args)
    }

    /// Runs `sh -ec SCRIPT` inside, with a clean environment.
    pub fn sh(&self, script: &str, timeout: Duration) -> Output {
        run_for(self.exec("-ec", script), timeout).unwrap_or_else(|| {
            panic!(
                "did not finish within {timeout:?}: {script}\n{}",
                self.diagnostics()
            )
        })
    }

    /// Runs `script` inside, panics (with the units' state and log) unless it succeeds;
    /// returns its stdout.
    #[track_caller]
    pub fn ok(&self, what: &str, script: &str) -> String {
        let out = self.checked(what, script);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// As [`SystemdCt::ok`], but returns stdout and stderr.
    #[track_caller]
    pub fn ok_all(&self, what: &str, script: &str) -> String {
        let out = self.checked(what, script);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    #[track_caller]
    fn checked(&self, what: &str, script: &str) -> Output {
        let out = self.sh(script, self.ok_limit);
        assert!(
            out.status.success(),
            "{what}: failed ({})\n--- script\n{script}\n--- stdout\n{}--- stderr\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.diagnostics()
        );
        out
    }

    /// stdout of `script`, trimmed, whatever its exit status.
    pub fn text(&self, script: &str) -> String {
        String::from_utf8_lossy(&self.sh(script, Duration::from_secs(30)).stdout)
            .trim()
            .to_string()
    }

    /// The package, the units' state and their log, for a failure message.
    pub fn diagnostics(&self) -> String {
        let cmd = self.exec(
            "-c",
            "dpkg-query -W wanfs 2>&1; systemctl status --no-pager wan22 data-models.mount 2>&1;\
             echo '--- journal'; journalctl -b --no-pager -n 60 -u wan22 -u data-models.mount 2>&1",
        );
        run_for(cmd, Duration::from_secs(30))
            .map(|o| {
                format!(
                    "\n--- in the container\n{}",
                    String::from_utf8_lossy(&o.stdout)
                )
            })
            .unwrap_or_default()
    }

    /// The mounts at /data/models, as "FSTYPE SOURCE" lines ("" if none).
    pub fn mounts(&self) -> String {
        self.text(&format!(
            r#"awk '$5 == "{MNT}" {{ for (i = 7; $i != "-"; i++) ; print $(i + 1), $(i + 2) }}' /proc/self/mountinfo"#
        ))
    }

    /// Exactly one mount at /data/models, and it is wanfs (fstype `fuse` or `fuse.wan`).
    #[track_caller]
    pub fn assert_mounted(&self, what: &str) {
        let m = self.mounts();
        let ok = m.lines().count() == 1 && m.starts_with("fuse") && m.ends_with(" wanfs");
        assert!(ok, "{what}: want one wanfs mount at {MNT}, have:\n{m}");
    }

    #[track_caller]
    pub fn assert_unmounted(&self, what: &str) {
        let m = self.mounts();
        assert!(
            m.is_empty(),
            "{what}: still mounted at {MNT}:\n{m}{}",
            self.diagnostics()
        );
    }

    pub fn main_pid(&self) -> String {
        self.text("systemctl show -p MainPID --value wan22")
    }

    /// Polls `check` (a script) until it succeeds, for at most `limit`; whether it did.
    pub fn poll(&self, check: &str, limit: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            if self.sh(check, Duration::from_secs(30)).status.success() {
                return true;
            }
            if t0.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for SystemdCt {
    fn drop(&mut self) {
        if !self.down() {
            let _ = writeln!(
                std::io::stderr(),
                "systemd-ct: {} did not power off",
                self.name
            );
            return;
        }
        if self.delete_root {
            let _ = std::fs::remove_dir_all(self.root());
        }
    }
}
