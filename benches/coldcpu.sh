#!/usr/bin/env bash
# benches/coldcpu.sh - (g) of compare.sh alone, for A/B of daemon builds: the daemon's CPU per
# GB of a cold sequential read (fresh cache, page cache dropped, unlimited nginx origin), rounds
# alternating between binaries so both see the same machine noise.
#
#     sudo benches/coldcpu.sh                               # target/release/wan, ROUNDS=5
#     sudo ROUNDS=5 benches/coldcpu.sh /var/tmp/wan-before target/release/wan
#     sudo PROFILE=1 ROUNDS=1 benches/coldcpu.sh            # + perf record of the daemon
#     sudo BUILD_ARGS="--chunk-size 1048576" benches/coldcpu.sh A B   # another chunk grid
#
# Prints per-round core-s/GB (utime+stime from /proc/PID/stat, from the start of the read until
# the cache is COMPLETE) and GB/s for each binary, their medians, and the sha256 floor measured
# in the same run (openssl speed -evp sha256, 8 MiB blocks, one core). Uses compare.sh's test
# file (WORK/data/model.bin, made by compare.sh; SIZE must match) and ../shared/bench.
set -Eeuo pipefail
REPO=$(cd "$(dirname "$(realpath "$0")")/.." && pwd)
BENCH=$(realpath -m "${BENCH_DIR:-$REPO/../shared/bench}")
WORK=${WORK:-/var/tmp/wanfs-bench}
ROUNDS=${ROUNDS:-5}
PORT=${PORT:-18490}
BS=${BS:-1048576}
read -ra BUILD <<< "${BUILD_ARGS:-}"
[ "$(id -u)" = 0 ] || { echo "coldcpu.sh: run as root" >&2; exit 1; }
[ $# -gt 0 ] || set -- "$REPO/target/release/wan"
# shellcheck source=/dev/null
. "$BENCH/lib.sh"
DATA=$WORK/data
[ -f "$DATA/model.bin" ] || { echo "coldcpu.sh: $DATA/model.bin missing: run compare.sh once" >&2; exit 1; }
SIZE=$(stat -c %s "$DATA/model.bin")
CLK_TCK=$(getconf CLK_TCK)
T=$WORK/coldcpu
rm -rf "$T"; mkdir -p "$T/mnt"
ARGS=("$@")
BINS=()
for b in "$@"; do n=${#BINS[@]}; cp "$b" "$T/wan$n"; BINS+=("$T/wan$n"); done
export ORIGIN_STATE=$T/origin-state
WAN_PID=
cleanup() {
  set +e
  [ -n "$WAN_PID" ] && kill -TERM "$WAN_PID" && wait "$WAN_PID"
  is_mounted "$T/mnt" && fusermount3 -u "$T/mnt"
  "$BENCH/origin.sh" stop "$PORT" >/dev/null 2>&1
}
trap cleanup EXIT
"$BENCH/origin.sh" start "$PORT" "$DATA" >"$T/origin.log" 2>&1
{ echo "schema_version = 1"; echo;
  "${BINS[0]}" manifest build "$DATA" --id bench@1.0.0 --source "http://127.0.0.1:$PORT" "${BUILD[@]}"; } > "$T/manifest.toml"
printf '[http]\naddr = ""\n' > "$T/wan.toml"
FLOOR=$(openssl speed -evp sha256 -bytes 8388608 -seconds 3 2>/dev/null | awk '/^sha256/{printf "%.3f", $2*1000/1e9}')
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
state() { python3 -c 'import os,sys; print(os.getxattr(sys.argv[1], "user.wan.state").decode())' "$1"; }
declare -A CPG GBPS
for r in $(seq 1 "$ROUNDS"); do
  order=("${!BINS[@]}"); [ $((r % 2)) = 0 ] && order=($(printf '%s\n' "${order[@]}" | tac))
  for k in "${order[@]}"; do
    rm -rf "$T/cache"; drop_caches
    NO_COLOR=1 "${BINS[$k]}" mount "$T/mnt" --manifest "$T/manifest.toml" --cache-dir "$T/cache" \
      --config "$T/wan.toml" 2>"$T/wan$k-$r.log" &
    WAN_PID=$!
    for _ in $(seq 1 300); do grep -qs mounted "$T/wan$k-$r.log" && is_mounted "$T/mnt" && break; sleep 0.05; done
    f=$T/mnt/bench@1.0.0/model.bin
    if [ "${PROFILE:-0}" = 1 ]; then
      perf record -g -o "$T/perf$k.data" -p "$WAN_PID" 2>/dev/null & PERF=$!; sleep 0.3
    fi
    w0=$(ticks "$WAN_PID"); t0=$(date +%s.%N)
    python3 "$BENCH/readfile.py" seq "$f" "$BS" > "$T/read.out"
    t1=$(date +%s.%N)
    for _ in $(seq 1 600); do [ "$(state "$f")" = COMPLETE ] && break; sleep 0.02; done
    w1=$(ticks "$WAN_PID")
    [ "${PROFILE:-0}" = 1 ] && { kill -INT "$PERF"; wait "$PERF" || true; }
    c=$(awk -v d=$((w1 - w0)) -v hz="$CLK_TCK" -v n="$SIZE" 'BEGIN{printf "%.2f", d/hz/(n/1e9)}')
    g=$(awk '{printf "%.3f", $2}' "$T/read.out")
    CPG[$k]="${CPG[$k]:-} $c"; GBPS[$k]="${GBPS[$k]:-} $g"
    echo "round $r, bin $k (${ARGS[$k]}): $c core-s/GB, $g GB/s" >&2
    kill -TERM "$WAN_PID"; wait "$WAN_PID" || true; WAN_PID=
  done
done
floor=$(awk -v r="$FLOOR" 'BEGIN{printf "%.2f", 1/r}')
echo "file $SIZE bytes, read() of $BS bytes; sha256 floor $FLOOR GB/s per core = $floor core-s/GB; load $(cut -d' ' -f1-3 /proc/loadavg)"
for k in "${!BINS[@]}"; do
  # shellcheck disable=SC2086
  m=$(median ${CPG[$k]})
  echo "bin $k (${ARGS[$k]}): core-s/GB${CPG[$k]} | median $m = $(awk -v m="$m" -v f="$floor" 'BEGIN{printf "%.2f", m/f}')x floor | GB/s${GBPS[$k]}"
done
[ "${PROFILE:-0}" = 1 ] && echo "perf data: $T/perf*.data (perf report -i FILE --no-children)"
exit 0
