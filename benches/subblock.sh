#!/usr/bin/env bash
# benches/subblock.sh - random 4 KiB reads of a cold mount: sub-blocks proven by outboards
# against whole 8 MiB chunks and against 1 MiB chunks, with one 4 KiB ranged GET (curl, on a
# kept-alive connection to the same origin) as the floor; and the cold sequential read of each,
# to show what each costs there.
#
#     sudo benches/subblock.sh                          # target/release/wan, ROUNDS=5
#     sudo ROUNDS=1 SIZE=256M benches/subblock.sh       # a quick check of the script
#
# Configurations, built from the same file with `wan manifest build --chunk-hash blake3-tree`:
#   ob8   8 MiB chunks (the default) and `--outboards` next to the manifest (64 KiB sub-blocks)
#   c8    8 MiB chunks, no outboards (what every read paid before)
#   c1    1 MiB chunks (`--chunk-size 1048576`), no outboards
# Each round runs, in an order rotated per round, for each configuration: a fresh mount, empty
# cache, page cache dropped, READS (48) reads of 4 KiB at random offsets, one in each of READS
# 8 MiB chunks (never in the first 16 MiB; a seed per round, the same for every configuration
# and for curl; POSIX_FADV_RANDOM), then a fresh
# mount and cache again and one cold sequential read of the whole file (readfile.py seq); and
# curl: READS ranged GETs of 4 KiB at the same offsets on one connection (a first GET opens it).
# Prints per round each median, then the medians of per-round medians and the ratios.
# The origin (../shared/bench/origin.sh, nginx) serves a copy of the file in /dev/shm, as a
# remote origin serves from its page cache (ORIGIN_DATA to change it).
set -Eeuo pipefail
REPO=$(cd "$(dirname "$(realpath "$0")")/.." && pwd)
BENCH=$(realpath -m "${BENCH_DIR:-$REPO/../shared/bench}")
WORK=${WORK:-/var/tmp/wanfs-subblock}
ROUNDS=${ROUNDS:-5}
READS=${READS:-48}
SIZE=${SIZE:-1G}
PORT=${PORT:-18499}
WAN=${WAN:-$REPO/target/release/wan}
[ "$(id -u)" = 0 ] || { echo "subblock.sh: run as root" >&2; exit 1; }
# shellcheck source=/dev/null
. "$BENCH/lib.sh"
T=$WORK/run
DATA=${ORIGIN_DATA:-/dev/shm/wanfs-subblock}
rm -rf "$T"; mkdir -p "$T/mnt" "$DATA"
if [ ! -f "$DATA/model.bin" ] || [ "$(stat -c %s "$DATA/model.bin")" != "$(numfmt --from=iec "$SIZE")" ]; then
  head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom > "$DATA/model.bin"
fi
printf '[http]\naddr = ""\n' > "$T/wan.toml"
export ORIGIN_STATE=$T/origin-state
WAN_PID=
cleanup() {
  [ -n "$WAN_PID" ] && kill -TERM "$WAN_PID" && wait "$WAN_PID"
  is_mounted "$T/mnt" && fusermount3 -u "$T/mnt"
  "$BENCH/origin.sh" stop "$PORT" >/dev/null 2>&1
}
trap cleanup EXIT
"$BENCH/origin.sh" start "$PORT" "$DATA" >"$T/origin.log" 2>&1
URL=http://127.0.0.1:$PORT/model.bin
CONFIGS=(ob8 c8 c1)
for c in "${CONFIGS[@]}"; do
  mkdir -p "$T/$c"
  args=(--chunk-hash blake3-tree)
  case $c in
    ob8) args+=(--outboards "$T/$c/outboards") ;;
    c1) args+=(--chunk-size 1048576) ;;
  esac
  { echo "schema_version = 1"; echo;
    "$WAN" manifest build "$DATA" --id bench@1.0.0 --source "http://127.0.0.1:$PORT" "${args[@]}"; } \
    > "$T/$c/models.toml"
done
du -sh "$T/ob8/outboards" | sed 's/^/outboards: /'

# mount CONFIG: a fresh daemon over an empty cache (sets WAN_PID).
mount_cold() {
  rm -rf "$T/cache"; drop_caches
  "$WAN" mount "$T/mnt" --manifest "$T/$1/models.toml" --cache-dir "$T/cache" \
    --config "$T/wan.toml" 2>>"$T/wan-$1.log" &
  WAN_PID=$!
  for _ in $(seq 1 200); do is_mounted "$T/mnt" && return 0; sleep 0.05; done
  echo "mount timeout" >&2; exit 1
}
umount_wan() { kill -TERM "$WAN_PID"; wait "$WAN_PID" || true; WAN_PID=; }

# offsets ROUND: READS random 4 KiB-aligned offsets past the first 16 MiB, each in another
# 8 MiB chunk (so every read is cold under every configuration).
offsets() {
  python3 - "$1" "$READS" "$(stat -c %s "$DATA/model.bin")" <<'PY'
import random, sys
rnd = random.Random(int(sys.argv[1]))
chunks = int(sys.argv[3]) >> 23
for c in rnd.sample(range(2, chunks), min(int(sys.argv[2]), chunks - 2)):
    print((c << 23) + (rnd.randrange(0, 2048) << 12))
PY
}

# randread FILE ROUND: median ms of the 4 KiB reads.
randread() {
  offsets "$2" | python3 -c '
import os, statistics, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
lat = []
for line in sys.stdin:
    off = int(line)
    t = time.perf_counter()
    if len(os.pread(fd, 4096, off)) != 4096:
        sys.exit("short read")
    lat.append((time.perf_counter() - t) * 1e3)
print("%.3f" % statistics.median(lat))' "$1"
}

# curlread ROUND: median ms of one 4 KiB ranged GET, all on one kept-alive connection.
curlread() {
  local args=(-s -o /dev/null -w '%{time_total}\n' -r 0-4095 "$URL")
  while read -r off; do
    args+=(--next -s -o /dev/null -w '%{time_total}\n' -r "$off-$((off + 4095))" "$URL")
  done < <(offsets "$1")
  drop_caches
  curl "${args[@]}" | tail -n +2 | awk '{print $1 * 1000}' | sort -g \
    | awk '{a[NR]=$1} END{printf "%.3f\n", (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'
}

declare -A RND SEQ
CURL=()
for r in $(seq 1 "$ROUNDS"); do
  n=${#CONFIGS[@]}
  for i in $(seq 0 $((n - 1))); do
    c=${CONFIGS[$(( (i + r) % n ))]}
    mount_cold "$c"
    ms=$(randread "$T/mnt/bench@1.0.0/model.bin" "$r")
    umount_wan
    mount_cold "$c"
    gbs=$(python3 "$BENCH/readfile.py" seq "$T/mnt/bench@1.0.0/model.bin" | awk '{print $2}')
    umount_wan
    RND[$c]="${RND[$c]:-} $ms"; SEQ[$c]="${SEQ[$c]:-} $gbs"
    echo "round $r $c: random 4 KiB median $ms ms, cold sequential $gbs GB/s"
  done
  ms=$(curlread "$r"); CURL+=("$ms")
  echo "round $r curl: 4 KiB ranged GET median $ms ms"
done
ref=$(median "${CURL[@]}")
echo
# The machine's limits: direct write and cold read of the cache's disk, one core's sha256.
dd if=/dev/zero of="$WORK/dd.test" bs=8M count=64 oflag=direct 2>"$T/dd-w.log"
drop_caches
echo "machine: $(nproc) CPUs; disk direct write $(awk '/copied/ {print $(NF-1), $NF}' "$T/dd-w.log"), \
cold read $(dd_gbps "$WORK/dd.test" 8M) GB/s; \
$(openssl speed -evp sha256 -bytes 8388608 -seconds 1 2>/dev/null | awk '/^sha256/ {printf "sha256 %.2f GB/s", $2 / 1e6}')"
rm -f "$WORK/dd.test"
echo "curl 4 KiB ranged GET (kept-alive): median $ref ms"
for c in "${CONFIGS[@]}"; do
  # shellcheck disable=SC2086
  m=$(median ${RND[$c]}); s=$(median ${SEQ[$c]})
  echo "$c: random 4 KiB median $m ms ($(awk -v a="$m" -v b="$ref" 'BEGIN{printf "%.2f", a/b}')x curl), cold sequential $s GB/s"
done
