//! The Debian package (`packaging/build-deb.sh`, `[package.metadata.deb]` in Cargo.toml),
//! installed the way an operator installs it: `apt-get install ./wanfs_*.deb` on a Debian whose
//! PID 1 is a real systemd (`../shared/systemd-ct/systemd-ct.sh`, as in tests/systemd.rs;
//! `WAN_SYSTEMD_CT` overrides the path). Checked, in order (docs/OPERATIONS.md §1):
//!
//! - install: the files where Debian looks for them (`/usr/bin/wan`, `mount.fuse.wan` where
//!   mount(8) finds it, units, man pages, completions, rules, dashboard, docs), the two conffiles,
//!   an example configuration and manifest that `wan config check` / `wan manifest check` pass,
//!   and neither unit enabled nor started;
//! - `systemctl enable --now wan22` runs the packaged binary and serves the demo models;
//! - upgrade to a newer version: the running daemon is left alone (same PID, still serving, a
//!   note says to restart), an edited conffile is kept, the unit stays enabled;
//! - `data-models.mount` mounts through the packaged `mount.fuse.wan`;
//! - remove: the daemon stopped and unmounted, the binary gone, config and cache kept;
//! - purge: `/etc/wan22`, the cache and the empty mountpoint gone, no unit state left.
//!
//! Both packages are built from the binary cargo built for the tests (`--no-build`, stripped,
//! fast compression), in seconds; a release build would take minutes and test nothing more about
//! the packaging. The container runs on a fresh copy of tests/systemd.rs's image (built first if
//! missing), deleted at the end, so nothing this test installs reaches that test.
//!
//! Where this cannot run (not root, no script, no /dev/fuse, no `cargo deb`, a container that
//! cannot boot) the test prints `SKIP: …` and passes.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::systemd_ct::{MNT, SystemdCt, cannot_boot, host_lock};
use common::*;

/// tests/systemd.rs's container, whose image this test copies (under the same lock).
const BASE: &str = "wanfs-systemd-test";
const NAME: &str = "wanfs-package-test";
/// A clean environment, and apt that asks nothing.
const ENV: &[&str] = &[
    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    "DEBIAN_FRONTEND=noninteractive",
];
const EXAMPLES: &str = "/usr/share/wanfs/examples/models";
/// A file of ti2v of several chunks.
const TI2V_WEIGHTS: &str = "diffusion_pytorch_model-00001-of-00001.safetensors";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Printed past libtest's capture, so a skip shows in a plain `cargo test`.
fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: package test: {why}");
}

/// Lists the models and reads `file` of `model` through the mount, compared with the copy the
/// package ships.
fn serving(model: &str, file: &str) -> String {
    format!(
        "ls {MNT}\n\
         cmp {MNT}/{model}/{file} {EXAMPLES}/{model}/{file}\n"
    )
}

/// `packaging/build-deb.sh --no-build` of the binary under test, at `version`, into `out`.
fn build_deb(target: &Path, version: &str, out: &Path) -> PathBuf {
    let mut cmd = Command::new(repo().join("packaging/build-deb.sh"));
    cmd.env("CARGO_TARGET_DIR", target).args([
        "--no-build",
        "--strip",
        "--fast",
        "--deb-version",
        version,
        "--output",
    ]);
    cmd.arg(out);
    let o = run_for(cmd, Duration::from_secs(300)).expect("build-deb.sh within 300 s");
    assert!(
        o.status.success(),
        "packaging/build-deb.sh --deb-version {version}: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // cargo-deb names it wanfs_VERSION_ARCH.deb; `out` holds only this one.
    let debs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    let prefix = format!("wanfs_{version}_");
    assert!(
        debs.len() == 1
            && debs[0]
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix),
        "want one {prefix}*.deb in {}, have {debs:?}",
        out.display()
    );
    debs[0].clone()
}

/// What `wan22.service` runs, from its last `ExecStart=` line.
fn exec_start(unit: &str) -> String {
    unit.lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .next_back()
        .unwrap_or_else(|| panic!("no ExecStart= in\n{unit}"))
        .to_string()
}

/// The drop-in that points the shipped unit at /usr/bin/wan runs the unit's own command: a
/// change to the unit's ExecStart must be made in the drop-in too.
#[test]
fn package_drop_in_runs_the_units_command_from_usr_bin() {
    let unit = std::fs::read_to_string(repo().join("systemd/wan22.service")).unwrap();
    let drop_in =
        std::fs::read_to_string(repo().join("packaging/systemd/wan22.service.d/package.conf"))
            .unwrap();
    assert!(
        drop_in.contains("\nExecStart=\n"),
        "the drop-in must clear the unit's ExecStart first:\n{drop_in}"
    );
    assert_eq!(
        exec_start(&drop_in),
        exec_start(&unit).replacen("/usr/local/bin/wan", "/usr/bin/wan", 1)
    );
}

#[test]
fn package_installs_upgrades_removes_and_purges_under_systemd() {
    if let Some(why) = cannot_boot() {
        return skip(&why);
    }
    // The daemon in the container mounts through this host's /dev/fuse.
    if no_fuse() {
        return;
    }
    match Command::new("cargo").args(["deb", "--version"]).output() {
        Ok(o) if o.status.success() => {}
        _ => return skip("no `cargo deb` (cargo install cargo-deb --locked)"),
    }
    // One container run at a time on a host; the base image is copied only while no one runs it.
    let lock = host_lock();

    let staging = tempfile::Builder::new()
        .prefix("package-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let target = staging.path().join("target");
    let host = staging.path().join("host");
    std::fs::create_dir_all(target.join("release")).unwrap();
    std::fs::create_dir_all(host.join("v2")).unwrap();
    let wan = target.join("release/wan");
    if std::fs::hard_link(wan_bin(), &wan).is_err() {
        std::fs::copy(wan_bin(), &wan).expect("copying the wan binary");
    }
    let t0 = Instant::now();
    let v1 = format!("{}-1", env!("CARGO_PKG_VERSION"));
    let v2 = format!("{}-2", env!("CARGO_PKG_VERSION"));
    let deb1 = build_deb(&target, &v1, &host);
    let deb2 = build_deb(&target, &v2, &host.join("v2"));
    let deb1 = format!("/host/{}", deb1.file_name().unwrap().to_string_lossy());
    let deb2 = format!("/host/v2/{}", deb2.file_name().unwrap().to_string_lossy());
    let _ = writeln!(
        std::io::stderr(),
        "package: two .debs built in {:.0?}",
        t0.elapsed()
    );

    // The base image: tests/systemd.rs's, built now if that test has not run on this host.
    let base_ct = SystemdCt::new(BASE, ENV, Duration::from_secs(120));
    let base = base_ct.root();
    base_ct.down();
    if !base.join("usr/lib/systemd/systemd").exists()
        && let Err(why) = base_ct.up(None)
    {
        return skip(&why);
    }
    drop(base_ct);
    // A fresh copy (a left-over one from an interrupted run powered off first), less what
    // tests/systemd.rs installs by hand: this host has never seen wanfs.
    let c = SystemdCt::new(NAME, ENV, Duration::from_secs(120)).deleting_root();
    c.down();
    let root = c.root();
    let _ = std::fs::remove_dir_all(&root);
    let cp = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&base)
        .arg(&root)
        .status()
        .expect("cp");
    assert!(
        cp.success(),
        "copying {} to {}",
        base.display(),
        root.display()
    );
    for gone in [
        "usr/local/bin/wan",
        "usr/sbin/mount.fuse.wan",
        "etc/wan22",
        "etc/systemd/system/wan22.service",
        "etc/systemd/system/data-models.mount",
        "var/cache/wan22",
        "data",
    ] {
        let p = root.join(gone);
        let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
        assert!(
            std::fs::symlink_metadata(&p).is_err(),
            "{} left",
            p.display()
        );
    }
    if let Err(why) = c.up(Some(&host)) {
        return skip(&why);
    }

    // Install. Nothing enabled, nothing started: /data/models may already be in use on a host.
    c.ok("apt install", &format!("apt-get install -y {deb1}"));
    assert_eq!(c.text("dpkg-query -W -f='${Version}' wanfs"), v1);
    assert!(
        c.text("dpkg-query -W -f='${Depends}' wanfs")
            .contains("fuse3"),
        "the package must depend on fuse3"
    );
    c.ok(
        "the installed files",
        "test -x /usr/bin/wan
         test \"$(readlink /usr/sbin/mount.fuse.wan)\" = ../bin/wan
         test \"$(readlink -f /sbin/mount.fuse.wan)\" = /usr/bin/wan
         test -f /usr/lib/systemd/system/wan22.service
         test -f /usr/lib/systemd/system/data-models.mount
         zcat /usr/share/man/man1/wan.1.gz | grep -q '^.TH wan 1'
         zcat /usr/share/man/man1/wan-mount.1.gz | grep -q '^.TH wan-mount 1'
         grep -q wan /usr/share/bash-completion/completions/wan
         grep -q '#compdef wan' /usr/share/zsh/vendor-completions/_wan
         grep -q 'complete -c wan' /usr/share/fish/vendor_completions.d/wan.fish
         grep -q 'alert:' /usr/share/wanfs/prometheus/wan-alerts.yml
         grep -q '\"panels\"' /usr/share/wanfs/grafana/grafana-dashboard.json
         test -f /usr/share/doc/wanfs/OPERATIONS.md
         test -d /data/models",
    );
    for unit in ["wan22.service", "data-models.mount"] {
        assert_eq!(
            std::fs::read_to_string(c.path("/usr/lib/systemd/system").join(unit)).unwrap(),
            std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap(),
            "{unit}: the package installs the unit of systemd/ as it is"
        );
    }
    let conffiles = c.text("dpkg-query -W -f='${Conffiles}' wanfs");
    for f in ["/etc/wan22/wan.toml", "/etc/wan22/models.toml"] {
        assert!(conffiles.contains(f), "{f} is not a conffile:\n{conffiles}");
    }
    let checked = c.ok_all(
        "the example is valid",
        "wan config check /etc/wan22/wan.toml
         wan manifest check /etc/wan22/models.toml",
    );
    assert!(checked.contains("ok: 3 models"), "{checked}");
    assert_eq!(c.text("systemctl is-enabled wan22"), "disabled");
    assert_eq!(c.text("systemctl is-enabled data-models.mount"), "disabled");
    assert_eq!(c.text("systemctl is-active wan22"), "inactive");
    assert_eq!(c.mounts(), "", "the package mounted something");

    // The operator's edit (the host's 127.0.0.1:8000 may be taken: the container shares its
    // network), then the service as docs/OPERATIONS.md §1a says.
    c.ok(
        "edit wan.toml",
        "sed -i 's|^addr = \"127.0.0.1:8000\"$|addr = \"\"|' /etc/wan22/wan.toml
         grep -qx 'addr = \"\"' /etc/wan22/wan.toml
         wan config check /etc/wan22/wan.toml",
    );
    let listed = c.ok_all(
        "enable --now wan22",
        &format!("systemctl enable --now wan22\n{}", serving(T2V, VAE)),
    );
    for id in [T2V, I2V, TI2V] {
        assert!(
            listed.lines().any(|l| l == id),
            "{id} not listed:\n{listed}"
        );
    }
    let pid = c.main_pid();
    assert_eq!(
        c.text(&format!("readlink /proc/{pid}/exe")),
        "/usr/bin/wan",
        "wan22 must run the packaged binary"
    );

    // Upgrade under the running daemon: it keeps serving, the edit stays.
    let upgraded = c.ok_all(
        "apt install (upgrade)",
        &format!("apt-get install -y {deb2}"),
    );
    assert_eq!(c.text("dpkg-query -W -f='${Version}' wanfs"), v2);
    assert!(
        upgraded.contains("wan22 still runs the previous wan"),
        "no note to restart:\n{upgraded}"
    );
    assert_eq!(c.main_pid(), pid, "the upgrade restarted the daemon");
    c.ok("serving after the upgrade", &serving(TI2V, TI2V_WEIGHTS));
    c.ok(
        "the edited conffile is kept",
        "grep -qx 'addr = \"\"' /etc/wan22/wan.toml
         ! ls /etc/wan22/*.dpkg-* 2>/dev/null",
    );
    assert_eq!(c.text("systemctl is-enabled wan22"), "enabled");
    c.ok(
        "restart wan22",
        &format!("systemctl restart wan22\n{}", serving(I2V, VAE)),
    );
    let pid = c.main_pid();
    assert_eq!(c.text(&format!("readlink /proc/{pid}/exe")), "/usr/bin/wan");

    // The mount unit, through the packaged /sbin/mount.fuse.wan (docs/OPERATIONS.md §1b).
    c.ok(
        "data-models.mount",
        &format!(
            "systemctl stop wan22\nsystemctl start data-models.mount\n{}",
            serving(T2V, "configuration.json")
        ),
    );
    let m = c.mounts();
    assert!(m.starts_with("fuse") && m.ends_with(" wanfs"), "{m}");
    c.ok("stop data-models.mount", "systemctl stop data-models.mount");
    assert_eq!(c.mounts(), "");

    // Remove: stops the running service (and unmounts), keeps configuration and cache.
    c.ok(
        "apt remove",
        "install -m 0600 /dev/null /etc/wan22/wan.env
         systemctl start wan22
         ls /data/models >/dev/null
         apt-get remove -y wanfs",
    );
    assert_eq!(c.mounts(), "", "remove left a mount{}", c.diagnostics());
    assert_ne!(c.text("systemctl is-active wan22"), "active");
    assert_eq!(
        c.text("dpkg-query -W -f='${Status}' wanfs"),
        "deinstall ok config-files"
    );
    c.ok(
        "what remove keeps",
        "test ! -e /usr/bin/wan
         test ! -e /usr/sbin/mount.fuse.wan
         grep -qx 'addr = \"\"' /etc/wan22/wan.toml
         test -f /etc/wan22/wan.env
         test -d /var/cache/wan22/v1/blobs",
    );

    // Purge: configuration, secrets, cache, the empty mountpoint and the units' state.
    let purged = c.ok_all("apt purge", "apt-get purge -y wanfs");
    assert!(!purged.contains("not empty"), "{purged}");
    c.ok(
        "what purge removes",
        "! dpkg-query -W wanfs 2>/dev/null
         test ! -e /etc/wan22
         test ! -e /var/cache/wan22
         test ! -e /data/models
         test ! -e /etc/systemd/system/wan22.service
         test ! -e /etc/systemd/system/multi-user.target.wants/wan22.service
         test ! -e /etc/systemd/system/data-models.mount",
    );
    let _ = writeln!(
        std::io::stderr(),
        "package: all checks done {:.0?} after the build began",
        t0.elapsed()
    );
    drop(c);
    drop(lock);
}
