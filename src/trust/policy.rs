//! The `[trust]` policy: which publishers' signatures are accepted, loaded into [`Anchors`],
//! and the verification of one bundle against them.
//!
//! Owns `TrustConfig` (the config section), reading the key, CA and trusted-root files it names
//! (`Anchors::load`, whose errors name the file), and `Anchors::verify`: bundle → signer +
//! statement, or a refusal with its reason. Three methods, chosen by the bundle's material:
//! a public key (`model_signing sign key`), a certificate chain to one of `ca_roots`
//! (`sign certificate`), and Sigstore keyless (a Fulcio certificate with a Rekor entry,
//! `keyless.rs`).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::Refusal;
use super::bundle::{Bundle, Material};
use super::keyless::TrustedRoot;
use super::pki::{self, Cert, PublicKey};
use super::statement::Statement;

/// `[trust]` in the config.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// Refuse a model that has no `model.sig`. Off by default: unsigned models are served as
    /// before, signed ones are checked.
    pub require_signature: bool,
    /// PEM public keys (ECDSA P-256/P-384/P-521, Ed25519) whose signatures are accepted.
    pub keys: Vec<PathBuf>,
    /// PEM CA certificates (one or several per file) that certificate-signed bundles must chain
    /// to.
    pub ca_roots: Vec<PathBuf>,
    /// A Sigstore `trusted_root.json` (Fulcio CAs, Rekor keys), for keyless signatures.
    pub trusted_root: Option<PathBuf>,
    /// Keyless signers accepted.
    pub identities: Vec<TrustIdentity>,
}

/// A keyless signer: both must match the Fulcio certificate.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustIdentity {
    /// The certificate's SAN: an email address or a URI (a CI workflow).
    pub identity: String,
    /// The OIDC issuer that vouched for it (`https://accounts.google.com`).
    pub issuer: String,
}

impl TrustConfig {
    /// Checks what can be checked without reading files (names the key).
    pub fn validate(&self) -> Result<(), String> {
        if !self.identities.is_empty() && self.trusted_root.is_none() {
            return Err(
                "trust.identities need trust.trusted_root (the Sigstore trusted root \
                        their certificates are checked against)"
                    .into(),
            );
        }
        for (i, id) in self.identities.iter().enumerate() {
            if id.identity.trim().is_empty() || id.issuer.trim().is_empty() {
                return Err(format!(
                    "trust.identities[{i}]: identity and issuer must both be set"
                ));
            }
        }
        Ok(())
    }
}

/// Who signed a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signer {
    /// A configured public key; `fingerprint` is `model_signing`'s hint (hex sha256 of the key's
    /// PEM).
    Key { fingerprint: String },
    /// A certificate chained to one of `ca_roots`; `fingerprint` is the leaf's DER sha256.
    Certificate {
        subject: String,
        fingerprint: String,
    },
    /// A Sigstore keyless identity.
    Keyless { identity: String, issuer: String },
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

/// A bundle accepted: who signed, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    pub signer: Signer,
    pub statement: Statement,
}

/// A configured key.
#[derive(Clone, Debug)]
struct AnchorKey {
    fingerprint: String,
    key: PublicKey,
}

/// What `[trust]` trusts, read from its files.
#[derive(Clone, Debug, Default)]
pub struct Anchors {
    keys: Vec<AnchorKey>,
    ca_roots: Vec<Cert>,
    keyless: Option<TrustedRoot>,
    identities: Vec<TrustIdentity>,
}

impl Anchors {
    /// Reads every file `[trust]` names. An error names the file and what is wrong with it.
    pub fn load(cfg: &TrustConfig) -> Result<Anchors, String> {
        cfg.validate()?;
        let mut anchors = Anchors {
            identities: cfg.identities.clone(),
            ..Anchors::default()
        };
        for path in &cfg.keys {
            let blocks = read_pem("trust.keys", path)?;
            let [(label, der)] = blocks.as_slice() else {
                return Err(format!(
                    "trust.keys: {}: holds {} PEM blocks, not one public key",
                    path.display(),
                    blocks.len()
                ));
            };
            if label != "PUBLIC KEY" {
                return Err(format!(
                    "trust.keys: {}: a PEM {label:?}, not a PUBLIC KEY",
                    path.display()
                ));
            }
            let key = PublicKey::from_spki_der(der)
                .map_err(|e| format!("trust.keys: {}: {e}", path.display()))?;
            anchors.keys.push(AnchorKey {
                fingerprint: pki::key_fingerprint(der),
                key,
            });
        }
        for path in &cfg.ca_roots {
            let blocks = read_pem("trust.ca_roots", path)?;
            let certs: Vec<_> = blocks.iter().filter(|(l, _)| l == "CERTIFICATE").collect();
            if certs.is_empty() {
                return Err(format!(
                    "trust.ca_roots: {}: holds no PEM CERTIFICATE",
                    path.display()
                ));
            }
            for (_, der) in certs {
                let cert = Cert::from_der(der)
                    .map_err(|e| format!("trust.ca_roots: {}: {e}", path.display()))?;
                cert.public_key().map_err(|e| {
                    format!(
                        "trust.ca_roots: {}: certificate {}: {e}",
                        path.display(),
                        cert.subject()
                    )
                })?;
                anchors.ca_roots.push(cert);
            }
        }
        if let Some(path) = &cfg.trusted_root {
            let bytes = std::fs::read(path)
                .map_err(|e| format!("trust.trusted_root: {}: {e}", path.display()))?;
            let root = TrustedRoot::parse(&bytes)
                .map_err(|e| format!("trust.trusted_root: {}: {e}", path.display()))?;
            anchors.keyless = Some(root);
        }
        Ok(anchors)
    }

    /// Nothing is trusted: every signed model would be refused as untrusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.ca_roots.is_empty()
            && (self.keyless.is_none() || self.identities.is_empty())
    }

    /// Verifies a bundle (the bytes of `model.sig`) at `now`: its signature, that the signer is
    /// trusted, and that the statement is a consistent model statement.
    pub fn verify(&self, bundle: &[u8], now: SystemTime) -> Result<Signed, Refusal> {
        let bundle = Bundle::parse(bundle)?;
        let envelope = &bundle.envelope;
        let (key, signer) = match &bundle.material {
            Material::PublicKey { hint } => {
                return self.verify_key(hint.as_deref(), &bundle);
            }
            // A Rekor entry is what makes a short-lived certificate keyless; `model_signing`'s
            // certificate method never writes one.
            Material::Certificate(leaf) if !bundle.tlog_entries.is_empty() => {
                self.verify_keyless(leaf, &[], &bundle)?
            }
            Material::Chain(chain) if !bundle.tlog_entries.is_empty() => {
                self.verify_keyless(&chain[0], &chain[1..], &bundle)?
            }
            Material::Certificate(leaf) => self.verify_certificate(leaf, &[], now)?,
            Material::Chain(chain) => self.verify_certificate(&chain[0], &chain[1..], now)?,
        };
        key.verify(&envelope.pae(), &envelope.signature)
            .map_err(|e| {
                Refusal::invalid(format!(
                    "bundle signature does not verify with the {signer}'s key: {e}"
                ))
            })?;
        Ok(Signed {
            signer,
            statement: Statement::parse(&envelope.payload)?,
        })
    }

    fn verify_key(&self, hint: Option<&str>, bundle: &Bundle) -> Result<Signed, Refusal> {
        let envelope = &bundle.envelope;
        let pae = envelope.pae();
        let key = match hint {
            Some(hint) => {
                let hint = hint.to_ascii_lowercase();
                let Some(k) = self.keys.iter().find(|k| k.fingerprint == hint) else {
                    return Err(Refusal::untrusted(format!(
                        "signed by key sha256:{hint}, which is not in [trust] keys"
                    )));
                };
                k.key.verify(&pae, &envelope.signature).map_err(|e| {
                    Refusal::invalid(format!(
                        "bundle signature does not verify with key sha256:{hint}: {e}"
                    ))
                })?;
                k
            }
            // Bundles older than model_signing 1.0 name no key: any configured key may do.
            None => self
                .keys
                .iter()
                .find(|k| k.key.verify(&pae, &envelope.signature).is_ok())
                .ok_or_else(|| {
                    Refusal::untrusted(
                        "the bundle names no key, and no key in [trust] keys verifies its \
                         signature",
                    )
                })?,
        };
        Ok(Signed {
            signer: Signer::Key {
                fingerprint: key.fingerprint.clone(),
            },
            statement: Statement::parse(&envelope.payload)?,
        })
    }

    fn verify_certificate(
        &self,
        leaf: &[u8],
        chain: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<(PublicKey, Signer), Refusal> {
        let leaf = Cert::from_der(leaf)
            .map_err(|e| Refusal::invalid(format!("bundle's signing certificate: {e}")))?;
        let chain = parse_chain(chain)?;
        if self.ca_roots.is_empty() {
            return Err(Refusal::untrusted(format!(
                "signed by certificate {}, and [trust] has no ca_roots",
                leaf.subject()
            )));
        }
        // At `now`, not at the leaf's notBefore as model_signing does: such a bundle carries no
        // trusted time, so a leaf that expired (or a CA that did) is no longer vouched for
        // (docs/DESIGN-NOTES.md, "Publisher signatures").
        pki::verify_chain(&leaf, &chain, &self.ca_roots, now)?;
        if !leaf.may_sign() {
            return Err(Refusal::untrusted(format!(
                "certificate {} may not sign (neither KeyUsage digitalSignature nor \
                 ExtendedKeyUsage codeSigning)",
                leaf.subject()
            )));
        }
        let key = leaf
            .public_key()
            .map_err(|e| Refusal::unsupported(format!("certificate {}: {e}", leaf.subject())))?;
        Ok((
            key,
            Signer::Certificate {
                subject: leaf.subject(),
                fingerprint: leaf.fingerprint(),
            },
        ))
    }

    fn verify_keyless(
        &self,
        leaf: &[u8],
        chain: &[Vec<u8>],
        bundle: &Bundle,
    ) -> Result<(PublicKey, Signer), Refusal> {
        let leaf = Cert::from_der(leaf)
            .map_err(|e| Refusal::invalid(format!("bundle's signing certificate: {e}")))?;
        let chain = parse_chain(chain)?;
        let Some(root) = &self.keyless else {
            let who = super::keyless::identity(&leaf)
                .map(|(id, iss)| format!("{id} ({iss})"))
                .unwrap_or_else(|_| leaf.subject());
            return Err(Refusal::untrusted(format!(
                "keyless signature by {who}, and [trust] has no trusted_root"
            )));
        };
        root.verify(&leaf, &chain, bundle, &self.identities)
    }
}

fn parse_chain(chain: &[Vec<u8>]) -> Result<Vec<Cert>, Refusal> {
    chain
        .iter()
        .enumerate()
        .map(|(i, der)| {
            Cert::from_der(der)
                .map_err(|e| Refusal::invalid(format!("bundle's chain certificate {i}: {e}")))
        })
        .collect()
}

fn read_pem(what: &str, path: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{what}: {}: {e}", path.display()))?;
    let blocks = pki::pem_blocks(&bytes).map_err(|e| format!("{what}: {}: {e}", path.display()))?;
    if blocks.is_empty() {
        return Err(format!("{what}: {}: not a PEM file", path.display()));
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{Method, RefusalReason, SignedHash};
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    fn path(name: &str) -> PathBuf {
        PathBuf::from(format!(
            "{}/fixtures/trust/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(path(name)).unwrap()
    }

    fn anchors(cfg: TrustConfig) -> Anchors {
        Anchors::load(&cfg).unwrap()
    }

    fn keys(names: &[&str]) -> Anchors {
        anchors(TrustConfig {
            keys: names.iter().map(|n| path(n)).collect(),
            ..TrustConfig::default()
        })
    }

    fn cas(names: &[&str]) -> Anchors {
        anchors(TrustConfig {
            ca_roots: names.iter().map(|n| path(n)).collect(),
            ..TrustConfig::default()
        })
    }

    fn keyless(identity: &str, issuer: &str) -> Anchors {
        anchors(TrustConfig {
            trusted_root: Some(path("keyless/trusted_root.json")),
            identities: vec![TrustIdentity {
                identity: identity.into(),
                issuer: issuer.into(),
            }],
            ..TrustConfig::default()
        })
    }

    const IBM: &str = "https://sigstore.verify.ibm.com/oauth2";

    fn refusal(a: &Anchors, bundle: &[u8]) -> Refusal {
        a.verify(bundle, SystemTime::now()).unwrap_err()
    }

    /// The bundle with its JSON edited.
    fn edit(name: &str, f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(&fixture(name)).unwrap();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    /// A base64 field of the bundle with one decoded byte flipped.
    fn flip(v: &mut serde_json::Value, at: usize) {
        let mut bytes = STANDARD.decode(v.as_str().unwrap()).unwrap();
        bytes[at] ^= 0x01;
        *v = STANDARD.encode(bytes).into();
    }

    #[test]
    fn key_bundles_are_accepted_with_their_key() {
        let a = keys(&["other.pub", "p256.pub", "p384.pub", "p521.pub"]);
        for (sig, pubkey) in [
            ("key-p256.sig", "p256.pub"),
            ("key-p384.sig", "p384.pub"),
            ("key-p521.sig", "p521.pub"),
        ] {
            let signed = a.verify(&fixture(sig), SystemTime::now()).unwrap();
            let der = &pki::pem_blocks(&fixture(pubkey)).unwrap()[0].1;
            assert_eq!(
                signed.signer,
                Signer::Key {
                    fingerprint: pki::key_fingerprint(der)
                }
            );
            assert!(signed.signer.to_string().starts_with("key sha256:"));
            assert_eq!(signed.statement.resources.len(), 3);
        }
        let blake3 = a.verify(&fixture("blake3.sig"), SystemTime::now()).unwrap();
        assert_eq!(blake3.statement.hash_type, SignedHash::Blake3);
        let shards = a.verify(&fixture("shards.sig"), SystemTime::now()).unwrap();
        assert_eq!(shards.statement.method, Method::Shards { shard_size: 16 });
    }

    #[test]
    fn a_key_not_configured_is_untrusted() {
        let r = refusal(&keys(&["other.pub", "p384.pub"]), &fixture("key-p256.sig"));
        assert_eq!(r.reason, RefusalReason::Untrusted);
        let hint = Bundle::parse(&fixture("key-p256.sig")).unwrap();
        let Material::PublicKey { hint: Some(hint) } = hint.material else {
            panic!()
        };
        assert!(
            r.detail.contains(&hint) && r.detail.contains("[trust] keys"),
            "{r}"
        );
        // No hint (bundles before model_signing 1.0): the configured keys are tried.
        let no_hint = edit("key-p256.sig", |v| {
            v["verificationMaterial"]["publicKey"] = serde_json::json!({});
        });
        assert_eq!(
            refusal(&keys(&["other.pub"]), &no_hint).reason,
            RefusalReason::Untrusted
        );
        let ok = keys(&["other.pub", "p256.pub"]).verify(&no_hint, SystemTime::now());
        assert!(ok.is_ok(), "{ok:?}");
        // A hint naming a trusted key the signature is not by.
        let other_hint = edit("key-p384.sig", |v| {
            let h = Bundle::parse(&fixture("key-p256.sig")).unwrap().material;
            let Material::PublicKey { hint: Some(h) } = h else {
                panic!()
            };
            v["verificationMaterial"]["publicKey"]["hint"] = h.into();
        });
        let r = refusal(&keys(&["p256.pub", "p384.pub"]), &other_hint);
        assert_eq!(r.reason, RefusalReason::Invalid, "{r}");
    }

    #[test]
    fn damaged_bundles_are_invalid() {
        let a = keys(&["p256.pub"]);
        let whole = fixture("key-p256.sig");
        let r = refusal(&a, &whole[..whole.len() / 2]);
        assert_eq!(r.reason, RefusalReason::Invalid);
        assert!(r.detail.contains("not a Sigstore bundle"), "{r}");
        let garbled = edit("key-p256.sig", |v| {
            v["dsseEnvelope"]["payload"] = "ewog*not base64*".into();
        });
        let r = refusal(&a, &garbled);
        assert_eq!(r.reason, RefusalReason::Invalid);
        assert!(r.detail.contains("payload"), "{r}");
        let sig = edit("key-p256.sig", |v| {
            flip(&mut v["dsseEnvelope"]["signatures"][0]["sig"], 20)
        });
        let r = refusal(&a, &sig);
        assert_eq!(r.reason, RefusalReason::Invalid);
        assert!(r.detail.contains("does not verify"), "{r}");
        let payload = edit("key-p256.sig", |v| {
            flip(&mut v["dsseEnvelope"]["payload"], 200)
        });
        let r = refusal(&a, &payload);
        assert_eq!(r.reason, RefusalReason::Invalid);
        assert!(r.detail.contains("does not verify"), "{r}");
    }

    /// Bundles the tool would never write (an inconsistent statement, another predicate),
    /// signed here with a key the test trusts.
    #[test]
    fn signed_statements_are_checked() {
        use p256::ecdsa::signature::Signer as _;
        use p256::pkcs8::EncodePublicKey;
        let sk = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pem = sk
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap();
        std::fs::write(dir.path().join("k.pub"), &pem).unwrap();
        let a = anchors(TrustConfig {
            keys: vec![dir.path().join("k.pub")],
            ..TrustConfig::default()
        });
        let sign = |statement: &serde_json::Value| {
            let payload = serde_json::to_vec(statement).unwrap();
            let sig: p256::ecdsa::Signature = sk.sign(&super::super::bundle::pae(
                super::super::bundle::IN_TOTO_PAYLOAD_TYPE,
                &payload,
            ));
            edit("key-p256.sig", |v| {
                v["verificationMaterial"]["publicKey"]["hint"] = pki::key_fingerprint(
                    pem_rfc7468::decode_vec(pem.as_bytes())
                        .unwrap()
                        .1
                        .as_slice(),
                )
                .into();
                v["dsseEnvelope"]["payload"] = STANDARD.encode(&payload).into();
                v["dsseEnvelope"]["signatures"][0]["sig"] =
                    STANDARD.encode(sig.to_der().as_bytes()).into();
            })
        };
        let original: serde_json::Value = serde_json::from_slice(
            &Bundle::parse(&fixture("key-p256.sig"))
                .unwrap()
                .envelope
                .payload,
        )
        .unwrap();
        assert!(a.verify(&sign(&original), SystemTime::now()).is_ok());
        let mut inconsistent = original.clone();
        inconsistent["predicate"]["resources"][1]["digest"] = "ab".repeat(32).into();
        let r = refusal(&a, &sign(&inconsistent));
        assert_eq!(r.reason, RefusalReason::Invalid);
        assert!(
            r.detail.contains("inconsistent") && r.detail.contains("model"),
            "{r}"
        );
        let mut other = original;
        other["predicateType"] = "https://example.com/other/v1".into();
        let r = refusal(&a, &sign(&other));
        assert_eq!(r.reason, RefusalReason::Unsupported);
        assert!(r.detail.contains("https://example.com/other/v1"), "{r}");
    }

    /// `model_signing` signs with EC keys only; an Ed25519 key signs the same envelope here.
    #[test]
    fn ed25519_keys_verify() {
        use ed25519_dalek::Signer as _;
        let sk = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        // SubjectPublicKeyInfo { id-Ed25519, BIT STRING key } (RFC 8410).
        let mut der = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        der.extend_from_slice(sk.verifying_key().as_bytes());
        let dir = tempfile::tempdir().unwrap();
        let pem = pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, &der[..])
            .unwrap();
        std::fs::write(dir.path().join("ed.pub"), &pem).unwrap();
        let a = anchors(TrustConfig {
            keys: vec![path("p256.pub"), dir.path().join("ed.pub")],
            ..TrustConfig::default()
        });
        let bundle = Bundle::parse(&fixture("key-p256.sig")).unwrap();
        let sig = sk.sign(&bundle.envelope.pae());
        let signed = edit("key-p256.sig", |v| {
            v["verificationMaterial"]["publicKey"]["hint"] = pki::key_fingerprint(&der[..]).into();
            v["dsseEnvelope"]["signatures"][0]["sig"] = STANDARD.encode(sig.to_bytes()).into();
        });
        let ok = a.verify(&signed, SystemTime::now()).unwrap();
        assert_eq!(
            ok.signer,
            Signer::Key {
                fingerprint: pki::key_fingerprint(&der[..])
            }
        );
        let bad = edit("key-p256.sig", |v| {
            v["verificationMaterial"]["publicKey"]["hint"] = pki::key_fingerprint(&der[..]).into();
        });
        assert_eq!(refusal(&a, &bad).reason, RefusalReason::Invalid);
    }

    #[test]
    fn certificate_bundles_chain_to_ca_roots_now() {
        let a = cas(&["ca/other-root.pem", "ca/root.pem"]);
        let signed = a.verify(&fixture("cert.sig"), SystemTime::now()).unwrap();
        let Signer::Certificate {
            subject,
            fingerprint,
        } = &signed.signer
        else {
            panic!("{:?}", signed.signer)
        };
        assert!(subject.contains("CN=release signer"), "{subject}");
        assert_eq!(fingerprint.len(), 64);
        assert!(signed.signer.to_string().starts_with("certificate "));

        let r = refusal(&cas(&["ca/other-root.pem"]), &fixture("cert.sig"));
        assert_eq!(r.reason, RefusalReason::Untrusted);
        assert!(r.detail.contains("release signer"), "{r}");
        let r = refusal(&keys(&["p256.pub"]), &fixture("cert.sig"));
        assert_eq!(r.reason, RefusalReason::Untrusted);
        assert!(r.detail.contains("ca_roots"), "{r}");
        // A root named like the one that signed, with another key.
        let r = refusal(&cas(&["ca/impostor-root.pem"]), &fixture("cert.sig"));
        assert_eq!(r.reason, RefusalReason::Untrusted);
        assert!(r.detail.contains("CN=wanfs test root"), "{r}");

        let r = refusal(&a, &fixture("cert-expired.sig"));
        assert_eq!(r.reason, RefusalReason::Untrusted);
        assert!(
            r.detail.contains("release signer") && r.detail.contains("2021"),
            "{r}"
        );

        // A chain certificate replaced by a stranger: the leaf no longer chains.
        let r = refusal(
            &a,
            &edit("cert.sig", |v| {
                let other = &pki::pem_blocks(&fixture("ca/other-root.pem")).unwrap()[0].1;
                v["verificationMaterial"]["x509CertificateChain"]["certificates"][1]["rawBytes"] =
                    STANDARD.encode(other).into();
            }),
        );
        assert_eq!(r.reason, RefusalReason::Untrusted, "{r}");
        let r = refusal(
            &a,
            &edit("cert.sig", |v| {
                flip(
                    &mut v["verificationMaterial"]["x509CertificateChain"]["certificates"][0]["rawBytes"],
                    300,
                )
            }),
        );
        assert_eq!(r.reason, RefusalReason::Invalid, "{r}");
    }

    #[test]
    fn keyless_bundles_verify_offline() {
        let a = keyless("stefanb@us.ibm.com", IBM);
        let signed = a
            .verify(&fixture("keyless/model.sig"), SystemTime::now())
            .unwrap();
        assert_eq!(
            signed.signer,
            Signer::Keyless {
                identity: "stefanb@us.ibm.com".into(),
                issuer: IBM.into()
            }
        );
        assert_eq!(
            signed.signer.to_string(),
            format!("keyless stefanb@us.ibm.com ({IBM})")
        );
        let names: Vec<_> = signed.statement.resources.iter().map(|r| &r.name).collect();
        assert_eq!(names, ["signme-1", "signme-2"]);

        for (identity, issuer) in [
            ("someone@example.com", IBM),
            ("stefanb@us.ibm.com", "https://accounts.google.com"),
        ] {
            let r = refusal(&keyless(identity, issuer), &fixture("keyless/model.sig"));
            assert_eq!(r.reason, RefusalReason::Untrusted);
            assert!(r.detail.contains("stefanb@us.ibm.com"), "{r}");
        }
        let r = refusal(&keys(&["p256.pub"]), &fixture("keyless/model.sig"));
        assert_eq!(r.reason, RefusalReason::Untrusted);
        assert!(r.detail.contains("trusted_root"), "{r}");

        // The v0.2 shape: the leaf in x509CertificateChain.
        let v02 = edit("keyless/model.sig", |v| {
            v["mediaType"] = "application/vnd.dev.sigstore.bundle+json;version=0.2".into();
            let m = v["verificationMaterial"].as_object_mut().unwrap();
            let leaf = m.remove("certificate").unwrap();
            m.insert(
                "x509CertificateChain".into(),
                serde_json::json!({ "certificates": [leaf] }),
            );
        });
        assert_eq!(a.verify(&v02, SystemTime::now()).unwrap(), signed);
    }

    #[test]
    fn keyless_log_entries_are_checked() {
        let a = keyless("stefanb@us.ibm.com", IBM);
        let entry = |f: &dyn Fn(&mut serde_json::Value)| {
            edit("keyless/model.sig", |v| {
                f(&mut v["verificationMaterial"]["tlogEntries"][0])
            })
        };
        let r = refusal(
            &a,
            &entry(&|e| flip(&mut e["inclusionPromise"]["signedEntryTimestamp"], 10)),
        );
        assert_eq!(r.reason, RefusalReason::Invalid);
        assert!(r.detail.contains("signed entry timestamp"), "{r}");
        // Moving the logged time breaks the SET too.
        let r = refusal(&a, &entry(&|e| e["integratedTime"] = "1760062000".into()));
        assert_eq!(r.reason, RefusalReason::Invalid);
        let r = refusal(&a, &entry(&|e| flip(&mut e["logId"]["keyId"], 3)));
        assert_eq!(r.reason, RefusalReason::Untrusted);
        let r = refusal(
            &a,
            &edit("keyless/model.sig", |v| {
                v["verificationMaterial"]["tlogEntries"] = serde_json::json!([]);
            }),
        );
        // Without a log entry, the certificate is an ordinary chain, and [trust] names no CA.
        assert_eq!(r.reason, RefusalReason::Untrusted, "{r}");
        // The inclusion proof: a sibling hash, the root, the checkpoint's signature.
        let r = refusal(
            &a,
            &entry(&|e| flip(&mut e["inclusionProof"]["hashes"][3], 0)),
        );
        assert_eq!(r.reason, RefusalReason::Invalid);
        assert!(r.detail.contains("inclusion proof"), "{r}");
        let r = refusal(
            &a,
            &entry(&|e| flip(&mut e["inclusionProof"]["rootHash"], 0)),
        );
        assert_eq!(r.reason, RefusalReason::Invalid);
        let r = refusal(
            &a,
            &entry(&|e| {
                let note = e["inclusionProof"]["checkpoint"]["envelope"]
                    .as_str()
                    .unwrap();
                let (head, sig) = note.rsplit_once(' ').unwrap();
                let mut raw = STANDARD.decode(sig.trim_end()).unwrap();
                raw[10] ^= 1;
                e["inclusionProof"]["checkpoint"]["envelope"] =
                    format!("{head} {}\n", STANDARD.encode(raw)).into();
            }),
        );
        assert_eq!(r.reason, RefusalReason::Invalid);
        assert!(r.detail.contains("checkpoint"), "{r}");
        let r = refusal(
            &a,
            &edit("keyless/model.sig", |v| {
                flip(&mut v["dsseEnvelope"]["payload"], 50)
            }),
        );
        assert_eq!(r.reason, RefusalReason::Invalid);
        assert!(r.detail.contains("not of this signature"), "{r}");
    }

    /// The daemon keeps anchors and verified statements in what is in force, shared by every
    /// thread.
    #[test]
    fn anchors_and_results_cross_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Anchors>();
        shared::<Signed>();
        shared::<Refusal>();
    }

    #[test]
    fn load_names_the_file_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = Anchors::load(&TrustConfig {
            keys: vec![missing.clone()],
            ..TrustConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("trust.keys") && e.contains("nope.pem"), "{e}");
        let text = dir.path().join("text.pem");
        std::fs::write(&text, "just text\n").unwrap();
        let e = Anchors::load(&TrustConfig {
            ca_roots: vec![text.clone()],
            ..TrustConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("text.pem") && e.contains("not a PEM"), "{e}");
        let e = Anchors::load(&TrustConfig {
            keys: vec![path("ca/root.pem")],
            ..TrustConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("root.pem") && e.contains("CERTIFICATE"), "{e}");
        let e = Anchors::load(&TrustConfig {
            trusted_root: Some(path("p256.pub")),
            ..TrustConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("p256.pub") && e.contains("trusted root"), "{e}");
        let e = Anchors::load(&TrustConfig {
            identities: vec![TrustIdentity {
                identity: "a@b".into(),
                issuer: "https://i".into(),
            }],
            ..TrustConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("trusted_root"), "{e}");
        assert!(Anchors::load(&TrustConfig::default()).unwrap().is_empty());
        assert!(!keys(&["p256.pub"]).is_empty());
    }
}
