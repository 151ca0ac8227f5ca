//! The in-toto statement a `model_signing` bundle signs: which files (or shards of files) the
//! model is, with what digests, serialized how.
//!
//! Owns reading the statement (`_type` in-toto v1, predicate
//! `https://model_signing/signature/v1.0`) into [`Statement`], and the one consistency check
//! `model_signing` makes on it (`dsse_payload_to_manifest`): the subject's sha256 is the sha256
//! of the resources' raw digests, in the order listed. Comparing a statement with a manifest
//! entry is the caller's (`trust::bind`).

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::Refusal;

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";

/// A verified model statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// The subject's name (`model_signing` takes the model directory's name).
    pub model_name: String,
    pub method: Method,
    pub hash_type: SignedHash,
    /// Paths the signer left out of the model (`serialization.ignore_paths`), as written.
    pub ignore_paths: Vec<String>,
    pub resources: Vec<Resource>,
}

/// How the model was cut into resources (`serialization.method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// One resource per file, named by its path.
    Files,
    /// Each file cut into `shard_size`-byte shards, named `path:start:end`.
    Shards { shard_size: u64 },
}

/// The hash of every resource's digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignedHash {
    Sha256,
    Blake2b,
    Blake3,
}

impl SignedHash {
    /// The name `model_signing` writes for a resource's algorithm.
    pub fn as_str(self) -> &'static str {
        match self {
            SignedHash::Sha256 => "sha256",
            SignedHash::Blake2b => "blake2b",
            SignedHash::Blake3 => "blake3",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            SignedHash::Sha256 | SignedHash::Blake3 => 32,
            SignedHash::Blake2b => 64,
        }
    }

    /// `hash_type` says `blake2`, a resource's algorithm `blake2b`: both name BLAKE2b-512.
    fn parse(name: &str) -> Option<SignedHash> {
        match name {
            "sha256" => Some(SignedHash::Sha256),
            "blake2" | "blake2b" => Some(SignedHash::Blake2b),
            "blake3" => Some(SignedHash::Blake3),
            _ => None,
        }
    }
}

impl std::fmt::Display for SignedHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One signed resource: a file, or a shard of one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// The path relative to the model's root (`/`-separated); for shards `path:start:end` as
    /// `model_signing` writes it (see [`Resource::shard`]).
    pub name: String,
    pub algorithm: SignedHash,
    pub digest: Vec<u8>,
}

impl Resource {
    /// A shard's (path, start, end): split at the last two colons, since a path may hold one.
    pub fn shard(&self) -> Option<(&str, u64, u64)> {
        let (rest, end) = self.name.rsplit_once(':')?;
        let (path, start) = rest.rsplit_once(':')?;
        Some((path, start.parse().ok()?, end.parse().ok()?))
    }
}

impl Statement {
    /// Reads and checks a statement (the envelope's payload, already authenticated). An
    /// unknown statement or predicate type is `Unsupported`; a statement inconsistent with
    /// itself (subject digest, algorithms, shard names) is `Invalid`.
    pub fn parse(payload: &[u8]) -> Result<Statement, Refusal> {
        let raw: RawStatement = serde_json::from_slice(payload).map_err(|e| {
            Refusal::invalid(format!("signed statement is not a model statement: {e}"))
        })?;
        if raw.type_ != STATEMENT_TYPE {
            return Err(Refusal::unsupported(format!(
                "statement type {:?}, not {STATEMENT_TYPE}",
                raw.type_
            )));
        }
        if raw.predicate_type != PREDICATE_TYPE {
            return Err(Refusal::unsupported(format!(
                "predicate type {:?}, not {PREDICATE_TYPE} (model_signing 1.x)",
                raw.predicate_type
            )));
        }
        let [subject] = raw.subject.as_slice() else {
            return Err(Refusal::invalid(format!(
                "statement has {} subjects, not one",
                raw.subject.len()
            )));
        };
        let Some(predicate) = raw.predicate else {
            return Err(Refusal::invalid("statement has no predicate"));
        };
        let s = predicate.serialization;
        let hash_type = SignedHash::parse(&s.hash_type).ok_or_else(|| {
            Refusal::unsupported(format!("serialization hash_type {:?}", s.hash_type))
        })?;
        let method = match s.method.as_str() {
            "files" => Method::Files,
            "shards" => {
                // Protobuf's JSON writes the number as `16.0`.
                let size = s.shard_size.unwrap_or(0.0);
                if !(size >= 1.0 && size.fract() == 0.0 && size <= u64::MAX as f64) {
                    return Err(Refusal::invalid(format!(
                        "shards serialization with shard_size {:?}",
                        s.shard_size
                    )));
                }
                Method::Shards {
                    shard_size: size as u64,
                }
            }
            other => {
                return Err(Refusal::unsupported(format!(
                    "serialization method {other:?}"
                )));
            }
        };
        let mut resources = Vec::with_capacity(predicate.resources.len());
        let mut hasher = Sha256::new();
        let mut names = std::collections::HashSet::new();
        for r in predicate.resources {
            let algorithm = resource_algorithm(&r.algorithm, method).ok_or_else(|| {
                Refusal::invalid(format!(
                    "resource {:?}: algorithm {:?} is not the statement's {hash_type}",
                    r.name, r.algorithm
                ))
            })?;
            if algorithm != hash_type {
                return Err(Refusal::invalid(format!(
                    "resource {:?}: algorithm {:?} is not the statement's {hash_type}",
                    r.name, r.algorithm
                )));
            }
            let digest = decode_hex(&r.digest)
                .filter(|d| d.len() == algorithm.digest_len())
                .ok_or_else(|| {
                    Refusal::invalid(format!(
                        "resource {:?}: digest {:?} is not {} hex bytes",
                        r.name,
                        r.digest,
                        algorithm.digest_len()
                    ))
                })?;
            hasher.update(&digest);
            let resource = Resource {
                name: r.name,
                algorithm,
                digest,
            };
            let path = match method {
                Method::Files => resource.name.as_str(),
                Method::Shards { .. } => match resource.shard() {
                    Some((path, start, end)) if start < end => path,
                    _ => {
                        return Err(Refusal::invalid(format!(
                            "resource {:?} is not named path:start:end",
                            resource.name
                        )));
                    }
                },
            };
            if path.is_empty()
                || path.starts_with('/')
                || path
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == "..")
            {
                return Err(Refusal::invalid(format!(
                    "resource {:?} is not a relative path",
                    resource.name
                )));
            }
            if !names.insert(resource.name.clone()) {
                return Err(Refusal::invalid(format!(
                    "resource {:?} is listed twice",
                    resource.name
                )));
            }
            resources.push(resource);
        }
        let computed = super::pki::hex(&hasher.finalize());
        let claimed = subject.digest.sha256.to_ascii_lowercase();
        if computed != claimed {
            return Err(Refusal::invalid(format!(
                "statement is inconsistent: subject {:?} has sha256 {claimed}, its resources \
                 hash to {computed}",
                subject.name
            )));
        }
        Ok(Statement {
            model_name: subject.name.clone(),
            method,
            hash_type,
            ignore_paths: s.ignore_paths,
            resources,
        })
    }
}

/// What a statement says of one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignedFile<'a> {
    /// `files`: the digest of the whole file.
    Whole { digest: &'a [u8] },
    /// `shards`: the file is `size` bytes, and `shards[i]` is the digest of bytes
    /// `[i × shard_size, min((i + 1) × shard_size, size))`.
    Shards { size: u64, shards: Vec<&'a [u8]> },
}

impl Statement {
    /// The statement per file path. Under `shards`, a file's shards are gathered and must tile
    /// it exactly (`0:s`, `s:2s`, …, the last one short or whole), else the statement is
    /// `Invalid`. `model_signing` lists no shard for an empty file: under `shards` an empty
    /// file of the model is absent here.
    pub fn files(&self) -> Result<std::collections::BTreeMap<&str, SignedFile<'_>>, Refusal> {
        use std::collections::BTreeMap;
        let shard_size = match self.method {
            Method::Files => {
                return Ok(self
                    .resources
                    .iter()
                    .map(|r| (r.name.as_str(), SignedFile::Whole { digest: &r.digest }))
                    .collect());
            }
            Method::Shards { shard_size } => shard_size,
        };
        // (start, end, digest) of each shard, per path.
        type Shard<'a> = (u64, u64, &'a [u8]);
        let mut per_file: BTreeMap<&str, Vec<Shard>> = BTreeMap::new();
        for r in &self.resources {
            // `parse` checked every name.
            if let Some((path, start, end)) = r.shard() {
                per_file
                    .entry(path)
                    .or_default()
                    .push((start, end, &r.digest));
            }
        }
        let mut out = BTreeMap::new();
        for (path, mut shards) in per_file {
            shards.sort_unstable_by_key(|&(start, _, _)| start);
            let last = shards.len() - 1;
            for (i, &(start, end, _)) in shards.iter().enumerate() {
                let want = (i as u64).checked_mul(shard_size);
                let whole = end.checked_sub(start) == Some(shard_size);
                if want != Some(start) || (i < last && !whole) || end - start > shard_size {
                    return Err(Refusal::invalid(format!(
                        "shards of {path:?} do not tile it: {path}:{start}:{end} at position {i}                          (shard_size {shard_size})"
                    )));
                }
            }
            out.insert(
                path,
                SignedFile::Shards {
                    size: shards[last].1,
                    shards: shards.into_iter().map(|(_, _, d)| d).collect(),
                },
            );
        }
        Ok(out)
    }
}

/// A resource's algorithm: the hash's name, for shards suffixed `-sharded-<shard_size>`
/// (`model_signing`'s `ShardedFileHasher`).
fn resource_algorithm(name: &str, method: Method) -> Option<SignedHash> {
    match method {
        Method::Files => SignedHash::parse(name),
        Method::Shards { shard_size } => {
            let (hash, size) = name.split_once("-sharded-")?;
            (size.parse::<u64>().ok()? == shard_size)
                .then(|| SignedHash::parse(hash))
                .flatten()
        }
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawStatement {
    #[serde(rename = "_type")]
    type_: String,
    subject: Vec<RawSubject>,
    predicate_type: String,
    predicate: Option<RawPredicate>,
}

#[derive(Deserialize)]
struct RawSubject {
    name: String,
    digest: RawSubjectDigest,
}

#[derive(Deserialize)]
struct RawSubjectDigest {
    sha256: String,
}

#[derive(Deserialize)]
struct RawPredicate {
    serialization: RawSerialization,
    resources: Vec<RawResource>,
}

#[derive(Deserialize)]
struct RawSerialization {
    method: String,
    hash_type: String,
    #[serde(default)]
    ignore_paths: Vec<String>,
    shard_size: Option<f64>,
}

#[derive(Deserialize)]
struct RawResource {
    name: String,
    algorithm: String,
    digest: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::RefusalReason;
    use crate::trust::bundle::Bundle;

    fn payload(name: &str) -> Vec<u8> {
        let bytes = std::fs::read(format!(
            "{}/fixtures/trust/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        Bundle::parse(&bytes).unwrap().envelope.payload
    }

    #[test]
    fn files_sha256_as_the_cli_signs() {
        let s = Statement::parse(&payload("key-p256.sig")).unwrap();
        assert_eq!(s.model_name, "model");
        assert_eq!(s.method, Method::Files);
        assert_eq!(s.hash_type, SignedHash::Sha256);
        assert!(s.ignore_paths.contains(&".git".to_string()));
        let names: Vec<_> = s.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["config.json", "sub/tokenizer.txt", "weights.bin"]);
        let weights = std::fs::read(format!(
            "{}/fixtures/trust/model/weights.bin",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        assert_eq!(s.resources[2].digest, Sha256::digest(&weights).to_vec());
    }

    #[test]
    fn blake3_and_shards() {
        let s = Statement::parse(&payload("blake3.sig")).unwrap();
        assert_eq!(s.hash_type, SignedHash::Blake3);
        let weights = std::fs::read(format!(
            "{}/fixtures/trust/model/weights.bin",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let w = s
            .resources
            .iter()
            .find(|r| r.name == "weights.bin")
            .unwrap();
        assert_eq!(w.digest, blake3::hash(&weights).as_bytes().to_vec());

        let s = Statement::parse(&payload("shards.sig")).unwrap();
        assert_eq!(s.method, Method::Shards { shard_size: 16 });
        let last = s
            .resources
            .iter()
            .filter_map(|r| r.shard())
            .filter(|(p, _, _)| *p == "weights.bin")
            .map(|(_, _, end)| end)
            .max();
        assert_eq!(last, Some(100));
        let r = Resource {
            name: "a:b.bin:16:32".into(),
            algorithm: SignedHash::Sha256,
            digest: vec![],
        };
        assert_eq!(r.shard(), Some(("a:b.bin", 16, 32)));
    }

    #[test]
    fn files_gathers_shards_per_file() {
        let s = Statement::parse(&payload("shards.sig")).unwrap();
        let files = s.files().unwrap();
        assert_eq!(
            files.keys().copied().collect::<Vec<_>>(),
            ["config.json", "sub/tokenizer.txt", "weights.bin"]
        );
        let SignedFile::Shards { size, shards } = &files["weights.bin"] else {
            panic!()
        };
        // 100 bytes of `w`: six whole shards and one of 4 bytes.
        assert_eq!((*size, shards.len()), (100, 7));
        assert_eq!(shards[0], Sha256::digest([b'w'; 16]).as_slice());
        assert_eq!(shards[6], Sha256::digest([b'w'; 4]).as_slice());
        let whole = Statement::parse(&payload("key-p256.sig")).unwrap();
        assert!(matches!(
            whole.files().unwrap()["weights.bin"],
            SignedFile::Whole { digest } if digest.len() == 32
        ));
        // Gathered by offset, not by the order listed.
        let mut reversed = s.clone();
        reversed.resources.reverse();
        assert_eq!(reversed.files().unwrap(), files);
        // A shard left out leaves a gap.
        let mut gap = s.clone();
        gap.resources.retain(|r| r.name != "weights.bin:32:48");
        let r = gap.files().unwrap_err();
        assert!(r.detail.contains("weights.bin"), "{r}");
    }

    fn edit(name: &str, f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(&payload(name)).unwrap();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn resources_must_hash_to_the_subject() {
        let changed = edit("key-p256.sig", |v| {
            v["predicate"]["resources"][0]["digest"] = "00".repeat(32).into();
        });
        let r = Statement::parse(&changed).unwrap_err();
        assert_eq!(r.reason, RefusalReason::Invalid);
        assert!(r.detail.contains("inconsistent"), "{r}");
        let reordered = edit("key-p256.sig", |v| {
            v["predicate"]["resources"]
                .as_array_mut()
                .unwrap()
                .swap(0, 1);
        });
        assert_eq!(
            Statement::parse(&reordered).unwrap_err().reason,
            RefusalReason::Invalid
        );
    }

    #[test]
    fn unknown_predicate_and_method_are_unsupported() {
        let other = edit("key-p256.sig", |v| {
            v["predicateType"] = "https://slsa.dev/provenance/v1".into();
        });
        let r = Statement::parse(&other).unwrap_err();
        assert_eq!(r.reason, RefusalReason::Unsupported);
        assert!(r.detail.contains("slsa.dev"), "{r}");
        let method = edit("key-p256.sig", |v| {
            v["predicate"]["serialization"]["method"] = "digests".into();
        });
        assert_eq!(
            Statement::parse(&method).unwrap_err().reason,
            RefusalReason::Unsupported
        );
        let escape = edit("key-p256.sig", |v| {
            v["predicate"]["resources"][0]["name"] = "../etc/passwd".into();
        });
        let r = Statement::parse(&escape).unwrap_err();
        assert_eq!(r.reason, RefusalReason::Invalid);
        assert!(r.detail.contains("../etc/passwd"), "{r}");
    }
}
