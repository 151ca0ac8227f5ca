//! The `oci://` source against a real registry: Debian's `docker-registry` (distribution 2.8)
//! on 127.0.0.1, plain and behind htpasswd, holding artifacts pushed by the real `oras` client
//! (oras-py) with CNCF ModelPack media types. `wan manifest build oci://…` pins the manifest
//! digest and lists sizes and sha256 from the manifest; a mount of it reads every file
//! byte-exact, a random 4 KiB read costs about one chunk, not the layer; credentials come
//! from a docker `config.json`, a wrong password fails naming the registry and showing no
//! secret, and a tar+gzip layer that is no gzip is refused naming it (tests/oci_gz.rs serves
//! real ones). `.ci/run` installs the registry,
//! `htpasswd` and `oras`; where one is missing, the tests print `SKIP: …` and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::registry::*;
use common::*;

const RAW: &str = "application/vnd.cncf.model.weight.v1.raw";
const CONFIG_RAW: &str = "application/vnd.cncf.model.weight.config.v1.raw";

fn model_dir(work: &Path) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let src = work.join("src");
    let weights = write_random(&src.join("weights/model.safetensors"), 6 << 20, 20);
    let config = b"{\"dim\": 8}\n".to_vec();
    std::fs::write(src.join("config.json"), &config).unwrap();
    (src, weights, config)
}

#[test]
fn a_modelpack_artifact_is_built_from_its_manifest_and_mounted_lazily() {
    if no_registry() {
        return;
    }
    let work = workdir();
    let (src, weights, config) = model_dir(work.path());
    let reg = Registry::start(None);
    let files = [
        ("weights/model.safetensors", RAW),
        ("config.json", CONFIG_RAW),
    ];
    reg.push(&src, "models/m:v1", &files, None);
    let url = format!("oci://{}/models/m:v1", reg.host);

    // From the manifest alone: the entry pins the digest, never the tag, and lists each
    // file's sha256 (its raw layer's digest) and size.
    let whole = ok_stdout(build(&url, "m@1.0.0", &[], &[]));
    assert!(!whole.contains(":v1\""), "the tag is pinned away:\n{whole}");
    let pinned = format!("oci://{}/models/m@sha256:", reg.host);
    assert!(whole.contains(&pinned), "{whole}");
    let listed = manifest_files(&whole, "m@1.0.0");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].path, "config.json");
    assert_eq!(listed[0].sha256, sha256_hex(&config));
    assert_eq!(listed[1].sha256, sha256_hex(&weights));
    assert_eq!(listed[1].size, weights.len() as u64);
    assert!(listed.iter().all(|f| f.chunks.is_empty()));

    // --chunked: the same chunk lists as a local build of the same files.
    let chunked = ok_stdout(build(
        &url,
        "m@1.0.0",
        &["--chunked", "--chunk-size", "1048576"],
        &[],
    ));
    let local = manifest_build_with(
        &src,
        "m@1.0.0",
        &BuildOpts {
            chunk_size: Some(1 << 20),
            sources: vec![url.clone()],
            whole_only: false,
        },
        &["--chunk-hash", "blake3-tree"],
    );
    let (c, l) = (
        manifest_files(&chunked, "m@1.0.0"),
        manifest_files(&local, "m@1.0.0"),
    );
    for (c, l) in c.iter().zip(&l) {
        assert_eq!(
            (&c.path, &c.sha256, &c.chunks),
            (&l.path, &l.sha256, &l.chunks)
        );
    }
    if no_fuse() {
        return;
    }
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[chunked]);
    let mnt = tempfile::tempdir().unwrap();
    let m = Mount::start(MountSpec::new(mnt.path(), &manifest));
    let f = m.path("m@1.0.0/weights/model.safetensors");
    // A random 4 KiB read fetches about one chunk (1 MiB), not the 6 MiB layer.
    let off = (3 << 20) + 12_345;
    let got = read_range(&f, off, 4096).expect("a 4 KiB read");
    assert_bytes_eq(&got, &weights[off as usize..off as usize + 4096], "4 KiB");
    let cached = cached_bytes(&f);
    assert!(
        cached <= 2 << 20,
        "a 4 KiB read cached {cached} bytes of a {} byte layer",
        weights.len()
    );
    let all = std::fs::read(&f).expect("whole read");
    assert_bytes_eq(&all, &weights, "weights through oci://");
    let cfg = std::fs::read(m.path("m@1.0.0/config.json")).expect("config read");
    assert_bytes_eq(&cfg, &config, "config through oci://");
}

#[test]
fn basic_auth_from_a_docker_config_and_a_wrong_password_named_without_its_secret() {
    if no_registry() {
        return;
    }
    let work = workdir();
    let (src, weights, _) = model_dir(work.path());
    let reg = Registry::start(Some(("alice", "right-pass-1")));
    reg.push(
        &src,
        "private/m:v1",
        &[("weights/model.safetensors", RAW)],
        Some(("alice", "right-pass-1")),
    );
    let url = format!("oci://{}/private/m:v1", reg.host);

    // Anonymous: refused.
    let anon = build(&url, "p@1.0.0", &[], &[]);
    assert!(!anon.status.success());
    let err = String::from_utf8_lossy(&anon.stderr);
    assert!(
        err.contains("access denied") && err.contains(&reg.host),
        "{err}"
    );

    // A wrong password: refused, naming the registry and the file, never the password.
    let bad = docker_config(&reg.host, "alice", "wrong-pass-9");
    let out = build(&url, "p@1.0.0", &[], &[("DOCKER_CONFIG", bad.path())]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("access denied") && err.contains(&reg.host) && err.contains("config.json"),
        "{err}"
    );
    assert!(
        !err.contains("wrong-pass-9") && !err.contains("YWxpY2"),
        "{err}"
    );

    // The right one, from $DOCKER_CONFIG/config.json: built, and mounted with it.
    let good = docker_config(&reg.host, "alice", "right-pass-1");
    let entry = ok_stdout(build(
        &url,
        "p@1.0.0",
        &["--chunked", "--chunk-size", "1048576"],
        &[("DOCKER_CONFIG", good.path())],
    ));
    if no_fuse() {
        return;
    }
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[entry]);
    let mnt = tempfile::tempdir().unwrap();
    let m = Mount::start(
        MountSpec::new(mnt.path(), &manifest).env("DOCKER_CONFIG", good.path().to_str().unwrap()),
    );
    let all = std::fs::read(m.path("p@1.0.0/weights/model.safetensors")).expect("read");
    assert_bytes_eq(&all, &weights, "weights through oci:// with basic auth");
    assert!(!m.log().contains("right-pass-1"));
}

#[test]
fn a_tar_gzip_layer_that_is_no_gzip_is_refused_naming_it() {
    if no_registry() {
        return;
    }
    let work = workdir();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("tokenizer.tgz"), b"not really gzip").unwrap();
    std::fs::write(src.join("config.json"), b"{}").unwrap();
    let reg = Registry::start(None);
    reg.push(
        &src,
        "models/packed:v1",
        &[
            ("config.json", CONFIG_RAW),
            (
                "tokenizer.tgz",
                "application/vnd.cncf.model.weight.v1.tar+gzip",
            ),
        ],
        None,
    );
    let out = build(
        &format!("oci://{}/models/packed:v1", reg.host),
        "t@1.0.0",
        &[],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokenizer.tgz") && err.contains("tar+gzip") && err.contains("not served"),
        "{err}"
    );
}

/// `tests/support/oci_token_proxy.py` in front of `reg`, on a free port, with `args`.
struct Proxy {
    child: Child,
    host: String,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn start(reg: &Registry, args: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("proxy.out");
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/oci_token_proxy.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(&reg.host)
            .args(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the token proxy");
        let p = Proxy {
            child,
            host: format!("127.0.0.1:{port}"),
            out,
            _dir: dir,
        };
        let up = common::origin::wait_until(Duration::from_secs(15), || {
            std::net::TcpStream::connect(&p.host).is_ok()
        });
        assert!(up, "the token proxy did not listen on {}", p.host);
        p
    }

    fn said(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

/// The Bearer flow: a 401 names the token realm, a token is fetched with the Basic credentials
/// of a docker config.json, and a token that expires in the middle of a read is renewed.
#[test]
fn the_bearer_token_flow_and_a_token_expiring_mid_read() {
    if no_registry() {
        return;
    }
    let work = workdir();
    let (src, weights, _) = model_dir(work.path());
    let reg = Registry::start(None);
    reg.push(
        &src,
        "models/b:v1",
        &[("weights/model.safetensors", RAW)],
        None,
    );
    let proxy = Proxy::start(
        &reg,
        &[
            "--user",
            "bob",
            "--password",
            "tok-pass-7",
            "--expire-after",
            "3",
        ],
    );
    let url = format!("oci://{}/models/b:v1", proxy.host);
    let creds = docker_config(&proxy.host, "bob", "tok-pass-7");
    let entry = ok_stdout(build(
        &url,
        "b@1.0.0",
        &["--chunk-size", "1048576"],
        &[("DOCKER_CONFIG", creds.path())],
    ));
    assert!(proxy.said().contains("issued token 1"), "{}", proxy.said());
    let wrong = docker_config(&proxy.host, "bob", "nope-nope");
    let out = build(&url, "b@1.0.0", &[], &[("DOCKER_CONFIG", wrong.path())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("access denied") && err.contains(&proxy.host),
        "{err}"
    );
    assert!(!err.contains("nope-nope"), "{err}");
    if no_fuse() {
        return;
    }
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[entry]);
    let mnt = tempfile::tempdir().unwrap();
    let m = Mount::start(
        MountSpec::new(mnt.path(), &manifest).env("DOCKER_CONFIG", creds.path().to_str().unwrap()),
    );
    let all = std::fs::read(m.path("b@1.0.0/weights/model.safetensors")).expect("read");
    assert_bytes_eq(&all, &weights, "weights through a Bearer-token registry");
    let said = proxy.said();
    assert!(said.contains("tokens expired"), "{said}");
    let issued = said.matches("issued token").count();
    assert!(issued >= 3, "a new token after the expiry: {said}");
    assert!(
        !m.log().contains("tok-pass-7") && !m.log().contains("tok-2"),
        "{}",
        m.log()
    );
}

/// A registry (or cache) that answers a ranged blob GET with 200 and the whole blob is never
/// served from: the read fails over to the next source, and the log says why.
#[test]
fn a_registry_answering_a_range_with_the_whole_blob_is_failed_over() {
    if no_registry() || no_fuse() {
        return;
    }
    let work = workdir();
    let (src, weights, _) = model_dir(work.path());
    let reg = Registry::start(None);
    reg.push(
        &src,
        "models/r:v1",
        &[("weights/model.safetensors", RAW)],
        None,
    );
    let proxy = Proxy::start(&reg, &["--range-200"]);
    let direct = ok_stdout(build(
        &format!("oci://{}/models/r:v1", reg.host),
        "r@1.0.0",
        &["--chunked", "--chunk-size", "1048576"],
        &[],
    ));
    // The proxy first, the registry second, both pinned to the same manifest.
    let pinned = direct
        .lines()
        .find_map(|l| l.split('"').nth(1).filter(|u| u.starts_with("oci://")))
        .expect("a pinned source")
        .to_string();
    let via_proxy = pinned.replace(&reg.host, &proxy.host);
    let entry = direct.replace(
        &format!("[\"{pinned}\"]"),
        &format!("[\"{via_proxy}\", \"{pinned}\"]"),
    );
    assert!(entry.contains(&via_proxy), "{entry}");
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[entry]);
    let mnt = tempfile::tempdir().unwrap();
    let m = Mount::start(MountSpec::new(mnt.path(), &manifest));
    let f = m.path("r@1.0.0/weights/model.safetensors");
    let off = (2 << 20) + 777;
    let got = read_range(&f, off, 4096).expect("a 4 KiB read");
    assert_bytes_eq(
        &got,
        &weights[off as usize..off as usize + 4096],
        "failed over",
    );
    let all = std::fs::read(&f).expect("whole read");
    assert_bytes_eq(&all, &weights, "weights, failed over");
    assert!(
        proxy.said().contains("answered 200 to a range"),
        "{}",
        proxy.said()
    );
    assert!(m.log().contains("does not serve ranges"), "{}", m.log());
}
