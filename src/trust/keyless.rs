//! Sigstore keyless signatures, verified offline: a Fulcio certificate naming an identity, and
//! a Rekor entry whose signed entry timestamp proves when the signature was logged.
//!
//! Owns reading a Sigstore `trusted_root.json` (Fulcio CA chains and Rekor keys with their
//! validity windows) and [`TrustedRoot::verify`]: the Rekor entry's SET with the log's key, the
//! entry's body bound to this envelope (payload hash, signature, certificate), the leaf chained
//! to a Fulcio CA *at the logged time* (a Fulcio leaf lives ten minutes: the SET is the trusted
//! time), and the identity (SAN + OIDC issuer extension) matched against `[trust.identities]`.
//! When the entry carries an inclusion proof, it is checked too, with the checkpoint's
//! signature. Not checked: the SCT of the CT log, RFC 3161 timestamps (docs/DESIGN-NOTES.md, "Publisher signatures").

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use der::Decode;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use spki::ObjectIdentifier;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use super::Refusal;
use super::bundle::{Bundle, InclusionProof, TlogEntry};
use super::pki::{self, Cert, PublicKey};
use super::policy::{Signer, TrustIdentity};

const EXT_SUBJECT_ALT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");
/// Fulcio's OIDC issuer, DER UTF8String (current certificates).
const EXT_FULCIO_ISSUER_V2: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.57264.1.8");
/// Fulcio's OIDC issuer, raw bytes (older certificates).
const EXT_FULCIO_ISSUER_V1: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.57264.1.1");

/// A Sigstore trusted root: the Fulcio CAs and Rekor logs keyless signatures are checked with.
#[derive(Clone, Debug)]
pub struct TrustedRoot {
    cas: Vec<CertificateAuthority>,
    logs: Vec<TransparencyLog>,
}

#[derive(Clone, Debug)]
struct CertificateAuthority {
    certs: Vec<Cert>,
    valid: Window,
}

#[derive(Clone, Debug)]
struct TransparencyLog {
    key_id: Vec<u8>,
    key: PublicKey,
    valid: Window,
}

/// A validity window (`validFor`): from `start`, until `end` if set.
#[derive(Clone, Copy, Debug)]
struct Window {
    start: SystemTime,
    end: Option<SystemTime>,
}

impl Window {
    fn contains(&self, t: SystemTime) -> bool {
        self.start <= t && self.end.is_none_or(|end| t <= end)
    }
}

impl TrustedRoot {
    /// Reads `trusted_root.json` as the Sigstore clients ship it.
    pub fn parse(bytes: &[u8]) -> Result<TrustedRoot, String> {
        let raw: RawRoot = serde_json::from_slice(bytes)
            .map_err(|e| format!("not a Sigstore trusted root: {e}"))?;
        let mut cas = Vec::new();
        for (i, ca) in raw.certificate_authorities.iter().enumerate() {
            let certs = ca
                .cert_chain
                .certificates
                .iter()
                .map(|c| {
                    let der = STANDARD.decode(&c.raw_bytes).map_err(|e| e.to_string())?;
                    Cert::from_der(&der)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("certificateAuthorities[{i}]: {e}"))?;
            cas.push(CertificateAuthority {
                certs,
                valid: window(&ca.valid_for)
                    .map_err(|e| format!("certificateAuthorities[{i}]: {e}"))?,
            });
        }
        let mut logs = Vec::new();
        for (i, log) in raw.tlogs.iter().enumerate() {
            let key_id = STANDARD
                .decode(&log.log_id.key_id)
                .map_err(|e| format!("tlogs[{i}].logId: {e}"))?;
            let der = STANDARD
                .decode(&log.public_key.raw_bytes)
                .map_err(|e| format!("tlogs[{i}].publicKey: {e}"))?;
            let key = PublicKey::from_spki_der(&der).map_err(|e| format!("tlogs[{i}]: {e}"))?;
            logs.push(TransparencyLog {
                key_id,
                key,
                valid: window(&log.public_key.valid_for).map_err(|e| format!("tlogs[{i}]: {e}"))?,
            });
        }
        if cas.is_empty() || logs.is_empty() {
            return Err("names no certificate authority or no transparency log".into());
        }
        Ok(TrustedRoot { cas, logs })
    }

    /// Verifies a keyless bundle's certificate and log entry, and returns the leaf's key (the
    /// caller checks the envelope's signature with it) and the signer.
    pub fn verify(
        &self,
        leaf: &Cert,
        chain: &[Cert],
        bundle: &Bundle,
        identities: &[TrustIdentity],
    ) -> Result<(PublicKey, Signer), Refusal> {
        let logged = self.logged_time(leaf, bundle)?;
        // Every CA valid when the entry was logged; their whole chains are trusted.
        let anchors: Vec<Cert> = self
            .cas
            .iter()
            .filter(|ca| ca.valid.contains(logged))
            .flat_map(|ca| ca.certs.iter().cloned())
            .collect();
        pki::verify_chain(leaf, chain, &anchors, logged)?;
        if !leaf.may_sign() {
            return Err(Refusal::untrusted(format!(
                "Fulcio certificate {} may not sign code",
                leaf.fingerprint()
            )));
        }
        let (identity, issuer) = identity(leaf).map_err(Refusal::invalid)?;
        if !identities
            .iter()
            .any(|t| t.identity == identity && t.issuer == issuer)
        {
            return Err(Refusal::untrusted(format!(
                "keyless signature by {identity} ({issuer}), which is not in [trust] identities"
            )));
        }
        let key = leaf
            .public_key()
            .map_err(|e| Refusal::unsupported(format!("Fulcio certificate: {e}")))?;
        Ok((key, Signer::Keyless { identity, issuer }))
    }

    /// The time a trusted log says it logged this very signature: the first entry whose SET
    /// verifies with a known log's key and whose body is this envelope's.
    fn logged_time(&self, leaf: &Cert, bundle: &Bundle) -> Result<SystemTime, Refusal> {
        let Some(entry) = bundle.tlog_entries.first() else {
            return Err(Refusal::invalid(
                "keyless bundle carries no transparency log entry",
            ));
        };
        let Some(log) = self.logs.iter().find(|l| l.key_id == entry.log_id) else {
            return Err(Refusal::untrusted(format!(
                "transparency log entry from log {}, which the trusted root does not name",
                pki::hex(&entry.log_id)
            )));
        };
        let Some(set) = &entry.signed_entry_timestamp else {
            return Err(Refusal::unsupported(
                "transparency log entry without a signed entry timestamp (the only signed time \
                 of a Rekor v1 entry, which a Fulcio certificate needs)",
            ));
        };
        log.key.verify(&set_message(entry), set).map_err(|e| {
            Refusal::invalid(format!(
                "transparency log entry {}: its signed entry timestamp does not verify: {e}",
                entry.log_index
            ))
        })?;
        let logged = u64::try_from(entry.integrated_time)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
            .map_err(|_| Refusal::invalid("transparency log entry time is negative"))?;
        if !log.valid.contains(logged) {
            return Err(Refusal::untrusted(format!(
                "transparency log entry {} logged at {}, outside its log key's validity",
                entry.log_index,
                pki::rfc3339(logged)
            )));
        }
        bind_body(entry, leaf, bundle)?;
        if let Some(proof) = &entry.inclusion_proof {
            verify_inclusion(entry, proof, log)?;
        }
        Ok(logged)
    }
}

/// The entry is in the log: its leaf hash, chained up the proof's hashes, is the root that
/// the log's checkpoint, signed with the log's key, names (RFC 6962 §2.1.1; the checkpoint is a
/// signed note, as sigstore-python and sigstore-go check it). Hashing is `sha2`'s, the
/// checkpoint's signature the log key's.
fn verify_inclusion(
    entry: &TlogEntry,
    proof: &InclusionProof,
    log: &TransparencyLog,
) -> Result<(), Refusal> {
    let bad = |why: String| {
        Refusal::invalid(format!(
            "transparency log entry {}: inclusion proof: {why}",
            entry.log_index
        ))
    };
    if proof.log_index >= proof.tree_size {
        return Err(bad(format!(
            "index {} outside a tree of {}",
            proof.log_index, proof.tree_size
        )));
    }
    // Hashes below the point where the leaf's path and the tree's last leaf's path part
    // ("inner"), then those on the right border.
    let inner = (u64::BITS - (proof.log_index ^ (proof.tree_size - 1)).leading_zeros()) as usize;
    let border = (proof.log_index >> inner).count_ones() as usize;
    if proof.hashes.len() != inner + border {
        return Err(bad(format!(
            "{} hashes where the tree needs {}",
            proof.hashes.len(),
            inner + border
        )));
    }
    let node = |left: &[u8], right: &[u8]| -> Vec<u8> {
        Sha256::new()
            .chain_update([1u8])
            .chain_update(left)
            .chain_update(right)
            .finalize()
            .to_vec()
    };
    let mut hash = Sha256::new()
        .chain_update([0u8])
        .chain_update(&entry.canonicalized_body)
        .finalize()
        .to_vec();
    for (i, h) in proof.hashes[..inner].iter().enumerate() {
        hash = if (proof.log_index >> i) & 1 == 0 {
            node(&hash, h)
        } else {
            node(h, &hash)
        };
    }
    for h in &proof.hashes[inner..] {
        hash = node(h, &hash);
    }
    if hash != proof.root_hash {
        return Err(bad("the entry does not hash to the proof's root".into()));
    }
    // The signed note: "origin\nsize\nroot (base64)\n[other lines]\n\n— name base64(hint ‖ sig)\n".
    let (note, signatures) = proof
        .checkpoint
        .split_once("\n\n")
        .ok_or_else(|| bad("checkpoint is not a signed note".into()))?;
    let mut lines = note.lines().skip(1);
    let size = lines.next().and_then(|l| l.parse::<u64>().ok());
    let root = lines.next().and_then(|l| STANDARD.decode(l).ok());
    if size != Some(proof.tree_size) || root.as_deref() != Some(&proof.root_hash[..]) {
        return Err(bad("checkpoint names another tree than the proof".into()));
    }
    let signed = format!("{note}\n");
    let hint = log.key_id.get(..4);
    let verified = signatures.lines().any(|line| {
        let Some(sig) = line
            .strip_prefix("\u{2014} ")
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, b)| STANDARD.decode(b).ok())
        else {
            return false;
        };
        sig.len() > 4
            && Some(&sig[..4]) == hint
            && log.key.verify(signed.as_bytes(), &sig[4..]).is_ok()
    });
    if !verified {
        return Err(bad(
            "checkpoint's signature does not verify with the log's key".into(),
        ));
    }
    Ok(())
}

/// What Rekor signs as an entry's SET: canonical JSON (sorted keys, no spaces) of the body
/// (base64), integrated time, log id (hex) and index, as sigstore-python and sigstore-go
/// rebuild it.
fn set_message(entry: &TlogEntry) -> Vec<u8> {
    format!(
        r#"{{"body":"{}","integratedTime":{},"logID":"{}","logIndex":{}}}"#,
        STANDARD.encode(&entry.canonicalized_body),
        entry.integrated_time,
        pki::hex(&entry.log_id),
        entry.log_index
    )
    .into_bytes()
}

/// The entry must be of this envelope: a `dsse` entry whose payload hash is this payload's
/// and whose signature and verifier are this bundle's.
fn bind_body(entry: &TlogEntry, leaf: &Cert, bundle: &Bundle) -> Result<(), Refusal> {
    let not_ours = |why: &str| {
        Refusal::invalid(format!(
            "transparency log entry {} is not of this signature: {why}",
            entry.log_index
        ))
    };
    let body: RawDsseBody = serde_json::from_slice(&entry.canonicalized_body)
        .map_err(|e| not_ours(&format!("body unreadable: {e}")))?;
    if body.kind != "dsse" || entry.kind != "dsse" {
        return Err(Refusal::unsupported(format!(
            "transparency log entry kind {:?} (only dsse entries are checked)",
            body.kind
        )));
    }
    let envelope = &bundle.envelope;
    let payload_hash = pki::hex(&Sha256::digest(&envelope.payload));
    if body.spec.payload_hash.algorithm != "sha256" || body.spec.payload_hash.value != payload_hash
    {
        return Err(not_ours("payload hash differs"));
    }
    let ours = body.spec.signatures.iter().any(|s| {
        let sig = STANDARD.decode(&s.signature).ok();
        let verifier = STANDARD
            .decode(&s.verifier)
            .ok()
            .and_then(|pem| pki::pem_blocks(&pem).ok())
            .and_then(|b| b.into_iter().next());
        sig.as_deref() == Some(&envelope.signature[..])
            && verifier.is_some_and(|(_, der)| der == leaf.der)
    });
    if !ours {
        return Err(not_ours("signature or certificate differs"));
    }
    Ok(())
}

/// A Fulcio certificate's (identity, issuer): its SAN (email or URI) and the OIDC issuer
/// extension.
pub fn identity(leaf: &Cert) -> Result<(String, String), String> {
    let san = leaf
        .extension(EXT_SUBJECT_ALT_NAME)
        .and_then(|v| SubjectAltName::from_der(v).ok())
        .and_then(|san| {
            san.0.into_iter().find_map(|n| match n {
                GeneralName::Rfc822Name(s) | GeneralName::UniformResourceIdentifier(s) => {
                    Some(s.to_string())
                }
                _ => None,
            })
        })
        .ok_or("Fulcio certificate without an email or URI subject alternative name")?;
    let issuer = if let Some(v) = leaf.extension(EXT_FULCIO_ISSUER_V2) {
        der::asn1::Utf8StringRef::from_der(v)
            .map(|s| s.as_str().to_string())
            .map_err(|e| format!("Fulcio certificate's issuer extension: {e}"))?
    } else if let Some(v) = leaf.extension(EXT_FULCIO_ISSUER_V1) {
        String::from_utf8(v.to_vec())
            .map_err(|_| "Fulcio certificate's issuer extension is not UTF-8".to_string())?
    } else {
        return Err("Fulcio certificate without an OIDC issuer extension".into());
    };
    Ok((san, issuer))
}

fn window(v: &Option<RawValidFor>) -> Result<Window, String> {
    let parse = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64))
            .map_err(|e| format!("validFor time {s:?}: {e}"))
    };
    // A key or CA without a window is valid whenever.
    let Some(v) = v else {
        return Ok(Window {
            start: SystemTime::UNIX_EPOCH,
            end: None,
        });
    };
    Ok(Window {
        start: parse(&v.start)?,
        end: v.end.as_deref().map(parse).transpose()?,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRoot {
    #[serde(default)]
    tlogs: Vec<RawLog>,
    #[serde(default)]
    certificate_authorities: Vec<RawCa>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLog {
    public_key: RawLogKey,
    log_id: RawLogId,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLogKey {
    raw_bytes: String,
    valid_for: Option<RawValidFor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLogId {
    key_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCa {
    cert_chain: super::bundle::RawChain,
    valid_for: Option<RawValidFor>,
}

#[derive(Deserialize)]
struct RawValidFor {
    start: String,
    end: Option<String>,
}

#[derive(Deserialize)]
struct RawDsseBody {
    kind: String,
    spec: RawDsseSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDsseSpec {
    payload_hash: RawHash,
    signatures: Vec<RawDsseSignature>,
}

#[derive(Deserialize)]
struct RawHash {
    algorithm: String,
    value: String,
}

#[derive(Deserialize)]
struct RawDsseSignature {
    signature: String,
    verifier: String,
}
