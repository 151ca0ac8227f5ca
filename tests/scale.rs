//! The compiled manifest through real mounts: the first mount compiles the manifest into the
//! cache dir, a restart opens that form instead of parsing TOML and still verifies every byte
//! it serves, a manifest edited between mounts (or before a SIGHUP) is compiled again and
//! served as edited, and a bad manifest is refused by `wan mount` in exactly the words of
//! `wan manifest check`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const KIB: usize = 1024;

/// The compiled forms in the cache dir.
fn forms(cache: &Path) -> Vec<PathBuf> {
    let dir = cache.join("v1/manifests");
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn form_of(cache: &Path, manifest: &Path) -> PathBuf {
    let hex = sha256_hex(&fs::read(manifest).unwrap());
    cache.join(format!("v1/manifests/{hex}.bin"))
}

#[test]
fn restart_uses_the_compiled_form_and_reads_still_verify() {
    if no_fuse() {
        return;
    }
    let g = GenSetup::new(
        &[("a.bin", 300 * KIB), ("d/b.bin", 200 * KIB)],
        64 * 1024,
        91,
    );
    let spec = g.spec(test_config());
    let cache = spec.cache_dir.clone();

    let m = Mount::start(spec.clone());
    assert!(m.log().contains("manifest: compiled"), "{}", m.log());
    assert_eq!(forms(&cache), vec![form_of(&cache, &g.manifest)]);
    let got = fs::read(g.mounted(&m, "a.bin")).unwrap();
    assert_bytes_eq(&got, g.data("a.bin"), "a.bin, first mount");
    assert!(m.stop().success());

    // The origin now serves wrong bytes for b.bin: the restart must check them against the
    // digests from the compiled form and refuse them, then serve the right ones.
    let m = Mount::start(spec.clone());
    let log = m.log();
    assert!(
        log.contains("manifest: using its compiled form") && !log.contains("manifest: compiled"),
        "{log}"
    );
    g.origin.add_fault(Fault::Corrupt, Some("b.bin"), Some(1));
    let b = g.mounted(&m, "d/b.bin");
    // The corrupt answer fails the first read (or is retried); after the cool-down a read
    // gets the right bytes. Never wrong ones.
    assert!(
        wait_until(Duration::from_secs(10), || {
            match fs::read(&b) {
                Ok(bytes) => {
                    assert_bytes_eq(&bytes, g.data("d/b.bin"), "b.bin, restart");
                    true
                }
                Err(_) => false,
            }
        }),
        "b.bin never served; log:\n{}",
        m.log()
    );
    assert!(m.log().contains("integrity failure"), "{}", m.log());
    assert_eq!(
        xattr_str(&g.mounted(&m, "a.bin"), "user.wan.sha256"),
        g.file("a.bin").sha256
    );
    assert!(m.stop().success());
}

#[test]
fn an_edited_manifest_is_compiled_again_at_restart_and_reload() {
    if no_fuse() {
        return;
    }
    let g = GenSetup::new(&[("a.bin", 100 * KIB), ("c.bin", 50 * KIB)], 64 * 1024, 92);
    let spec = g.spec(test_config());
    let cache = spec.cache_dir.clone();
    let full = fs::read_to_string(&g.manifest).unwrap();
    // The same model without c.bin: its [[files]] table is cut out.
    let start = full
        .find("[[models.\"gen@1.0.0\".files]]\npath = \"c.bin\"")
        .unwrap();
    let end = full[start + 1..]
        .find("[[models")
        .map_or(full.len(), |i| start + 1 + i);
    let without_c = format!("{}{}", &full[..start], &full[end..]);
    fs::write(&g.manifest, &without_c).unwrap();

    let m = Mount::start(spec.clone());
    assert!(!g.mounted(&m, "c.bin").exists());
    assert!(m.stop().success());

    fs::write(&g.manifest, &full).unwrap();
    let m = Mount::start(spec.clone());
    assert!(m.log().contains("manifest: compiled"), "{}", m.log());
    assert_bytes_eq(
        &fs::read(g.mounted(&m, "c.bin")).unwrap(),
        g.data("c.bin"),
        "c.bin after the edit",
    );
    assert_eq!(forms(&cache).len(), 2, "both versions' forms are kept");

    // Back to the first version with a SIGHUP: its form is reused, c.bin goes.
    fs::write(&g.manifest, &without_c).unwrap();
    hup(m.pid());
    assert!(
        wait_until(Duration::from_secs(10), || !g.mounted(&m, "c.bin").exists()),
        "c.bin still there after the reload; log:\n{}",
        m.log()
    );
    assert!(
        m.log().matches("manifest: using its compiled form").count() == 1,
        "{}",
        m.log()
    );
    assert_bytes_eq(
        &fs::read(g.mounted(&m, "a.bin")).unwrap(),
        g.data("a.bin"),
        "a.bin after the reload",
    );
    assert!(m.stop().success());
}

#[test]
fn mount_refuses_a_bad_manifest_in_the_words_of_manifest_check() {
    if no_fuse() {
        return;
    }
    let g = GenSetup::new(&[("a.bin", 10 * KIB)], 4096, 93);
    let text = fs::read_to_string(&g.manifest).unwrap();
    // Two problems in one manifest (one per line), then a syntax error (with its line).
    let bad = [
        text.replace("path = \"a.bin\"", "path = \"../a.bin\"")
            .replace("schema_version = 1", "schema_version = 7"),
        text.replace("size = ", "size = \"x\" #"),
    ];
    for bad in bad {
        fs::write(&g.manifest, &bad).unwrap();
        let check = run_wan(
            &[
                "manifest".as_ref(),
                "check".as_ref(),
                g.manifest.as_os_str(),
            ],
            Duration::from_secs(20),
        );
        assert!(!check.status.success());
        let want = format!("error: {}", String::from_utf8_lossy(&check.stderr));
        let spec = g.spec(test_config());
        let (mut child, log) = spec.spawn();
        let status = child.wait().unwrap();
        assert!(!status.success());
        let log = fs::read_to_string(log).unwrap();
        assert!(
            log.ends_with(&want),
            "mount said:\n{log}\ncheck said:\n{want}"
        );
        assert!(forms(&spec.cache_dir).is_empty());
    }
}

#[test]
fn a_cache_where_no_form_can_be_written_still_mounts() {
    if no_fuse() {
        return;
    }
    let g = GenSetup::new(&[("a.bin", 100 * KIB)], 64 * 1024, 94);
    let spec = g.spec(test_config());
    // Where the forms would go, a file: nothing can be written there (as a full disk would).
    fs::create_dir_all(spec.cache_dir.join("v1")).unwrap();
    fs::write(spec.cache_dir.join("v1/manifests"), b"not a directory").unwrap();
    let m = Mount::start(spec);
    assert!(m.log().contains("manifest: kept in memory"), "{}", m.log());
    assert_bytes_eq(
        &fs::read(g.mounted(&m, "a.bin")).unwrap(),
        g.data("a.bin"),
        "a.bin without a compiled form",
    );
    assert!(m.stop().success());
}
