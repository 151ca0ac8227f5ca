#!/usr/bin/env bash
# benches/coldcpu.sh - (g) of compare.sh alone, for A/B of daemon builds: the daemon's CPU per
# GB of a cold sequential read (fresh cache, page cache dropped, unlimited nginx origin), rounds
# alternating between binaries so both see the same machine noise.
#
#     sudo benches/coldcpu.sh                               # target/release/wan, ROUNDS=5
#     sudo ROUNDS=5 benches/coldcpu.sh /var/tmp/wan-before target/release/wan
#     sudo PROFILE=1 ROUNDS=1 benches/coldcpu.sh            # + perf record of the daemon
#     sudo benches/coldcpu.sh target/release/wan,--chunk-hash=sha256 target/release/wan
#
# Each argument is a binary, optionally followed by comma-separated `wan manifest build`
# arguments; each builds its own manifest with them (so one binary can run against both
# chunk hashes, and an older binary gets a manifest it can read). An item `cfg:KEY=VALUE` is a
# `[fetch]` key of that binary's config instead:
#     sudo THROTTLE_WBPS=200000000 benches/coldcpu.sh target/release/wan \
#          'target/release/wan,cfg:when_cache_behind="skip"'
# RATE: limit the origin per connection (origin.sh syntax, e.g. 50m), as compare.sh's (b); there
# read-ahead fetches chunks as parallel 1 MiB parts.
# THROTTLE_WBPS: limit the daemon's writes to the cache's disk (bytes/s, cgroup v1 blkio), to
# stand for a cache disk slower than the network.
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
[ "$(id -u)" = 0 ] || { echo "coldcpu.sh: run as root" >&2; exit 1; }
[ $# -gt 0 ] || set -- "$REPO/target/release/wan"
# shellcheck source=/dev/null
. "$BENCH/lib.sh"
DATA=${ORIGIN_DATA:-$WORK/data}   # ORIGIN_DATA: serve the test file from elsewhere (e.g. a tmpfs)
[ -f "$DATA/model.bin" ] || { echo "coldcpu.sh: $DATA/model.bin missing: run compare.sh once" >&2; exit 1; }
SIZE=$(stat -c %s "$DATA/model.bin")
CLK_TCK=$(getconf CLK_TCK)
T=$WORK/coldcpu
rm -rf "$T"; mkdir -p "$T/mnt"
ARGS=("$@")
BINS=()
BUILD=()
for a in "$@"; do
  n=${#BINS[@]}; IFS=, read -r -a parts <<<"$a"
  cp "${parts[0]}" "$T/wan$n"; BINS+=("$T/wan$n")
  b=(); c=()
  for p in "${parts[@]:1}"; do
    if [[ $p == cfg:* ]]; then c+=("${p#cfg:}"); else b+=("$p"); fi
  done
  BUILD+=("${b[*]}")
  { echo "[fetch]"; printf '%s\n' "${c[@]}"; printf '[http]\naddr = ""\n'; } > "$T/wan$n.toml"
done
CG=
if [ -n "${THROTTLE_WBPS:-}" ]; then
  CG=/sys/fs/cgroup/blkio/wanfs-coldcpu
  mkdir -p "$CG"
  dev=$(stat -c '%Hd:%Ld' "$WORK")
  if ! echo "$dev $THROTTLE_WBPS" > "$CG/blkio.throttle.write_bps_device"; then
    rmdir "$CG" 2>/dev/null || true
    echo "coldcpu.sh: cannot throttle device $dev (that of $WORK): blkio throttles whole disks," \
      "not partitions; put WORK on a whole disk or unset THROTTLE_WBPS" >&2
    exit 1
  fi
fi
export ORIGIN_STATE=$T/origin-state
WAN_PID=
cleanup() {
  set +e
  [ -n "$WAN_PID" ] && kill -TERM "$WAN_PID" && wait "$WAN_PID"
  is_mounted "$T/mnt" && fusermount3 -u "$T/mnt"
  "$BENCH/origin.sh" stop "$PORT" >/dev/null 2>&1
  [ -n "$CG" ] && rmdir "$CG" 2>/dev/null
}
trap cleanup EXIT
# shellcheck disable=SC2086
"$BENCH/origin.sh" start "$PORT" "$DATA" ${RATE:-} >"$T/origin.log" 2>&1
for k in "${!BINS[@]}"; do
  # shellcheck disable=SC2086
  { echo "schema_version = 1"; echo;
    "${BINS[$k]}" manifest build "$DATA" --id bench@1.0.0 --source "http://127.0.0.1:$PORT" ${BUILD[$k]}; } > "$T/manifest$k.toml"
done
FLOOR=$(openssl speed -evp sha256 -bytes 8388608 -seconds 3 2>/dev/null | awk '/^sha256/{printf "%.3f", $2*1000/1e9}')
# BLAKE3's floor from the crate the daemon uses (examples/hashspeed.rs), when it can be built.
HS=$REPO/target/release/examples/hashspeed
[ -x "$HS" ] || (cd "$REPO" && cargo build --release --example hashspeed >/dev/null 2>&1) || true
B3=$([ -x "$HS" ] && "$HS" | awk '$1=="blake3"{print $2}' || echo "")
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
cached() { python3 -c 'import os,sys; print(os.getxattr(sys.argv[1], "user.wan.cached_bytes").decode())' "$1"; }
state() { python3 -c 'import os,sys; print(os.getxattr(sys.argv[1], "user.wan.state").decode())' "$1"; }
declare -A CPG GBPS HWM
for r in $(seq 1 "$ROUNDS"); do
  order=("${!BINS[@]}"); [ $((r % 2)) = 0 ] && order=($(printf '%s\n' "${order[@]}" | tac))
  for k in "${order[@]}"; do
    rm -rf "$T/cache"; drop_caches
    NO_COLOR=1 "${BINS[$k]}" mount "$T/mnt" --manifest "$T/manifest$k.toml" --cache-dir "$T/cache" \
      --config "$T/wan$k.toml" 2>"$T/wan$k-$r.log" &
    WAN_PID=$!
    [ -n "$CG" ] && echo "$WAN_PID" > "$CG/cgroup.procs"
    for _ in $(seq 1 300); do grep -qs mounted "$T/wan$k-$r.log" && is_mounted "$T/mnt" && break; sleep 0.05; done
    f=$T/mnt/bench@1.0.0/model.bin
    if [ "${PROFILE:-0}" = 1 ]; then
      perf record -g -o "$T/perf$k.data" -p "$WAN_PID" 2>/dev/null & PERF=$!; sleep 0.3
    fi
    w0=$(ticks "$WAN_PID"); t0=$(date +%s.%N)
    python3 "$BENCH/readfile.py" seq "$f" "$BS" > "$T/read.out"
    t1=$(date +%s.%N)
    # Until the cache holds the file, or (chunks skipped under when_cache_behind = "skip")
    # its cached bytes stop growing for a second.
    last=-1; still=0
    for _ in $(seq 1 1500); do
      [ "$(state "$f")" = COMPLETE ] && break
      now=$(cached "$f"); if [ "$now" = "$last" ]; then still=$((still + 1)); else still=0; last=$now; fi
      [ $still -ge 50 ] && break
      sleep 0.02
    done
    skipped=$(awk '$1=="wan_cache_skipped_bytes_total"{printf "%.0f", $2/1048576}' "$T/mnt/.wan/metrics" 2>/dev/null || echo "?")
    w1=$(ticks "$WAN_PID")
    [ "${PROFILE:-0}" = 1 ] && { kill -INT "$PERF"; wait "$PERF" || true; }
    c=$(awk -v d=$((w1 - w0)) -v hz="$CLK_TCK" -v n="$SIZE" 'BEGIN{printf "%.2f", d/hz/(n/1e9)}')
    h=$(awk '/^VmHWM:/{printf "%.0f", $2/1024}' "/proc/$WAN_PID/status")
    g=$(awk '{printf "%.3f", $2}' "$T/read.out")
    CPG[$k]="${CPG[$k]:-} $c"; GBPS[$k]="${GBPS[$k]:-} $g"; HWM[$k]="${HWM[$k]:-} $h"
    echo "round $r, bin $k (${ARGS[$k]}): $c core-s/GB, $g GB/s, peak RSS $h MiB, $skipped MiB not cached" >&2
    kill -TERM "$WAN_PID"; wait "$WAN_PID" || true; WAN_PID=
  done
done
floor=$(awk -v r="$FLOOR" 'BEGIN{printf "%.2f", 1/r}')
b3floor=$([ -n "$B3" ] && awk -v r="$B3" 'BEGIN{printf "%.2f", 1/r}' || echo "?")
echo "file $SIZE bytes, read() of $BS bytes${RATE:+, origin limited to $RATE per connection}; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "floors, one core: sha256 (openssl) $FLOOR GB/s = $floor core-s/GB; blake3 (examples/hashspeed) ${B3:-?} GB/s = $b3floor core-s/GB"
for k in "${!BINS[@]}"; do
  # shellcheck disable=SC2086
  m=$(median ${CPG[$k]})
  echo "bin $k (${ARGS[$k]}): core-s/GB${CPG[$k]} | median $m = $(awk -v m="$m" -v f="$floor" 'BEGIN{printf "%.2f", m/f}')x the sha256 floor | GB/s${GBPS[$k]} | peak RSS MiB${HWM[$k]}"
done
[ "${PROFILE:-0}" = 1 ] && echo "perf data: $T/perf*.data (perf report -i FILE --no-children)"
exit 0
