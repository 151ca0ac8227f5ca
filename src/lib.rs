//! wanfs: a FUSE-mounted, lazy, verified model filesystem.
//!
//! Module map (arrows point down; see docs/DESIGN.md §10 and docs/DESIGN-NOTES.md):
//! `cli` → `daemon` → `fuse` → `fs` → `fetch` (+ `prefetch`) → `source`, `store` →
//! `manifest` (+ `compiled`, its form in the cache dir), `chunk` (+ `bufpool`); `config` and
//! `metrics` are leaves used throughout; `remote` (manifest entries from the Hub or S3) sits
//! beside `cli`, over `source`. `daemon::Services::builder` wires store, sources, fetcher and
//! control in one place: the daemon, `cmd` when no daemon runs, and tests/reftest.rs (with
//! its own sources) all build through it; `file_ctx` (a file with its sources) sits under
//! `fetch`, which re-exports it.
//! `fetch/`, `store/`, `http/` and `manifest/` are split by concern; each file's `//!` says
//! what it owns.
//! In `source/`, `http` reads plain `http://` through `rawhttp`, and both read a status through
//! `answer`: the imports point one way.
//! `lock_order` (a leaf) writes down the order of the fetcher's and the store's locks and
//! checks it in debug builds.
//! `control` is the operator's vocabulary: each operation one `control::Request`, answered by
//! `Control::handle`, which `http` (through `control::routes`), `cmd` and `fs`'s `.wan/` files
//! only carry.
//! `in_force` is what is in force: catalog, inode tree, config and peers in one snapshot that
//! `control`, `fs` and `daemon` read; `reload` builds the next one whole and swaps it in one
//! step. `system` holds the host helpers (mount table, sd_notify, read-ahead, malloc_trim).

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bufpool;
pub mod chunk;
pub mod cli;
pub mod cmd;
pub mod compiled;
pub mod config;
pub mod control;
pub mod daemon;
pub mod fetch;
pub mod file_ctx;
pub mod fs;
pub mod fuse;
pub mod http;
pub mod in_force;
pub mod lock_order;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod mount_helper;
pub mod prefetch;
pub mod reload;
pub mod remote;
pub mod source;
pub mod store;
pub mod system;
