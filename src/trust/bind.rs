//! Binding a verified statement to a manifest entry: which files the publisher signed, and
//! how each of the entry's files may be served so that no byte other than the signed content
//! reaches a reader ([`Plan`]). Owns the rules of issue 19 §3–4: the entry's files and the
//! statement's are the same set (`ignore_paths` and `model.sig` aside), each signed digest
//! matches, and a chunk list is bound to its signed digest before a byte is served.
//!
//! What binding costs: nothing is downloaded. A BLAKE3-signed file's chunk digests are merged
//! into its BLAKE3 root (`chunk::blake3_tree_root`, a few merges per chunk); a sha256-signed
//! file is compared by its `sha256` line and is then served whole-checked.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::statement::SignedFile;
use super::{Method, Refusal, RefusalReason, SignedHash, Statement};
use crate::chunk::{ChunkHash, Digest};
use crate::manifest::{FileEntry, Model, Verification};

/// The bundle's file name at a model's root, as `model_signing` writes it.
pub const SIGNATURE_FILE: &str = "model.sig";

/// How one file of a signed model is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Not under the signature (`model.sig` itself, or a path the statement's `ignore_paths`
    /// covers): served as the manifest says.
    Open,
    /// Its chunk list merges into the signed BLAKE3 digest: served chunk by chunk, each
    /// chunk verified against a digest the signature now covers.
    Lazy,
    /// Signed with sha256, which no chunk list can be bound to: fetched and checked whole
    /// against the signed digest (its `sha256` line) before its first byte is served.
    Whole,
    /// Signed as sha256 shards (`serialization.method = "shards"`): fetched and checked whole
    /// against its `sha256` line, then each shard against its signed digest, before its
    /// first byte is served.
    Shards(Arc<[Shard]>),
}

/// One signed byte range of a file and its sha256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub start: u64,
    pub end: u64,
    pub digest: Digest,
}

fn refuse(reason: RefusalReason, detail: String) -> Refusal {
    Refusal { reason, detail }
}

/// Whether `path` is under one of `ignore` (the path itself or a directory above it), as
/// `model_signing`'s `should_ignore` decides.
pub fn ignored(path: &str, ignore: &[String]) -> bool {
    ignore.iter().any(|p| {
        let p = p.trim_end_matches('/');
        !p.is_empty()
            && (path == p || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'/')))
    })
}

/// The plan of each of `model`'s files (in its order), or why the statement does not sign
/// this entry.
pub fn bind(files: &[&FileEntry], st: &Statement) -> Result<Vec<Plan>, Refusal> {
    // Per file, shards gathered and checked to tile it (`Statement::files` owns that).
    let signed = st.files()?;
    let under = |p: &str| p != SIGNATURE_FILE && !ignored(p, &st.ignore_paths);
    let listed: BTreeSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
    // A partial model is not the signed model, nor is one with a file the publisher did not
    // sign: both directions, each named.
    let unsigned: Vec<&str> = files
        .iter()
        .filter(|f| under(&f.path) && !signed.contains_key(f.path.as_str()))
        // A shards statement has no shard for an empty file: its size says all of it.
        .filter(|f| !(matches!(st.method, Method::Shards { .. }) && f.size == 0))
        .map(|f| f.path.as_str())
        .collect();
    if !unsigned.is_empty() {
        return Err(refuse(
            RefusalReason::Mismatch,
            format!(
                "{} file(s) of the entry are not in the signed statement: {}",
                unsigned.len(),
                names(&unsigned)
            ),
        ));
    }
    let absent: Vec<&str> = signed
        .keys()
        .copied()
        .filter(|p| !listed.contains(p) && under(p))
        .collect();
    if !absent.is_empty() {
        return Err(refuse(
            RefusalReason::Mismatch,
            format!(
                "{} signed file(s) are not in the entry: {}",
                absent.len(),
                names(&absent)
            ),
        ));
    }
    files
        .iter()
        .map(|f| {
            if !under(&f.path) {
                return Ok(Plan::Open);
            }
            match signed.get(f.path.as_str()) {
                None => Ok(Plan::Whole), // an empty file of a shards statement
                Some(SignedFile::Whole { digest }) => plan_whole(f, st.hash_type, digest),
                Some(SignedFile::Shards { size, shards }) => {
                    let Method::Shards { shard_size } = st.method else {
                        unreachable!("only a shards statement has shards")
                    };
                    plan_shards(f, st.hash_type, shard_size, *size, shards)
                }
            }
        })
        .collect()
}

/// What `wan manifest check` says of the signed models of `models`: a model listing
/// `model.sig` whose files are not all `blake3-tree` can be read lazily only if it was signed
/// with BLAKE3 over such chunk lists; signed with sha256 (model_signing's default), those files
/// are fetched whole before their first byte is served.
pub fn notes<'a>(models: impl IntoIterator<Item = &'a Model>) -> Vec<String> {
    models
        .into_iter()
        .filter(|m| m.files.iter().any(|f| f.path == SIGNATURE_FILE))
        .filter_map(|m| {
            let not_tree = m
                .files
                .iter()
                .filter(|f| f.path != SIGNATURE_FILE && f.size > 0)
                .filter(|f| {
                    !(f.chunk_hash == ChunkHash::Blake3Tree
                        && matches!(f.verification, Verification::Chunked(_)))
                })
                .count();
            (not_tree > 0).then(|| {
                format!(
                    "model {} lists {SIGNATURE_FILE}: its signature is checked at mount. {not_tree} \
                     file(s) have no chunk_hash = \"blake3-tree\" chunk list: signed with sha256 \
                     (model_signing's default) they are fetched whole and checked before their \
                     first byte is served, and a BLAKE3 signature cannot be bound to them. For \
                     lazy reads, sign with BLAKE3 and rebuild the entry with `wan manifest build`.",
                    m.id
                )
            })
        })
        .collect()
}

fn names(v: &[&str]) -> String {
    let mut s: Vec<String> = v.iter().take(5).map(|p| format!("{p:?}")).collect();
    if v.len() > 5 {
        s.push("…".into());
    }
    s.join(", ")
}

/// A signed digest as a 32-byte `Digest` (sha256 and BLAKE3 are; `Statement` checked the
/// length against the algorithm).
fn digest_of(f: &FileEntry, algorithm: SignedHash, digest: &[u8]) -> Result<Digest, Refusal> {
    <[u8; 32]>::try_from(digest).map(Digest).map_err(|_| {
        refuse(
            RefusalReason::Invalid,
            format!(
                "file {:?}: the signed {} digest is {} bytes, not 32",
                f.path,
                algorithm.as_str(),
                digest.len()
            ),
        )
    })
}

fn plan_whole(f: &FileEntry, algorithm: SignedHash, digest: &[u8]) -> Result<Plan, Refusal> {
    match algorithm {
        SignedHash::Sha256 => {
            let want = digest_of(f, algorithm, digest)?;
            if f.sha256 != want {
                return Err(refuse(
                    RefusalReason::Mismatch,
                    format!(
                        "file {:?}: signed sha256 {want}, but the entry says {}",
                        f.path, f.sha256
                    ),
                ));
            }
            Ok(Plan::Whole)
        }
        SignedHash::Blake3 => {
            let want = digest_of(f, algorithm, digest)?;
            let Some(root) = tree_root(f) else {
                return Err(refuse(
                    RefusalReason::Unsupported,
                    format!(
                        "file {:?} is signed with BLAKE3, but its chunk list is not \
                         chunk_hash = \"blake3-tree\" (rebuild the entry with `wan manifest \
                         build`, which writes it)",
                        f.path
                    ),
                ));
            };
            if root != want {
                return Err(refuse(
                    RefusalReason::Mismatch,
                    format!(
                        "file {:?}: its chunk list merges into BLAKE3 {root}, but the signed \
                         digest is {want}",
                        f.path
                    ),
                ));
            }
            Ok(Plan::Lazy)
        }
        SignedHash::Blake2b => Err(refuse(
            RefusalReason::Unsupported,
            format!(
                "file {:?} is signed with blake2b, which wanfs cannot check (sign with sha256 \
                 or, for lazy reads, BLAKE3)",
                f.path
            ),
        )),
    }
}

fn plan_shards(
    f: &FileEntry,
    algorithm: SignedHash,
    shard_size: u64,
    size: u64,
    shards: &[&[u8]],
) -> Result<Plan, Refusal> {
    if algorithm != SignedHash::Sha256 {
        return Err(refuse(
            RefusalReason::Unsupported,
            format!(
                "file {:?} is signed as {} shards; wanfs checks sha256 shards",
                f.path,
                algorithm.as_str()
            ),
        ));
    }
    if size != f.size {
        return Err(refuse(
            RefusalReason::Mismatch,
            format!(
                "file {:?}: the signed shards cover {size} bytes, the entry says {}",
                f.path, f.size
            ),
        ));
    }
    let out = shards
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let start = i as u64 * shard_size;
            Ok(Shard {
                start,
                end: (start + shard_size).min(size),
                digest: digest_of(f, algorithm, d)?,
            })
        })
        .collect::<Result<Vec<_>, Refusal>>()?;
    Ok(Plan::Shards(out.into()))
}

/// The BLAKE3 root a blake3-tree chunk list merges into; `None` for any other chunk list.
fn tree_root(f: &FileEntry) -> Option<Digest> {
    match (&f.verification, f.chunk_hash) {
        (Verification::Chunked(chunks), ChunkHash::Blake3Tree) => {
            crate::chunk::blake3_tree_root(&f.layout(), chunks)
        }
        // An empty file has no chunks to list (whole-only or not): its hash is BLAKE3's of
        // no bytes whatever the entry's chunk_hash.
        _ if f.size == 0 => Some(Digest(*blake3::hash(b"").as_bytes())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ModelId;
    use crate::trust::Resource;

    fn file(path: &str, content: &[u8]) -> FileEntry {
        FileEntry {
            path: path.into(),
            size: content.len() as u64,
            sha256: Digest::of(content),
            chunk_size: 4096,
            head_size: 4096,
            chunk_hash: ChunkHash::Sha256,
            verification: Verification::Chunked(content.chunks(4096).map(Digest::of).collect()),
        }
    }

    fn entries(m: &Model) -> Vec<&FileEntry> {
        m.files.iter().collect()
    }

    fn model(files: Vec<FileEntry>) -> Model {
        Model {
            id: ModelId::new("m@1.0.0").unwrap(),
            description: String::new(),
            pinned: false,
            sources: Vec::new(),
            files,
        }
    }

    fn sha(name: &str, content: &[u8]) -> Resource {
        Resource {
            name: name.into(),
            algorithm: SignedHash::Sha256,
            digest: Digest::of(content).0.to_vec(),
        }
    }

    fn statement(method: Method, resources: Vec<Resource>) -> Statement {
        Statement {
            model_name: "m".into(),
            method,
            hash_type: SignedHash::Sha256,
            ignore_paths: vec![".git".into(), "model.sig".into()],
            resources,
        }
    }

    #[test]
    fn sha256_files_bind_whole_and_the_signature_and_ignored_paths_stay_open() {
        let m = model(vec![
            file("a.bin", b"aaaa"),
            file("model.sig", b"{}"),
            file(".git/HEAD", b"ref"),
            file("sub/b.txt", b"bb"),
        ]);
        let st = statement(
            Method::Files,
            vec![sha("a.bin", b"aaaa"), sha("sub/b.txt", b"bb")],
        );
        assert_eq!(
            bind(&entries(&m), &st).unwrap(),
            vec![Plan::Whole, Plan::Open, Plan::Open, Plan::Whole]
        );
    }

    #[test]
    fn a_changed_digest_or_a_file_on_one_side_only_is_a_mismatch_naming_it() {
        let m = model(vec![file("a.bin", b"aaaa"), file("b.bin", b"bbbb")]);
        let forged = statement(
            Method::Files,
            vec![sha("a.bin", b"aaab"), sha("b.bin", b"bbbb")],
        );
        let e = bind(&entries(&m), &forged).unwrap_err();
        assert_eq!(e.reason, RefusalReason::Mismatch);
        assert!(e.detail.contains("\"a.bin\""), "{e}");
        let partial = statement(Method::Files, vec![sha("a.bin", b"aaaa")]);
        let e = bind(&entries(&m), &partial).unwrap_err();
        assert_eq!(e.reason, RefusalReason::Mismatch);
        assert!(
            e.detail.contains("not in the signed statement: \"b.bin\""),
            "{e}"
        );
        let more = statement(
            Method::Files,
            vec![
                sha("a.bin", b"aaaa"),
                sha("b.bin", b"bbbb"),
                sha("c.bin", b"c"),
            ],
        );
        let e = bind(&entries(&m), &more).unwrap_err();
        assert!(e.detail.contains("not in the entry: \"c.bin\""), "{e}");
    }

    #[test]
    fn blake2_and_a_non_tree_blake3_chunk_list_are_unsupported() {
        let m = model(vec![file("a.bin", b"aaaa")]);
        let signed_with = |hash: SignedHash| {
            let mut r = sha("a.bin", b"aaaa");
            r.algorithm = hash;
            Statement {
                hash_type: hash,
                ..statement(Method::Files, vec![r])
            }
        };
        let e = bind(&entries(&m), &signed_with(SignedHash::Blake2b)).unwrap_err();
        assert_eq!(e.reason, RefusalReason::Unsupported);
        let e = bind(&entries(&m), &signed_with(SignedHash::Blake3)).unwrap_err();
        assert_eq!(e.reason, RefusalReason::Unsupported);
        assert!(e.detail.contains("blake3-tree"), "{e}");
    }

    /// A BLAKE3-signed file binds lazily exactly when its blake3-tree chunk list merges into
    /// the signed digest: no byte is read.
    #[test]
    fn a_blake3_tree_chunk_list_binds_to_the_signed_blake3_digest() {
        let content = (0..3 * 4096 + 100)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<u8>>();
        let mut f = file("a.bin", &content);
        (f.chunk_size, f.head_size, f.chunk_hash) = (8192, 4096, ChunkHash::Blake3Tree);
        let layout = f.layout();
        let chunks: Vec<Digest> = (0..layout.count())
            .map(|i| {
                let r = layout.range(i);
                f.check(i)
                    .digest(&content[r.start as usize..r.end as usize])
            })
            .collect();
        f.verification = Verification::Chunked(chunks.clone().into());
        let signed = Statement {
            hash_type: SignedHash::Blake3,
            ..statement(
                Method::Files,
                vec![Resource {
                    name: "a.bin".into(),
                    algorithm: SignedHash::Blake3,
                    digest: blake3::hash(&content).as_bytes().to_vec(),
                }],
            )
        };
        assert_eq!(bind(&[&f], &signed).unwrap(), vec![Plan::Lazy]);
        // A forged chunk (the signed digest kept) merges into another root.
        let mut forged = chunks;
        forged[2] = Digest::of(b"other");
        f.verification = Verification::Chunked(forged.into());
        let e = bind(&[&f], &signed).unwrap_err();
        assert_eq!(e.reason, RefusalReason::Mismatch);
        assert!(e.detail.contains("merges into BLAKE3"), "{e}");
    }

    #[test]
    fn shards_must_tile_the_file() {
        let content = b"0123456789";
        let m = model(vec![file("a.bin", content), file("empty", b"")]);
        let shard = |s: usize, e: usize| Resource {
            name: format!("a.bin:{s}:{e}"),
            algorithm: SignedHash::Sha256,
            digest: Digest::of(&content[s..e]).0.to_vec(),
        };
        let st = statement(
            Method::Shards { shard_size: 4 },
            vec![shard(4, 8), shard(0, 4), shard(8, 10)],
        );
        let Plan::Shards(v) = &bind(&entries(&m), &st).unwrap()[0] else {
            panic!("not shards");
        };
        assert_eq!(
            v.iter().map(|s| (s.start, s.end)).collect::<Vec<_>>(),
            [(0, 4), (4, 8), (8, 10)]
        );
        assert_eq!(v[1].digest, Digest::of(b"4567"));
        let gap = statement(
            Method::Shards { shard_size: 4 },
            vec![shard(0, 4), shard(8, 10)],
        );
        // A gap is the statement's own fault (`Statement::files` refuses it as invalid).
        assert_eq!(
            bind(&entries(&m), &gap).unwrap_err().reason,
            RefusalReason::Invalid
        );
        let short = statement(
            Method::Shards { shard_size: 4 },
            vec![shard(0, 4), shard(4, 8)],
        );
        assert!(
            bind(&entries(&m), &short)
                .unwrap_err()
                .detail
                .contains("cover 8 bytes")
        );
    }

    #[test]
    fn check_notes_signed_models_whose_files_cannot_be_read_lazily() {
        let signed = model(vec![file("a.bin", b"aaaa"), file("model.sig", b"{}")]);
        let notes = notes([&signed]);
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].contains("m@1.0.0") && notes[0].contains("1 file(s)"),
            "{notes:?}"
        );
        let mut tree = signed.clone();
        tree.files[0].chunk_hash = ChunkHash::Blake3Tree;
        assert!(super::notes([&tree]).is_empty());
        let unsigned = model(vec![file("a.bin", b"aaaa")]);
        assert!(super::notes([&unsigned]).is_empty());
    }

    #[test]
    fn ignore_paths_cover_directories_not_prefixes() {
        let ig = vec![".git".to_string(), "docs/".to_string()];
        assert!(ignored(".git", &ig) && ignored(".git/HEAD", &ig) && ignored("docs/a.md", &ig));
        assert!(!ignored(".gitattributes", &ig) && !ignored("docsx/a", &ig));
    }
}
