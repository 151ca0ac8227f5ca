//! The model manifest (`models.toml`): what it holds, how its text is read and checked, and
//! how `wan manifest build` writes an entry.
//!
//! A manifest is refused as a whole when any rule is broken, with one error per problem naming
//! the model, the file and the rule, so an operator fixes everything in one pass. `build` hashes
//! a local tree and prints the entry to paste into a manifest.
//!
//! The parts, each owning one concern (callers name `crate::manifest::X`, never a part: they
//! are private and re-exported here):
//! - `model.rs`: what a validated manifest holds: `Model`, `FileEntry`, `ModelId`,
//!   `Verification`, `ChunkList`, `SourceUrl`, and the chunk grid's constants;
//! - `parse.rs`: the TOML side: `Manifest::load`, `parse`, `parse_fast`, and cutting a text by
//!   model (`segments`, `parse_models`) to parse one model per core;
//! - `rules.rs`: every rule a manifest keeps (ids, paths, sizes, chunk grids, one content
//!   described alike) and how a broken one is reported (`ManifestError`, `Problem`); also
//!   applied to remote listings (`check_listing`) and compiled forms (`bounds_rule`);
//! - `build.rs`: `wan manifest build` from a local tree: hashing, rendering, parsing back.
//!
//! This file holds `Manifest` itself and its totals.

use std::collections::BTreeMap;

mod build;
mod model;
mod parse;
mod rules;

pub use build::{
    BuildOptions, BuiltFile, build, hash_file, head_size_for, head_size_from, render_entry,
};
pub use model::{
    BadModelId, ChunkList, DEFAULT_CHUNK_SIZE, DEFAULT_HEAD_SIZE, FileEntry, HEAD_ALIGN, Model,
    ModelId, SourceUrl, Verification,
};
pub use parse::{parse_models, segments};
pub(crate) use rules::edit_distance;
pub use rules::{
    MAX_CHUNK_SIZE, MAX_FILE_SIZE, ManifestError, NAME_MAX, PATH_MAX, Problem, bounds_rule,
    check_listing, path_rule, size_rule, suggest_id, valid_id,
};

/// A validated manifest.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// Models by id, sorted.
    pub models: BTreeMap<ModelId, Model>,
}

impl Manifest {
    pub fn file_count(&self) -> usize {
        self.models.values().map(|m| m.files.len()).sum()
    }

    /// Every file's size added up: a u128, since sizes up to i64::MAX each overflow a u64
    /// in three files (a wrapped total once printed `ok: … 8191 bytes`).
    pub fn total_bytes(&self) -> u128 {
        self.models
            .values()
            .flat_map(|m| &m.files)
            .map(|f| u128::from(f.size))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::chunk::Digest;

    /// A file entry of model `m@1.0.0` (3 bytes, the sha256 of "abc"), `extra` keys added.
    pub(super) fn entry(path: &str, extra: &str) -> String {
        format!(
            "[[models.\"m@1.0.0\".files]]\npath = {}\nsize = 3\nsha256 = \"{}\"\n{extra}\n",
            toml::Value::String(path.into()),
            Digest::of(b"abc")
        )
    }

    /// A manifest of model `m@1.0.0` (one `local://` source) with `body` appended, parsed.
    pub(super) fn parse(body: &str) -> Result<Manifest, ManifestError> {
        let text = format!(
            "schema_version = 1\n[models.\"m@1.0.0\".sources]\npriority = [\"local://x\"]\n{body}"
        );
        Manifest::parse(&text, "t.toml", Path::new("/base"))
    }

    /// What `parse(body)` refuses, as an operator reads it.
    pub(super) fn problems(body: &str) -> String {
        parse(body).unwrap_err().to_string()
    }

    /// Three files of i64::MAX bytes: the total is right, not wrapped around a u64.
    #[test]
    fn totals_do_not_overflow() {
        let files: String = ["a", "b", "c"]
            .iter()
            .map(|p| entry(p, "").replace("size = 3", "size = 9223372036854775807"))
            .collect();
        // One sha256 with one size: the same content three times.
        let m = parse(&files).unwrap();
        assert_eq!(m.total_bytes(), 3 * u128::from(MAX_FILE_SIZE));
    }
}
