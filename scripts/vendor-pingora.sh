#!/usr/bin/env bash
# Re-creates goms's vendored pingora crates: each crate's source as published on crates.io,
# plus goms's patch for it (vendor/CRATE.patch). Cargo.toml's [patch.crates-io] builds goms
# against them. Run it after changing a patch, or with a new version to move to (then update
# Cargo.toml's pingora version to match and run `cargo update -p pingora-core -p pingora-proxy
# -p pingora-http`).
#   scripts/vendor-pingora.sh [--version V] [CRATE ...]
#       CRATE: pingora-core, pingora-proxy, pingora-http (default: all three); V: default 0.9.1,
#       the vendored one
#   scripts/vendor-pingora.sh --write-patch [CRATE ...]
#       the other way: after editing vendor/CRATE by hand, writes vendor/CRATE.patch as the
#       difference from the published source
# vendor/README.md lists what each patch changes and why.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.9.1
write_patch=0
crates=()
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version=$2; shift 2 ;;
    --write-patch) write_patch=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    pingora-core|pingora-proxy|pingora-http) crates+=("$1"); shift ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#crates[@]} -gt 0 ] || crates=(pingora-core pingora-proxy pingora-http)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

for crate in "${crates[@]}"; do
  curl -sSfL "https://static.crates.io/crates/$crate/$crate-$version.crate" | tar -xz -C "$scratch"
  source="$scratch/$crate-$version"
  rm -f "$source/Cargo.lock" "$source/.cargo_vcs_info.json"
  if [ "$write_patch" = 1 ]; then
    mv "$source" "$scratch/a"
    cp -r "vendor/$crate" "$scratch/b"
    # Unified diff, a/ and b/ prefixes without timestamps, as `patch -p1` above reads it.
    (cd "$scratch" && diff -ruN a b || true) |
      sed -E 's#^(---|\+\+\+) ([ab]/[^\t]*)\t.*#\1 \2#' | { grep -v '^diff -ruN' || true; } > "vendor/$crate.patch"
    rm -rf "$scratch/a" "$scratch/b"
    echo "vendor/$crate.patch: $(grep -c '^+++ ' "vendor/$crate.patch" || true) files changed" >&2
    continue
  fi
  # An empty patch (a crate vendored before its first change) applies as nothing.
  if [ -s "vendor/$crate.patch" ]; then
    patch -d "$source" -p1 --no-backup-if-mismatch < "vendor/$crate.patch"
  fi
  rm -rf "vendor/$crate"
  mv "$source" "vendor/$crate"
  echo "vendor/$crate: $crate $version with vendor/$crate.patch applied" >&2
done
