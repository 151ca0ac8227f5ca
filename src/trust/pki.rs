//! Public keys, PEM files and X.509 chains for `trust`, over RustCrypto.
//!
//! Owns: reading PEM public keys and certificates (one or several per file), the key
//! fingerprint `model_signing` writes as its bundle's `hint`, verifying a signature with a key
//! (ECDSA P-256/P-384/P-521 in ASN.1 DER, Ed25519), and walking a certificate chain to a set of
//! trusted certificates at a given time. Every signature check and digest is a call into
//! `p256`/`p384`/`p521`/`ed25519-dalek`/`sha2`; certificates are decoded by `x509-cert`.
//! What a chain is *for* (a publisher CA, Fulcio) is decided by the callers.

use std::time::SystemTime;

use der::{Decode, Encode};
use ecdsa::signature::Verifier;
use ecdsa::signature::hazmat::PrehashVerifier;
use sha2::{Digest, Sha256, Sha384, Sha512};
use spki::ObjectIdentifier;
use x509_cert::Certificate;
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage};

use super::Refusal;

const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const SECP521R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");
const ID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const ECDSA_WITH_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.4");
const EXT_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const EXT_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
const EXT_EXTENDED_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const EKU_CODE_SIGNING: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.3");

/// The longest chain walked, leaf to anchor: deeper is a loop or an attack, not a PKI.
const MAX_CHAIN: usize = 8;

/// A digest named by a certificate's signature algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    Sha256,
    Sha384,
    Sha512,
}

/// A public key wanfs can verify signatures with.
#[derive(Clone)]
pub enum PublicKey {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    P521(p521::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl std::fmt::Debug for PublicKey {
    // `p521`'s key has no `Debug`; the kind is what a message needs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl PublicKey {
    /// Reads a DER `SubjectPublicKeyInfo`; the error says what the key is when it is not one of
    /// ours.
    pub fn from_spki_der(der: &[u8]) -> Result<PublicKey, String> {
        let spki = spki::SubjectPublicKeyInfoRef::from_der(der)
            .map_err(|e| format!("not a DER public key (SubjectPublicKeyInfo): {e}"))?;
        let bits = spki
            .subject_public_key
            .as_bytes()
            .ok_or("public key bit string has unused bits")?;
        let alg = spki.algorithm.oid;
        if alg == ID_ED25519 {
            let raw: [u8; 32] = bits
                .try_into()
                .map_err(|_| format!("Ed25519 key of {} bytes, not 32", bits.len()))?;
            return ed25519_dalek::VerifyingKey::from_bytes(&raw)
                .map(PublicKey::Ed25519)
                .map_err(|e| format!("bad Ed25519 key: {e}"));
        }
        if alg != ID_EC_PUBLIC_KEY {
            return Err(format!(
                "unsupported key algorithm {alg} (ECDSA P-256/P-384/P-521 or Ed25519 only)"
            ));
        }
        let curve = spki
            .algorithm
            .parameters_oid()
            .map_err(|_| "EC key without a named curve".to_string())?;
        let bad = |e: ecdsa::Error| format!("bad EC point: {e}");
        match curve {
            SECP256R1 => p256::ecdsa::VerifyingKey::from_sec1_bytes(bits)
                .map(PublicKey::P256)
                .map_err(bad),
            SECP384R1 => p384::ecdsa::VerifyingKey::from_sec1_bytes(bits)
                .map(PublicKey::P384)
                .map_err(bad),
            SECP521R1 => p521::ecdsa::VerifyingKey::from_sec1_bytes(bits)
                .map(PublicKey::P521)
                .map_err(bad),
            other => Err(format!(
                "unsupported EC curve {other} (P-256, P-384 or P-521 only)"
            )),
        }
    }

    /// What kind of key, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            PublicKey::P256(_) => "ECDSA P-256",
            PublicKey::P384(_) => "ECDSA P-384",
            PublicKey::P521(_) => "ECDSA P-521",
            PublicKey::Ed25519(_) => "Ed25519",
        }
    }

    /// Verifies `sig` over `msg` as `model_signing` signs: ECDSA with the curve's own hash
    /// (P-256 → SHA-256, P-384 → SHA-384, P-521 → SHA-512, its `get_ec_key_hash`), the signature
    /// ASN.1 DER; Ed25519 over the message itself.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), String> {
        let bad = |e: ecdsa::Error| e.to_string();
        match self {
            PublicKey::P256(k) => {
                let s = p256::ecdsa::Signature::from_der(sig).map_err(bad)?;
                k.verify(msg, &s).map_err(bad)
            }
            PublicKey::P384(k) => {
                let s = p384::ecdsa::Signature::from_der(sig).map_err(bad)?;
                k.verify(msg, &s).map_err(bad)
            }
            PublicKey::P521(k) => {
                let s = p521::ecdsa::Signature::from_der(sig).map_err(bad)?;
                k.verify(msg, &s).map_err(bad)
            }
            PublicKey::Ed25519(k) => {
                let s = ed25519_dalek::Signature::from_slice(sig).map_err(bad)?;
                k.verify_strict(msg, &s).map_err(bad)
            }
        }
    }

    /// Verifies an ECDSA DER signature over `msg` hashed with `hash` (a certificate names its
    /// own hash, which need not be the curve's), or an Ed25519 signature (`hash` is `None`).
    fn verify_with(&self, hash: Option<HashAlg>, msg: &[u8], sig: &[u8]) -> Result<(), String> {
        let digest = match hash {
            Some(HashAlg::Sha256) => Sha256::digest(msg).to_vec(),
            Some(HashAlg::Sha384) => Sha384::digest(msg).to_vec(),
            Some(HashAlg::Sha512) => Sha512::digest(msg).to_vec(),
            None => Vec::new(),
        };
        let bad = |e: ecdsa::Error| e.to_string();
        match (self, hash) {
            (PublicKey::Ed25519(_), None) => self.verify(msg, sig),
            (PublicKey::P256(k), Some(_)) => {
                let s = p256::ecdsa::Signature::from_der(sig).map_err(bad)?;
                k.verify_prehash(&digest, &s).map_err(bad)
            }
            (PublicKey::P384(k), Some(_)) => {
                let s = p384::ecdsa::Signature::from_der(sig).map_err(bad)?;
                k.verify_prehash(&digest, &s).map_err(bad)
            }
            (PublicKey::P521(k), Some(_)) => {
                let s = p521::ecdsa::Signature::from_der(sig).map_err(bad)?;
                k.verify_prehash(&digest, &s).map_err(bad)
            }
            _ => Err(format!(
                "a {} key cannot check this signature algorithm",
                self.kind()
            )),
        }
    }
}

/// The blocks of a PEM file: (label, DER), in order. Text around the blocks is ignored, as
/// OpenSSL does (certificate bundles often carry comments).
pub fn pem_blocks(text: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const END: &[u8] = b"-----END ";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = find(rest, BEGIN) {
        rest = &rest[at..];
        let end = find(rest, END).ok_or("a PEM block without its END line")?;
        // The END line runs to its closing dashes.
        let close = find(&rest[end + END.len()..], b"-----")
            .ok_or("a PEM END line without its closing dashes")?;
        let stop = end + END.len() + close + 5;
        let (label, der) =
            pem_rfc7468::decode_vec(&rest[..stop]).map_err(|e| format!("bad PEM block: {e}"))?;
        out.push((label.to_string(), der));
        rest = &rest[stop..];
    }
    Ok(out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The fingerprint `model_signing` writes as `verificationMaterial.publicKey.hint`: hex sha256
/// of the key's SubjectPublicKeyInfo PEM as Python's `cryptography` writes it (64-column
/// base64, `\n` line ends). Kept equal to it so the hint picks the configured key.
pub fn key_fingerprint(spki_der: &[u8]) -> String {
    let pem = pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, spki_der)
        .expect("a PEM encoding of bytes in memory cannot fail");
    hex(&Sha256::digest(pem.as_bytes()))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A decoded X.509 certificate with its DER.
#[derive(Clone, Debug)]
pub struct Cert {
    pub der: Vec<u8>,
    pub cert: Certificate,
}

impl Cert {
    pub fn from_der(der: &[u8]) -> Result<Cert, String> {
        let cert =
            Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        Ok(Cert {
            der: der.to_vec(),
            cert,
        })
    }

    /// Its subject, RFC 4514 (`CN=release signer,O=wanfs test`).
    pub fn subject(&self) -> String {
        self.cert.tbs_certificate.subject.to_string()
    }

    /// Hex sha256 of its DER, the fingerprint `openssl x509 -fingerprint -sha256` shows.
    pub fn fingerprint(&self) -> String {
        hex(&Sha256::digest(&self.der))
    }

    pub fn public_key(&self) -> Result<PublicKey, String> {
        let spki = self
            .cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| e.to_string())?;
        PublicKey::from_spki_der(&spki)
    }

    pub fn not_before(&self) -> SystemTime {
        self.cert
            .tbs_certificate
            .validity
            .not_before
            .to_system_time()
    }

    pub fn not_after(&self) -> SystemTime {
        self.cert
            .tbs_certificate
            .validity
            .not_after
            .to_system_time()
    }

    /// The DER value of the extension `oid`, if present.
    pub fn extension(&self, oid: ObjectIdentifier) -> Option<&[u8]> {
        self.cert
            .tbs_certificate
            .extensions
            .as_ref()?
            .iter()
            .find(|e| e.extn_id == oid)
            .map(|e| e.extn_value.as_bytes())
    }

    fn is_ca(&self) -> bool {
        self.extension(EXT_BASIC_CONSTRAINTS)
            .and_then(|v| BasicConstraints::from_der(v).ok())
            .is_some_and(|bc| bc.ca)
    }

    /// Whether it may sign code, as `model_signing` decides: KeyUsage digitalSignature, else
    /// ExtendedKeyUsage codeSigning.
    pub fn may_sign(&self) -> bool {
        let ku = self
            .extension(EXT_KEY_USAGE)
            .and_then(|v| KeyUsage::from_der(v).ok())
            .is_some_and(|ku| ku.digital_signature());
        ku || self
            .extension(EXT_EXTENDED_KEY_USAGE)
            .and_then(|v| ExtendedKeyUsage::from_der(v).ok())
            .is_some_and(|eku| eku.0.contains(&EKU_CODE_SIGNING))
    }

    /// Whether `at` is within its validity.
    pub fn valid_at(&self, at: SystemTime) -> bool {
        self.not_before() <= at && at <= self.not_after()
    }

    /// Whether `issuer` signed it: names match and the signature over its TBS verifies with
    /// `issuer`'s key.
    fn signed_by(&self, issuer: &Cert) -> Result<(), String> {
        if self.cert.tbs_certificate.issuer != issuer.cert.tbs_certificate.subject {
            return Err("issuer name differs".into());
        }
        let tbs = self
            .cert
            .tbs_certificate
            .to_der()
            .map_err(|e| e.to_string())?;
        let alg = self.cert.signature_algorithm.oid;
        let hash = match alg {
            ECDSA_WITH_SHA256 => Some(HashAlg::Sha256),
            ECDSA_WITH_SHA384 => Some(HashAlg::Sha384),
            ECDSA_WITH_SHA512 => Some(HashAlg::Sha512),
            ID_ED25519 => None,
            other => return Err(format!("unsupported signature algorithm {other}")),
        };
        let sig = self
            .cert
            .signature
            .as_bytes()
            .ok_or("signature bit string has unused bits")?;
        issuer.public_key()?.verify_with(hash, &tbs, sig)
    }
}

/// Walks from `leaf` through `intermediates` to one of `anchors`, checking each link's
/// signature, that every issuer is a CA, and that every certificate (the anchor too) is valid
/// at `at`. Returns the anchor reached. A link within the bundle's own chain whose signature
/// fails is `Invalid`; a chain that reaches no anchor (a CA named like an anchor but with
/// another key included), or a certificate outside its validity, is `Untrusted`.
pub fn verify_chain<'a>(
    leaf: &Cert,
    intermediates: &[Cert],
    anchors: &'a [Cert],
    at: SystemTime,
) -> Result<&'a Cert, Refusal> {
    let mut current = leaf.clone();
    for _ in 0..MAX_CHAIN {
        if !current.valid_at(at) {
            return Err(Refusal::untrusted(format!(
                "certificate {} is not valid at the time checked (valid {} to {})",
                current.subject(),
                rfc3339(current.not_before()),
                rfc3339(current.not_after())
            )));
        }
        let named_issuer =
            |c: &&Cert| c.cert.tbs_certificate.subject == current.cert.tbs_certificate.issuer;
        // An anchor ends the walk, even when the bundle carries a copy of it.
        let mut link_error = None;
        for anchor in anchors.iter().filter(named_issuer) {
            match current.signed_by(anchor) {
                Ok(()) if !anchor.is_ca() => {
                    return Err(Refusal::untrusted(format!(
                        "certificate {} is not a CA (basicConstraints)",
                        anchor.subject()
                    )));
                }
                Ok(()) if !anchor.valid_at(at) => {
                    return Err(Refusal::untrusted(format!(
                        "CA certificate {} is not valid at the time checked (valid {} to {})",
                        anchor.subject(),
                        rfc3339(anchor.not_before()),
                        rfc3339(anchor.not_after())
                    )));
                }
                Ok(()) => return Ok(anchor),
                Err(e) => link_error = Some(e),
            }
        }
        let next = intermediates
            .iter()
            .filter(named_issuer)
            .find(|c| c.der != current.der && current.signed_by(c).is_ok());
        match next {
            Some(issuer) if issuer.is_ca() => current = issuer.clone(),
            Some(issuer) => {
                return Err(Refusal::untrusted(format!(
                    "certificate {} is not a CA (basicConstraints)",
                    issuer.subject()
                )));
            }
            None => {
                // A CA named like a trusted one, with another key: not the trusted CA.
                if let Some(e) = link_error {
                    return Err(Refusal::untrusted(format!(
                        "certificate {} names the trusted CA {} as its issuer, but that CA's \
                         key does not verify it: {e}",
                        current.subject(),
                        current.cert.tbs_certificate.issuer
                    )));
                }
                if intermediates
                    .iter()
                    .any(|c| named_issuer(&c) && c.der != current.der)
                {
                    return Err(Refusal::invalid(format!(
                        "certificate {}: its signature does not verify with its issuer's key",
                        current.subject()
                    )));
                }
                return Err(Refusal::untrusted(format!(
                    "certificate {} (issued by {}) does not chain to a trusted CA",
                    leaf.subject(),
                    current.cert.tbs_certificate.issuer
                )));
            }
        }
    }
    Err(Refusal::invalid(format!(
        "certificate chain of {} is longer than {MAX_CHAIN}",
        leaf.subject()
    )))
}

/// A time as RFC 3339 UTC, for messages.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| format!("{secs}s"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::trust::fixture;

    #[test]
    fn fingerprint_is_model_signings_hint() {
        let blocks = pem_blocks(&fixture("p256.pub")).unwrap();
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].0, "PUBLIC KEY");
        let bundle: serde_json::Value = serde_json::from_slice(&fixture("key-p256.sig")).unwrap();
        let hint = bundle["verificationMaterial"]["publicKey"]["hint"]
            .as_str()
            .unwrap();
        assert_eq!(key_fingerprint(&blocks[0].1), hint);
        assert!(matches!(
            PublicKey::from_spki_der(&blocks[0].1),
            Ok(PublicKey::P256(_))
        ));
    }

    #[test]
    fn every_key_kind_openssl_writes_loads() {
        for (name, kind) in [
            ("p256.pub", "ECDSA P-256"),
            ("p384.pub", "ECDSA P-384"),
            ("p521.pub", "ECDSA P-521"),
            ("ed25519.pub", "Ed25519"),
        ] {
            let der = &pem_blocks(&fixture(name)).unwrap()[0].1;
            assert_eq!(
                PublicKey::from_spki_der(der).unwrap().kind(),
                kind,
                "{name}"
            );
        }
        let cert = &pem_blocks(&fixture("ca/root.pem")).unwrap()[0].1;
        let e = PublicKey::from_spki_der(cert).unwrap_err();
        assert!(e.contains("SubjectPublicKeyInfo"), "{e}");
    }

    #[test]
    fn pem_files_with_several_blocks_and_garbage() {
        let mut text = b"# a comment\n".to_vec();
        text.extend(fixture("ca/root.pem"));
        text.extend(b"between\n");
        text.extend(fixture("ca/other-root.pem"));
        let blocks = pem_blocks(&text).unwrap();
        assert_eq!(blocks.len(), 2);
        assert!(blocks.iter().all(|(l, _)| l == "CERTIFICATE"));
        assert!(pem_blocks(b"no pem here").unwrap().is_empty());
        assert!(pem_blocks(b"-----BEGIN PUBLIC KEY-----\nAAAA\n").is_err());
    }
}
