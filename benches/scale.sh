#!/usr/bin/env bash
# Mount at scale (issue 9): a fleet manifest of 10 models x 10,000 files (~3.7 TB, ~540k chunk
# digests, ~57 MB of TOML), metadata only: sources point at 127.0.0.1:9, which need not serve.
#
# usage (as root, release builds):  benches/scale.sh AFTER_BIN [BEFORE_BIN]
#   e.g. cargo build --release && cp target/release/wan /tmp/wan-after
#        benches/scale.sh /tmp/wan-after /tmp/wan-main
# Measures, per binary: first `wan mount` until every file is visible; daemon peak RSS (VmHWM)
# and steady RSS (VmRSS 2 s later); `find` over the mount; a restart on the same manifest
# (unmount, mount again until every file is visible); a reload (SIGHUP) after one model changed,
# until the change is visible; a reload of the unchanged manifest (until the daemon logs it);
# and `wan manifest check` time and peak RSS. ROUNDS (3) rounds, binaries alternating; the
# table gives medians of times and the worst round's memory.
set -euo pipefail
AFTER=${1:?usage: scale.sh AFTER_BIN [BEFORE_BIN]}
BEFORE=${2:-}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-/tmp/wan-scale}
mkdir -p "$WORK"
MANI=$WORK/fleet.toml
[ -f "$WORK/fleet-a.toml" ] || python3 "$HERE/scale_manifest.py" "$WORK/fleet-a.toml"
[ -f "$WORK/fleet-b.toml" ] || python3 "$HERE/scale_manifest.py" "$WORK/fleet-b.toml" --bump 3
LAST="fleet-09@1.0.0/part-099/file-09999.bin"
CHANGED="fleet-03@1.0.0/part-000/file-00000.safetensors"
WANT_FILES=100000

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$(now)"; }
kib() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$2/status"; }

# Mounts with $1 and waits until the last file of the manifest stats; sets PID and SECS.
mount_wait() {
  local bin=$1 t0
  t0=$(now)
  "$bin" mount "$WORK/mnt" --manifest "$MANI" --cache-dir "$WORK/cache" --config "$WORK/wan.toml" \
    >>"$WORK/daemon.log" 2>&1 &
  PID=$!
  until stat "$WORK/mnt/$LAST" >/dev/null 2>&1; do
    kill -0 "$PID" 2>/dev/null || { tail -20 "$WORK/daemon.log"; exit 1; }
    sleep 0.01
  done
  SECS=$(since "$t0")
}

stop() {
  kill -TERM "$PID"
  wait "$PID" || true
}

run() {
  local bin=$1 name=$2
  if grep -q " $WORK/mnt " /proc/mounts; then echo "$WORK/mnt is mounted"; exit 1; fi
  rm -rf "$WORK/cache"; mkdir -p "$WORK/mnt" "$WORK/cache"
  printf '[http]\naddr = ""\n' >"$WORK/wan.toml"
  cp "$WORK/fleet-a.toml" "$MANI"
  sync; echo 3 >/proc/sys/vm/drop_caches
  local first restart hwm rss findt n reload check
  mount_wait "$bin"; first=$SECS
  sleep 2
  hwm=$(kib VmHWM "$PID"); rss=$(kib VmRSS "$PID")
  local t0; t0=$(now)
  n=$(find "$WORK/mnt" -type f -not -path '*/.wan/*' | wc -l)
  findt=$(since "$t0")
  [ "$n" = "$WANT_FILES" ] || { echo "find saw $n files, want $WANT_FILES"; exit 1; }
  stop
  mount_wait "$bin"; restart=$SECS
  local rhwm; rhwm=$(kib VmHWM "$PID")
  # Reload: one file of one model changed (size + 1).
  local want; want=$(( $(stat -c %s "$WORK/mnt/$CHANGED") + 1 ))
  cp "$WORK/fleet-b.toml" "$MANI"
  t0=$(now)
  kill -HUP "$PID"
  until [ "$(stat -c %s "$WORK/mnt/$CHANGED")" = "$want" ]; do sleep 0.005; done
  reload=$(since "$t0")
  sleep 1
  local lhwm; lhwm=$(kib VmHWM "$PID")
  # Reload of an unchanged manifest: until the daemon logs that it reloaded.
  local before_n; before_n=$(grep -c 'reloaded configuration and manifest' "$WORK/daemon.log" || true)
  t0=$(now)
  kill -HUP "$PID"
  until [ "$(grep -c 'reloaded configuration and manifest' "$WORK/daemon.log")" -gt "$before_n" ]; do
    sleep 0.005
  done
  local same; same=$(since "$t0")
  stop
  local check crss
  check=$( { /usr/bin/time -f '%e %M' "$bin" manifest check "$MANI" >/dev/null; } 2>&1 | tail -1)
  crss=${check#* }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$first" "$((hwm / 1024))" \
    "$((rss / 1024))" "$findt" "$restart" "$((rhwm / 1024))" "$reload" "$((lhwm / 1024))" "$same" \
    "${check% *}" "$((crss / 1024))" | tee -a "$WORK/rows.tsv"
}

ROUNDS=${ROUNDS:-3}
: >"$WORK/rows.tsv"
echo "manifest: $(stat -c %s "$WORK/fleet-a.toml") bytes; $(nproc) cores; $(uname -r); $ROUNDS rounds"
echo "columns: binary, first mount s, peak RSS MiB, steady RSS MiB, find s, restart s, restart peak MiB,"
echo "         reload (1 model changed) s, peak after it MiB, reload (unchanged) s, manifest check s, check MiB"
for r in $(seq "$ROUNDS"); do
  # Alternate which binary goes first, so neither always meets the colder machine.
  if [ -n "$BEFORE" ] && [ $((r % 2)) = 1 ]; then run "$BEFORE" before; fi
  run "$AFTER" after
  if [ -n "$BEFORE" ] && [ $((r % 2)) = 0 ]; then run "$BEFORE" before; fi
done
python3 - "$WORK/rows.tsv" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
cols = ["first mount", "peak RSS", "steady RSS", "find", "restart", "restart peak",
        "reload, 1 model", "peak after reload", "reload, unchanged", "manifest check", "check RSS"]
units = ["s", "MiB", "MiB", "s", "s", "MiB", "s", "MiB", "s", "s", "MiB"]
med = {}
for name in dict.fromkeys(r[0] for r in rows):
    vals = [r[1:] for r in rows if r[0] == name]
    # Memory: the worst round; times: the median.
    med[name] = [max(float(v[i]) for v in vals) if units[i] == "MiB"
                 else statistics.median(float(v[i]) for v in vals) for i in range(len(cols))]
names = list(med)
print()
print("| measure (median of rounds; memory: worst round) | " + " | ".join(names)
      + (" | before / after |" if len(names) == 2 else " |"))
print("|---" * (len(names) + 1 + (len(names) == 2)) + "|")
for i, c in enumerate(cols):
    cells = [f"{med[n][i]:.3f} {units[i]}" if units[i] == "s" else f"{med[n][i]:.0f} {units[i]}"
             for n in names]
    ratio = ""
    if len(names) == 2 and med[names[1]][i] > 0:
        ratio = f" | {med['before'][i] / med['after'][i]:.1f}x"
    print(f"| {c} | " + " | ".join(cells) + ratio + " |")
PY
