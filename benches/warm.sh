#!/usr/bin/env bash
# benches/warm.sh - warm reads (issue 21, goal 3): a complete cached file read through the mount
# against the cached blob file read directly, with the page cache dropped before every read.
#
#     sudo benches/warm.sh                        # target/release/wan, 2 GiB file, ROUNDS=5
#     sudo WAN=/var/tmp/wan-before ROUNDS=7 benches/warm.sh
#
# Each round runs every case once, in an order rotated from round to round, `sync` and
# drop_caches before each (interleaved, so the disk's swings fall on every case alike):
#   blob     dd bs=1M of the blob file in the cache, directly: one sequential stream
#   blob4    four dd of the blob's quarters at once: what the disk gives to parallel readers
#            (mountpoint-s3's cache reads its blocks in parallel; this is its ceiling here)
#   fresh    dd bs=1M of the file through a new mount over the complete cache
#   after    dd of the file through the mount that has just read it cold, once the blob is
#            written and checked (the whole-file check reads the blob too; it is waited for,
#            then `sync`: writeback of the fill is kept out of the warm read), page cache dropped
#   mmap     the file read through the mount by mmap, page by page (a safetensors loader)
#   fresh-off, mmap-off   fresh and mmap with `mount.warm_readahead = false`: the kernel's own
#            read-ahead only (the A/B for src/warm.rs, same binary, same rounds)
# Prints GB/s per round and each case's median, and the ratios to `blob` and `blob4`.
# Machine limits: direct write, cold read (the `blob` case), sha256 per core.
# Environment: SIZE_MIB=2048 ROUNDS=5 WORK=/var/tmp/wanfs-warm WAN=target/release/wan
#              PORT=18493 BENCH_DIR=../shared/bench
#              CASES="blob blob4 fresh fresh-off after mmap mmap-off"
set -Eeuo pipefail
REPO=$(cd "$(dirname "$(realpath "$0")")/.." && pwd)
BENCH=$(realpath -m "${BENCH_DIR:-$REPO/../shared/bench}")
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-5}
PORT=${PORT:-18493}
WORK=${WORK:-/var/tmp/wanfs-warm}
WAN=${WAN:-$REPO/target/release/wan}
read -r -a CASES <<< "${CASES:-blob blob4 fresh fresh-off after mmap mmap-off}"
die() { echo "warm.sh: ERROR: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root (drop_caches, FUSE)"
[ -x "$WAN" ] || (cd "$REPO" && cargo build --release) || die "cargo build --release failed"
# shellcheck source=/dev/null
. "$BENCH/lib.sh"

mkdir -p "$WORK"
WORK=$(realpath "$WORK")
DATA=$WORK/data MNT=$WORK/mnt CFG=$WORK/wan.toml MAN=$WORK/manifest.toml
export ORIGIN_STATE=$WORK/origin-state
mkdir -p "$DATA" "$MNT" "$ORIGIN_STATE"
cp "$WAN" "$WORK/wan.bin"; WAN=$WORK/wan.bin
WPID=
cleanup() {
  set +e
  [ -n "$WPID" ] && kill "$WPID" 2>/dev/null && wait "$WPID" 2>/dev/null
  is_mounted "$MNT" && umount -l "$MNT"
  "$BENCH/origin.sh" stop "$PORT" >/dev/null 2>&1
}
trap cleanup EXIT

if [ "$(cat "$WORK/data.ok" 2>/dev/null)" != "$SIZE_MIB" ]; then
  log "writing $SIZE_MIB MiB to $DATA/model.bin"
  head -c "$((SIZE_MIB << 20))" /dev/urandom > "$DATA/model.bin"
  echo "$SIZE_MIB" > "$WORK/data.ok"
fi
SIZE=$(stat -c %s "$DATA/model.bin")
{ echo "schema_version = 1"; echo;
  "$WAN" manifest build "$DATA" --id warm@1.0.0 --source "http://127.0.0.1:$PORT"; } > "$MAN"
printf '[http]\naddr = ""\n' > "$CFG"
printf '[http]\naddr = ""\n[mount]\nwarm_readahead = false\n' > "$WORK/wan-off.toml"
"$BENCH/origin.sh" start "$PORT" "$DATA" 0 > "$WORK/origin.log" 2>&1 || die "origin: $(cat "$WORK/origin.log")"
FILE=$MNT/warm@1.0.0/model.bin

mount_wan() { # mount_wan CACHE [CONFIG]
  WAN_LOG=wanfs=debug,info "$WAN" mount "$MNT" --manifest "$MAN" --cache-dir "$1" --config "${2:-$CFG}" \
    > "$WORK/wan.log" 2>&1 &
  WPID=$!
  for _ in $(seq 1 200); do is_mounted "$MNT" && [ -e "$FILE" ] && return; sleep 0.05; done
  die "wan mount did not come up (log: $WORK/wan.log)"
}
umount_wan() { kill "$WPID"; wait "$WPID" 2>/dev/null || true; WPID=; }
# Waits until the daemon has checked the complete blob whole (its own read of the blob).
wait_checked() {
  for _ in $(seq 1 600); do grep -q "whole-file sha256 checked" "$WORK/wan.log" && return; sleep 0.1; done
  die "the blob was never checked whole (log: $WORK/wan.log)"
}
gbps() { awk -v s="$1" -v e="$2" -v n="$SIZE" 'BEGIN{printf "%.3f", n/(e-s)/1e9}'; }
now() { date +%s.%N; }
mmap_read() {
  python3 - "$1" <<'EOF'
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
n = len(m)
s = 0
for off in range(0, n, 4096):
    s += m[off]
print(s, file=sys.stderr)
EOF
}

log "filling the cache (cold read through a mount, then the whole-file check)"
rm -rf "$WORK/cache"; mount_wan "$WORK/cache"
dd if="$FILE" of=/dev/null bs=1M 2>/dev/null
wait_checked
umount_wan
BLOB=$(find "$WORK/cache" -type f -size "${SIZE}c" | head -1)
[ -n "$BLOB" ] || die "no blob of $SIZE bytes under $WORK/cache"

run_case() { # run_case CASE: prints GB/s
  local s e
  case $1 in
    blob) drop_caches; s=$(now); dd if="$BLOB" of=/dev/null bs=1M 2>/dev/null; e=$(now) ;;
    blob4)
      local q=$(( (SIZE + 4 * 1048576 - 1) / (4 * 1048576) ))
      drop_caches; s=$(now)
      for i in 0 1 2 3; do dd if="$BLOB" of=/dev/null bs=1M skip=$((i * q)) count="$q" 2>/dev/null & done
      wait; e=$(now) ;;
    fresh|fresh-off)
      mount_wan "$WORK/cache" "$( [ "$1" = fresh ] && echo "$CFG" || echo "$WORK/wan-off.toml")"; drop_caches
      s=$(now); dd if="$FILE" of=/dev/null bs=1M 2>/dev/null; e=$(now)
      umount_wan ;;
    after)
      # A copy of the cache without this blob, so this mount reads it cold first.
      rm -rf "$WORK/cache-after"; mount_wan "$WORK/cache-after"
      dd if="$FILE" of=/dev/null bs=1M 2>/dev/null
      wait_checked; drop_caches
      s=$(now); dd if="$FILE" of=/dev/null bs=1M 2>/dev/null; e=$(now)
      umount_wan; rm -rf "$WORK/cache-after" ;;
    mmap|mmap-off)
      mount_wan "$WORK/cache" "$( [ "$1" = mmap ] && echo "$CFG" || echo "$WORK/wan-off.toml")"; drop_caches
      s=$(now); mmap_read "$FILE" 2>/dev/null; e=$(now)
      umount_wan ;;
    *) die "unknown case $1" ;;
  esac
  gbps "$s" "$e"
}

declare -A R
n=${#CASES[@]}
for r in $(seq 1 "$ROUNDS"); do
  line="round $r:"
  for k in $(seq 0 $((n - 1))); do
    c=${CASES[$(( (k + r) % n ))]}
    v=$(run_case "$c")
    R[$c]="${R[$c]:-} $v"
    line="$line $c $v"
  done
  log "$line"
done

echo "machine: $(nproc) cores; direct write $(dd if=/dev/zero of="$WORK/ddtest" bs=8M count=64 oflag=direct 2>&1 | tail -1 | awk '{print $(NF-1), $NF}'); sha256 $(openssl speed -evp sha256 -bytes 8388608 -seconds 1 2>/dev/null | awk '/^sha256/{print $NF}'); cold read: the blob case"
rm -f "$WORK/ddtest"
echo "file: $SIZE bytes; rounds: $ROUNDS (order rotated per round; page cache dropped before each read)"
# shellcheck disable=SC2086
b=$(median ${R[blob]:-0}); b4=$(median ${R[blob4]:-0})
echo "| case | median GB/s | vs blob | vs blob4 | per round |"
echo "|---|---|---|---|---|"
for c in "${CASES[@]}"; do
  # shellcheck disable=SC2086
  m=$(median ${R[$c]})
  awk -v c="$c" -v m="$m" -v b="$b" -v b4="$b4" -v p="${R[$c]}" \
    'BEGIN{printf "| %s | %.3f | %s | %s |%s |\n", c, m, (b>0? sprintf("%.2fx", m/b) : "-"), (b4>0? sprintf("%.2fx", m/b4) : "-"), p}'
done
