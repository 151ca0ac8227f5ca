#!/usr/bin/env bash
# What publisher signatures cost at scale (issue 19): the fleet manifest of benches/scale.sh
# (10 models x 10,000 files), mounted unsigned and with every model signed (benches/
# scale_sign.py: a model_signing bundle per model, 10,000 sha256 digests each, ECDSA P-256,
# fetched from a file:// source), by the same binary, rounds interleaved (unsigned, signed,
# signed, unsigned, ...), page cache dropped before each.
#
# usage (as root, a release build):  benches/scale_signed.sh BIN
# Per round: the first mount until every file is visible and, signed, until every model's
# verdict is logged ("model signature verified"); a restart from the compiled form until every
# file is visible (signed: and verified); a reload after one model changed until its new
# verdict is logged. The goal: signed mount (all verified) within 1.5x of the unsigned mount,
# a signed restart's mount within 0.5 s.
set -euo pipefail
BIN=${1:?usage: scale_signed.sh BIN}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-/tmp/wan-scale}
mkdir -p "$WORK"
[ -f "$WORK/fleet-a.toml" ] || python3 "$HERE/scale_manifest.py" "$WORK/fleet-a.toml"
[ -f "$WORK/fleet-b.toml" ] || python3 "$HERE/scale_manifest.py" "$WORK/fleet-b.toml" --bump 3
if [ ! -f "$WORK/signed-b.toml" ]; then
  openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/sign.pem"
  openssl ec -in "$WORK/sign.pem" -pubout -out "$WORK/sign.pub" 2>/dev/null
  python3 "$HERE/scale_sign.py" "$WORK/fleet-a.toml" "$WORK/signed-a.toml" "$WORK/sigs-a" "$WORK/sign.pem"
  # The same bundles where a model did not change: a reload then re-verifies the changed one.
  python3 "$HERE/scale_sign.py" "$WORK/fleet-b.toml" "$WORK/signed-b.toml" "$WORK/sigs-a" "$WORK/sign.pem" \
    "$WORK/sigs-a"
fi
MANI=$WORK/fleet.toml
LAST="fleet-09@1.0.0/part-099/file-09999.bin"
MODELS=10

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$(now)"; }
verified() { grep -c 'model signature verified' "$WORK/daemon.log" || true; }

# Mounts and waits until the last file stats (VISIBLE) and, when signed, until $1 more models
# are verified (SECS).
mount_wait() {
  local more=$1 t0 base
  base=$(verified)
  t0=$(now)
  "$BIN" mount "$WORK/mnt" --manifest "$MANI" --cache-dir "$WORK/cache" --config "$WORK/wan.toml" \
    >>"$WORK/daemon.log" 2>&1 &
  PID=$!
  until stat "$WORK/mnt/$LAST" >/dev/null 2>&1; do
    kill -0 "$PID" 2>/dev/null || { tail -20 "$WORK/daemon.log"; exit 1; }
    sleep 0.005
  done
  VISIBLE=$(since "$t0")
  until [ "$(verified)" -ge $((base + more)) ]; do
    kill -0 "$PID" 2>/dev/null || { tail -20 "$WORK/daemon.log"; exit 1; }
    grep -q 'model refused' "$WORK/daemon.log" && { grep 'model refused' "$WORK/daemon.log" | tail -3; exit 1; }
    sleep 0.005
  done
  SECS=$(since "$t0")
}

run() {
  local kind=$1 more=0
  if grep -q " $WORK/mnt " /proc/mounts; then echo "$WORK/mnt is mounted"; exit 1; fi
  rm -rf "$WORK/cache"; mkdir -p "$WORK/mnt" "$WORK/cache"
  : >"$WORK/daemon.log"
  if [ "$kind" = signed ]; then
    printf '[http]\naddr = ""\n[trust]\nkeys = ["%s"]\n' "$WORK/sign.pub" >"$WORK/wan.toml"
    cp "$WORK/signed-a.toml" "$MANI"; more=$MODELS
  else
    printf '[http]\naddr = ""\n' >"$WORK/wan.toml"
    cp "$WORK/fleet-a.toml" "$MANI"
  fi
  sync; echo 3 >/proc/sys/vm/drop_caches
  local first first_visible restart restart_visible reload t0
  mount_wait "$more"; first=$SECS; first_visible=$VISIBLE
  kill -TERM "$PID"; wait "$PID" || true
  mount_wait "$more"; restart=$SECS; restart_visible=$VISIBLE
  if [ "$kind" = signed ]; then cp "$WORK/signed-b.toml" "$MANI"; else cp "$WORK/fleet-b.toml" "$MANI"; fi
  local base; base=$(verified)
  local want; want=$(( $(stat -c %s "$WORK/mnt/fleet-03@1.0.0/part-000/file-00000.safetensors") + 1 ))
  t0=$(now)
  kill -HUP "$PID"
  until [ "$(stat -c %s "$WORK/mnt/fleet-03@1.0.0/part-000/file-00000.safetensors")" = "$want" ] &&
        { [ "$kind" != signed ] || [ "$(verified)" -gt "$base" ]; }; do sleep 0.005; done
  reload=$(since "$t0")
  kill -TERM "$PID"; wait "$PID" || true
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$first_visible" "$first" "$restart_visible" "$restart" "$reload" |
    tee -a "$WORK/signed-rows.tsv"
}

ROUNDS=${ROUNDS:-3}
: >"$WORK/signed-rows.tsv"
echo "manifest: $(stat -c %s "$WORK/fleet-a.toml") bytes; $(nproc) cores; $(uname -r); $ROUNDS rounds"
echo "columns: kind, first mount visible s, first mount verified s, restart visible s, restart verified s, reload (1 model changed) s"
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then run unsigned; run signed; else run signed; run unsigned; fi
done
python3 - "$WORK/signed-rows.tsv" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
cols = ["first mount: every file visible", "first mount: every model verified",
        "restart: every file visible", "restart: every model verified", "reload, 1 model changed"]
med = {k: [statistics.median(float(r[i + 1]) for r in rows if r[0] == k) for i in range(len(cols))]
       for k in ("unsigned", "signed")}
print("\n| measure (median) | unsigned | signed | signed / unsigned |\n|---|---|---|---|")
for i, c in enumerate(cols):
    u, s = med["unsigned"][i], med["signed"][i]
    print(f"| {c} | {u:.3f} s | {s:.3f} s | {s / u:.2f}x |")
PY
