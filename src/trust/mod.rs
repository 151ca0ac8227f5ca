//! TEMPORARY: B's interface (src/trust/mod.rs, bundle/statement/policy), replaced at merge.
pub mod bind;
pub mod gate;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub model_name: String,
    pub method: Method,
    pub hash_type: SignedHash,
    pub ignore_paths: Vec<String>,
    pub resources: Vec<Resource>,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Files,
    Shards { shard_size: u64 },
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedHash {
    Sha256,
    Blake2b,
    Blake3,
}
impl SignedHash {
    pub fn as_str(self) -> &'static str {
        match self {
            SignedHash::Sha256 => "sha256",
            SignedHash::Blake2b => "blake2b",
            SignedHash::Blake3 => "blake3",
        }
    }
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    pub algorithm: SignedHash,
    pub digest: Vec<u8>,
}
#[derive(Debug, Clone)]
pub struct Signed {
    pub signer: Signer,
    pub statement: Statement,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signer {
    Key {
        fingerprint: String,
    },
    Certificate {
        subject: String,
        fingerprint: String,
    },
    Keyless {
        identity: String,
        issuer: String,
    },
}
impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Key { fingerprint } => write!(f, "key sha256:{fingerprint}"),
            Signer::Certificate { subject, .. } => write!(f, "certificate {subject}"),
            Signer::Keyless { identity, issuer } => write!(f, "keyless {identity} ({issuer})"),
        }
    }
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub detail: String,
}
impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    Missing,
    Invalid,
    Untrusted,
    Mismatch,
    Unsupported,
    Unavailable,
}
impl RefusalReason {
    pub const ALL: [RefusalReason; 6] = [
        RefusalReason::Missing,
        RefusalReason::Invalid,
        RefusalReason::Untrusted,
        RefusalReason::Mismatch,
        RefusalReason::Unsupported,
        RefusalReason::Unavailable,
    ];
    pub fn as_label(self) -> &'static str {
        match self {
            RefusalReason::Missing => "missing",
            RefusalReason::Invalid => "invalid",
            RefusalReason::Untrusted => "untrusted",
            RefusalReason::Mismatch => "mismatch",
            RefusalReason::Unsupported => "unsupported",
            RefusalReason::Unavailable => "unavailable",
        }
    }
}
#[derive(Default)]
pub struct Anchors {
    _tmp: (),
}
impl Anchors {
    pub fn verify(&self, _b: &[u8], _now: std::time::SystemTime) -> Result<Signed, Refusal> {
        Err(Refusal {
            reason: RefusalReason::Invalid,
            detail: "tmp".into(),
        })
    }
    pub fn is_empty(&self) -> bool {
        true
    }
}
