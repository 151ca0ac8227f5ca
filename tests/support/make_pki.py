#!/usr/bin/env python3
"""Makes the certificates tests/trust.rs signs models with, using `cryptography` (which
model_signing installs):

    make_pki.py OUT_DIR

OUT_DIR gets, each as PEM: ca1.pem (a root the daemon trusts), int1.pem (an intermediate
under it), leaf1.pem + leaf1.key (a signing leaf under int1: KeyUsage digitalSignature, EKU
codeSigning), expired.pem + expired.key (the same, valid only in 2020), and ca2.pem with
leaf2.pem + leaf2.key (a whole chain the daemon does not trust).
"""
import datetime
import pathlib
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

out = pathlib.Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
now = datetime.datetime.now(datetime.timezone.utc)


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wanfs tests")])


def cert(cn, key, issuer_cn, issuer_key, ca, start, end):
    b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(issuer_cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                          False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                          False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def save(stem, c, key=None):
    (out / f"{stem}.pem").write_bytes(c.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (out / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


year = datetime.timedelta(days=365)
for n in ["1", "2"]:
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = cert(f"wanfs test root {n}", ca_key, f"wanfs test root {n}", ca_key, True,
              now - year, now + 10 * year)
    save(f"ca{n}", ca)
    int_key = ec.generate_private_key(ec.SECP256R1())
    inter = cert(f"wanfs test intermediate {n}", int_key, f"wanfs test root {n}", ca_key, True,
                 now - year, now + 5 * year)
    save(f"int{n}", inter)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    save(f"leaf{n}", cert(f"publisher {n}", leaf_key, f"wanfs test intermediate {n}", int_key,
                          False, now - datetime.timedelta(days=1), now + year), leaf_key)
    if n == "1":
        old_key = ec.generate_private_key(ec.SECP256R1())
        save("expired", cert("publisher 1 (2020)", old_key, "wanfs test intermediate 1", int_key,
                             False, datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
                             datetime.datetime(2020, 12, 31, tzinfo=datetime.timezone.utc)),
             old_key)
