#!/usr/bin/env bash
# benches/tensors.sh - time to tensors (issue 8, target 3): how soon an inference process holds
# every tensor of a safetensors file, through wanfs against "download, then load".
#
# Run by hand, as root, on a quiet machine (not in CI):
#     sudo benches/tensors.sh                 # 1 GiB of float16 tensors, RUNS=3, unlimited origin
#     sudo RATE=50m benches/tensors.sh        # origin limited to 50 MiB/s per connection
#
# Per round (the order of A and B alternates; medians of RUNS rounds are reported):
#   (h) cold: safetensors.numpy.load_file through a fresh wanfs mount (empty cache, page cache
#       dropped), vs aria2c -x8 -s8 -k1M downloading the file to the same disk (page cache
#       dropped) + load_file of that copy                                              target <= 1.0x
#   (i) warm: load_file through a fresh mount over the complete cache (page cache dropped), vs
#       load_file of the downloaded copy (page cache dropped)                          target >= 0.9x
#       (the loads' own rate: the same comparison the GPU check makes with torch)
# Times are wall seconds from the start of the load (or the download) to the last tensor in
# memory; a mount is started before the clock, as the daemon is already running in production.
# Uses ../shared/bench/origin.sh (nginx; RATE through its rate-limiting proxy) and lib.sh.
#
# Environment: SIZE_MIB=1024 RUNS=3 RATE=0 TPORT=18482 WORK=/var/tmp/wanfs-tensors
#              WAN=target/release/wan (built if missing) BENCH_DIR=../shared/bench
set -Eeuo pipefail
REPO=$(cd "$(dirname "$(realpath "$0")")/.." && pwd)
BENCH=$(realpath -m "${BENCH_DIR:-$REPO/../shared/bench}")
SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3}
RATE=${RATE:-0}
TPORT=${TPORT:-18482}
WORK=${WORK:-/var/tmp/wanfs-tensors}
WAN=${WAN:-$REPO/target/release/wan}
die() { echo "tensors.sh: ERROR: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root (drop_caches, FUSE)"
for t in aria2c python3 curl; do command -v "$t" >/dev/null || die "missing $t"; done
python3 -c 'import numpy, safetensors' 2>/dev/null \
  || die "python3 needs numpy and safetensors (pip install numpy safetensors)"
[ -x "$WAN" ] || (cd "$REPO" && cargo build --release) || die "cargo build --release failed"
# shellcheck source=/dev/null
. "$BENCH/lib.sh"

mkdir -p "$WORK"
WORK=$(realpath "$WORK")
DATA=$WORK/data MNT=$WORK/mnt DL=$WORK/dl CFG=$WORK/wan.toml MAN=$WORK/manifest.toml
export ORIGIN_STATE=$WORK/origin-state
mkdir -p "$DATA" "$MNT" "$DL" "$ORIGIN_STATE"
cp "$WAN" "$WORK/wan.bin"; WAN=$WORK/wan.bin
FILE=$DATA/model.safetensors
WPID=
cleanup() {
  set +e
  [ -n "$WPID" ] && kill "$WPID" 2>/dev/null && wait "$WPID" 2>/dev/null
  is_mounted "$MNT" && umount -l "$MNT"
  "$BENCH/origin.sh" stop "$TPORT" >/dev/null 2>&1
}
trap cleanup EXIT

if [ ! -f "$FILE" ] || [ "$(cat "$WORK/data.ok" 2>/dev/null)" != "$SIZE_MIB" ]; then
  log "writing $SIZE_MIB MiB of float16 tensors to $FILE"
  python3 - "$FILE" "$SIZE_MIB" <<'EOF'
import sys
import numpy as np
from safetensors.numpy import save_file
path, mib = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(22)
# 16 MiB tensors, like the layers of a diffusion transformer shard.
tensors = {f"blocks.{i}.weight": rng.standard_normal((8192, 1024), dtype=np.float32).astype(np.float16)
           for i in range(mib // 16)}
save_file(tensors, path)
EOF
  echo "$SIZE_MIB" > "$WORK/data.ok"
fi
SIZE=$(stat -c %s "$FILE")
{ echo "schema_version = 1"; echo;
  "$WAN" manifest build "$DATA" --id tensors@1.0.0 --source "http://127.0.0.1:$TPORT"; } > "$MAN"
printf '[http]\naddr = ""\n' > "$CFG"
"$BENCH/origin.sh" start "$TPORT" "$DATA" "$RATE" > "$WORK/origin.log" 2>&1 || die "origin: $(cat "$WORK/origin.log")"

# load PATH: seconds from the start of load_file to every tensor in memory (checks the bytes).
load() {
  python3 - "$1" "$SIZE" <<'EOF'
import sys, time
from safetensors.numpy import load_file
t0 = time.perf_counter()
d = load_file(sys.argv[1])
n = sum(v.nbytes for v in d.values())
t = time.perf_counter() - t0
assert n > 0.99 * int(sys.argv[2]) - (1 << 20), n
print(f"{t:.3f}")
EOF
}
mount_wan() { # mount_wan CACHE
  "$WAN" mount "$MNT" --manifest "$MAN" --cache-dir "$1" --config "$CFG" 2>>"$WORK/wan.log" &
  WPID=$!
  for _ in $(seq 1 200); do is_mounted "$MNT" && ls "$MNT/tensors@1.0.0" >/dev/null 2>&1 && return; sleep 0.05; done
  die "wan mount did not come up (log: $WORK/wan.log)"
}
umount_wan() { kill "$WPID"; wait "$WPID" 2>/dev/null || true; WPID=; }
now() { date +%s.%N; }

declare -a COLD DLLOAD WARM LOCAL
for r in $(seq 1 "$RUNS"); do
  for side in $( ((r % 2)) && echo "A B" || echo "B A"); do
    if [ "$side" = A ]; then
      rm -rf "$WORK/cache"; drop_caches; mount_wan "$WORK/cache"
      COLD+=("$(load "$MNT/tensors@1.0.0/model.safetensors")")
      umount_wan
      drop_caches; mount_wan "$WORK/cache"
      WARM+=("$(load "$MNT/tensors@1.0.0/model.safetensors")")
      umount_wan
    else
      rm -f "$DL/model.safetensors"; drop_caches
      t0=$(now)
      aria2c -q -x8 -s8 -k1M --file-allocation=falloc --allow-overwrite=true --auto-file-renaming=false \
        -d "$DL" -o model.safetensors "http://127.0.0.1:$TPORT/model.safetensors"
      l=$(load "$DL/model.safetensors")
      DLLOAD+=("$(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}')")
      drop_caches
      LOCAL+=("$(load "$DL/model.safetensors")")
      : "$l"
    fi
  done
  log "round $r: cold ${COLD[-1]} s vs download+load ${DLLOAD[-1]} s; warm ${WARM[-1]} s vs local ${LOCAL[-1]} s"
done

c=$(median "${COLD[@]}"); d=$(median "${DLLOAD[@]}"); w=$(median "${WARM[@]}"); l=$(median "${LOCAL[@]}")
echo "machine: $(nproc) cores; direct write $(dd if=/dev/zero of="$WORK/ddtest" bs=8M count=64 oflag=direct 2>&1 | tail -1 | awk '{print $(NF-1), $NF}'); sha256 $(openssl speed -evp sha256 -bytes 8388608 -seconds 1 2>/dev/null | awk '/^sha256/{print $NF}')"
rm -f "$WORK/ddtest"
echo "file: $SIZE bytes of float16 tensors; origin rate per connection: ${RATE}; rounds: $RUNS"
echo "| measure | wanfs | baseline | wanfs / baseline | target |"
echo "|---|---|---|---|---|"
awk -v c="$c" -v d="$d" 'BEGIN{printf "| (h) time to tensors, cold mount vs aria2c -x8 + load | %.3f s | %.3f s | %.2fx | <= 1.0x |\n", c, d, c/d}'
awk -v w="$w" -v l="$l" 'BEGIN{printf "| (i) load rate, warm mount vs local copy (page cache dropped) | %.3f s | %.3f s | %.2fx (as a rate: %.2fx) | rate >= 0.9x |\n", w, l, w/l, l/w}'
echo "per round: cold ${COLD[*]} | download+load ${DLLOAD[*]} | warm ${WARM[*]} | local ${LOCAL[*]}"
