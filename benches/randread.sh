#!/usr/bin/env bash
# benches/randread.sh - latency of on-demand chunks: small reads at random chunks of a cold mount,
# for A/B of daemon builds, rounds alternating between binaries.
#
#     sudo benches/randread.sh                                  # target/release/wan, ROUNDS=5
#     sudo ORIGIN_DATA=/dev/shm/origin ROUNDS=5 benches/randread.sh /var/tmp/wan-before target/release/wan
#
# Each round and binary: a fresh mount with an empty cache, page cache dropped, then READS
# (48) reads of 4 KiB at random chunks (never chunk 0, the head; a seed per round, the same for
# every binary), with `posix_fadvise(RANDOM)`. Every read waits for an on-demand fetch of its
# whole chunk (parallel `part_size_kib` parts). Prints each run's median and mean latency and
# the daemon's CPU ticks, then each binary's median of the per-round medians.
# RATE: limit the origin per connection (origin.sh syntax, e.g. 50m).
# Uses compare.sh's test file (WORK/data/model.bin, made by compare.sh) and ../shared/bench.
set -Eeuo pipefail
REPO=$(cd "$(dirname "$(realpath "$0")")/.." && pwd)
BENCH=$(realpath -m "${BENCH_DIR:-$REPO/../shared/bench}")
WORK=${WORK:-/var/tmp/wanfs-bench}
ROUNDS=${ROUNDS:-5}
READS=${READS:-48}
PORT=${PORT:-18497}
[ "$(id -u)" = 0 ] || { echo "randread.sh: run as root" >&2; exit 1; }
[ $# -gt 0 ] || set -- "$REPO/target/release/wan"
# shellcheck source=/dev/null
. "$BENCH/lib.sh"
DATA=${ORIGIN_DATA:-$WORK/data}
[ -f "$DATA/model.bin" ] || { echo "randread.sh: $DATA/model.bin missing: run compare.sh once" >&2; exit 1; }
T=$WORK/randread
rm -rf "$T"; mkdir -p "$T/mnt"
NAMES=("$@")
BINS=()
for a in "$@"; do n=${#BINS[@]}; cp "$a" "$T/wan$n"; BINS+=("$T/wan$n"); done
printf '[http]\naddr = ""\n' > "$T/wan.toml"
export ORIGIN_STATE=$T/origin-state
WAN_PID=
cleanup() {
  [ -n "$WAN_PID" ] && kill -TERM "$WAN_PID" && wait "$WAN_PID"
  is_mounted "$T/mnt" && fusermount3 -u "$T/mnt"
  "$BENCH/origin.sh" stop "$PORT" >/dev/null 2>&1
}
trap cleanup EXIT
# shellcheck disable=SC2086
"$BENCH/origin.sh" start "$PORT" "$DATA" ${RATE:-} >"$T/origin.log" 2>&1
for k in "${!BINS[@]}"; do
  { echo "schema_version = 1"; echo;
    "${BINS[$k]}" manifest build "$DATA" --id bench@1.0.0 --source "http://127.0.0.1:$PORT"; } > "$T/manifest$k.toml"
done
declare -A MEDS
for r in $(seq 1 "$ROUNDS"); do
  for i in "${!BINS[@]}"; do
    k=$(( (i + r) % ${#BINS[@]} ))
    rm -rf "$T/cache"; drop_caches
    "${BINS[$k]}" mount "$T/mnt" --manifest "$T/manifest$k.toml" --cache-dir "$T/cache" \
      --config "$T/wan.toml" 2>"$T/wan$k-$r.log" &
    WAN_PID=$!
    for _ in $(seq 1 200); do grep -qs mounted "$T/wan$k-$r.log" && break; sleep 0.05; done
    t0=$(awk '{print $14+$15}' "/proc/$WAN_PID/stat")
    out=$(python3 - "$T/mnt/bench@1.0.0/model.bin" "$r" "$READS" <<'PY'
import os, random, statistics, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
size = os.fstat(fd).st_size
chunks = size >> 23
rnd = random.Random(int(sys.argv[2]))
lat = []
for c in rnd.sample(range(1, chunks), min(int(sys.argv[3]), chunks - 1)):
    off = (c << 23) + rnd.randrange(0, 2040) * 4096
    t = time.perf_counter()
    if len(os.pread(fd, 4096, off)) != 4096:
        sys.exit("short read")
    lat.append((time.perf_counter() - t) * 1e3)
print("%.2f %.2f" % (statistics.median(lat), statistics.mean(lat)))
PY
)
    ticks=$(( $(awk '{print $14+$15}' "/proc/$WAN_PID/stat") - t0 ))
    kill -TERM "$WAN_PID"; wait "$WAN_PID"; WAN_PID=
    read -r med mean <<<"$out"
    MEDS[$k]="${MEDS[$k]:-} $med"
    echo "round $r, bin $k (${NAMES[$k]}): median $med ms, mean $mean ms, daemon CPU $ticks ticks"
  done
done
for k in "${!BINS[@]}"; do
  # shellcheck disable=SC2086
  echo "bin $k (${NAMES[$k]}): per-round medians${MEDS[$k]} ms | median $(median ${MEDS[$k]}) ms"
done
