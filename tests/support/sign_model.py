#!/usr/bin/env python3
"""Signs or verifies a model directory with OpenSSF model_signing's own Python API, for
tests/trust.rs.

    sign_model.py sign DIR SIGNATURE --key K.pem [--hash sha256|blake3|shards]
                  [--shard-size N] [--cert LEAF.pem --chain INT.pem ...]
    sign_model.py verify DIR SIGNATURE (--pub P.pem | --ca ROOT.pem) [--hash ... --shard-size N]

Run it with DIR as the working directory and DIR = "." (and the signature inside it, as
"model.sig"): model_signing records its ignore paths relative to the working directory.

`model_signing sign key` (the CLI) signs sha256 file serializations; BLAKE3 and shards are
reachable through the API only, and its CLI's `verify` hashes with sha256 files whatever the
bundle says, so both go through the API here (its `verify` takes the hashing configuration
from the signed statement). The signature inside DIR and git's paths are ignored, as the CLI
ignores them.
"""
import argparse
import pathlib
import sys

from model_signing import hashing, signing, verifying

p = argparse.ArgumentParser()
p.add_argument("op", choices=["sign", "verify"])
p.add_argument("dir")
p.add_argument("signature")
p.add_argument("--key")
p.add_argument("--pub")
p.add_argument("--ca", action="append", default=[])
p.add_argument("--hash", default="sha256", choices=["sha256", "blake3", "shards"])
p.add_argument("--shard-size", type=int, default=1_000_000_000)
p.add_argument("--cert")
p.add_argument("--chain", action="append", default=[])
a = p.parse_args()

model = pathlib.Path(a.dir)
if a.op == "verify":
    v = verifying.Config()
    if a.pub:
        v = v.use_elliptic_key_verifier(public_key=a.pub)
    else:
        v = v.use_certificate_verifier(certificate_chain=a.ca)
    if a.hash == "shards":
        # model_signing 1.1.1 reads `shard_size` back as a float and then fails to guess the
        # shards configuration from it: give it, as its CLI users must.
        v = v.set_hashing_config(hashing.Config().use_shard_serialization(
            hashing_algorithm="sha256", shard_size=a.shard_size,
            ignore_paths=[pathlib.Path(a.signature)]))
    try:
        v.verify(model, a.signature)
    except Exception as e:  # the tool's verdict, printed for the test's message
        print(f"verification failed: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)

ignore = [model / n for n in [".git", ".gitignore", ".github", ".gitattributes"]]
ignore.append(pathlib.Path(a.signature))
h = hashing.Config()
if a.hash == "shards":
    h = h.use_shard_serialization(hashing_algorithm="sha256", shard_size=a.shard_size,
                                  ignore_paths=ignore)
else:
    h = h.use_file_serialization(hashing_algorithm=a.hash, ignore_paths=ignore)
s = signing.Config()
if a.cert:
    s = s.use_certificate_signer(private_key=a.key, signing_certificate=a.cert,
                                 certificate_chain=a.chain)
else:
    s = s.use_elliptic_key_signer(private_key=a.key)
s.set_hashing_config(h).sign(model, a.signature)
