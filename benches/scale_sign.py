#!/usr/bin/env python3
"""Signs every model of a scale_manifest.py fleet manifest, for benches/scale.sh SIGNED=1:
each model gets a model_signing bundle (a sha256 file serialization listing every file's
sha256, signed with an ECDSA P-256 key through model_signing's own signer) in
SIG_DIR/<model>/model.sig, listed in its entry as `model.sig`, with a `file://` source for it
ahead of the model's own (which need not serve: only the bundle is fetched at mount).

usage: scale_sign.py IN.toml OUT.toml SIG_DIR KEY.pem [REUSE_SIG_DIR]

With REUSE_SIG_DIR (the SIG_DIR of an earlier run), a model whose files are the same keeps its
earlier bundle, as a publisher keeps the signature of a release it did not change (ECDSA
signatures differ at every signing, so re-signing would change every model's entry).
"""
import base64
import hashlib
import json
import pathlib
import shutil
import re
import sys
import tomllib

from model_signing import manifest
from model_signing._hashing import hashing
from model_signing._signing import sign_ec_key, signing

src, out, sig_dir, key = sys.argv[1:5]
reuse = pathlib.Path(sys.argv[5]) if len(sys.argv) > 5 else None
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
    old = reuse / mid / "model.sig" if reuse else None
    signed = {(f["path"], f["sha256"]) for f in m["files"]}
    if old and old.exists():
        stmt = json.loads(base64.b64decode(json.loads(old.read_text())["dsseEnvelope"]["payload"]))
        same = {(r["name"], r["digest"]) for r in stmt["predicate"]["resources"]} == signed
        if same and old.resolve() != (d / "model.sig").resolve():
            shutil.copy(old, d / "model.sig")
        elif not same:
            (d / "model.sig").unlink(missing_ok=True)
    if not (d / "model.sig").exists():
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
