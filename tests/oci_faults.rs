//! The `oci://` source against a misbehaving registry: Debian's `docker-registry` on
//! 127.0.0.1 behind `tests/support/oci_fault_proxy.py` (resets, 5xx, stalls, 429 with
//! `Retry-After`, blob GETs redirected to another host, as to a presigned object-storage URL)
//! and `tests/support/oci_token_proxy.py` (the Bearer flow, tokens that expire). Every read is
//! byte-exact; a redirected read never carries the registry's `Authorization` to the other
//! host; a `Retry-After` is waited out; a token is renewed before it expires. Where the
//! registry, htpasswd or oras-py is missing, the tests print `SKIP: …` and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::*;

const RAW: &str = "application/vnd.cncf.model.weight.v1.raw";

fn have(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True, after printing `SKIP: …`, where the registry, oras-py or FUSE is missing.
fn cannot_run() -> bool {
    if !have("docker-registry", &["--version"]) || !have("python3", &["-c", "import oras.provider"])
    {
        skip("docker-registry or oras (pip) missing (.ci/run installs them)");
        return true;
    }
    no_fuse()
}

/// A child process killed when dropped, with its stdout in a file.
struct Proc {
    child: Child,
    host: String,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(what: &str, mut cmd: Command, dir: tempfile::TempDir, port: u16) -> Proc {
        let out = dir.path().join("out");
        let child = cmd
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let p = Proc {
            child,
            host: format!("127.0.0.1:{port}"),
            out,
            _dir: dir,
        };
        let up = common::origin::wait_until(Duration::from_secs(15), || {
            std::net::TcpStream::connect(&p.host).is_ok()
        });
        assert!(up, "{what} did not listen on {}", p.host);
        p
    }

    fn said(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

/// A plain `docker-registry` on a free loopback port, storing in a temp dir.
fn registry() -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        dir.path().join("store").display()
    );
    let cfg_path = dir.path().join("config.yml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve").arg(&cfg_path);
    Proc::start("docker-registry", cmd, dir, port)
}

/// `tests/support/NAME` on a free port, in front of `upstream`, with `args`.
fn proxy(name: &str, upstream: &str, args: &[&str]) -> Proc {
    let port = free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(name);
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg(port.to_string())
        .arg(upstream)
        .args(args);
    Proc::start(name, cmd, tempfile::tempdir().unwrap(), port)
}

/// A 6 MiB weights file pushed with oras as `repo:v1` to `reg`: its bytes.
fn push_model(work: &Path, reg: &Proc, repo: &str) -> Vec<u8> {
    let src = work.join("src");
    let weights = write_random(&src.join("weights/model.safetensors"), 6 << 20, 33);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/oci_push.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg(&reg.host)
        .arg(format!("{repo}:v1"))
        .arg(&src)
        .arg(format!("weights/model.safetensors={RAW}"));
    let out = run_with_timeout(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "oras push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    weights
}

/// `wan manifest build URL --id ID --chunked` (1 MiB chunks) with `$DOCKER_CONFIG` at
/// `docker_config`: the entry.
fn build(url: &str, id: &str, docker_config: Option<&Path>) -> String {
    let mut cmd = Command::new(wan_bin());
    cmd.args(["manifest", "build", url, "--id", id])
        .args(["--chunked", "--chunk-size", "1048576"])
        .env_remove("REGISTRY_AUTH_FILE")
        .env(
            "DOCKER_CONFIG",
            docker_config.unwrap_or(Path::new("/nonexistent")),
        );
    let out = run_with_timeout(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "wan manifest build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A docker `config.json` in a new dir, with `user:pass` for `registry`.
fn docker_config(registry: &str, user: &str, pass: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    std::fs::write(
        dir.path().join("config.json"),
        format!(r#"{{"auths": {{"{registry}": {{"auth": "{auth}"}}}}}}"#),
    )
    .unwrap();
    dir
}

/// Mounts `entry` (with `$DOCKER_CONFIG` at `creds`) and reads the weights whole: byte-exact.
fn mount_and_read(work: &Path, entry: String, creds: Option<&Path>, weights: &[u8]) -> String {
    let manifest = work.join("models.toml");
    write_manifest(&manifest, &[entry]);
    let mnt = tempfile::tempdir().unwrap();
    let mut spec = MountSpec::new(mnt.path(), &manifest);
    if let Some(c) = creds {
        spec = spec.env("DOCKER_CONFIG", c.to_str().unwrap());
    }
    let m = Mount::start(spec);
    let all = std::fs::read(m.path("m@1.0.0/weights/model.safetensors")).expect("read");
    assert_bytes_eq(&all, weights, "weights through a misbehaving registry");
    m.log()
}

/// Each blob GET fails once (a reset half-way through the body, a 500, a 503 without
/// `Retry-After`, a body that stalls), and is retried: the file is read byte-exact.
#[test]
fn resets_5xx_and_stalls_are_retried_and_the_read_is_byte_exact() {
    if cannot_run() {
        return;
    }
    let work = workdir();
    let reg = registry();
    let weights = push_model(work.path(), &reg, "models/f");
    let entry = build(&format!("oci://{}/models/f:v1", reg.host), "m@1.0.0", None);
    for kind in ["reset", "500", "503", "stall"] {
        let p = proxy(
            "oci_fault_proxy.py",
            &reg.host,
            &["--fault", kind, "--times", "1"],
        );
        let via = entry.replace(&reg.host, &p.host);
        mount_and_read(work.path(), via, None, &weights);
        let said = p.said();
        assert!(said.contains(&format!("fault {kind}")), "{kind}: {said}");
        assert!(said.contains("retry after"), "{kind}: {said}");
    }
}

/// A 429 with `Retry-After: 1` is waited out: no blob is asked again within the second.
#[test]
fn a_429_with_retry_after_is_waited_out() {
    if cannot_run() {
        return;
    }
    let work = workdir();
    let reg = registry();
    let weights = push_model(work.path(), &reg, "models/t");
    let entry = build(&format!("oci://{}/models/t:v1", reg.host), "m@1.0.0", None);
    let p = proxy(
        "oci_fault_proxy.py",
        &reg.host,
        &["--fault", "429", "--times", "1"],
    );
    mount_and_read(
        work.path(),
        entry.replace(&reg.host, &p.host),
        None,
        &weights,
    );
    let said = p.said();
    let waits: Vec<f64> = said
        .lines()
        .filter_map(|l| l.strip_prefix("retry after "))
        .map(|l| l.trim_end_matches(" s").parse().unwrap())
        .collect();
    assert!(!waits.is_empty(), "{said}");
    assert!(waits.iter().all(|w| *w >= 0.95), "{said}");
}

/// A registry that answers every blob GET with a redirect to another host (a presigned
/// object-storage URL) behind the Bearer flow: the build and the mount follow it, and the
/// other host never receives the registry's `Authorization`.
#[test]
fn a_blob_redirect_to_another_host_is_followed_without_the_token() {
    if cannot_run() {
        return;
    }
    let work = workdir();
    let reg = registry();
    let weights = push_model(work.path(), &reg, "models/r");
    let tokens = proxy(
        "oci_token_proxy.py",
        &reg.host,
        &["--user", "rita", "--password", "redir-pass-3"],
    );
    let side = free_port().to_string();
    let front = proxy(
        "oci_fault_proxy.py",
        &tokens.host,
        &["--side-port", &side, "--blob-origin", &reg.host],
    );
    let creds = docker_config(&front.host, "rita", "redir-pass-3");
    let entry = build(
        &format!("oci://{}/models/r:v1", front.host),
        "m@1.0.0",
        Some(creds.path()),
    );
    let log = mount_and_read(work.path(), entry, Some(creds.path()), &weights);
    let said = front.said();
    assert!(said.contains("side got no Authorization"), "{said}");
    assert!(!said.contains("side got Authorization"), "{said}");
    assert!(tokens.said().contains("issued token"), "{}", tokens.said());
    assert!(
        !log.contains("redir-pass-3") && !log.contains("tok-1"),
        "{log}"
    );
}

/// Tokens that live 3 s, read across 4 s: the token is renewed before it expires (from the
/// token answer's `expires_in`), so the registry never sees an expired one.
#[test]
fn a_token_is_renewed_before_it_expires() {
    if cannot_run() {
        return;
    }
    let work = workdir();
    let reg = registry();
    let weights = push_model(work.path(), &reg, "models/e");
    let tokens = proxy(
        "oci_token_proxy.py",
        &reg.host,
        &[
            "--user",
            "eve",
            "--password",
            "life-pass-5",
            "--token-life",
            "3",
        ],
    );
    let creds = docker_config(&tokens.host, "eve", "life-pass-5");
    let entry = build(
        &format!("oci://{}/models/e:v1", tokens.host),
        "m@1.0.0",
        Some(creds.path()),
    );
    let before = tokens.said().matches("issued token").count();
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[entry]);
    let mnt = tempfile::tempdir().unwrap();
    let m = Mount::start(
        MountSpec::new(mnt.path(), &manifest).env("DOCKER_CONFIG", creds.path().to_str().unwrap()),
    );
    let f = m.path("m@1.0.0/weights/model.safetensors");
    for (i, chunk) in [5u64, 1, 3].into_iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(1700));
        }
        let off = (chunk << 20) + 4321;
        let got = read_range(&f, off, 4096).expect("a 4 KiB read");
        assert_bytes_eq(&got, &weights[off as usize..off as usize + 4096], "4 KiB");
    }
    let said = tokens.said();
    let issued = said.matches("issued token").count() - before;
    assert!(issued >= 2, "a token renewed during the read: {said}");
    assert!(!said.contains("refused an expired token"), "{said}");
}
