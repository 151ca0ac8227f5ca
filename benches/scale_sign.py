#!/usr/bin/env python3
"""Signs every model of a scale_manifest.py fleet manifest, for benches/scale.sh SIGNED=1:
each model gets a model_signing bundle (a sha256 file serialization listing every file's
sha256, signed with an ECDSA P-256 key through model_signing's own signer) in
SIG_DIR/<model>/model.sig, listed in its entry as `model.sig`, with a `file://` source for it
ahead of the model's own (which need not serve: only the bundle is fetched at mount).

usage: scale_sign.py IN.toml OUT.toml SIG_DIR KEY.pem
"""
import hashlib
import pathlib
import re
import sys
import tomllib

from model_signing import manifest
from model_signing._hashing import hashing
from model_signing._signing import sign_ec_key, signing

src, out, sig_dir, key = sys.argv[1:5]
sig_dir = pathlib.Path(sig_dir)
with open(src, "rb") as f:
    fleet = tomllib.load(f)
signer = sign_ec_key.Signer(pathlib.Path(key))
text = open(src).read()
tail = []
for mid, m in fleet["models"].items():
    items = [
        manifest.FileManifestItem(
            path=pathlib.PurePosixPath(f["path"]),
            digest=hashing.Digest("sha256", bytes.fromhex(f["sha256"])),
        )
        for f in m["files"]
    ]
    ser = manifest._FileSerialization("sha256", False, ["model.sig"])
    payload = signing.Payload(manifest.Manifest(mid.split("@")[0], items, ser))
    d = sig_dir / mid
    d.mkdir(parents=True, exist_ok=True)
    signer.sign(payload).write(d / "model.sig")
    b = (d / "model.sig").read_bytes()
    tail.append(
        f'\n[[models."{mid}".files]]\npath = "model.sig"\nsize = {len(b)}\n'
        f'sha256 = "{hashlib.sha256(b).hexdigest()}"\n'
    )
    old = f'[models."{mid}".sources]\npriority = ['
    assert old in text, mid
    text = text.replace(old, old + f'"file://{d}", ', 1)
with open(out, "w") as f:
    f.write(text + "".join(tail))
print(f"{out}: {len(fleet['models'])} models signed into {sig_dir}")
