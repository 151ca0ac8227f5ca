//! Descriptions that lie: a manifest, a reload or a cached form that disagrees with what the
//! cache holds or with itself is refused, and never changes a byte an open file reads.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;

const MIB: usize = 1 << 20;

/// A whole-only `w.bin` (10 MiB) is cached and held open (passthrough). A reload removes its
/// model and adds one that lists the same sha256 at 5 MiB: the reload is refused, naming the
/// file and both sizes, and the open file still reads all 10 MiB. Before the rule, the first
/// read of the new model shrank the shared blob in place: the reader got 5 MiB and then EOF.
#[test]
fn a_reload_that_lists_a_cached_sha256_at_another_size_is_refused() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::whole_only(&[("w.bin", 10 * MIB)], 71);
    let m = Mount::start(setup.spec(test_config()));
    let w = setup.mounted(&m, "w.bin");
    let data = setup.data("w.bin").to_vec();
    assert_bytes_eq(&std::fs::read(&w).unwrap(), &data, "w.bin, first read");
    wait_state(&w, "COMPLETE");
    let held = std::fs::File::open(&w).unwrap();

    // q@1.0.0 names w.bin's sha256 with half its size; the origin serves q.bin as listed.
    let src = setup.work.path().join("src").join(GEN);
    std::fs::write(src.join("q.bin"), &data[..5 * MIB]).unwrap();
    let f = setup.file("w.bin");
    let q = format!(
        "schema_version = 1\n\n[models.\"q@1.0.0\"]\n[models.\"q@1.0.0\".sources]\npriority = [{:?}]\n\n\
         [[models.\"q@1.0.0\".files]]\npath = \"q.bin\"\nsize = {}\nsha256 = {:?}\n",
        setup.origin.base(GEN),
        5 * MIB,
        f.sha256
    );
    std::fs::write(&setup.manifest, q).unwrap();
    hup(m.pid());
    assert!(
        wait_until(Duration::from_secs(10), || m
            .log()
            .contains("reload refused")),
        "reload not refused:\n{}",
        m.log()
    );
    let log = m.log();
    assert!(
        log.contains("q.bin") && log.contains(&f.sha256) && log.contains("10485760"),
        "the refusal names the file, the sha256 and the cached size:\n{log}"
    );
    // The running manifest stays: q is not listed, w still is.
    assert!(!m.path("q@1.0.0").exists(), "q@1.0.0 mounted");
    assert!(w.exists());

    let mut back = vec![0u8; data.len()];
    held.read_exact_at(&mut back, 0)
        .expect("the open file reads its whole length");
    assert_bytes_eq(&back, &data, "w.bin through the held handle");
    assert_eq!(held.metadata().unwrap().len(), data.len() as u64);
    assert_bytes_eq(&std::fs::read(&w).unwrap(), &data, "w.bin, read again");
}

/// The compiled manifest form in the cache, truncated while mounted: cold reads go on, right
/// (the digests were read and checked at start; a mapping of the file faulted, SIGBUS, and
/// left a dead mount). Then a FIFO in its place does not hang the next start.
#[test]
fn a_compiled_form_truncated_while_mounted_or_replaced_by_a_fifo_changes_nothing() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::new(&[("a.bin", 3 * MIB)], 256 * 1024, 72);
    let m = Mount::start(setup.spec(test_config()));
    let forms: Vec<_> = std::fs::read_dir(m.spec.cache_dir.join("v1/manifests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    assert_eq!(forms.len(), 1, "{forms:?}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&forms[0])
        .unwrap()
        .set_len(0)
        .unwrap();
    let a = setup.mounted(&m, "a.bin");
    assert_bytes_eq(&std::fs::read(&a).unwrap(), setup.data("a.bin"), "a.bin");
    let spec = m.spec.clone();
    assert!(m.stop().success());

    std::fs::remove_file(&forms[0]).unwrap();
    nix::unistd::mkfifo(&forms[0], nix::sys::stat::Mode::S_IRWXU).unwrap();
    let m = Mount::start(spec);
    let a = setup.mounted(&m, "a.bin");
    assert_bytes_eq(
        &std::fs::read(&a).unwrap(),
        setup.data("a.bin"),
        "a.bin after restart",
    );
    assert!(
        std::fs::metadata(&forms[0]).unwrap().is_file(),
        "compiled again"
    );
}

/// An `HF_ENDPOINT` without a scheme is refused at start, naming the variable, instead of a
/// `builder error` at the first read of an `hf://` source.
#[test]
fn a_malformed_hf_endpoint_is_refused_at_start_naming_it() {
    if no_fuse() {
        return;
    }
    let work = workdir();
    let spec = MountSpec::new(work.path(), &fixtures().join("models.toml"))
        .env("HF_ENDPOINT", "localhost:9");
    let (mut child, log) = spec.spawn();
    let status = run_until_exit(&mut child, Duration::from_secs(20));
    let text = std::fs::read_to_string(log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("HF_ENDPOINT")
            && text.contains("localhost:9")
            && !text.contains("builder error"),
        "{text}"
    );
    assert_eq!(mount_count(&spec.mountpoint), 0, "nothing left mounted");
}

fn run_until_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(t0.elapsed() < limit, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
