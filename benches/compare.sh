#!/usr/bin/env bash
# benches/compare.sh - wanfs against what users would otherwise use, on one deterministic file.
#
# Run by hand, as root, on a quiet machine (not in CI):
#     sudo benches/compare.sh                      # 2 GiB file, RUNS=3
#     sudo SIZE=256M RUNS=1 benches/compare.sh     # quick check of the script itself
#
# What it measures (all in one run, A/B interleaved; the order of A and B alternates each round;
# every figure is the median of RUNS rounds; GB/s = 10^9 bytes/s):
#   (a) cold sequential read through wanfs (fresh cache, page cache dropped), unlimited origin,
#       vs rclone mount cold (peers.sh; the faster of --vfs-cache-mode full/off)    target >= 2x
#   (a2) the same cold read vs the faster of curl -o and aria2c -x8 -s8 downloading the file
#       from the same origin to the same disk (peers.sh)                             target >= 1.0x
#   (b) the same with the origin limited to RATE (50 MiB/s) per connection,
#       vs aria2c -x8 -s8 (peers.sh) to local disk                                  target >= 1.0x
#   (c) warm read (every chunk cached, page cache dropped, fresh mount)
#       vs rclone mount warm (peers.sh, faster of full/off)                           target >= 3x
#       vs reading the cache's blob file directly (page cache dropped)                target >= 0.8x
#   (d) hot re-read through wanfs (page cache kept) vs re-reading a local file
#       (the blob file) from the page cache                                           target >= 0.8x
#   (e) time to the first MiB through a fresh mount, empty cache, RATE-limited origin,
#       vs one 1 MiB curl range request to the same origin (page cache dropped before both)
#                                                                                     target <= 2x
#   (f) daemon peak RSS (VmHWM) over the cold reads of (a) and (b), worst run          target <= 200 MiB
#   (g) daemon CPU per GB of the cold read of (a): utime+stime from /proc/PID/stat, from the
#       start of the read until the cache is COMPLETE (commits included), over GB read,
#       vs the hashing floor: one core's sha256 (openssl speed -evp sha256, 8 MiB blocks),
#       which every byte must pass through once                                   target <= 1.3x
#       (g2), for information: the same CPU against the floor of the chunk hash in use (BLAKE3
#       by default; one core, examples/hashspeed.rs)
# The machine's limits are measured once per run and printed with the table: direct write to
# WORK's disk (dd oflag=direct), cold read of the test file (dd, page cache dropped) and one
# core's sha256 (openssl).
# Reads use ../shared/bench/readfile.py (read() of 1 MiB), the origin is ../shared/bench/origin.sh
# (nginx; RATE through its per-connection rate-limiting proxy), peers come from
# ../shared/bench/peers.sh. Those scripts are called from where they live, never copied.
#
# Environment (all optional):
#   SIZE=2G          test file size (bytes, or with K/M/G suffix); 2G is the published 2 GiB file
#   RUNS=3           rounds; medians are reported
#   RATE=50m         per-connection limit of the limited origin (origin.sh syntax)
#   PORT=18480 LPORT=18481   origin ports (unlimited, limited), 127.0.0.1 only
#   WORK=/var/tmp/wanfs-bench   scratch dir (test file kept there for the next run; caches removed)
#   WAN=target/release/wan      the binary (the repo's is built with `cargo build --release` if
#                               missing or stale; another path is used as is)
#   WAN_LABEL=TEXT   how to name that binary in the results (default: the repo's git revision)
#   WAN_CONFIG=FILE  a wan config to use instead of the defaults written below (for tuning)
#   BENCH_DIR=../shared/bench   where origin.sh, peers.sh, lib.sh and readfile.py live
#   KEEP=1           keep caches of the last round under WORK (logs are always kept)
#   HEAD_SIZE=N      `wan manifest build --head-size N` (0: uniform 8 MiB chunks, as before
#                    head_size existed); default: what build picks (a 1 MiB first chunk)
#   PROFILE=1        after the rounds, profile one extra cold read of the daemon with perf
#   ORIGIN_MEM=0     1: the origins serve a copy of the test file kept in a tmpfs (/dev/shm),
#                    as a remote origin serves from its own page cache (peers.sh means to keep
#                    the origin warm, but on one machine its drop_caches empties the origin's
#                    cache too). With 0 (the default, as every earlier table), the origins read
#                    the file from WORK's disk, the disk the cache writes to: a cold read then
#                    also waits for the origin's disk reads. See docs/BENCHMARKS.md for what
#                    each setting does to which target.
#   SETTLE=3         seconds to wait after drop_caches before (c) and (d) (see settle())
# Results: the table on stdout, also saved with per-run values and diagnostics under WORK/.
set -Eeuo pipefail

REPO=$(cd "$(dirname "$(realpath "$0")")/.." && pwd)
BENCH=$(realpath -m "${BENCH_DIR:-$REPO/../shared/bench}")
SIZE_ARG=${SIZE:-2G}
RUNS=${RUNS:-3}
RATE=${RATE:-50m}
PORT=${PORT:-18480}
LPORT=${LPORT:-18481}
WORK=${WORK:-/var/tmp/wanfs-bench}
WAN=${WAN:-$REPO/target/release/wan}
KEEP=${KEEP:-0}
MODEL=bench@1.0.0
CHUNK=8388608

die() { echo "compare.sh: ERROR: $*" >&2; exit 1; }
warn() { echo "compare.sh: warning: $*" >&2; }
log() { echo "[$(date +%T)] $*" >&2; }

# ---------------------------------------------------------------- preflight
[ "$(id -u)" = 0 ] || die "run as root (drop_caches, FUSE passthrough, nginx)"
missing=()
for pair in nginx:nginx-light aria2c:aria2 rclone:rclone fusermount3:fuse3 python3:python3 \
            openssl:openssl curl:curl ss:iproute2 top:procps numfmt:coreutils; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair#*:}")
done
[ ${#missing[@]} = 0 ] || die "missing tools; install them with: apt-get install -y ${missing[*]}
  (all of: apt-get install -y nginx-light aria2 rclone fuse3 python3)"
[ -e /dev/fuse ] || die "/dev/fuse does not exist (modprobe fuse?)"
for f in origin.sh peers.sh lib.sh readfile.py ratelimit-proxy.py; do
  [ -r "$BENCH/$f" ] || die "$BENCH/$f not found: set BENCH_DIR to the shared bench directory"
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$RUNS'"
s=${SIZE_ARG%iB}; s=${s%B}
SIZE=$(numfmt --from=iec "$s" 2>/dev/null) || die "cannot parse SIZE='$SIZE_ARG' (try 2G, 256M or bytes)"
[ "$SIZE" -ge $((16 << 20)) ] || die "SIZE must be at least 16 MiB"
for p in "$PORT" "$LPORT"; do
  [ -z "$(ss -ltnH "sport = :$p")" ] || die "port $p is in use (set PORT/LPORT)"
done

# shellcheck source=/dev/null
. "$BENCH/lib.sh"   # drop_caches, median, is_mounted
READ="python3 $BENCH/readfile.py"
CLK_TCK=$(getconf CLK_TCK)

# Build the repo's binary only if it is missing or older than the sources; a WAN given in the
# environment is used as is (label it with WAN_LABEL).
if [ "$WAN" = "$REPO/target/release/wan" ]; then
  if [ ! -x "$WAN" ] || [ -n "$(find "$REPO/src" "$REPO/Cargo.toml" "$REPO/Cargo.lock" -newer "$WAN" -print -quit 2>/dev/null)" ]; then
    log "building wan (cargo build --release)"
    (cd "$REPO" && cargo build --release) || die "cargo build --release failed"
  fi
else
  [ -x "$WAN" ] || die "WAN=$WAN is not an executable"
fi

mkdir -p "$WORK"
WORK=$(realpath "$WORK")
# Snapshot the binary: a concurrent `cargo build` must not swap it in the middle of the run.
if [ -n "${WAN_LABEL:-}" ]; then
  WAN_REV=$WAN_LABEL
else
  WAN_REV="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  [ -z "$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ] \
    || WAN_REV="$WAN_REV+uncommitted($(git -C "$REPO" status --porcelain -- src | awk '{print $2}' | xargs | tr ' ' ','))"
fi
cp "$WAN" "$WORK/wan.bin"
WAN=$WORK/wan.bin
STAMP=$(date +%Y%m%d-%H%M%S)
LOGS=$WORK/logs-$STAMP
DATA=$WORK/data
MNT=$WORK/mnt
CFG=$WORK/wan.toml
export ORIGIN_STATE=$WORK/origin-state
mkdir -p "$LOGS" "$DATA" "$MNT" "$ORIGIN_STATE"
RESULTS=$WORK/results-$STAMP.md

# ---------------------------------------------------------------- cleanup
WAN_PID=
SAMPLER_PID=
PERF_PID=
ORIGINS=()
cleanup() {
  local rc=$?
  set +e
  trap - ERR
  [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null
  [ -n "$PERF_PID" ] && kill -INT "$PERF_PID" 2>/dev/null && wait "$PERF_PID" 2>/dev/null
  wan_umount
  for p in "${ORIGINS[@]}"; do "$BENCH/origin.sh" stop "$p" >/dev/null 2>&1; done
  rmdir "$MNT" 2>/dev/null
  if [ "$KEEP" != 1 ]; then rm -rf "$WORK"/cache-* "$WORK/peers" /dev/shm/wanfs-bench-origin; fi
  [ $rc = 0 ] || echo "compare.sh: failed (exit $rc); logs in $LOGS" >&2
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'echo "compare.sh: ERROR: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR

# ---------------------------------------------------------------- wan mount helpers
WFILE=$MNT/$MODEL/model.bin
WLOG=
wan_mount() { # wan_mount MANIFEST CACHE_DIR LOG
  local man=$1 cache=$2 wlog=$3
  WLOG=$wlog
  mkdir -p "$MNT" "$cache"
  is_mounted "$MNT" && die "$MNT is still mounted"
  : > "$wlog"
  NO_COLOR=1 "$WAN" mount "$MNT" --manifest "$man" --cache-dir "$cache" --config "$CFG" 2>"$wlog" &
  WAN_PID=$!
  local _
  for _ in $(seq 1 300); do
    if grep -qs "mounted" "$wlog" && is_mounted "$MNT"; then return 0; fi
    if ! kill -0 "$WAN_PID" 2>/dev/null; then
      WAN_PID=; cat "$wlog" >&2; die "wan mount exited early (log: $wlog)"
    fi
    sleep 0.05
  done
  die "wan mount did not come up within 15 s (log: $wlog)"
}
wan_umount() {
  if [ -n "$WAN_PID" ]; then
    kill -TERM "$WAN_PID" 2>/dev/null || true
    local _
    for _ in $(seq 1 300); do kill -0 "$WAN_PID" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "$WAN_PID" 2>/dev/null; then
      warn "wan (pid $WAN_PID) ignored SIGTERM for 15 s; sending SIGKILL"
      kill -KILL "$WAN_PID" 2>/dev/null || true
    fi
    wait "$WAN_PID" 2>/dev/null || true
    WAN_PID=
  fi
  if is_mounted "$MNT"; then
    warn "$MNT still mounted after the daemon stopped; unmounting"
    fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" || true
  fi
}

# ---------------------------------------------------------------- small helpers
isnum() { [[ ${1:-} =~ ^[0-9]+([.][0-9]+)?([eE][-+]?[0-9]+)?$ ]]; }
need() { isnum "${1:-}" || die "$2: got '${1:-}' (see logs in $LOGS)"; }
field() { awk -v k="$1" '$1==k{print $2}' "$2"; }    # field NAME FILE: value of 'NAME value'
readval() { $READ "$@" | awk '{print $2}'; }           # readfile.py MODE ... -> the number
wan_failed() { # the read through the mount failed: say why, with the daemon's own words
  echo "compare.sh: ERROR: $1 through wanfs failed" >&2
  if [ -n "$WAN_PID" ] && ! kill -0 "$WAN_PID" 2>/dev/null; then echo "  the wan daemon (pid $WAN_PID) has exited" >&2; fi
  grep -m4 "panicked\| ERROR \|error" "$WLOG" >&2 || true
  die "daemon log: $WLOG"
}
wread() { # wread WHAT MODE FILE [ARG]: readfile.py through the mount, value only
  local what=$1 v; shift
  v=$($READ "$@" 2>>"$LOGS/readfile.err" | awk '{print $2}') || wan_failed "$what"
  isnum "$v" || wan_failed "$what"
  echo "$v"
}
ticks() { local s=0 p; for p in "$@"; do [ -r "/proc/$p/stat" ] && s=$((s + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo "$s"; }
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }  # "busy total" jiffies
origin_pids() { # origin_pids PORT: nginx master+workers and the rate-limit proxy, if any
  local st=$ORIGIN_STATE/origin-$1 m
  m=$(cat "$st/nginx.pid" 2>/dev/null) || return 0
  echo "$m" $(ps -o pid= --ppid "$m" || true) $( [ -s "$st/proxy.pid" ] && cat "$st/proxy.pid" || true)
}
hwm_mib() { awk '/^VmHWM:/{printf "%.1f\n", $2/1024}' "/proc/$1/status"; }
wan_state() { python3 -c 'import os,sys; print(os.getxattr(sys.argv[1], "user.wan.state").decode())' "$WFILE"; }
now() { date +%s.%N; }
# settle: drop the page cache, then wait SETTLE seconds, before each side of (c) and (d): two
# reads of 2 GiB through the page cache. On a VM that reports freed memory to its host
# (virtio-balloon free page reporting, as on the machine of docs/BENCHMARKS.md), a read right
# after drop_caches reuses pages not yet handed back and runs up to twice as fast as the same
# read a few seconds later, so whichever side of the pair came second won. After the wait both
# sides start from the same state. (e) does not wait: its two sides do not take turns with the
# same memory, and after the wait a fresh daemon's own first pages would fault on the host
# inside its timed read, where curl's timer starts after curl has started. 0 turns it off.
settle() { drop_caches; sleep "${SETTLE:-3}"; }

# ---------------------------------------------------------------- test data, manifests, config
FILE=$DATA/model.bin
OK=$WORK/data.ok
if [ ! -f "$FILE" ] || [ "$(stat -c %s "$FILE")" != "$SIZE" ] || [ "$(cat "$OK" 2>/dev/null)" != "$SIZE" ]; then
  log "generating the test file ($SIZE bytes) in $FILE"
  rm -f "$OK" "$FILE"
  { openssl enc -aes-128-ctr -pass pass:lazyfs-bench -nosalt -pbkdf2 < /dev/zero 2>/dev/null || true; } \
    | head -c "$SIZE" > "$FILE"
  [ "$(stat -c %s "$FILE")" = "$SIZE" ] || die "test file generation failed"
  if [ "$SIZE" = 2147483648 ]; then
    sum=$(sha256sum "$FILE" | cut -d' ' -f1)
    [[ $sum == 4fd4035f*54af9 ]] || die "test file sha256 $sum does not match the published 4fd4035f...54af9"
  fi
  echo "$SIZE" > "$OK"
fi
ls -A "$DATA" | grep -qvx model.bin && die "$DATA must contain only model.bin"

# What the origins serve (ORIGIN_MEM): a tmpfs copy of the file, or the file on WORK's disk.
ORIGIN_DIR=$DATA
if [ "${ORIGIN_MEM:-0}" = 1 ]; then
  SHM=/dev/shm/wanfs-bench-origin
  if [ "$(df -k --output=avail /dev/shm 2>/dev/null | tail -1)" -gt $(( SIZE / 1024 + 1048576 )) ] 2>/dev/null; then
    mkdir -p "$SHM"
    [ "$(stat -c %s "$SHM/model.bin" 2>/dev/null)" = "$SIZE" ] && cmp -s "$SHM/model.bin" "$FILE" \
      || cp "$FILE" "$SHM/model.bin"
    ORIGIN_DIR=$SHM
  else
    warn "not enough room in /dev/shm for the test file: the origins read it from $DATA (ORIGIN_MEM=0)"
  fi
fi

log "building manifests"
MAN_U=$WORK/manifest-unlimited.toml
MAN_L=$WORK/manifest-limited.toml
{ echo "schema_version = 1"; echo;
  "$WAN" manifest build "$DATA" --id "$MODEL" --chunk-size "$CHUNK" ${HEAD_SIZE:+--head-size "$HEAD_SIZE"} \
    --source "http://127.0.0.1:$PORT"; } > "$MAN_U"
sed "s#\"http://127.0.0.1:$PORT\"#\"http://127.0.0.1:$LPORT\"#" "$MAN_U" > "$MAN_L"
grep -q "127.0.0.1:$LPORT" "$MAN_L" || die "could not derive the limited manifest from $MAN_U"
"$WAN" manifest check "$MAN_U" >/dev/null && "$WAN" manifest check "$MAN_L" >/dev/null \
  || die "wan manifest check failed"
SHA=$(awk -F'"' '/^sha256 = /{print $2; exit}' "$MAN_U")
[ ${#SHA} = 64 ] || die "no sha256 in $MAN_U"

if [ -n "${WAN_CONFIG:-}" ]; then
  cp "$WAN_CONFIG" "$CFG"
else
  cat > "$CFG" <<'EOF'
# the daemon's defaults, spelled out
[fetch]
connections = 16
max_inflight_mib = 64
read_timeout_secs = 30.0
request_timeout_secs = 10.0
retries = 3
readahead_chunks = 4
part_size_kib = 1024

[mount]
passthrough = true
read_ahead_kb = 4096
threads = 2

[http]
addr = ""
EOF
fi

# ---------------------------------------------------------------- origins
log "starting origins: unlimited on :$PORT, $RATE per connection on :$LPORT"
ORIGINS+=("$PORT"); "$BENCH/origin.sh" start "$PORT" "$ORIGIN_DIR" >"$LOGS/origin-$PORT.log" 2>&1 \
  || die "origin.sh start $PORT failed: $(cat "$LOGS/origin-$PORT.log")"
ORIGINS+=("$LPORT"); "$BENCH/origin.sh" start "$LPORT" "$ORIGIN_DIR" "$RATE" >"$LOGS/origin-$LPORT.log" 2>&1 \
  || die "origin.sh start $LPORT failed: $(cat "$LOGS/origin-$LPORT.log")"
URL_U=http://127.0.0.1:$PORT/
URL_L=http://127.0.0.1:$LPORT/
for u in "$URL_U" "$URL_L"; do
  curl -sfI -r 0-0 "${u}model.bin" | grep -q "^HTTP/1.1 206" || die "origin ${u} does not answer 206 to a Range request"
done

# ---------------------------------------------------------------- measurements
declare -a W_COLD_U W_COLD_L W_WARM W_HOT W_TTFB HWM \
           RCF_COLD RCF_WARM RCO_COLD RCO_WARM ARIA BLOB_COLD BLOB_HOT CURL_TTFB \
           CPU_U CPU_L ORG_U ORG_L BUSY_U BUSY_L CONN_U CONN_L LAG CPG_U CPG_L CURL_DL ARIA_U SRC
i=0

# wan_cold TAG MANIFEST PORT: cold sequential read of the whole file through a fresh mount.
# Leaves $WORK/cache-TAG complete. Sets C_GBPS C_HWM C_LAG (s from the end of the read until the
# cache holds every chunk) C_CPU (daemon CPU %, 100 = one core), C_CPG (daemon core-seconds
# per GB, from the start of the read until the cache is COMPLETE, so commits count too),
# C_ORG (origin CPU %), C_BUSY (machine busy %), C_CONN (origin connections seen mid-read).
wan_cold() {
  local tag=$1 man=$2 port=$3 cache=$WORK/cache-$1 r=$i
  rm -rf "$cache"
  drop_caches
  wan_mount "$man" "$cache" "$LOGS/wan-cold-$tag-$r.log"
  local org; org=$(origin_pids "$port")
  # mid-read snapshot: per-thread CPU of the daemon, TCP connections to the origin
  ( sleep 0.7
    { echo "== top -H (round $r, $tag)"; top -b -n1 -H -w 200 -p "$WAN_PID" | sed -n '7,40p' || true
      echo "== connections to :$port"; ss -tniH state established "( dport = :$port )" || true; } \
      > "$LOGS/snapshot-$tag-$r.txt" 2>&1
    { ss -tnH state established "( dport = :$port )" || true; } | wc -l > "$LOGS/conns-$tag-$r.txt" ) &
  SAMPLER_PID=$!
  local t0 t1 w0 w1 o0 o1 b0 b1
  local tot0 tot1
  read -r b0 tot0 <<<"$(busy)"
  w0=$(ticks "$WAN_PID"); o0=$(ticks $org); t0=$(now)
  C_GBPS=$(wread "cold read ($tag)" seq "$WFILE")
  t1=$(now); w1=$(ticks "$WAN_PID"); o1=$(ticks $org)
  read -r b1 tot1 <<<"$(busy)"
  need "$C_GBPS" "cold read ($tag) through wanfs"
  # Readers are answered once a chunk is verified; its commit to the cache may lag behind.
  local _ lag0; lag0=$(now)
  for _ in $(seq 1 600); do [ "$(wan_state)" = COMPLETE ] && break; sleep 0.05; done
  [ "$(wan_state)" = COMPLETE ] || die "cache still not COMPLETE 30 s after a full read ($tag); log: $WLOG"
  C_LAG=$(awk -v a="$lag0" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}')
  C_CPG=$(awk -v d=$(($(ticks "$WAN_PID") - w0)) -v hz="$CLK_TCK" -v n="$SIZE" 'BEGIN{printf "%.2f", d/hz/(n/1e9)}')
  C_HWM=$(hwm_mib "$WAN_PID")
  # What the daemon asked its sources for, against what was read (the whole file).
  C_SRC=$(awk '/^wan_source_bytes_total/{s+=$2} END{printf "%.0f", s}' "$MNT/.wan/metrics")
  wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=
  C_CONN=$(cat "$LOGS/conns-$tag-$r.txt" 2>/dev/null || echo 0)
  C_CPU=$(awk -v d=$((w1 - w0)) -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" 'BEGIN{printf "%.0f", 100*d/hz/(t1-t0)}')
  C_ORG=$(awk -v d=$((o1 - o0)) -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" 'BEGIN{printf "%.0f", 100*d/hz/(t1-t0)}')
  C_BUSY=$(awk -v b=$((b1 - b0)) -v t=$((tot1 - tot0)) 'BEGIN{printf "%.0f", (t>0) ? 100*b/t : 0}')
  if [ "$r" = 1 ]; then
    [ "$($READ verify "$WFILE" "$FILE" | awk '{print $2}')" = ok ] || die "content through wanfs differs from the origin file"
  fi
  wan_umount
  log "  wanfs cold $tag: $C_GBPS GB/s, VmHWM $C_HWM MiB, daemon CPU ${C_CPU}% (${C_CPG} core-s/GB), origin CPU ${C_ORG}%, machine busy ${C_BUSY}%, conns $C_CONN, cache complete ${C_LAG}s after the read"
}

a_wan() {
  wan_cold u "$MAN_U" "$PORT"
  W_COLD_U+=("$C_GBPS"); HWM+=("$C_HWM"); SRC+=("$C_SRC"); LAG+=("$C_LAG"); CPU_U+=("$C_CPU"); CPG_U+=("$C_CPG"); ORG_U+=("$C_ORG"); BUSY_U+=("$C_BUSY"); CONN_U+=("$C_CONN")
}
a_peer() {
  local out=$LOGS/peers-rclone-$i.txt
  PEERS="rclone_full rclone_off curl aria2" "$BENCH/peers.sh" "$URL_U" model.bin 1 "$WORK/peers" >"$out" 2>>"$LOGS/peers.err" || true
  local v
  v=$(field curl_disk "$out");   need "$v" "curl -o (peers.sh)";   CURL_DL+=("$v")
  v=$(field aria2c_x8s8 "$out"); need "$v" "aria2c unlimited (peers.sh)"; ARIA_U+=("$v")
  v=$(field rclone_full_cold "$out"); need "$v" "rclone full cold (peers.sh)"; RCF_COLD+=("$v")
  v=$(field rclone_full_warm "$out"); need "$v" "rclone full warm (peers.sh)"; RCF_WARM+=("$v")
  v=$(field rclone_off_cold "$out");  need "$v" "rclone off cold (peers.sh)";  RCO_COLD+=("$v")
  v=$(field rclone_off_warm "$out");  need "$v" "rclone off warm (peers.sh)";  RCO_WARM+=("$v")
  log "  rclone: full cold ${RCF_COLD[-1]} warm ${RCF_WARM[-1]}, off cold ${RCO_COLD[-1]} warm ${RCO_WARM[-1]} GB/s; curl -o ${CURL_DL[-1]}, aria2c ${ARIA_U[-1]} GB/s"
}
b_wan() {
  wan_cold l "$MAN_L" "$LPORT"
  W_COLD_L+=("$C_GBPS"); HWM+=("$C_HWM"); SRC+=("$C_SRC"); LAG+=("$C_LAG"); CPU_L+=("$C_CPU"); CPG_L+=("$C_CPG"); ORG_L+=("$C_ORG"); BUSY_L+=("$C_BUSY"); CONN_L+=("$C_CONN")
}
b_peer() {
  local out=$LOGS/peers-aria2-$i.txt v
  PEERS=aria2 "$BENCH/peers.sh" "$URL_L" model.bin 1 "$WORK/peers" >"$out" 2>>"$LOGS/peers.err" || true
  v=$(field aria2c_x8s8 "$out"); need "$v" "aria2c -x8 -s8 (peers.sh)"; ARIA+=("$v")
  log "  aria2c -x8 -s8 at $RATE/conn: $v GB/s"
}
# (c)+(d): fresh mount over the complete cache left by (a): warm read, then hot re-read
cd_wan() {
  local cache=$WORK/cache-u
  [ -f "$cache/v1/blobs/${SHA:0:2}/$SHA" ] || die "no complete blob in $cache for the warm read"
  settle
  wan_mount "$MAN_U" "$cache" "$LOGS/wan-warm-$i.log"
  [ "$(wan_state)" = COMPLETE ] || die "cache not COMPLETE at the warm mount"
  local w h
  w=$(wread "warm read" seq "$WFILE")
  h=$(wread "hot re-read" seq "$WFILE")
  wan_umount
  W_WARM+=("$w"); W_HOT+=("$h")
  log "  wanfs warm $w GB/s, hot $h GB/s"
}
cd_local() {
  local blob=$WORK/cache-u/v1/blobs/${SHA:0:2}/$SHA c h
  [ -f "$blob" ] || die "blob $blob not found"
  settle
  c=$(readval seq "$blob"); need "$c" "direct read of the blob file"
  h=$(readval seq "$blob"); need "$h" "page-cache read of the blob file"
  BLOB_COLD+=("$c"); BLOB_HOT+=("$h")
  log "  blob file direct: cold $c GB/s, page cache $h GB/s"
}
e_wan() {
  local cache=$WORK/cache-t t
  rm -rf "$cache"
  drop_caches
  wan_mount "$MAN_L" "$cache" "$LOGS/wan-ttfb-$i.log"
  t=$(wread "time to first MiB" ttfb "$WFILE" 1048576)
  wan_umount
  W_TTFB+=("$t")
  log "  wanfs first MiB (cold, $RATE/conn): $t s"
}
e_curl() {
  local t
  drop_caches
  t=$(curl -sf -o /dev/null -r 0-1048575 -w '%{time_total}' "${URL_L}model.bin") || die "curl range request failed"
  need "$t" "curl 1 MiB range"
  CURL_TTFB+=("$t")
  log "  curl one 1 MiB range ($RATE/conn): $t s"
}
pair() { if (( i % 2 )); then "$1"; "$2"; else "$2"; "$1"; fi; }   # alternate A/B order

# ---------------------------------------------------------------- the machine's limits
# What no filesystem on this box can beat, measured in the same run: the cache disk's direct
# write (what a commit does), its cold read, and one core's sha256 (every fetched byte is hashed
# once, so core-s/GB of hashing is the floor for the daemon's CPU per GB).
limits() {
  local n=$(( SIZE / CHUNK < 128 ? SIZE / CHUNK : 128 )) out
  out=$(LC_ALL=C dd if=/dev/zero of="$WORK/dd-direct.tmp" bs=$CHUNK count=$n oflag=direct conv=fdatasync 2>&1 | tail -1)
  rm -f "$WORK/dd-direct.tmp"
  L_WRITE=$(awk -v l="$out" 'BEGIN{split(l,a," "); for(i=1;i<=length(a);i++) if(a[i] ~ /^s,?$/) s=a[i-1]; printf "%.3f\n", a[1]/s/1e9}')
  need "$L_WRITE" "dd oflag=direct write to $WORK"
  drop_caches
  L_READ=$(dd_gbps "$FILE" 8M); need "$L_READ" "dd cold read of $FILE"
  # openssl's figure is in 1000s of bytes per second of user CPU time: one core's rate.
  L_SHA=$(openssl speed -seconds 3 -bytes $CHUNK -evp sha256 2>/dev/null | awk '/^sha256 /{sub(/k$/, "", $2); printf "%.3f\n", $2*1000/1e9}')
  need "$L_SHA" "openssl speed -evp sha256"
  L_FLOOR=$(awk -v g="$L_SHA" 'BEGIN{printf "%.2f", 1/g}')
  # The chunk hash in use (BLAKE3 unless HEAD_SIZE/BUILD_ARGS say otherwise), with the crate
  # the daemon uses: examples/hashspeed.rs.
  local hs=$REPO/target/release/examples/hashspeed
  [ -x "$hs" ] || (cd "$REPO" && cargo build --release --example hashspeed >/dev/null 2>&1) || true
  L_B3=$([ -x "$hs" ] && "$hs" | awk '$1=="blake3"{print $2}' || echo "")
  L_B3FLOOR=$([ -n "$L_B3" ] && awk -v g="$L_B3" 'BEGIN{printf "%.2f", 1/g}' || echo "")
  log "machine limits: direct write $L_WRITE GB/s, cold read $L_READ GB/s, sha256 $L_SHA GB/s per core ($L_FLOOR core-s/GB), blake3 ${L_B3:-?} GB/s per core"
}
limits

{ echo "== $(date -Is) start"; uptime; top -b -n1 -w 200 | sed -n '7,20p'; } > "$LOGS/machine-start.txt"
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
T_START=$(date +%s)
log "size $SIZE bytes, $RUNS rounds; logs in $LOGS"
for i in $(seq 1 "$RUNS"); do
  log "round $i/$RUNS (load $(cut -d' ' -f1-3 /proc/loadavg))"
  pair a_wan a_peer
  pair cd_wan cd_local
  pair b_wan b_peer
  pair e_wan e_curl
done
# PROFILE=1: one more cold read (unlimited origin), not counted, under `perf record -g`
PROFILE_TXT=
if [ "${PROFILE:-0}" = 1 ]; then
  if command -v perf >/dev/null; then
    log "profiling one extra cold read with perf"
    rm -rf "$WORK/cache-p"; drop_caches
    wan_mount "$MAN_U" "$WORK/cache-p" "$LOGS/wan-profile.log"
    perf record -F 499 -g -p "$WAN_PID" -o "$LOGS/perf.data" >/dev/null 2>"$LOGS/perf.err" &
    PERF_PID=$!; sleep 0.5
    p=$(wread "profiled cold read" seq "$WFILE")
    kill -INT "$PERF_PID"; wait "$PERF_PID" || true; PERF_PID=
    wan_umount
    PROFILE_TXT=$LOGS/perf-report.txt
    perf report -i "$LOGS/perf.data" --no-children --sort comm,dso,sym --stdio 2>/dev/null \
      | grep -E '^ +[0-9.]+%' | head -25 > "$PROFILE_TXT" || true
    log "  profiled cold read: $p GB/s (under perf); top symbols in $PROFILE_TXT"
  else
    warn "PROFILE=1 but perf is not installed; skipped"
  fi
fi
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
T_END=$(date +%s)
{ echo "== $(date -Is) end"; uptime; top -b -n1 -w 200 | sed -n '7,20p'; } > "$LOGS/machine-end.txt"

# ---------------------------------------------------------------- table
m() { median "$@"; }
mx() { printf '%s\n' "$@" | sort -g | tail -1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
verdict() { awk -v r="$1" -v op="$2" -v t="$3" 'BEGIN{ok = (op==">=") ? r>=t : r<=t; print ok ? "PASS" : "FAIL"}'; }

wcu=$(m "${W_COLD_U[@]}"); wcl=$(m "${W_COLD_L[@]}")
rfc=$(m "${RCF_COLD[@]}"); roc=$(m "${RCO_COLD[@]}"); rfw=$(m "${RCF_WARM[@]}"); row=$(m "${RCO_WARM[@]}")
if awk -v a="$rfc" -v b="$roc" 'BEGIN{exit !(a>=b)}'; then rc=$rfc; rcn="rclone mount cold (full)"; else rc=$roc; rcn="rclone mount cold (off)"; fi
if awk -v a="$rfw" -v b="$row" 'BEGIN{exit !(a>=b)}'; then rw=$rfw; rwn="rclone mount warm (full)"; else rw=$row; rwn="rclone mount warm (off)"; fi
ar=$(m "${ARIA[@]}"); ww=$(m "${W_WARM[@]}"); wh=$(m "${W_HOT[@]}")
bc=$(m "${BLOB_COLD[@]}"); bh=$(m "${BLOB_HOT[@]}")
wt=$(m "${W_TTFB[@]}"); ct=$(m "${CURL_TTFB[@]}"); hw=$(mx "${HWM[@]}")
src=$(for b in "${SRC[@]}"; do awk -v b="$b" -v n="$SIZE" 'BEGIN{printf "%.3f\n", b/n}'; done | sort -g | tail -1)
cpg=$(m "${CPG_U[@]}")
cdl=$(m "${CURL_DL[@]}"); aru=$(m "${ARIA_U[@]}")
if awk -v a="$cdl" -v b="$aru" 'BEGIN{exit !(a>=b)}'; then dl=$cdl; dln="curl -o"; else dl=$aru; dln="aria2c -x8 -s8"; fi
ms() { awk -v s="$1" 'BEGIN{printf "%.1f ms", s*1000}'; }

row() { # row MEASURE WAN BASELINE RATIO OP TARGET UNIT
  printf '| %s | %s | %s | %s× | %s %s× | %s |\n' "$1" "$2" "$3" "$4" "$5" "$6" "$(verdict "$4" "$5" "$6")"
}
{
  echo "wanfs compare.sh — $(date -Is) — $(hostname) — $(nproc) CPUs, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, kernel $(uname -r)"
  echo "file $SIZE bytes, RUNS=$RUNS (medians), rate-limited origin $RATE per connection, wan $WAN_REV"
  echo "origins serve the file from $ORIGIN_DIR ($(df --output=fstype "$ORIGIN_DIR" | tail -1))"
  echo "wan config ${WAN_CONFIG:-(defaults)}: $(grep -v '^ *#' "$CFG" | grep . | xargs)"
  echo "load average at start $LOAD0, at end $LOAD1; wall time $((T_END - T_START)) s"
  echo "machine limits: dd oflag=direct write $L_WRITE GB/s; cold read of the test file (dd) $L_READ GB/s;" \
       "openssl sha256 $L_SHA GB/s per core = $L_FLOOR core-s/GB; blake3 (examples/hashspeed) ${L_B3:-?} GB/s per core = ${L_B3FLOOR:-?} core-s/GB"
  echo
  echo "| measure | wanfs | baseline | ratio | target | result |"
  echo "| --- | --- | --- | --- | --- | --- |"
  row "(a) cold read, unlimited origin (GB/s) vs $rcn" "$wcu" "$rc" "$(ratio "$wcu" "$rc")" ">=" 2
  row "(a2) cold read, unlimited origin (GB/s) vs $dln download to the same disk" "$wcu" "$dl" "$(ratio "$wcu" "$dl")" ">=" 1.0
  row "(b) cold read, $RATE/conn origin (GB/s) vs aria2c -x8 -s8" "$wcl" "$ar" "$(ratio "$wcl" "$ar")" ">=" 1.0
  row "(c) warm read (GB/s) vs $rwn" "$ww" "$rw" "$(ratio "$ww" "$rw")" ">=" 3
  row "(c) warm read (GB/s) vs blob file read directly" "$ww" "$bc" "$(ratio "$ww" "$bc")" ">=" 0.8
  row "(d) hot re-read (GB/s) vs local file from page cache" "$wh" "$bh" "$(ratio "$wh" "$bh")" ">=" 0.8
  row "(e) time to first MiB, cold, $RATE/conn, vs curl 1 MiB range" "$(ms "$wt")" "$(ms "$ct")" "$(ratio "$wt" "$ct")" "<=" 2
  printf '| (f) daemon peak RSS (VmHWM), cold reads, worst run | %s MiB | — | — | <= 200 MiB | %s |\n' \
    "$hw" "$(awk -v h="$hw" 'BEGIN{print (h<=200) ? "PASS" : "FAIL"}')"
  printf '| (f2) origin bytes / bytes read, cold reads of (a) and (b), worst run | %s | — | — | = 1.00 | %s |\n' \
    "$src" "$(awk -v r="$src" 'BEGIN{print (r+0 == 1) ? "PASS" : "FAIL"}')"
  row "(g) daemon CPU per GB, cold read of (a) (core-s/GB) vs sha256 floor (openssl)" "$cpg" "$L_FLOOR" "$(ratio "$cpg" "$L_FLOOR")" "<=" 1.3
  [ -n "$L_B3FLOOR" ] && printf '| (g2) the same vs the floor of the chunk hash in use (blake3, one core) | %s | %s | %s× | (information) | — |\n' \
    "$cpg" "$L_B3FLOOR" "$(ratio "$cpg" "$L_B3FLOOR")"
  echo
  echo "per-run values (in round order):"
  echo "  wanfs cold unlimited GB/s: ${W_COLD_U[*]}"
  echo "  rclone full cold / warm:   ${RCF_COLD[*]} / ${RCF_WARM[*]}"
  echo "  rclone off  cold / warm:   ${RCO_COLD[*]} / ${RCO_WARM[*]}"
  echo "  wanfs cold limited GB/s:   ${W_COLD_L[*]}"
  echo "  aria2c -x8 -s8 GB/s:       ${ARIA[*]}"
  echo "  unlimited origin: curl -o ${CURL_DL[*]}; aria2c ${ARIA_U[*]}"
  echo "  wanfs warm / hot GB/s:     ${W_WARM[*]} / ${W_HOT[*]}"
  echo "  blob cold / page cache:    ${BLOB_COLD[*]} / ${BLOB_HOT[*]}"
  echo "  wanfs first MiB s:         ${W_TTFB[*]}"
  echo "  curl 1 MiB range s:        ${CURL_TTFB[*]}"
  echo "  daemon VmHWM MiB (a,b):    ${HWM[*]}"
  echo "  origin bytes per read (a,b): ${SRC[*]} (the file: $SIZE)"
  echo "  daemon core-s/GB (a / b):  ${CPG_U[*]} / ${CPG_L[*]}"
  echo "  cache COMPLETE after read: ${LAG[*]} s (a,b; commit lag behind the reader)"
  echo "diagnostics during cold reads (100% = one core; machine has $(nproc)):"
  echo "  unlimited: daemon CPU % ${CPU_U[*]}; origin (nginx) CPU % ${ORG_U[*]}; machine busy % ${BUSY_U[*]}; origin connections ${CONN_U[*]}"
  echo "  limited:   daemon CPU % ${CPU_L[*]}; origin (nginx+proxy) CPU % ${ORG_L[*]}; machine busy % ${BUSY_L[*]}; origin connections ${CONN_L[*]}"
  echo "  per-thread snapshots: $LOGS/snapshot-*.txt"
  if [ -n "$PROFILE_TXT" ]; then echo "perf profile of the daemon during one extra cold read (top symbols):"; sed 's/^/  /' "$PROFILE_TXT"; fi
} | tee "$RESULTS"
echo "results saved to $RESULTS" >&2
