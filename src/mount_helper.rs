//! `mount.fuse.wan`: the helper mount(8) runs for `fuse.wan` fstab entries and systemd mount
//! units (`ln -s /usr/local/bin/wan /sbin/mount.fuse.wan`). It starts `wan mount` detached and
//! returns once the mount answers, as mount(8) expects.
//!
//! Called as `mount.fuse.wan SOURCE MOUNTPOINT [-o OPTIONS]`; options understood: `config=`,
//! `manifest=`, `cache_dir=`, and `nonempty` (FUSE's name for `--allow-non-empty`); the generic
//! ones (`rw`, `_netdev`, `nofail`, …) are ignored.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Whether this process was started under the helper's name.
pub fn invoked_as_helper() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n == "mount.fuse.wan")
}

pub fn run() -> anyhow::Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => options.extend(
                it.next()
                    .into_iter()
                    .flat_map(|o| o.split(','))
                    .map(str::to_string),
            ),
            "-n" | "-f" | "-s" | "-v" => {}
            _ => positional.push(a.clone()),
        }
    }
    let [_source, mountpoint] = positional.as_slice() else {
        bail!("usage: mount.fuse.wan SOURCE MOUNTPOINT [-o config=FILE,...]");
    };
    let mut cmd = Command::new(std::env::current_exe().context("finding the wan binary")?);
    cmd.arg("mount").arg(mountpoint);
    for o in &options {
        if o == "nonempty" {
            cmd.arg("--allow-non-empty");
        } else if let Some((k, v)) = o.split_once('=') {
            match k {
                "config" | "manifest" => {
                    cmd.arg(format!("--{k}")).arg(v);
                }
                "cache_dir" => {
                    cmd.arg("--cache-dir").arg(v);
                }
                _ => {}
            }
        }
    }
    // Detached: its own process group, no terminal; logs go to the journal via stderr when
    // run by systemd, else nowhere.
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0);
    let mut child = cmd.spawn().context("starting wan mount")?;
    let mp = PathBuf::from(mountpoint);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        if let Some(status) = child.try_wait()? {
            bail!("wan mount exited before mounting ({status})");
        }
        if crate::system::is_fuse_mount(&std::path::absolute(&mp)?) {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{mountpoint} was not mounted within 60 s")
}
