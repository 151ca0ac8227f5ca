//! Packed layers of an OCI artifact against a real registry (Debian's `docker-registry`,
//! artifacts pushed by oras-py): an uncompressed `…tar` layer's files are found by reading its
//! headers by range (pax and GNU long names, directories skipped), built with the sha256 of
//! their bytes, and served by range from their span of the blob, byte-exact, a random 4 KiB
//! read costing about one chunk, not the layer; a tar holding a link is refused naming it.
//! Where the registry, htpasswd or oras is missing, the tests print `SKIP: …` and pass.

mod common;

use std::path::Path;
use std::process::Command;

use common::registry::*;
use common::*;

const RAW: &str = "application/vnd.cncf.model.weight.v1.raw";
const TAR: &str = "application/vnd.cncf.model.weight.v1.tar";
const DOC_TAR: &str = "application/vnd.cncf.model.doc.v1.tar";

/// Packs `members` (paths relative to `root`) into `tar` with Python's tarfile in `format`
/// (`PAX_FORMAT`, `GNU_FORMAT`): a real archiver's headers, not ours.
fn make_tar(root: &Path, tar: &Path, format: &str, members: &[&str]) {
    let script = format!(
        "import sys, tarfile\n\
         with tarfile.open(sys.argv[1], 'w', format=tarfile.{format}) as t:\n\
         \x20   for m in sys.argv[2:]: t.add(m)\n"
    );
    let out = Command::new("python3")
        .current_dir(root)
        .arg("-c")
        .arg(script)
        .arg(tar)
        .args(members)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tarfile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_tar_layers_files_are_built_from_its_headers_and_served_by_range() {
    if no_registry() {
        return;
    }
    let work = workdir();
    let files = work.path().join("files");
    let long = format!("tokenizer/{}/vocab.json", "deep".repeat(30));
    let big = write_random(&files.join("extra/big.bin"), 5 << 20, 7);
    let vocab = b"{\"hello\": 1}\n".to_vec();
    std::fs::create_dir_all(files.join(&long).parent().unwrap()).unwrap();
    std::fs::write(files.join(&long), &vocab).unwrap();
    std::fs::write(files.join("tokenizer/merges.txt"), b"a b\n").unwrap();
    std::fs::write(files.join("README.md"), b"# a model\n").unwrap();
    let src = work.path().join("src");
    let weights = write_random(&src.join("model.safetensors"), 3 << 20, 8);
    // A pax tar of a directory (a long path, directory entries) and a GNU tar of a large
    // file and a small one: ModelPack packs directories and files this way.
    make_tar(
        &files,
        &src.join("tokenizer.tar"),
        "PAX_FORMAT",
        &["tokenizer"],
    );
    make_tar(
        &files,
        &src.join("extra.tar"),
        "GNU_FORMAT",
        &["extra/big.bin", "README.md"],
    );
    let reg = Registry::start(None);
    reg.push(
        &src,
        "models/tarred:v1",
        &[
            ("model.safetensors", RAW),
            ("tokenizer.tar", DOC_TAR),
            ("extra.tar", TAR),
        ],
        None,
    );
    let url = format!("oci://{}/models/tarred:v1", reg.host);

    let out = build(&url, "t@1.0.0", &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let whole = ok_stdout(out);
    // The build says which files are packed, and in which layer.
    assert!(
        stderr.contains("extra/big.bin is packed in tar layer sha256:"),
        "{stderr}"
    );
    let listed = manifest_files(&whole, "t@1.0.0");
    let want: Vec<(&str, &[u8])> = vec![
        ("README.md", b"# a model\n"),
        ("extra/big.bin", &big),
        ("model.safetensors", &weights),
        (long.as_str(), &vocab),
        ("tokenizer/merges.txt", b"a b\n"),
    ];
    let mut want = want;
    want.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(
        listed.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        want.iter().map(|w| w.0).collect::<Vec<_>>(),
        "{whole}"
    );
    for (f, (_, bytes)) in listed.iter().zip(&want) {
        assert_eq!(f.sha256, sha256_hex(bytes), "{}", f.path);
        assert_eq!(f.size, bytes.len() as u64, "{}", f.path);
    }

    let chunked = ok_stdout(build(
        &url,
        "t@1.0.0",
        &["--chunked", "--chunk-size", "1048576"],
        &[],
    ));
    if no_fuse() {
        return;
    }
    let manifest = work.path().join("models.toml");
    write_manifest(&manifest, &[chunked]);
    let mnt = tempfile::tempdir().unwrap();
    let m = Mount::start(MountSpec::new(mnt.path(), &manifest));
    let f = m.path("t@1.0.0/extra/big.bin");
    // A random 4 KiB read inside a tar layer fetches about one chunk, not the layer.
    let off = (2 << 20) + 54_321;
    let got = read_range(&f, off, 4096).expect("a 4 KiB read");
    assert_bytes_eq(
        &got,
        &big[off as usize..off as usize + 4096],
        "4 KiB in a tar",
    );
    let cached = cached_bytes(&f);
    assert!(
        cached <= 2 << 20,
        "a 4 KiB read cached {cached} bytes of a {} byte file",
        big.len()
    );
    for (path, bytes) in &want {
        let got = std::fs::read(m.path(&format!("t@1.0.0/{path}"))).expect(path);
        assert_bytes_eq(&got, bytes, path);
    }
}

#[test]
fn a_tar_layer_holding_a_link_is_refused_naming_it() {
    if no_registry() {
        return;
    }
    let work = workdir();
    let files = work.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("model.bin"), b"weights").unwrap();
    std::os::unix::fs::symlink("model.bin", files.join("alias.bin")).unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    make_tar(
        &files,
        &src.join("linked.tar"),
        "PAX_FORMAT",
        &["model.bin", "alias.bin"],
    );
    let reg = Registry::start(None);
    reg.push(&src, "models/linked:v1", &[("linked.tar", TAR)], None);
    let out = build(
        &format!("oci://{}/models/linked:v1", reg.host),
        "l@1.0.0",
        &[],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("alias.bin") && err.contains("link") && err.contains("sha256:"),
        "{err}"
    );
}
