//! `wan manifest publish-chunks oci://…` against a real registry (Debian's `docker-registry`,
//! distribution 2.8, which has no referrers API: the `sha256-<digest>` tag fallback is the
//! path taken), on artifacts pushed by the real `oras` client. Once published, `wan manifest
//! build oci://…` lists the chunk lists with no layer read, the same lists a local build
//! writes; a BLAKE3-signed model's lists must bind to its `model.sig`. Where the registry or
//! oras is missing, the tests print `SKIP: …` and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::registry::{Registry, have, no_registry};
use common::*;

const RAW: &str = "application/vnd.cncf.model.weight.v1.raw";
const CONFIG_RAW: &str = "application/vnd.cncf.model.weight.config.v1.raw";

fn wan(args: &[&str]) -> Output {
    let mut cmd = Command::new(wan_bin());
    cmd.args(args)
        .env_remove("REGISTRY_AUTH_FILE")
        .env("DOCKER_CONFIG", "/nonexistent");
    run_with_timeout(cmd, Duration::from_secs(120))
}

fn ok(out: Output, what: &str) -> (String, String) {
    let (o, e) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert!(out.status.success(), "{what}: {e}");
    (o, e)
}

fn model_dir(work: &Path) -> PathBuf {
    let src = work.join("src");
    write_random(&src.join("weights/model.safetensors"), (6 << 20) + 777, 31);
    std::fs::write(src.join("config.json"), b"{\"dim\": 8}\n").unwrap();
    src
}

#[test]
fn published_chunk_lists_are_built_from_with_no_layer_read() {
    if no_registry() {
        return;
    }
    let work = workdir();
    let src = model_dir(work.path());
    let reg = Registry::start(None);
    reg.push(
        &src,
        "models/m:v1",
        &[
            ("weights/model.safetensors", RAW),
            ("config.json", CONFIG_RAW),
        ],
        None,
    );
    let url = format!("oci://{}/models/m:v1", reg.host);

    // Nothing published yet: a plain build is whole-only, as before.
    let (before, _) = ok(
        wan(&["manifest", "build", &url, "--id", "m@1.0.0"]),
        "build",
    );
    assert!(
        manifest_files(&before, "m@1.0.0")
            .iter()
            .all(|f| f.chunks.is_empty())
    );

    let (said, _) = ok(
        wan(&[
            "manifest",
            "publish-chunks",
            &url,
            "--chunk-size",
            "1048576",
        ]),
        "publish-chunks",
    );
    // distribution 2.8 has no referrers API: the fallback tag names the manifest's digest.
    assert!(said.contains("referrer sha256:"), "{said}");
    assert!(said.contains("under tag sha256-"), "{said}");

    // Now a plain build lists the published chunk lists, reading no layer, and they are the
    // lists a local build of the same bytes writes.
    let (text, err) = ok(
        wan(&["manifest", "build", &url, "--id", "m@1.0.0"]),
        "build",
    );
    assert!(err.contains("using the chunk lists published"), "{err}");
    assert!(!err.contains("hashed "), "a layer was read: {err}");
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
    let (got, want) = (
        manifest_files(&text, "m@1.0.0"),
        manifest_files(&local, "m@1.0.0"),
    );
    assert_eq!(got.len(), 2);
    for (g, w) in got.iter().zip(&want) {
        assert!(!g.chunks.is_empty());
        assert_eq!(
            (&g.path, &g.sha256, &g.chunks),
            (&w.path, &w.sha256, &w.chunks)
        );
    }
    assert!(
        text.contains(&format!("oci://{}/models/m@sha256:", reg.host)),
        "{text}"
    );

    // Published twice: the tagged index lists the newest, and builds still find one.
    ok(
        wan(&[
            "manifest",
            "publish-chunks",
            &url,
            "--chunk-size",
            "2097152",
        ]),
        "publish-chunks again",
    );
    // --chunked with another chunk size than published: the layers are hashed.
    let (text, err) = ok(
        wan(&[
            "manifest",
            "build",
            &url,
            "--id",
            "m@1.0.0",
            "--chunked",
            "--chunk-size",
            "4194304",
        ]),
        "build --chunked",
    );
    assert!(err.contains("hashed "), "{err}");
    assert!(text.contains("chunk_size = 4194304"), "{text}");
    // --whole-only asks for none.
    let (text, err) = ok(
        wan(&["manifest", "build", &url, "--id", "m@1.0.0", "--whole-only"]),
        "build --whole-only",
    );
    assert!(!err.contains("published"), "{err}");
    assert!(
        manifest_files(&text, "m@1.0.0")
            .iter()
            .all(|f| f.chunks.is_empty())
    );
    // The newest (2 MiB) list is the one a plain build takes.
    let (text, _) = ok(
        wan(&["manifest", "build", &url, "--id", "m@1.0.0"]),
        "build",
    );
    assert!(text.contains("chunk_size = 2097152"), "{text}");
}

fn sh(dir: &Path, cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_blake3_signed_model_gets_only_chunk_lists_that_bind_to_its_signature() {
    if no_registry() || !have("python3", &["-c", "import model_signing"]) {
        skip("model_signing (pip) missing");
        return;
    }
    let work = workdir();
    let src = model_dir(work.path());
    let key = work.path().join("key.pem");
    sh(
        work.path(),
        "openssl",
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "key.pem",
        ],
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/sign_model.py");
    sh(
        &src,
        "python3",
        &[
            script.to_str().unwrap(),
            "sign",
            ".",
            "model.sig",
            "--key",
            key.to_str().unwrap(),
            "--hash",
            "blake3",
        ],
    );
    let reg = Registry::start(None);
    reg.push(
        &src,
        "models/s:v1",
        &[
            ("weights/model.safetensors", RAW),
            ("config.json", CONFIG_RAW),
            ("model.sig", "application/vnd.cncf.model.doc.v1.raw"),
        ],
        None,
    );
    let url = format!("oci://{}/models/s:v1", reg.host);

    // sha256 chunk lists cannot bind to a BLAKE3 signature: refused before any push.
    let out = wan(&[
        "manifest",
        "publish-chunks",
        &url,
        "--chunk-size",
        "1048576",
        "--chunk-hash",
        "sha256",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sha256 lists were published");
    assert!(
        err.contains("do not bind to the model's signature"),
        "{err}"
    );
    let (text, err) = ok(
        wan(&["manifest", "build", &url, "--id", "s@1.0.0"]),
        "build",
    );
    assert!(!err.contains("published"), "{err}");
    assert!(
        manifest_files(&text, "s@1.0.0")
            .iter()
            .all(|f| f.chunks.is_empty())
    );

    // A --chunked build is held to the signature too: sha256 lists fail the build, the
    // default blake3-tree ones on the same grid bind.
    let out = wan(&[
        "manifest",
        "build",
        &url,
        "--id",
        "s@1.0.0",
        "--chunked",
        "--chunk-size",
        "1048576",
        "--chunk-hash",
        "sha256",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sha256 lists were built");
    assert!(
        err.contains("do not bind to the model's signature"),
        "{err}"
    );
    let (text, _) = ok(
        wan(&[
            "manifest",
            "build",
            &url,
            "--id",
            "s@1.0.0",
            "--chunked",
            "--chunk-size",
            "1048576",
        ]),
        "build --chunked",
    );
    assert!(text.contains("chunk_hash = \"blake3-tree\""), "{text}");

    // blake3-tree lists bind: published, then built from and checked again.
    ok(
        wan(&[
            "manifest",
            "publish-chunks",
            &url,
            "--chunk-size",
            "1048576",
        ]),
        "publish-chunks",
    );
    let (text, err) = ok(
        wan(&["manifest", "build", &url, "--id", "s@1.0.0"]),
        "build",
    );
    assert!(err.contains("using the chunk lists published"), "{err}");
    let files = manifest_files(&text, "s@1.0.0");
    assert_eq!(files.len(), 3);
    assert!(files.iter().all(|f| !f.chunks.is_empty()), "{text}");
    assert!(text.contains("chunk_hash = \"blake3-tree\""), "{text}");
}
