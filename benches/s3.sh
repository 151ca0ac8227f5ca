#!/usr/bin/env bash
# benches/s3.sh - one S3 object read through wanfs, awslabs mountpoint-s3 and boto3, from one
# local Ceph radosgw (tests/support/ceph_rgw.sh: memstore OSD, data in memory), in interleaved
# rounds whose order rotates; medians and ratios to wanfs's first binary.
#
#     sudo benches/s3.sh                                   # target/release/wan, SIZE_MIB=1024, ROUNDS=5
#     sudo ROUNDS=3 benches/s3.sh target/release/wan /var/tmp/wan-before,--chunked   # A/B two builds
# A binary may carry `manifest build` arguments after a comma (`,--chunked,--chunk-size,1048576`).
#     sudo MOUNT_S3=/path/to/mount-s3 benches/s3.sh        # a mount-s3 already built
#
# Setup, once per run: radosgw on 127.0.0.1:RGW_PORT, bucket `bench`, object m/model.safetensors
# of SIZE_MIB random bytes (put by boto3), each wan binary's entry built with its own
# `wan manifest build s3://bench/m` (its defaults: what a user gets). mount-s3 is built from
# ../shared/bench/mountpoint-s3/ (release, CARGO_TARGET_DIR=$MP_TARGET, nice) unless MOUNT_S3 is
# given (then never built) or already built there; without it, its rows are left out.
# Each round, every tool in turn (page cache dropped before each):
#   wanN:     a fresh mount with an empty cache (default config), the file read once in 1 MiB
#             reads: first MiB and whole read timed; daemon and radosgw CPU over the read; GETs
#             radosgw counted (its perf counters); then the page cache dropped and the file read
#             again from the same mount (warm: wanfs's cache blob, passthrough).
#   mount-s3: the same with `--cache DIR` (an empty dir) and its defaults.
#   boto3:    download_file with 16 threads into a file (TransferConfig max_concurrency=16).
# Then RANDOM (24) reads of 4 KiB at random 8 MiB-aligned chunks (never the first 16 MiB), each
# tool on its own fresh cold mount per round: median latency.
# Machine limits printed first: dd oflag=direct write, cold read of a file, openssl sha256.
# Needs root (drop_caches, FUSE), Debian's ceph packages (radosgw, ceph-mon, ceph-osd),
# python3 with boto3, ../shared/bench (lib.sh).
set -Eeuo pipefail
REPO=$(cd "$(dirname "$(realpath "$0")")/.." && pwd)
BENCH=$(realpath -m "${BENCH_DIR:-$REPO/../shared/bench}")
WORK=${WORK:-/var/tmp/wanfs-bench-s3}
SIZE_MIB=${SIZE_MIB:-1024}
ROUNDS=${ROUNDS:-5}
RANDOM_READS=${RANDOM_READS:-24}
MON_PORT=${MON_PORT:-18689}
RGW_PORT=${RGW_PORT:-18690}
MP_TARGET=${MP_TARGET:-/var/tmp/wanfs-bench-mp-target}
MOUNT_S3_GIVEN=${MOUNT_S3:+1}
MOUNT_S3=${MOUNT_S3:-$MP_TARGET/release/mount-s3}
[ "$(id -u)" = 0 ] || { echo "s3.sh: run as root" >&2; exit 1; }
[ $# -gt 0 ] || set -- "$REPO/target/release/wan"
# shellcheck source=/dev/null
. "$BENCH/lib.sh"
T=$WORK
AK=benchkey SK=benchsecret0123456789
export AWS_ACCESS_KEY_ID=$AK AWS_SECRET_ACCESS_KEY=$SK AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$RGW_PORT
BYTES=$((SIZE_MIB << 20))
PIDS=(); MNT_PID=
cleanup() {
  [ -n "$MNT_PID" ] && kill -TERM "$MNT_PID" 2>/dev/null && wait "$MNT_PID" 2>/dev/null
  is_mounted "$T/mnt" && { fusermount3 -u "$T/mnt" || umount -l "$T/mnt"; }
  for f in "$T"/ceph/run/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
  sleep 1; rm -rf "$T/ceph" "$T/cache" "$T/boto.bin" "$T/limits.bin"
}
trap cleanup EXIT
rm -rf "$T"; mkdir -p "$T/mnt"

if [ -z "$MOUNT_S3_GIVEN" ] && [ ! -x "$MOUNT_S3" ] && [ -d "$BENCH/mountpoint-s3" ] && command -v cmake >/dev/null; then
  echo "building mount-s3 into $MP_TARGET (about 10 minutes on 2 cores)..."
  rm -rf "$T/mp-src"; cp -r "$BENCH/mountpoint-s3" "$T/mp-src"
  (cd "$T/mp-src" && CARGO_TARGET_DIR=$MP_TARGET nice -n 10 cargo build --release -q) || true
fi
TOOLS=()
NAMES=()
for i in $(seq 0 $(($# - 1))); do TOOLS+=("wan$i"); done
WANS=(); BUILD_ARGS=()
for a in "$@"; do WANS+=("${a%%,*}"); [[ $a == *,* ]] && BUILD_ARGS+=("${a#*,}") || BUILD_ARGS+=(""); done
[ -x "$MOUNT_S3" ] && TOOLS+=(mount-s3) || echo "no mount-s3 at $MOUNT_S3: its rows are left out"
TOOLS+=(boto3)

echo "machine: $(nproc) CPUs, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM," \
  "load $(cut -d' ' -f1-3 /proc/loadavg)"
for i in "${!WANS[@]}"; do echo "wan$i: ${WANS[$i]}"; done
w=$(LC_ALL=C dd if=/dev/zero of="$T/limits.bin" bs=1M count=1024 oflag=direct 2>&1 | tail -1 | awk -F, '{print $NF}')
drop_caches
r=$(dd_gbps "$T/limits.bin")
rm -f "$T/limits.bin"
s=$(openssl speed -evp sha256 -seconds 1 2>/dev/null | awk '/^sha256/{print $NF}')
echo "limits: dd oflag=direct write$w; cold read $r GB/s; openssl sha256 (16 KiB blocks) $s"

MEMSTORE_BYTES=$((BYTES * 3 + (512 << 20))) "$REPO/tests/support/ceph_rgw.sh" "$T/ceph" \
  "$MON_PORT" "$RGW_PORT" "$AK" "$SK" > "$T/endpoint"
RGW_PID=$(cat "$T/ceph/run/client.rgw.pid")
OSD_PID=$(cat "$T/ceph/run/osd.0.pid")
ASOK=$T/ceph/run/client.rgw.asok
python3 - "$SIZE_MIB" <<'PY'
import os, sys, boto3
from boto3.s3.transfer import TransferConfig
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
s3.create_bucket(Bucket="bench")
# A real safetensors layout (8-byte header length, JSON header, then one U8 tensor of random
# bytes): a loader's first read, and the build's head chunk (the header rounded up to 1 MiB),
# are those of a model; random bytes from the start read as a garbage header.
class Safetensors:
    def __init__(self, n):
        hdr = b'{"w":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}' % (n, n)
        hdr += b" " * (-(len(hdr) + 8) % 8)
        self.head = len(hdr).to_bytes(8, "little") + hdr
        self.left = n - len(self.head)
        self.head = self.head
    def read(self, k=-1):
        out, self.head = self.head, b""
        k = self.left if k < 0 else min(max(k - len(out), 0), self.left)
        self.left -= k
        return out + os.urandom(k)
s3.upload_fileobj(Safetensors(int(sys.argv[1]) << 20), "bench", "m/model.safetensors",
                  Config=TransferConfig(multipart_chunksize=64 << 20))
PY
for i in "${!WANS[@]}"; do
  IFS=, read -ra extra <<<"${BUILD_ARGS[$i]}"
  { echo "schema_version = 1"; echo;
    "${WANS[$i]}" manifest build s3://bench/m --id bench@1.0.0 "${extra[@]}"; } > "$T/models$i.toml" 2>"$T/build$i.log"
  echo "wan$i entry: $(grep -q '^chunks' "$T/models$i.toml" && echo chunked || echo whole-only) (build args: ${BUILD_ARGS[$i]:-none})"
done
printf '[http]\naddr = ""\n' > "$T/wan.toml"

ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
gets() {
  ceph --admin-daemon "$ASOK" perf dump 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["rgw"]["get"])'
}
mount_tool() { # tool: a fresh mount with an empty cache; sets MNT_PID and FILE
  local tool=$1
  rm -rf "$T/cache"; mkdir -p "$T/cache"; drop_caches
  case $tool in
    wan*)
      local i=${tool#wan}
      "${WANS[$i]}" mount "$T/mnt" --manifest "$T/models$i.toml" --cache-dir "$T/cache" \
        --config "$T/wan.toml" 2>"$T/$tool.log" &
      MNT_PID=$!
      for _ in $(seq 1 200); do grep -qs mounted "$T/$tool.log" && break; sleep 0.05; done
      FILE=$T/mnt/bench@1.0.0/model.safetensors ;;
    mount-s3)
      "$MOUNT_S3" bench "$T/mnt" --prefix m/ --endpoint-url "$AWS_ENDPOINT_URL" --force-path-style \
        --region us-east-1 --read-only --foreground --cache "$T/cache" >"$T/$tool.log" 2>&1 &
      MNT_PID=$!
      for _ in $(seq 1 200); do is_mounted "$T/mnt" && break; sleep 0.05; done
      FILE=$T/mnt/model.safetensors ;;
  esac
  is_mounted "$T/mnt" || { echo "$tool did not mount" >&2; cat "$T/$tool.log" >&2; exit 1; }
}
unmount_tool() {
  kill -TERM "$MNT_PID"; wait "$MNT_PID" 2>/dev/null || true; MNT_PID=
  is_mounted "$T/mnt" && { fusermount3 -u "$T/mnt" 2>/dev/null || umount -l "$T/mnt"; }
  return 0
}
# Reads FILE front to back in 1 MiB reads: "first_mib_ms total_s".
read_timed() {
  python3 - "$1" <<'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
t0 = time.perf_counter(); first = None; n = 0
while True:
    b = os.read(fd, 1 << 20)
    if not b: break
    n += len(b)
    if first is None: first = time.perf_counter() - t0
print("%.2f %.3f" % (first * 1e3, time.perf_counter() - t0))
PY
}

declare -A COLD FIRST DCPU RCPU NGET WARM RAND
for r in $(seq 1 "$ROUNDS"); do
  for k in "${!TOOLS[@]}"; do
    tool=${TOOLS[$(( (k + r) % ${#TOOLS[@]} ))]}
    g0=$(gets); c0=$(ticks "$RGW_PID"); o0=$(ticks "$OSD_PID")
    if [ "$tool" = boto3 ]; then
      rm -f "$T/boto.bin"; drop_caches
      g0=$(gets); c0=$(ticks "$RGW_PID"); o0=$(ticks "$OSD_PID")
      secs=$(/usr/bin/time -o "$T/boto.time" -f "%U %S" python3 - "$T/boto.bin" <<'PY'
import os, sys, time, boto3
from boto3.s3.transfer import TransferConfig
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
t = time.perf_counter()
s3.download_file("bench", "m/model.safetensors", sys.argv[1],
                 Config=TransferConfig(max_concurrency=16))
os.sync()
print("%.3f" % (time.perf_counter() - t))
PY
)
      first=-; warm=-
      dt=$(awk '{printf "%d", ($1+$2)*100}' "$T/boto.time")
      rm -f "$T/boto.bin"
    else
      mount_tool "$tool"
      d0=$(ticks "$MNT_PID"); g0=$(gets); c0=$(ticks "$RGW_PID"); o0=$(ticks "$OSD_PID")
      read -r first secs <<<"$(read_timed "$FILE")"
      dt=$(( $(ticks "$MNT_PID") - d0 ))
      sync; drop_caches
      read -r _ warm <<<"$(read_timed "$FILE")"
      unmount_tool
    fi
    rc=$(( $(ticks "$RGW_PID") - c0 )); oc=$(( $(ticks "$OSD_PID") - o0 )); ng=$(( $(gets) - g0 ))
    gb=$(echo "$BYTES / 1000000000" | bc -l)
    COLD[$tool]="${COLD[$tool]:-} $secs"; FIRST[$tool]="${FIRST[$tool]:-} $first"
    DCPU[$tool]="${DCPU[$tool]:-} $(echo "$dt / 100 / $gb" | bc -l)"
    RCPU[$tool]="${RCPU[$tool]:-} $(echo "$rc / 100 / $gb" | bc -l)"
    NGET[$tool]="${NGET[$tool]:-} $(echo "$ng * 1073741824 / $BYTES" | bc -l)"
    WARM[$tool]="${WARM[$tool]:-} $warm"
    printf 'round %d %-8s cold %6.3f s (%5.2f GB/s) first MiB %s ms, client CPU %.2f s, radosgw %.2f s + osd %.2f s, %d GETs, warm %s s\n' \
      "$r" "$tool" "$secs" "$(echo "$BYTES / $secs / 1000000000" | bc -l)" "$first" \
      "$(echo "$dt / 100" | bc -l)" "$(echo "$rc / 100" | bc -l)" "$(echo "$oc / 100" | bc -l)" "$ng" "$warm"
  done
  for k in "${!TOOLS[@]}"; do
    tool=${TOOLS[$(( (k + r) % ${#TOOLS[@]} ))]}
    [ "$tool" = boto3 ] && continue
    mount_tool "$tool"
    ms=$(python3 - "$FILE" "$r" "$RANDOM_READS" <<'PY'
import os, random, statistics, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
chunks = os.fstat(fd).st_size >> 23
rnd = random.Random(int(sys.argv[2]))
lat = []
for c in rnd.sample(range(2, chunks), min(int(sys.argv[3]), chunks - 2)):
    off = (c << 23) + rnd.randrange(0, 2048) * 4096
    t = time.perf_counter()
    assert len(os.pread(fd, 4096, off)) == 4096
    lat.append((time.perf_counter() - t) * 1e3)
print("%.2f" % statistics.median(lat))
PY
)
    unmount_tool
    RAND[$tool]="${RAND[$tool]:-} $ms"
    printf 'round %d %-8s random 4 KiB cold: median %s ms\n' "$r" "$tool" "$ms"
  done
done

echo
echo "medians of $ROUNDS rounds, $SIZE_MIB MiB object (per GB: 10^9 bytes; GETs per GiB):"
printf '%-8s %8s %8s %10s %11s %12s %10s %9s %10s\n' tool "cold s" "GB/s" "first ms" "rand4k ms" \
  "client s/GB" "rgw s/GB" "GETs/GiB" "warm GB/s"
# shellcheck disable=SC2086
for tool in "${TOOLS[@]}"; do
  c=$(median ${COLD[$tool]})
  f=$( [ "$tool" = boto3 ] && echo - || median ${FIRST[$tool]})
  ra=$( [ "$tool" = boto3 ] && echo - || median ${RAND[$tool]})
  wm=$( [ "$tool" = boto3 ] && echo - || printf '%.2f' "$(echo "$BYTES / $(median ${WARM[$tool]}) / 1000000000" | bc -l)")
  printf '%-8s %8.3f %8.2f %10s %11s %12.2f %10.2f %9.0f %10s\n' "$tool" "$c" \
    "$(echo "$BYTES / $c / 1000000000" | bc -l)" "$f" "$ra" "$(median ${DCPU[$tool]})" \
    "$(median ${RCPU[$tool]})" "$(median ${NGET[$tool]})" "$wm"
done
echo
echo "wan0 ÷ each (cold: speed ratio, >1 = wan0 faster; first/rand: latency ratio, <1 = wan0 faster; CPU: ratio):"
# Ratios of medians of per-round ratios, rounds being interleaved.
ratio() { # name array-of-wan0 array-of-tool invert
  local a b out=()
  read -ra a <<<"$1"; read -ra b <<<"$2"
  for i in "${!a[@]}"; do
    { [ -n "${b[$i]:-}" ] && [ "${b[$i]}" != - ] && [ "${a[$i]}" != - ]; } || continue
    out+=("$(echo "${a[$i]} / ${b[$i]}" | bc -l)")
  done
  if [ ${#out[@]} -gt 0 ]; then printf '%.2f' "$(median "${out[@]}")"; else echo -; fi
}
for tool in "${TOOLS[@]:1}"; do
  printf '%-8s cold %s×  first MiB %s×  random 4 KiB %s×  client CPU/GB %s×  radosgw CPU/GB %s×  warm %s×\n' "$tool" \
    "$(ratio "${COLD[$tool]}" "${COLD[wan0]}")" "$(ratio "${FIRST[wan0]}" "${FIRST[$tool]}")" \
    "$(ratio "${RAND[wan0]:-}" "${RAND[$tool]:-}")" "$(ratio "${DCPU[wan0]}" "${DCPU[$tool]}")" \
    "$(ratio "${RCPU[wan0]}" "${RCPU[$tool]}")" "$(ratio "${WARM[$tool]}" "${WARM[wan0]}")"
done
