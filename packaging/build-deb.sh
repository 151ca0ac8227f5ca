#!/usr/bin/env bash
# Builds the Debian package target/debian/wanfs_VERSION_ARCH.deb (docs/OPERATIONS.md §1):
#
#   packaging/build-deb.sh [CARGO-DEB OPTIONS]     e.g. --deb-version 0.1.1-1, --fast
#
# 1. `cargo build --release` of wan; with --no-build, the binary already at
#    $CARGO_TARGET_DIR/release/wan (default target/release/wan) is packaged as it is;
# 2. makes from that binary what the package ships beside it, in target/release/packaging/:
#    the man pages (`wan man`), the shell completions (`wan completions`), and the example
#    manifest: fixtures/models.toml with its sources under /usr/share/wanfs/examples/models;
# 3. checks the example configuration and manifest, as an operator would (`wan config check`,
#    `wan manifest check`), and runs `cargo deb --no-build` ([package.metadata.deb]).
set -euo pipefail
target=$(realpath -m "${CARGO_TARGET_DIR:-$(dirname "$0")/../target}")
cd "$(dirname "$0")/.."

build=1
args=()
for a in "$@"; do
  if [ "$a" = --no-build ]; then build=0; else args+=("$a"); fi
done
command -v cargo-deb >/dev/null || { echo "build-deb.sh: needs cargo-deb (cargo install cargo-deb --locked)" >&2; exit 1; }
if ((build)); then CARGO_TARGET_DIR=$target cargo build --release --locked --bin wan; fi
wan=$target/release/wan
[ -x "$wan" ] || { echo "build-deb.sh: no $wan to package" >&2; exit 1; }

out=$target/release/packaging
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
"$wan" man --out "$out/man" >/dev/null
# Debian policy wants man pages compressed; cargo-deb compresses only those it did not build.
gzip -9n "$out"/man/*.1
"$wan" completions bash >"$out/completions/wan"
"$wan" completions zsh >"$out/completions/_wan"
"$wan" completions fish >"$out/completions/wan.fish"

examples=/usr/share/wanfs/examples/models
{
  echo "# /etc/wan22/models.toml: the models wanfs serves (docs/MANIFEST.md). Installed by the wanfs"
  echo "# package as a conffile: your edits are kept on upgrade. As shipped: three demo models,"
  echo "# a few MB, from $examples. Replace them with your own:"
  echo "#   wan manifest build hf://ORG/REPO@REV --id NAME@VERSION >> models.toml; wan manifest check models.toml"
  # the fixture's own header (how it is made, relative local:// paths) does not apply here
  sed -e '1,/^schema_version/{/^#/d}' -e "s|\"local://models/|\"file://$examples/|" fixtures/models.toml
} >"$out/models.toml"
if grep -q 'local://' "$out/models.toml"; then
  echo "build-deb.sh: $out/models.toml still names a local:// source" >&2; exit 1
fi
"$wan" config check packaging/wan.toml >/dev/null
"$wan" manifest check "$out/models.toml" >/dev/null

CARGO_TARGET_DIR=$target cargo deb --no-build "${args[@]}"
