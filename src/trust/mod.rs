//! Who signed a model, and what they signed: OpenSSF `model_signing` bundles (`model.sig`)
//! checked against the `[trust]` policy.
//!
//! This module owns the verification half of publisher signatures: reading a Sigstore bundle
//! and its DSSE envelope (`bundle.rs`), the in-toto statement it signs (`statement.rs`), the
//! public-key and X.509 machinery over RustCrypto (`pki.rs`), Sigstore keyless material (the
//! trusted root, Fulcio identities, Rekor's signed entry timestamps: `keyless.rs`), and the
//! policy that ties them to what the operator trusts (`policy.rs`: `[trust]`, `Anchors`).
//! The verification half knows nothing of manifests, mounts or fetching: it turns bytes of a
//! bundle into a [`policy::Signed`] (signer + statement) or a [`Refusal`] with its reason.
//! Binding a statement to a manifest entry (`bind.rs`: each file's `Plan`) and what a verdict
//! does to a model (`gate.rs`: `ModelTrust`, the gate of every read and fetch) sit on top.
//!
//! No cryptography is written here: signatures, digests and certificate parsing are RustCrypto's
//! (`p256`, `p384`, `p521`, `ed25519-dalek`, `sha2`, `x509-cert`); this module only decides what
//! to check (docs/DESIGN-NOTES.md, "Publisher signatures").

pub mod bind;
pub mod bundle;
pub mod gate;
pub mod keyless;
pub mod pki;
pub mod policy;
pub mod statement;

pub use policy::{Anchors, Signed, Signer, TrustConfig, TrustIdentity};
pub use statement::{Method, Resource, SignedFile, SignedHash, Statement};

/// Why a model's signature was not accepted: the `reason` label of the refusal metric and the
/// first word of the reason shown in status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// No `model.sig` where `require_signature` wants one.
    Missing,
    /// A bundle that does not parse, or whose signature, chain or statement does not hold.
    Invalid,
    /// A sound signature by a key, CA or identity that `[trust]` does not name (or an expired
    /// certificate).
    Untrusted,
    /// A valid statement that does not describe the model's entry.
    Mismatch,
    /// A well-formed bundle using something wanfs does not verify (a key type, a method).
    Unsupported,
    /// The bundle could not be read (its source failed).
    Unavailable,
}

impl RefusalReason {
    /// The metric label and status word.
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

    /// Every reason, for metrics that export a zero for each label.
    pub const ALL: [RefusalReason; 6] = [
        RefusalReason::Missing,
        RefusalReason::Invalid,
        RefusalReason::Untrusted,
        RefusalReason::Mismatch,
        RefusalReason::Unsupported,
        RefusalReason::Unavailable,
    ];
}

/// A signature not accepted: why (`reason`) and, for people, what exactly (`detail` names the
/// key, certificate, file or field at fault).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub detail: String,
}

impl Refusal {
    pub fn new(reason: RefusalReason, detail: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            detail: detail.into(),
        }
    }
    pub fn invalid(detail: impl Into<String>) -> Refusal {
        Refusal::new(RefusalReason::Invalid, detail)
    }
    pub fn untrusted(detail: impl Into<String>) -> Refusal {
        Refusal::new(RefusalReason::Untrusted, detail)
    }
    pub fn unsupported(detail: impl Into<String>) -> Refusal {
        Refusal::new(RefusalReason::Unsupported, detail)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for Refusal {}

/// The bytes of `fixtures/trust/NAME` (bundles, keys and certificates made by the real tools:
/// fixtures/trust/make.sh).
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/fixtures/trust/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}
