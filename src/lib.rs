//! wanfs: a FUSE-mounted, lazy, verified model filesystem.
//!
//! Module map, drawn from the code (arrows point down: a module uses only those below it;
//! docs/DESIGN.md §10 is the contract, docs/DESIGN-NOTES.md has each folder's files):
//!
//! ```text
//! main → cli ─┬─ cmd ──────────────┐   (`wan models …`: over HTTP, or in process)
//!             ├─ remote            │   (`wan manifest build hf://… s3://… oci://…`, `publish-chunks`, over source)
//!             └─ daemon ───────────┤   (Services::builder: the one wiring; serve; run)
//!                 ├─ reload        │   (builds the next in_force whole, swaps it)
//!                 ├─ system        │   (mount table, sd_notify, read-ahead, malloc_trim)
//!                 ├─ fuse → fs ────┤   (fuser adapter → inode tree, reads, `.wan/` files; + warm)
//!                 └─ http ─────────┤   (control routes, `/blobs` for peers)
//!                                  ▼
//!                              control      (one Request per operation, Control::handle)
//!                                  ▼
//!                              in_force     (manifest, tree, config, peers: one snapshot)
//!                                  ▼
//!                fetch (+ prefetch, file_ctx)   (single flight, sources, verify, commit)
//!                     ▼                 ▼
//!                  source             store     (Source trait / blobs, index, GC plan)
//!                     ▼                 ▼
//!                manifest (+ compiled)          (models.toml, its compiled form)
//!                     ▼
//!                chunk (+ bufpool)              (Digest, Layout, Filler, VerifiedChunk, blake3_tree_root)
//! ```
//! Leaves used throughout: `config`, `metrics`, `logging`, `lock_order` (the fetcher's and the
//! store's lock order, checked in debug builds). `mount_helper` is `mount.fuse.wan`. `trust`
//! (publisher signatures): its verification half (a `model.sig` bundle checked against
//! `[trust]`, giving the signer and the signed statement, or a refusal) is a leaf that knows no
//! manifest; `trust::bind` binds a statement to an entry and `trust::gate` holds each model's
//! verdict in what is in force, the gate `fs` and `control` pass before a read or a fetch.
//! Where each concern lives: a chunk's life in `fetch/flight.rs` (`ChunkTable`, `FetchKey`);
//! a control operation in `control/request.rs` (`Request`, `Response`, the handler) and
//! `control/routes.rs` (its HTTP route); what is in force in `in_force.rs` and `reload.rs`;
//! a file's mode in `manifest/model.rs` (`Verification`); peer or origin in `source/mod.rs`
//! (`SourceKind`); the whole-file check of complete blobs and the files it refused in
//! `store/checked.rs` (what is kept) and `fetch/check.rs` (when it runs, what a mismatch
//! does); an OCI model's published chunk lists in `source/oci_chunks.rs` (wire format, push,
//! find) and `remote.rs` (`adopt`: what a build believes of them); a compressed OCI layer's
//! whole fetch, digest check, unpacking and spool in `source/oci_packed.rs`; reading a
//! complete file into the page cache at open in `warm.rs`. Each file's `//!` says what it owns.

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
pub mod trust;
pub mod warm;
