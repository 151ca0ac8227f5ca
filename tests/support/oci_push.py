#!/usr/bin/env python3
"""Pushes files as one OCI artifact with the real `oras` client (oras-py), one layer per file,
as CNCF ModelPack lays a model out: each layer's media type as given, and its file path in the
`org.cncf.model.filepath` annotation (oras adds `org.opencontainers.image.title`, the base name).

usage: oci_push.py REGISTRY REPO:TAG DIR REL=MEDIATYPE...
Credentials, when the registry asks for them: $OCI_USER and $OCI_PASS (HTTP Basic).
Prints the pushed manifest's digest.
"""
import json
import os
import sys
import tempfile

import oras.provider


def main():
    registry, target, root = sys.argv[1:4]
    specs = [a.split("=", 1) for a in sys.argv[4:]]
    os.chdir(root)
    annotations = {rel: {"org.cncf.model.filepath": rel} for rel, _ in specs}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(annotations, f)
        annotation_file = f.name
    client = oras.provider.Registry(hostname=registry, insecure=True, auth_backend="basic")
    if os.environ.get("OCI_USER"):
        client.auth.set_basic_auth(os.environ["OCI_USER"], os.environ["OCI_PASS"])
    resp = client.push(
        target=f"{registry}/{target}",
        files=[f"{rel}:{mt}" for rel, mt in specs],
        annotation_file=annotation_file,
        quiet=True,
    )
    os.unlink(annotation_file)
    if resp.status_code not in (200, 201):
        sys.exit(f"push failed: HTTP {resp.status_code}: {resp.text}")
    print(resp.headers.get("Docker-Content-Digest", ""))


if __name__ == "__main__":
    main()
