//! A real OCI registry for the `oci://` tests: Debian's `docker-registry` (distribution 2.8) on
//! a free loopback port, storing in a temp dir, with htpasswd auth when asked; artifacts
//! pushed by oras-py (tests/support/oci_push.py); `wan manifest build oci://…` run with no
//! credentials of this machine's own user; a docker `config.json`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;

use super::fuse::skip;
use super::{free_port, run_with_timeout, wan_bin};

pub fn have(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True, after printing `SKIP: …`, where the registry, htpasswd or oras-py is missing.
pub fn no_registry() -> bool {
    let missing: Vec<&str> = [
        ("docker-registry", have("docker-registry", &["--version"])),
        ("htpasswd", have("sh", &["-c", "command -v htpasswd"])),
        (
            "oras (pip)",
            have("python3", &["-c", "import oras.provider"]),
        ),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(n, _)| n)
    .collect();
    if !missing.is_empty() {
        skip(&format!(
            "{} missing (apt-get install docker-registry apache2-utils; pip install oras; \
             .ci/run installs them)",
            missing.join(", ")
        ));
    }
    !missing.is_empty()
}

/// A `docker-registry` of our own, on a free loopback port, storing in a temp dir.
pub struct Registry {
    child: Child,
    pub host: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// With `user` (and its password) in an htpasswd file when given.
    pub fn start(user: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {host}\n",
            dir.path().join("store").display()
        );
        if let Some((u, p)) = user {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .unwrap();
            assert!(out.status.success(), "htpasswd failed");
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).unwrap();
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: wan-test\n    path: {}\n",
                file.display()
            ));
        }
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let reg = Registry {
            child,
            host,
            _dir: dir,
        };
        let up = super::origin::wait_until(Duration::from_secs(15), || {
            std::net::TcpStream::connect(&reg.host).is_ok()
        });
        assert!(up, "docker-registry did not listen on {}", reg.host);
        reg
    }

    /// Where the registry's filesystem driver keeps blob `sha256:<hex>`: what a test tampers
    /// with (the registry serves it as it finds it).
    pub fn blob_file(&self, digest: &str) -> std::path::PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self._dir
            .path()
            .join("store/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes `files` (relative path, media type) of `dir` as `target` (`repo:tag`) with oras.
    pub fn push(
        &self,
        dir: &Path,
        target: &str,
        files: &[(&str, &str)],
        cred: Option<(&str, &str)>,
    ) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/oci_push.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script).arg(&self.host).arg(target).arg(dir);
        for (rel, mt) in files {
            cmd.arg(format!("{rel}={mt}"));
        }
        if let Some((u, p)) = cred {
            cmd.env("OCI_USER", u).env("OCI_PASS", p);
        }
        let out = run_with_timeout(cmd, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "oras push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `wan manifest build URL --id ID EXTRA…` with `envs`: its output.
pub fn build(url: &str, id: &str, extra: &[&str], envs: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = Command::new(wan_bin());
    cmd.args(["manifest", "build", url, "--id", id]).args(extra);
    // No credentials of this machine's own user leak into a test.
    cmd.env_remove("REGISTRY_AUTH_FILE")
        .env("DOCKER_CONFIG", "/nonexistent");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run_with_timeout(cmd, Duration::from_secs(120))
}

pub fn ok_stdout(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "wan manifest build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A docker `config.json` in a new dir, with `user:pass` for `registry`.
pub fn docker_config(registry: &str, user: &str, pass: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    std::fs::write(
        dir.path().join("config.json"),
        format!(r#"{{"auths": {{"{registry}": {{"auth": "{auth}"}}}}}}"#),
    )
    .unwrap();
    dir
}
