//! The Sigstore bundle `model_signing` writes as `model.sig`, read into plain types, and the
//! DSSE pre-authentication encoding its signature covers.
//!
//! Owns the bundle's JSON shape (media types v0.2 and v0.3, `verificationMaterial`,
//! `tlogEntries`, `dsseEnvelope`) and nothing of what it means: which key or chain to trust is
//! `policy.rs`'s, what a Rekor entry proves is `keyless.rs`'s. Every parse failure is an
//! `Invalid` refusal that names the field.

use base64::Engine;
use serde::Deserialize;

use super::Refusal;

/// The only payload type a `model_signing` envelope carries (an in-toto statement).
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// Bundle media types read: what `model_signing` 1.x writes (v0.3), and the older and
/// newer spellings the Sigstore clients write for the same shape.
const MEDIA_TYPES: [&str; 4] = [
    "application/vnd.dev.sigstore.bundle.v0.3+json",
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
    "application/vnd.dev.sigstore.bundle.v0.2+json",
    "application/vnd.dev.sigstore.bundle+json;version=0.2",
];

/// A parsed bundle.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub media_type: String,
    pub material: Material,
    pub tlog_entries: Vec<TlogEntry>,
    pub envelope: Envelope,
}

/// Who the bundle says signed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Material {
    /// `publicKey {hint}`: `model_signing sign key`; the hint is the key's fingerprint
    /// (`pki::key_fingerprint`), absent in bundles older than 1.0.
    PublicKey { hint: Option<String> },
    /// `x509CertificateChain`: leaf first, then the chain the signer included (DER).
    Chain(Vec<Vec<u8>>),
    /// `certificate`: a leaf alone (DER), as keyless v0.3 bundles carry it.
    Certificate(Vec<u8>),
}

/// The DSSE envelope: the statement's bytes and the signature over their PAE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub payload: Vec<u8>,
    pub payload_type: String,
    /// The signature as it was base64 in the bundle (Rekor's entry names it so).
    pub signature_b64: String,
    pub signature: Vec<u8>,
}

impl Envelope {
    /// The bytes the signature covers.
    pub fn pae(&self) -> Vec<u8> {
        pae(&self.payload_type, &self.payload)
    }
}

/// A transparency log entry (Rekor v1), as keyless bundles carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlogEntry {
    pub log_index: i64,
    pub log_id: Vec<u8>,
    pub kind: String,
    pub version: String,
    pub integrated_time: i64,
    /// The signed entry timestamp (`inclusionPromise`), absent in entries that carry only an
    /// inclusion proof.
    pub signed_entry_timestamp: Option<Vec<u8>>,
    /// The entry's Merkle inclusion proof with the log's signed checkpoint, when present.
    pub inclusion_proof: Option<InclusionProof>,
    pub canonicalized_body: Vec<u8>,
}

/// An entry's place in the log's Merkle tree, and the checkpoint (a signed note) naming the
/// tree's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InclusionProof {
    /// The leaf's index in this tree (the log shard's own, not the entry's global index).
    pub log_index: u64,
    pub tree_size: u64,
    pub root_hash: Vec<u8>,
    pub hashes: Vec<Vec<u8>>,
    pub checkpoint: String,
}

/// DSSE v1's pre-authentication encoding, as `model_signing`'s `pae`
/// (`_signing/sign_sigstore_pb.py`): `"DSSEv1" SP len(type) SP type SP len(body) SP body`,
/// lengths in decimal bytes.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

impl Bundle {
    /// Parses a bundle. A bundle that signs something other than an in-toto statement, or that
    /// carries a message signature instead of an envelope, is `Unsupported`; anything garbled
    /// is `Invalid`.
    pub fn parse(bytes: &[u8]) -> Result<Bundle, Refusal> {
        let raw: RawBundle = serde_json::from_slice(bytes)
            .map_err(|e| Refusal::invalid(format!("model.sig is not a Sigstore bundle: {e}")))?;
        if !MEDIA_TYPES.contains(&raw.media_type.as_str()) {
            return Err(Refusal::unsupported(format!(
                "bundle media type {:?} (wanfs reads Sigstore bundles v0.2 and v0.3)",
                raw.media_type
            )));
        }
        let m = raw.verification_material;
        let material = match (m.public_key, m.x509_certificate_chain, m.certificate) {
            (Some(k), None, None) => Material::PublicKey { hint: k.hint },
            (None, Some(chain), None) => {
                if chain.certificates.is_empty() {
                    return Err(Refusal::invalid("bundle's certificate chain is empty"));
                }
                let certs = chain
                    .certificates
                    .iter()
                    .enumerate()
                    .map(|(i, c)| b64(&c.raw_bytes, &format!("certificate {i}")))
                    .collect::<Result<_, _>>()?;
                Material::Chain(certs)
            }
            (None, None, Some(c)) => Material::Certificate(b64(&c.raw_bytes, "certificate")?),
            _ => {
                return Err(Refusal::invalid(
                    "bundle's verificationMaterial must hold exactly one of publicKey, \
                     x509CertificateChain, certificate",
                ));
            }
        };
        let tlog_entries = m
            .tlog_entries
            .into_iter()
            .map(TlogEntry::from_raw)
            .collect::<Result<_, _>>()?;
        let Some(env) = raw.dsse_envelope else {
            return Err(Refusal::unsupported(
                "bundle holds no DSSE envelope (a message signature is not a model signature)",
            ));
        };
        if env.payload_type != IN_TOTO_PAYLOAD_TYPE {
            return Err(Refusal::unsupported(format!(
                "envelope payload type {:?}, not {IN_TOTO_PAYLOAD_TYPE}",
                env.payload_type
            )));
        }
        // `model_signing` signs once and checks the first signature; a second one would be a
        // signature nobody checks.
        let [sig] = env.signatures.as_slice() else {
            return Err(Refusal::invalid(format!(
                "envelope carries {} signatures, not one",
                env.signatures.len()
            )));
        };
        Ok(Bundle {
            media_type: raw.media_type,
            material,
            tlog_entries,
            envelope: Envelope {
                payload: b64(&env.payload, "envelope payload")?,
                payload_type: env.payload_type,
                signature: b64(&sig.sig, "envelope signature")?,
                signature_b64: sig.sig.clone(),
            },
        })
    }
}

impl TlogEntry {
    fn from_raw(raw: RawTlogEntry) -> Result<TlogEntry, Refusal> {
        let int = |s: &StrOrInt, what: &str| {
            s.value()
                .ok_or_else(|| Refusal::invalid(format!("tlog entry {what} is not an integer")))
        };
        Ok(TlogEntry {
            log_index: int(&raw.log_index, "logIndex")?,
            log_id: b64(&raw.log_id.key_id, "tlog entry logId")?,
            kind: raw.kind_version.kind,
            version: raw.kind_version.version,
            integrated_time: int(&raw.integrated_time, "integratedTime")?,
            signed_entry_timestamp: raw
                .inclusion_promise
                .map(|p| b64(&p.signed_entry_timestamp, "signedEntryTimestamp"))
                .transpose()?,
            inclusion_proof: raw
                .inclusion_proof
                .map(|p| -> Result<InclusionProof, Refusal> {
                    let uint = |s: &StrOrInt, what: &str| {
                        s.value()
                            .and_then(|v| u64::try_from(v).ok())
                            .ok_or_else(|| {
                                Refusal::invalid(format!("inclusion proof {what} is not a count"))
                            })
                    };
                    Ok(InclusionProof {
                        log_index: uint(&p.log_index, "logIndex")?,
                        tree_size: uint(&p.tree_size, "treeSize")?,
                        root_hash: b64(&p.root_hash, "inclusion proof rootHash")?,
                        hashes: p
                            .hashes
                            .iter()
                            .map(|h| b64(h, "inclusion proof hash"))
                            .collect::<Result<_, _>>()?,
                        checkpoint: p.checkpoint.envelope,
                    })
                })
                .transpose()?,
            canonicalized_body: b64(&raw.canonicalized_body, "tlog entry canonicalizedBody")?,
        })
    }
}

/// Decodes a protobuf-JSON `bytes` field: standard base64, or the URL-safe alphabet, which
/// protobuf's JSON mapping also accepts.
pub fn b64(text: &str, what: &str) -> Result<Vec<u8>, Refusal> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    STANDARD
        .decode(text)
        .or_else(|_| URL_SAFE.decode(text))
        .map_err(|e| Refusal::invalid(format!("bundle's {what} is not base64: {e}")))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBundle {
    media_type: String,
    verification_material: RawMaterial,
    dsse_envelope: Option<RawEnvelope>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMaterial {
    public_key: Option<RawPublicKey>,
    x509_certificate_chain: Option<RawChain>,
    certificate: Option<RawCert>,
    #[serde(default)]
    tlog_entries: Vec<RawTlogEntry>,
}

#[derive(Deserialize)]
struct RawPublicKey {
    hint: Option<String>,
}

/// `{"certificates": [{"rawBytes": …}]}`: a bundle's chain, and a trusted root's CA chain.
#[derive(Deserialize)]
pub(super) struct RawChain {
    pub(super) certificates: Vec<RawCert>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawCert {
    pub(super) raw_bytes: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEnvelope {
    payload: String,
    payload_type: String,
    signatures: Vec<RawSignature>,
}

#[derive(Deserialize)]
struct RawSignature {
    sig: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTlogEntry {
    log_index: StrOrInt,
    log_id: RawLogId,
    kind_version: RawKindVersion,
    integrated_time: StrOrInt,
    inclusion_promise: Option<RawPromise>,
    inclusion_proof: Option<RawInclusionProof>,
    canonicalized_body: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawInclusionProof {
    log_index: StrOrInt,
    root_hash: String,
    tree_size: StrOrInt,
    #[serde(default)]
    hashes: Vec<String>,
    checkpoint: RawCheckpoint,
}

#[derive(Deserialize)]
struct RawCheckpoint {
    envelope: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLogId {
    key_id: String,
}

#[derive(Deserialize)]
struct RawKindVersion {
    kind: String,
    version: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPromise {
    signed_entry_timestamp: String,
}

/// A protobuf int64: JSON writes it as a string, some writers as a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrInt {
    Str(String),
    Int(i64),
}

impl StrOrInt {
    fn value(&self) -> Option<i64> {
        match self {
            StrOrInt::Str(s) => s.parse().ok(),
            StrOrInt::Int(i) => Some(*i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::RefusalReason;

    use crate::trust::fixture;

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(
            pae("application/vnd.in-toto+json", b"{}"),
            b"DSSEv1 28 application/vnd.in-toto+json 2 {}".to_vec()
        );
    }

    #[test]
    fn reads_every_material_kind() {
        let key = Bundle::parse(&fixture("key-p256.sig")).unwrap();
        assert!(matches!(key.material, Material::PublicKey { hint: Some(ref h) } if h.len() == 64));
        assert!(key.tlog_entries.is_empty());
        assert_eq!(key.envelope.payload_type, IN_TOTO_PAYLOAD_TYPE);
        let cert = Bundle::parse(&fixture("cert.sig")).unwrap();
        assert!(matches!(cert.material, Material::Chain(ref c) if c.len() == 2));
        let keyless = Bundle::parse(&fixture("keyless/model.sig")).unwrap();
        assert!(matches!(keyless.material, Material::Certificate(_)));
        assert_eq!(keyless.tlog_entries.len(), 1);
        assert_eq!(keyless.tlog_entries[0].kind, "dsse");
        assert!(keyless.tlog_entries[0].signed_entry_timestamp.is_some());
    }

    #[test]
    fn refuses_what_is_not_a_model_signature() {
        let text = String::from_utf8(fixture("key-p256.sig")).unwrap();
        let other_type = text.replace(IN_TOTO_PAYLOAD_TYPE, "text/plain");
        let r = Bundle::parse(other_type.as_bytes()).unwrap_err();
        assert_eq!(r.reason, RefusalReason::Unsupported);
        assert!(r.detail.contains("text/plain"), "{r}");
        let media = text.replace("bundle.v0.3+json", "bundle.v9+json");
        let r = Bundle::parse(media.as_bytes()).unwrap_err();
        assert_eq!(r.reason, RefusalReason::Unsupported);
        let r = Bundle::parse(&fixture("key-p256.sig")[..100]).unwrap_err();
        assert_eq!(r.reason, RefusalReason::Invalid);
    }
}
