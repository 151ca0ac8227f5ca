#!/usr/bin/env bash
# benches/oci.sh - a cold read of a model through `oci://` against `oras pull` of the same
# artifact and curl of the same blob, all from one local docker-registry (distribution 2.8),
# in interleaved rounds; then what a random 4 KiB read of a cold mount costs.
#
#     sudo benches/oci.sh                        # target/release/wan, SIZE_MIB=1024, ROUNDS=5
#     sudo WAN=target/debug/wan SIZE_MIB=512 ROUNDS=3 benches/oci.sh
#
# Setup, once per run: a docker-registry on 127.0.0.1:PORT storing in WORK, a model of one
# SIZE_MIB weight file pushed by oras-py as a ModelPack raw layer, its chunk lists published
# with `wan manifest publish-chunks` (CHUNK bytes, blake3-tree) and the entry built with
# `wan manifest build oci://…` (which reads the published lists, no layer).
# Each round, in an order that rotates: page cache dropped, then
#   wan:  a fresh mount with an empty cache, the file read whole (cat > /dev/null);
#   oras: `oras pull` (oras-py) of the artifact into an empty directory;
#   curl: GET of the layer's blob into a file.
# Each prints seconds and GB/s; then the median of each. All three end with the bytes on this
# machine's disk (wan's cache, oras' directory, curl's file), and all read the registry's
# file on the same disk.
# Then RANDOM (8) reads of 4 KiB at random offsets, each on a fresh cold mount: latency and
# the bytes the cache has allocated after it (a chunk, not the layer).
# Needs root (drop_caches, FUSE), docker-registry, python3 with oras, curl, ../shared/bench.
set -Eeuo pipefail
REPO=$(cd "$(dirname "$(realpath "$0")")/.." && pwd)
BENCH=$(realpath -m "${BENCH_DIR:-$REPO/../shared/bench}")
WORK=${WORK:-/var/tmp/wanfs-bench-oci}
WAN=$(realpath "${WAN:-$REPO/target/release/wan}")
SIZE_MIB=${SIZE_MIB:-1024}
ROUNDS=${ROUNDS:-5}
RANDOM_READS=${RANDOM_READS:-8}
CHUNK=${CHUNK:-8388608}
PORT=${PORT:-18599}
[ "$(id -u)" = 0 ] || { echo "oci.sh: run as root" >&2; exit 1; }
# shellcheck source=/dev/null
. "$BENCH/lib.sh"
T=$WORK
HOST=127.0.0.1:$PORT
rm -rf "$T"; mkdir -p "$T/mnt" "$T/model"
REG_PID=; WAN_PID=
cleanup() {
  [ -n "$WAN_PID" ] && kill -TERM "$WAN_PID" && wait "$WAN_PID"
  is_mounted "$T/mnt" && fusermount3 -u "$T/mnt"
  [ -n "$REG_PID" ] && kill "$REG_PID" && wait "$REG_PID" 2>/dev/null
  rm -rf "$T"
}
trap cleanup EXIT

echo "machine: $(nproc) CPUs, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM," \
  "$(df -h "$T" | awk 'NR==2{print $1", "$4" free"}'); wan: $WAN"
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' \
  "$T/store" "$HOST" > "$T/registry.yml"
docker-registry serve "$T/registry.yml" >"$T/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 1 100); do curl -sf "http://$HOST/v2/" >/dev/null && break; sleep 0.1; done
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$T/model/model.safetensors"
python3 "$REPO/tests/support/oci_push.py" "$HOST" models/bench:v1 "$T/model" \
  "model.safetensors=application/vnd.cncf.model.weight.v1.raw" > /dev/null
URL=oci://$HOST/models/bench:v1
"$WAN" manifest publish-chunks "$URL" --chunk-size "$CHUNK"
{ echo "schema_version = 1"; echo;
  "$WAN" manifest build "$URL" --id bench@1.0.0; } > "$T/models.toml" 2>"$T/build.log"
grep -q "using the chunk lists published" "$T/build.log" || { cat "$T/build.log" >&2; exit 1; }
BLOB=$(grep -m1 '^sha256 = ' "$T/models.toml" | cut -d'"' -f2)
rm -rf "$T/model"
printf '[http]\naddr = ""\n' > "$T/wan.toml"
BYTES=$((SIZE_MIB << 20))

mount_cold() {
  rm -rf "$T/cache"; drop_caches
  "$WAN" mount "$T/mnt" --manifest "$T/models.toml" --cache-dir "$T/cache" \
    --config "$T/wan.toml" 2>"$T/wan.log" &
  WAN_PID=$!
  for _ in $(seq 1 200); do grep -qs mounted "$T/wan.log" && return 0; sleep 0.05; done
  echo "mount did not come up" >&2; cat "$T/wan.log" >&2; exit 1
}
unmount() { kill -TERM "$WAN_PID"; wait "$WAN_PID" || true; WAN_PID=; }
now() { date +%s.%N; }

run_wan() {
  mount_cold
  local t0; t0=$(now)
  cat "$T/mnt/bench@1.0.0/model.safetensors" > /dev/null
  echo "$(now) - $t0" | bc -l
  unmount
}
run_oras() {
  rm -rf "$T/oras"; mkdir -p "$T/oras"; drop_caches
  local t0; t0=$(now)
  python3 -c 'import sys, oras.provider as p
c = p.Registry(hostname=sys.argv[1], insecure=True)
c.pull(target=sys.argv[1] + "/models/bench:v1", outdir=sys.argv[2])' "$HOST" "$T/oras" >/dev/null
  sync -f "$T/oras"
  echo "$(now) - $t0" | bc -l
}
run_curl() {
  rm -f "$T/curl.bin"; drop_caches
  local t0; t0=$(now)
  curl -sf -o "$T/curl.bin" "http://$HOST/v2/models/bench/blobs/sha256:$BLOB"
  sync -f "$T/curl.bin"
  echo "$(now) - $t0" | bc -l
}

declare -A SECS
TOOLS=(wan oras curl)
for r in $(seq 1 "$ROUNDS"); do
  for i in 0 1 2; do
    tool=${TOOLS[$(( (i + r) % 3 ))]}
    s=$("run_$tool")
    SECS[$tool]="${SECS[$tool]:-} $s"
    printf 'round %d %-4s %6.2f s %6.2f GB/s\n' "$r" "$tool" "$s" "$(echo "$BYTES / $s / 1000000000" | bc -l)"
  done
done
for tool in "${TOOLS[@]}"; do
  # shellcheck disable=SC2086
  m=$(median ${SECS[$tool]})
  printf '%-4s median %6.2f s %6.2f GB/s (%d MiB)\n' "$tool" "$m" "$(echo "$BYTES / $m / 1000000000" | bc -l)" "$SIZE_MIB"
done
rm -rf "$T/oras" "$T/curl.bin"

for r in $(seq 1 "$RANDOM_READS"); do
  mount_cold
  out=$(python3 - "$T/mnt/bench@1.0.0/model.safetensors" "$r" <<'PY'
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
off = random.Random(int(sys.argv[2])).randrange(0, size - 4096) & ~4095
t = time.perf_counter()
assert len(os.pread(fd, 4096, off)) == 4096
print("%d %.2f" % (off, (time.perf_counter() - t) * 1e3))
PY
)
  cached=$(du -sB1 "$T/cache" | cut -f1)  # allocated, not the sparse size
  unmount
  read -r off ms <<<"$out"
  echo "random 4 KiB at $off: $ms ms, cache holds $cached bytes (chunk $CHUNK, layer $BYTES)"
done
