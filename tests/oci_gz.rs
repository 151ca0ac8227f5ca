//! Compressed tar layers of an OCI artifact against a real registry (Debian's
//! `docker-registry`, artifacts pushed by oras-py): a `tar+gzip` and a `tar+zstd` layer (made
//! by Python's tarfile, gzip and the `zstd` tool, not by us) are listed by the build with
//! their files' sha256, fetched whole once at first read, unpacked once into the spool and
//! served from it byte-exact, also to a second model that lists the same layer; a layer
//! whose bytes are not its digest's is never served. Where the registry, htpasswd, oras or
//! `zstd` is missing, the tests print `SKIP: …` and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fuse::skip;
use common::registry::*;
use common::*;

const RAW: &str = "application/vnd.cncf.model.weight.v1.raw";
const GZ: &str = "application/vnd.cncf.model.doc.v1.tar+gzip";
const ZST: &str = "application/vnd.cncf.model.code.v1.tar+zstd";

fn no_tools() -> bool {
    if no_registry() {
        return true;
    }
    if !have("zstd", &["--version"]) {
        skip("zstd missing (apt-get install zstd)");
        return true;
    }
    false
}

/// Packs `members` (relative to `root`) into `out` with Python's tarfile: `w:gz` for gzip,
/// else an uncompressed pax tar that `zstd` then compresses.
fn pack(root: &Path, out: &Path, members: &[&str]) {
    let gz = out.extension().is_some_and(|e| e == "tgz");
    let tar = if gz {
        out.to_path_buf()
    } else {
        out.with_extension("tar")
    };
    let script = format!(
        "import sys, tarfile\n\
         with tarfile.open(sys.argv[1], '{}', format=tarfile.PAX_FORMAT) as t:\n\
         \x20   for m in sys.argv[2:]: t.add(m)\n",
        if gz { "w:gz" } else { "w" }
    );
    let st = Command::new("python3")
        .current_dir(root)
        .arg("-c")
        .arg(script)
        .arg(&tar)
        .args(members)
        .status()
        .unwrap();
    assert!(st.success(), "tarfile");
    if !gz {
        let st = Command::new("zstd")
            .args(["-q", "-f", "--rm"])
            .arg(&tar)
            .arg("-o")
            .arg(out)
            .status()
            .unwrap();
        assert!(st.success(), "zstd");
    }
}

struct Model {
    src: PathBuf,
    /// Every file a mount shows, and its bytes.
    files: Vec<(String, Vec<u8>)>,
}

/// A model: a raw weight, a gzip layer of docs (a 3 MiB file among them) and a zstd layer
/// of code.
fn model(work: &Path) -> Model {
    let tree = work.join("tree");
    let big = write_random(&tree.join("docs/big.bin"), 3 << 20, 31);
    std::fs::write(tree.join("docs/README.md"), b"# a packed model\n").unwrap();
    let code = b"print('hello')\n".repeat(5000);
    std::fs::create_dir_all(tree.join("code")).unwrap();
    std::fs::write(tree.join("code/run.py"), &code).unwrap();
    let src = work.join("src");
    let weights = write_random(&src.join("model.safetensors"), 2 << 20, 32);
    pack(&tree, &src.join("docs.tgz"), &["docs"]);
    pack(&tree, &src.join("code.tzst"), &["code"]);
    let mut files = vec![
        ("code/run.py".to_string(), code),
        ("docs/README.md".to_string(), b"# a packed model\n".to_vec()),
        ("docs/big.bin".to_string(), big),
        ("model.safetensors".to_string(), weights),
    ];
    files.sort();
    Model { src, files }
}

const LAYERS: [(&str, &str); 3] = [
    ("model.safetensors", RAW),
    ("docs.tgz", GZ),
    ("code.tzst", ZST),
];

fn layer_digest(file: &Path) -> String {
    format!("sha256:{}", sha256_hex(&std::fs::read(file).unwrap()))
}

/// Overwrites a blob in the registry's storage with bytes of the same length.
fn tamper(reg: &Registry, digest: &str) {
    let f = reg.blob_file(digest);
    let mut b = std::fs::read(&f).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x55;
    std::fs::write(&f, b).unwrap();
}

#[test]
fn gzip_and_zstd_tar_layers_are_unpacked_once_and_served() {
    if no_tools() {
        return;
    }
    let work = workdir();
    let m = model(work.path());
    let reg = Registry::start(None);
    reg.push(&m.src, "models/packed:v1", &LAYERS, None);
    let url = format!("oci://{}/models/packed:v1", reg.host);

    let out = build(&url, "p@1.0.0", &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let whole = ok_stdout(out);
    // The build says which files are packed in a compressed layer, and what a read costs.
    for (path, kind) in [("docs/big.bin", "tar+gzip"), ("code/run.py", "tar+zstd")] {
        let said = format!("{path} is packed in {kind} layer sha256:");
        assert!(stderr.contains(&said), "{said:?} in:\n{stderr}");
    }
    assert!(
        stderr.contains("fetched whole and unpacked at first read"),
        "{stderr}"
    );
    let listed = manifest_files(&whole, "p@1.0.0");
    assert_eq!(
        listed.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        m.files.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(),
        "{whole}"
    );
    for (f, (_, bytes)) in listed.iter().zip(&m.files) {
        assert_eq!(f.sha256, sha256_hex(bytes), "{}", f.path);
        assert_eq!(f.size, bytes.len() as u64, "{}", f.path);
    }
    let chunked = ok_stdout(build(
        &url,
        "p@1.0.0",
        &["--chunked", "--chunk-size", "1048576"],
        &[],
    ));
    if no_fuse() {
        return;
    }
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[chunked]);
    let mnt = tempfile::tempdir().unwrap();
    let mount = Mount::start(MountSpec::new(mnt.path(), &manifest));
    // A 4 KiB read of a file in the gzip layer: the layer is fetched and unpacked now.
    let big = &m.files.iter().find(|f| f.0 == "docs/big.bin").unwrap().1;
    let off = (2 << 20) + 777;
    let got = read_range(&mount.path("p@1.0.0/docs/big.bin"), off, 4096).expect("4 KiB");
    assert_bytes_eq(
        &got,
        &big[off as usize..off as usize + 4096],
        "4 KiB in tar+gzip",
    );
    // From now on the layers are read from the spool, never from the registry again: a
    // registry that would now serve other bytes changes nothing.
    tamper(&reg, &layer_digest(&m.src.join("docs.tgz")));
    tamper(&reg, &layer_digest(&m.src.join("code.tzst")));
    for (path, bytes) in &m.files {
        let got = std::fs::read(mount.path(&format!("p@1.0.0/{path}"))).expect(path);
        assert_bytes_eq(&got, bytes, path);
    }
    // Status names each file packed in a compressed layer, and what that costs.
    let status = std::fs::read_to_string(mount.path(".wan/status")).expect(".wan/status");
    for (path, kind) in [("docs/big.bin", "tar+gzip"), ("code/run.py", "tar+zstd")] {
        let said = format!("{path}: {kind} layer sha256:");
        assert!(status.contains(&said), "{said:?} in {status}");
    }
    assert!(
        status.contains("fetched whole at first read (unpacked in the spool now)"),
        "{status}"
    );
    assert!(!status.contains("model.safetensors:"), "{status}");
}

#[test]
fn a_layer_two_models_list_is_unpacked_once_for_both() {
    if no_tools() {
        return;
    }
    let work = workdir();
    let m = model(work.path());
    let reg = Registry::start(None);
    reg.push(&m.src, "models/a:v1", &LAYERS, None);
    // Another model (another weight) with the same docs and code layers.
    write_random(&m.src.join("model.safetensors"), 1 << 20, 33);
    reg.push(&m.src, "models/b:v1", &LAYERS, None);
    if no_fuse() {
        return;
    }
    let chunked = |repo: &str, id: &str| {
        let url = format!("oci://{}/models/{repo}:v1", reg.host);
        ok_stdout(build(
            &url,
            id,
            &["--chunked", "--chunk-size", "1048576"],
            &[],
        ))
    };
    let manifest = work.path().join("models.toml");
    write_manifest(
        &manifest,
        &[chunked("a", "a@1.0.0"), chunked("b", "b@1.0.0")],
    );
    let mnt = tempfile::tempdir().unwrap();
    let mount = Mount::start(MountSpec::new(mnt.path(), &manifest));
    let readme = std::fs::read(mount.path("a@1.0.0/docs/README.md")).expect("a's README");
    assert_eq!(readme, b"# a packed model\n");
    tamper(&reg, &layer_digest(&m.src.join("docs.tgz")));
    // b's big.bin was never read: it comes from the layer a's read unpacked.
    let big = &m.files.iter().find(|f| f.0 == "docs/big.bin").unwrap().1;
    let got = std::fs::read(mount.path("b@1.0.0/docs/big.bin")).expect("b's big.bin");
    assert_bytes_eq(&got, big, "b's docs/big.bin from the shared layer");
}

#[test]
fn a_compressed_layer_whose_bytes_are_not_its_digest_is_never_served() {
    if no_tools() {
        return;
    }
    let work = workdir();
    let m = model(work.path());
    let reg = Registry::start(None);
    reg.push(&m.src, "models/bad:v1", &LAYERS, None);
    let url = format!("oci://{}/models/bad:v1", reg.host);
    let chunked = ok_stdout(build(
        &url,
        "x@1.0.0",
        &["--chunked", "--chunk-size", "1048576"],
        &[],
    ));
    let gz = layer_digest(&m.src.join("docs.tgz"));
    tamper(&reg, &gz);
    // A build names the layer and says why.
    let out = build(&url, "x@1.0.0", &[], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&gz) && err.contains("not the layer's digest"),
        "{err}"
    );
    if no_fuse() {
        return;
    }
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[chunked]);
    let mnt = tempfile::tempdir().unwrap();
    let mount = Mount::start(MountSpec::new(mnt.path(), &manifest));
    assert_eio(
        std::fs::read(mount.path("x@1.0.0/docs/README.md")),
        "a file of a tampered layer",
    );
    // The other layers are whole and served.
    let code = &m.files.iter().find(|f| f.0 == "code/run.py").unwrap().1;
    let got = std::fs::read(mount.path("x@1.0.0/code/run.py"));
    assert_bytes_eq(&got.expect("code/run.py"), code, "code/run.py");
}
