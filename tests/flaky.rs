//! A mirror that fails half its requests, with the default fetch settings: every read is
//! served, right, from chunks fetched as several parts and from whole-only files alike.
//! Parts that landed are kept for the next round, and whole-only files get rounds too (each
//! part of an 8 MiB chunk had to succeed in the same round, and a whole-only file had no round
//! after the first: most such reads failed with EIO).

mod common;

use common::*;
use wanfs::config::{Config, FetchConfig};

const MIB: usize = 1 << 20;

/// The default `[fetch]` settings, but for the source's cool-down, which the harness keeps
/// short elsewhere and which is what leaves a cooling source one attempt per part.
fn default_fetch() -> Config {
    let mut config = test_config();
    config.fetch = FetchConfig {
        cooldown_secs: 30.0,
        ..FetchConfig::default()
    };
    config
}

fn flaky(setup: &GenSetup) {
    setup.origin.add_fault(
        Fault::Flaky {
            status: 503,
            percent: 50,
        },
        None,
        None,
    );
}

fn refused(setup: &GenSetup) -> usize {
    setup
        .origin
        .requests()
        .iter()
        .filter(|r| r.status == 503)
        .count()
}

#[test]
fn a_half_failing_mirror_serves_chunks_fetched_in_parts() {
    if no_fuse() {
        return;
    }
    // 8 MiB chunks of 1 MiB parts: eight requests per chunk.
    let setup = GenSetup::new(&[("c.bin", 24 * MIB)], 8 * MIB as u64, 81);
    let m = Mount::start(setup.spec(default_fetch()));
    flaky(&setup);
    let got = std::fs::read(setup.mounted(&m, "c.bin")).expect("every read served");
    assert_bytes_eq(&got, setup.data("c.bin"), "c.bin");
    assert!(refused(&setup) >= 10, "the origin was not flaky");
}

#[test]
fn a_half_failing_mirror_serves_whole_only_files() {
    if no_fuse() {
        return;
    }
    let setup = GenSetup::whole_only(&[("w.bin", 24 * MIB)], 82);
    let m = Mount::start(setup.spec(default_fetch()));
    flaky(&setup);
    let got = std::fs::read(setup.mounted(&m, "w.bin")).expect("every read served");
    assert_bytes_eq(&got, setup.data("w.bin"), "w.bin");
    assert!(refused(&setup) >= 10, "the origin was not flaky");
    assert_eq!(
        wait_state(&setup.mounted(&m, "w.bin"), "COMPLETE"),
        "COMPLETE",
        "w.bin served but not cached"
    );
}
