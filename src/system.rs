//! What the daemon asks of its host, apart from serving: telling systemd its state
//! (`sd_notify`), the mount table (a dead mount left by a killed daemon, detaching, whether a
//! path is a FUSE mount), the checks a mountpoint and `/dev/fuse` must pass before anything is
//! mounted, the kernel's read-ahead for the mount, and giving freed heap back (`malloc_trim`).
//! Nothing here knows models, chunks or the cache.

use std::path::Path;

use anyhow::{Context, bail};

/// Gives glibc's free memory back to the system: building the catalog and the tree leaves
/// freed temporaries in the heap that would otherwise count as resident for the daemon's life.
pub(crate) fn trim_heap() {
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
}

/// Tells systemd (Type=notify) about our state, if it is listening.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        std::os::unix::net::SocketAddr::from_pathname(&path)
    };
    let sent = addr.and_then(|a| {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        sock.send_to_addr(msg.as_bytes(), &a)
    });
    if let Err(e) = sent {
        tracing::warn!(socket = %path, error = %e, "could not notify systemd");
    }
}

/// Waits (≤ 10 s) until the mount answers a `stat`, so READY means usable.
pub(crate) fn wait_until_answering(mountpoint: &Path) -> anyhow::Result<()> {
    let mp = mountpoint.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read_dir(&mp).map(|_| ()));
    });
    match rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!(
            "the new mount at {} does not answer: {e}",
            mountpoint.display()
        ),
        Err(_) => bail!(
            "the new mount at {} did not answer within 10 s",
            mountpoint.display()
        ),
    }
}

/// One line of /proc/self/mountinfo that matters here.
struct MountEntry {
    dev: String,
    fstype: String,
}

/// Undoes the octal escapes of /proc/self/mountinfo (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a FUSE filesystem is mounted at `path`.
pub fn is_fuse_mount(path: &Path) -> bool {
    mount_at(path).is_some_and(|m| m.fstype.starts_with("fuse"))
}

/// The last (topmost) mount at `path`, if any.
fn mount_at(path: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    text.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        if unescape(fields.get(4)?) != want {
            return None;
        }
        Some(MountEntry {
            dev: fields.get(2)?.to_string(),
            fstype: fields.get(sep + 1)?.to_string(),
        })
    })
}

/// Detaches the mount at `path` lazily: `umount2(MNT_DETACH)` as root, else `fusermount3 -u -z`.
pub(crate) fn detach(path: &Path) -> anyhow::Result<()> {
    if nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).is_ok() {
        return Ok(());
    }
    let status = std::process::Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(path)
        .status()
        .context("running fusermount3 -u -z")?;
    if !status.success() {
        bail!("could not detach the mount at {}", path.display());
    }
    Ok(())
}

/// What opening a mountpoint's root says about the daemon behind it.
#[derive(Debug)]
enum Probe {
    Answers,
    Dead,
    Silent,
    Error(std::io::Error),
}

/// Opens the directory, which the kernel always forwards to the daemon (`OPENDIR`): a `stat`
/// is answered from the kernel's attribute cache (TTL up to an hour) even when the daemon is
/// gone, so it cannot tell a dead mount from a live one.
fn probe_mount(path: &Path, timeout: std::time::Duration) -> Probe {
    let p = path.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    // A hung daemon blocks the open in the kernel; the thread is left behind in that case.
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::File::open(&p).map(|_| ()));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => Probe::Answers,
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOTCONN) => Probe::Dead,
        Ok(Err(e)) => Probe::Error(e),
        Err(_) => Probe::Silent,
    }
}

/// A daemon killed with SIGKILL leaves its mount behind ("Transport endpoint is not
/// connected"); detach it so we can mount again. A live mount is refused instead.
pub(crate) fn clear_stale_mount(path: &Path) -> anyhow::Result<()> {
    let Some(entry) = mount_at(path) else {
        return Ok(());
    };
    if !entry.fstype.starts_with("fuse") {
        return Ok(());
    }
    match probe_mount(path, std::time::Duration::from_secs(5)) {
        Probe::Dead => {
            tracing::warn!(mountpoint = %path.display(), "clearing a dead mount left by a previous daemon");
            detach(path)
        }
        Probe::Answers => bail!(
            "{} is already mounted ({}) and answering: is another wan daemon running?",
            path.display(),
            entry.fstype
        ),
        Probe::Silent => bail!(
            "{} is mounted ({}) by a daemon that does not answer within 5 s; \
             stop it, or clear the mount with `umount -l {}`",
            path.display(),
            entry.fstype,
            path.display()
        ),
        Probe::Error(e) => bail!(
            "{} is mounted ({}) and opening it fails: {e}",
            path.display(),
            entry.fstype
        ),
    }
}

/// Refuses a mountpoint that cannot be served as the operator expects, and a FUSE device that
/// cannot be opened, before anything is mounted, compiled or cached: a dead mount left by a
/// killed daemon is cleared first (it is not "non-empty"), then the path must be a directory,
/// empty unless `allow_non_empty` (mounting over files hides them), and `/dev/fuse` usable.
pub(crate) fn check_mountpoint(mountpoint: &Path, allow_non_empty: bool) -> anyhow::Result<()> {
    clear_stale_mount(mountpoint)?;
    let mp = mountpoint.display();
    let meta = match std::fs::metadata(mountpoint) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mountpoint {mp} does not exist: create it (`install -d {mp}`) or name another")
        }
        Err(e) => bail!("mountpoint {mp}: {e}"),
    };
    if !meta.is_dir() {
        bail!("mountpoint {mp} is not a directory: mount on an empty directory");
    }
    if !allow_non_empty {
        let mut entries =
            std::fs::read_dir(mountpoint).with_context(|| format!("reading mountpoint {mp}"))?;
        if let Some(first) = entries.next() {
            let first = first.map_or_else(
                |e| e.to_string(),
                |e| e.file_name().to_string_lossy().into_owned(),
            );
            bail!(
                "mountpoint {mp} is not empty (it holds {:?}{}): mounting over it would hide its \
                 files. Mount on an empty directory, or pass --allow-non-empty (config: \
                 mount.allow_non_empty = true) to hide them while mounted",
                crate::logging::untrusted(&first),
                if entries.next().is_some() {
                    ", …"
                } else {
                    ""
                }
            );
        }
    }
    check_fuse_device()
}

/// The FUSE device every mount opens, root or not (a non-root mount opens it before handing
/// it to fusermount3).
const FUSE_DEVICE: &str = "/dev/fuse";

/// Opens the FUSE device as the mount will: fuser's own error on failure ("Permission denied
/// (os error 13)") names neither the device nor what to do.
fn check_fuse_device() -> anyhow::Result<()> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(FUSE_DEVICE)
    {
        Ok(_) => Ok(()),
        Err(e) => bail!("{}", fuse_device_problem(&e)),
    }
}

/// What an unusable `/dev/fuse` means, and the fixes for the case at hand.
fn fuse_device_problem(e: &std::io::Error) -> String {
    let fix = match e.kind() {
        std::io::ErrorKind::NotFound => {
            "the FUSE module is not loaded or the device was not made: `modprobe fuse` and \
             install fuse3; in a container, pass the device in (`--device /dev/fuse`)"
        }
        std::io::ErrorKind::PermissionDenied => {
            "run wan as root, or let this user read and write the device (it is normally mode \
             0666; non-root mounts also need fuse3's setuid fusermount3); in a container, pass \
             the device in (`--device /dev/fuse`) and allow it in the device cgroup"
        }
        _ => "check the device (`ls -l /dev/fuse`, a character device 10:229) and dmesg",
    };
    format!("cannot open {FUSE_DEVICE} to mount: {e}. To fix: {fix}")
}

/// `fuser::Session::new`'s error, with the cause and fix where it is a known one: a non-root
/// mount without fusermount3, or one the kernel refuses.
pub(crate) fn mount_error(e: std::io::Error, mountpoint: &Path) -> anyhow::Error {
    let mp = mountpoint.display();
    let is_root = nix::unistd::geteuid().is_root();
    let on_path = |bin: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
    };
    if !is_root && !on_path("fusermount3") && !on_path("fusermount") {
        return anyhow::anyhow!(
            "mounting {mp}: {e}. A non-root mount needs fusermount3 (setuid root, from the \
             fuse3 package): install fuse3, or run wan as root"
        );
    }
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        return anyhow::anyhow!(
            "mounting {mp}: {e}. Run wan as root; a non-root mount needs fuse3's setuid \
             fusermount3, write access to {mp}, and for allow_other `user_allow_other` in \
             /etc/fuse.conf; in a container, CAP_SYS_ADMIN (or fusermount3) and the device \
             (`--device /dev/fuse`)"
        );
    }
    anyhow::anyhow!("mounting {mp}: {e}")
}

/// FUSE asks the kernel for 128 KiB requests by default; a larger bdi read-ahead makes the
/// kernel send up to 1 MiB requests (capped by /proc/sys/fs/fuse/max_pages_limit) and keep
/// more of them in flight, which is what sequential model loading wants.
pub(crate) fn raise_read_ahead(mountpoint: &Path, kb: u32) {
    let Some(entry) = mount_at(mountpoint) else {
        return;
    };
    let path = format!("/sys/class/bdi/{}/read_ahead_kb", entry.dev);
    match std::fs::write(&path, kb.to_string()) {
        Ok(()) => tracing::debug!(path, kb, "raised kernel read-ahead"),
        Err(e) => tracing::info!(path, error = %e, "could not raise kernel read-ahead (not root?)"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_unescape() {
        assert_eq!(super::unescape("/a\\040b"), "/a b");
        assert_eq!(super::unescape("/plain"), "/plain");
        assert_eq!(super::unescape("/end\\"), "/end\\");
    }
}
