#!/usr/bin/env bash
# Re-creates vendor/pingora-core: pingora-core's source as published on crates.io, plus goms's
# patch (vendor/pingora-core.patch). Cargo.toml's [patch.crates-io] builds goms against it.
# Run it after changing the patch, or with a new version to move to (then update Cargo.toml's
# pingora version to match and run `cargo update -p pingora-core`).
#   scripts/vendor-pingora-core.sh [VERSION]     (default: the vendored version, 0.9.1)
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-0.9.1}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

curl -sSfL "https://static.crates.io/crates/pingora-core/pingora-core-$version.crate" |
    tar -xz -C "$scratch"
rm -f "$scratch/pingora-core-$version/Cargo.lock" "$scratch/pingora-core-$version/.cargo_vcs_info.json"
patch -d "$scratch/pingora-core-$version" -p1 --no-backup-if-mismatch < vendor/pingora-core.patch
rm -rf vendor/pingora-core
mv "$scratch/pingora-core-$version" vendor/pingora-core
echo "vendor/pingora-core: pingora-core $version with vendor/pingora-core.patch applied" >&2
