#!/usr/bin/env bash
# The wanfs demo, end to end, on the built-in demo models (fixtures/, no network):
# builds `wan`, mounts fixtures/models.toml, lists every model, reads and verifies files,
# shows what was fetched (and what dedup saved), then unmounts. Works as root, or as an
# ordinary user with fuse3 installed.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

[ -e /dev/fuse ] || die "/dev/fuse is missing: load the fuse module (modprobe fuse)"
if [ "$(id -u)" != 0 ]; then
  command -v fusermount3 >/dev/null || die "as a non-root user wanfs needs fusermount3: sudo apt-get install -y fuse3"
  [ -r /dev/fuse ] && [ -w /dev/fuse ] || die "/dev/fuse is not open to $(id -un) (mode $(stat -c %a /dev/fuse); distributions ship it 0666)"
fi
command -v cargo >/dev/null || die "cargo is missing: install Rust from https://rustup.rs"
command -v python3 >/dev/null || die "python3 is missing (used here only to read xattrs)"

say "building wan (release)"
cargo build --release --quiet
WAN=$PWD/target/release/wan

work=$(mktemp -d /tmp/wanfs-demo.XXXXXX)
mnt=$work/models cache=$work/cache log=$work/wan.log
mkdir -p "$mnt"
pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

say "checking the manifest"
"$WAN" manifest check fixtures/models.toml

say "mounting at $mnt (cache: $cache)"
# The HTTP endpoint on a free port, so the demo never collides with a running daemon.
printf '[http]\naddr = "127.0.0.1:0"\n' > "$work/wan.toml"
WAN_LOG=info "$WAN" mount "$mnt" --manifest fixtures/models.toml --cache-dir "$cache" --config "$work/wan.toml" 2>"$log" &
pid=$!
for _ in $(seq 100); do
  grep -q mounted "$log" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; die "wan mount exited"; }
  sleep 0.1
done
grep -q mounted "$log" || { cat "$log"; die "mount did not come up"; }

xattrs() {
  python3 - "$@" <<'PY'
import os, sys
for f in sys.argv[1:]:
    st = os.getxattr(f, "user.wan.state").decode()
    cb = int(os.getxattr(f, "user.wan.cached_bytes"))
    print(f"  {st:<12} {cb:>9} / {os.path.getsize(f):>9} bytes cached  {os.path.relpath(f, os.environ['MNT'])}")
PY
}
export MNT=$mnt

say "every model is listed at once, with exact sizes, before any download"
ls -l "$mnt"
find "$mnt" -type f | sort | sed "s|$mnt/||"
du -sh --apparent-size "$mnt" | sed 's/\t.*/ in total (apparent size)/'

t2v="$mnt/t2v-A14B@2.2.0"
i2v="$mnt/i2v-A14B@2.2.0"
shard="$t2v/high_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors"

say "nothing is cached yet"
xattrs "$shard" "$t2v/Wan2.1_VAE.safetensors" "$i2v/Wan2.1_VAE.safetensors"

say "reading only the safetensors header of one shard (as a loader does first)"
python3 - "$shard" <<'PY'
import json, struct, sys
import os
with open(sys.argv[1], "rb", buffering=0) as f:
    # Like a loader that is about to mmap: no kernel read-ahead, so only the header is asked for.
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
tensors = [k for k in header if k != "__metadata__"]
print(f"  {len(tensors)} tensors, e.g. {tensors[0]}: {header[tensors[0]]['dtype']} {header[tensors[0]]['shape']}")
PY
xattrs "$shard"

say "reading the whole shard and checking it against the manifest's sha256"
want=$(python3 -c "import os,sys; print(os.getxattr(sys.argv[1],'user.wan.sha256').decode())" "$shard")
got=$(sha256sum "$shard" | cut -d' ' -f1)
echo "  manifest: $want"
echo "  read:     $got"
[ "$want" = "$got" ] || die "content mismatch"
echo "  verified"
xattrs "$shard"

say "reading t2v's VAE; i2v lists the identical file, so it is cached too (stored once)"
cat "$t2v/Wan2.1_VAE.safetensors" >/dev/null
xattrs "$t2v/Wan2.1_VAE.safetensors" "$i2v/Wan2.1_VAE.safetensors"
cmp "$t2v/Wan2.1_VAE.safetensors" fixtures/models/i2v-A14B@2.2.0/Wan2.1_VAE.safetensors && echo "  i2v's copy reads back identical"

say "mmap works (inference loaders map safetensors)"
python3 - "$i2v/high_noise_model/diffusion_pytorch_model-00001-of-00001.safetensors" fixtures/models/i2v-A14B@2.2.0/high_noise_model/diffusion_pytorch_model-00001-of-00001.safetensors <<'PY'
import mmap, sys
with open(sys.argv[1], "rb") as f, open(sys.argv[2], "rb") as g:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    assert m[:] == g.read(), "mmap content differs"
    print(f"  mapped {len(m)} bytes, identical to the source")
PY

say "the control plane: .wan/ files, the HTTP endpoint and wan models speak one vocabulary"
http=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -o 'HTTP endpoint listening addr=[0-9.:]*' | sed 's/.*addr=//')
echo "  \$ echo ti2v-5B@2.2.0 > .wan/ensure"
echo ti2v-5B@2.2.0 > "$mnt/.wan/ensure"
for _ in $(seq 100); do
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); sys.exit(s['models']['ti2v-5B@2.2.0']['state']!='COMPLETE')" "$mnt/.wan/status" && break
  sleep 0.1
done
echo "  \$ wan models --http $http status"
"$WAN" models --http "$http" status | sed 's/^/  /'
echo "  \$ curl -s http://$http/health/models   (summary)"
python3 - "$http" <<'PY'
import json, sys, urllib.request
print("  ", json.load(urllib.request.urlopen(f"http://{sys.argv[1]}/health/models"))["summary"])
PY
echo "  \$ echo bogus@1.0.0 > .wan/ensure"
if echo bogus@1.0.0 > "$mnt/.wan/ensure" 2>/dev/null; then die "a bad id was accepted"; else echo "  refused with EINVAL, as it should be"; fi

say "what was fetched (daemon log)"
grep -o 'download completed.*' "$log" | sed 's/\x1b\[[0-9;]*m//g; s/^/  /'
echo "  cache on disk: $(du -sh "$cache/v1/blobs" | cut -f1) in $(find "$cache/v1/blobs" -type f | wc -l) blobs"

say "unmounting (SIGTERM)"
kill -TERM "$pid"; wait "$pid"; pid=
grep -q stopped "$log" && echo "  clean unmount"
echo
echo "demo OK"
