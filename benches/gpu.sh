#!/usr/bin/env bash
# benches/gpu.sh - tensors onto a GPU through wanfs, against download-then-load (issue 8, "On a
# GPU host"). One prepared script for a machine that has a GPU and no network: it needs only a
# `wan` binary, python3 with torch + safetensors (numpy alone: CPU only), and FUSE.
#
#     sudo WAN=bin/wan benches/gpu.sh            # SIZE_GIB=4 RUNS=3, device cuda (cpu if none)
#
# Per round (medians of RUNS; page cache dropped before every timed step):
#   (G1) cold: safetensors load_file(device=cuda) of a bf16 file through a fresh mount (empty
#        cache) vs downloading it to the same disk (aria2c -x8 -s8 if present, else curl) and
#        load_file of the copy                                           target <= 1.0x
#   (G2) warm: load_file(device=cuda) through a mount over the complete cache vs load_file of
#        the local copy                                                  target >= 0.9x (as time: <= 1.11x)
# The origin is benches/rangeserver.py on 127.0.0.1 (nginx may not be installed there).
# Prints a table with the GPU's name; paste it into docs/BENCHMARKS.md.
set -Eeuo pipefail
REPO=$(cd "$(dirname "$(realpath "$0")")/.." && pwd)
SIZE_GIB=${SIZE_GIB:-4}
RUNS=${RUNS:-3}
PORT=${PORT:-18483}
WORK=${WORK:-/var/tmp/wanfs-gpu}
WAN=${WAN:-$REPO/target/release/wan}
DEVICE=${DEVICE:-cuda}
die() { echo "gpu.sh: ERROR: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (drop_caches, FUSE)"
[ -x "$WAN" ] || die "no wan binary at $WAN (set WAN=)"
[ -e /dev/fuse ] || die "/dev/fuse missing"
python3 -c 'import safetensors' 2>/dev/null || die "python3 needs safetensors (and torch for a GPU)"
mkdir -p "$WORK"; WORK=$(realpath "$WORK")
DATA=$WORK/data MNT=$WORK/mnt DL=$WORK/dl CACHE=$WORK/cache
mkdir -p "$DATA" "$MNT" "$DL"
FILE=$DATA/model.safetensors
WPID= OPID=
cleanup() {
  set +e
  [ -n "$WPID" ] && kill "$WPID" 2>/dev/null && wait "$WPID" 2>/dev/null
  grep -qs " $MNT " /proc/mounts && umount -l "$MNT"
  [ -n "$OPID" ] && kill "$OPID" 2>/dev/null
}
trap cleanup EXIT
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }

# bf16 when torch can load it; numpy has no bfloat16, so without torch the tensors are f16.
if [ "$(cat "$WORK/data.ok" 2>/dev/null)" != "$SIZE_GIB" ]; then
  python3 - "$FILE" "$SIZE_GIB" <<'EOF'
import json, os, struct, sys
path, gib = sys.argv[1], int(sys.argv[2])
try:
    import torch  # noqa: F401
    dtype = "BF16"
except ImportError:
    dtype = "F16"
n, per = gib * 16, 64 << 20           # 64 MiB tensors
header, off = {}, 0
for i in range(n):
    header[f"layer{i}.weight"] = {"dtype": dtype, "shape": [per // 2], "data_offsets": [off, off + per]}
    off += per
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for i in range(n):
        f.write(os.urandom(per))
EOF
  echo "$SIZE_GIB" > "$WORK/data.ok"
fi
SIZE=$(stat -c %s "$FILE")

LOAD=$WORK/load.py
cat > "$LOAD" <<'EOF'
import sys, time
path, device = sys.argv[1], sys.argv[2]
t = time.perf_counter()
try:
    import torch
    from safetensors.torch import load_file
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    ts = load_file(path, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (no CUDA)"
except ImportError:
    from safetensors.numpy import load_file
    ts = load_file(path)
    name = "cpu (numpy; no torch)"
print(f"{time.perf_counter() - t:.3f} {len(ts)} {name}")
EOF

python3 "$REPO/benches/rangeserver.py" "$DATA" "$PORT" & OPID=$!
sleep 0.5
{ echo "schema_version = 1"; echo
  "$WAN" manifest build "$DATA" --id gpu@1.0.0 --source "http://127.0.0.1:$PORT"; } > "$WORK/manifest.toml"
printf '[http]\naddr = ""\n' > "$WORK/wan.toml"
mount_wan() {
  "$WAN" mount "$MNT" --manifest "$WORK/manifest.toml" --cache-dir "$CACHE" --config "$WORK/wan.toml" 2>"$WORK/wan.log" &
  WPID=$!
  for _ in $(seq 1 200); do grep -qs " $MNT " /proc/mounts && return 0; sleep 0.05; done
  die "wan mount did not come up: $(tail -5 "$WORK/wan.log")"
}
umount_wan() { kill "$WPID"; wait "$WPID" 2>/dev/null || true; WPID=; }
download() {
  rm -f "$DL/model.safetensors"
  if command -v aria2c >/dev/null; then
    aria2c -q -x8 -s8 -k1M -d "$DL" -o model.safetensors "http://127.0.0.1:$PORT/model.safetensors"
  else
    curl -sf -o "$DL/model.safetensors" "http://127.0.0.1:$PORT/model.safetensors"
  fi
}
declare -a COLD_W COLD_B WARM_W WARM_B
NAME=
for r in $(seq 1 "$RUNS"); do
  rm -rf "$CACHE"; drop; mount_wan
  out=$(python3 "$LOAD" "$MNT/gpu@1.0.0/model.safetensors" "$DEVICE"); COLD_W+=("${out%% *}"); NAME=${out#* * }
  umount_wan
  drop; t0=$(now); download
  l=$(python3 "$LOAD" "$DL/model.safetensors" "$DEVICE"); COLD_B+=("$(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}')")
  : "$l"
  drop; mount_wan
  out=$(python3 "$LOAD" "$MNT/gpu@1.0.0/model.safetensors" "$DEVICE"); WARM_W+=("${out%% *}")
  umount_wan
  drop; out=$(python3 "$LOAD" "$DL/model.safetensors" "$DEVICE"); WARM_B+=("${out%% *}")
  echo "round $r: cold ${COLD_W[-1]} s vs download+load ${COLD_B[-1]} s; warm ${WARM_W[-1]} s vs local ${WARM_B[-1]} s" >&2
done
cw=$(median "${COLD_W[@]}") cb=$(median "${COLD_B[@]}") ww=$(median "${WARM_W[@]}") wb=$(median "${WARM_B[@]}")
echo "wanfs gpu.sh — $(date -Iseconds) — $NAME — $(nproc) CPUs — file $SIZE bytes, RUNS=$RUNS, $("$WAN" --version 2>/dev/null | head -1)"
echo "| measure | wanfs (s) | baseline (s) | ratio | target |"
echo "| --- | --- | --- | --- | --- |"
awk -v a="$cw" -v b="$cb" 'BEGIN{printf "| (G1) cold load_file to device vs download + load | %.3f | %.3f | %.2fx | <= 1.0x |\n", a, b, a/b}'
awk -v a="$ww" -v b="$wb" 'BEGIN{printf "| (G2) warm load_file to device vs local file (time) | %.3f | %.3f | %.2fx | <= 1.11x |\n", a, b, a/b}'
