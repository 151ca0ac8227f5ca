#!/usr/bin/env python3
"""Writes a synthetic fleet manifest for benches/scale.sh: MODELS models x FILES files, sizes
summing to about TOTAL bytes, 8 MiB chunks with a 1 MiB head, random (but well-formed) digests,
sources on a 127.0.0.1 URL that need not serve (metadata alone is measured).

usage: scale_manifest.py OUT [--models 10] [--files 10000] [--total 3.7e12] [--seed 1]
                              [--bump MODEL_INDEX]   (changes one file of that model: a reload)
"""
import argparse
import random

MIB = 1 << 20
CHUNK = 8 * MIB
HEAD = MIB


def chunk_count(size):
    if size <= HEAD:
        return 1
    return 1 + -(-(size - HEAD) // CHUNK)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--total", type=float, default=3.7e12)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bump", type=int, default=-1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    hexd = lambda: "%064x" % rng.getrandbits(256)
    per_model = a.total / a.models
    # Like a sharded checkpoint: 1% of the files are multi-GB shards holding nearly all the
    # bytes; the rest are configs, tokenizers and small tensors (KB to a few MB).
    big = max(1, a.files // 100)
    small = a.files - big
    digests = 0
    with open(a.out, "w") as out:
        out.write("schema_version = 1\n")
        for m in range(a.models):
            mid = f"fleet-{m:02d}@1.0.0"
            out.write(f'\n[models."{mid}"]\ndescription = "synthetic model {m}"\n')
            out.write(f'[models."{mid}".sources]\npriority = ["http://127.0.0.1:9/m{m}"]\n')
            smalls = [int(rng.lognormvariate(10, 2)) % (8 * MIB) + 1 for _ in range(small)]
            big_size = int((per_model - sum(smalls)) / big)
            sizes = [big_size + rng.randrange(-MIB, MIB) for _ in range(big)] + smalls
            for i, size in enumerate(sizes):
                if m == a.bump and i == 0:
                    size += 1
                path = f"part-{i // 100:03d}/file-{i:05d}.{'safetensors' if i < big else 'bin'}"
                n = chunk_count(size)
                digests += n
                head = f"head_size = {HEAD}\n" if size > HEAD else ""
                chunks = ",\n  ".join(f'"{hexd()}"' for _ in range(n))
                out.write(
                    f'\n[[models."{mid}".files]]\npath = "{path}"\nsize = {size}\n'
                    f'sha256 = "{hexd()}"\nchunk_size = {CHUNK}\n{head}chunks = [\n  {chunks},\n]\n'
                )
    print(f"{a.out}: {a.models} models x {a.files} files, {digests} chunk digests")


if __name__ == "__main__":
    main()
