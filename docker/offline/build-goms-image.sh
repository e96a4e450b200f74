#!/usr/bin/env bash
# Build the goms runtime image (default goms/goms:latest) without a registry: build goms on
# the host, then copy the binary into an image FROM the offline Debian base.
#
# Usage: docker/offline/build-goms-image.sh
#   GOMS_BUILD_PROFILE=release|debug   which cargo profile (default release; debug builds faster)
#   GOMS_BINARY=PATH                   use this binary; skips cargo
#   GOMS_NO_CARGO_BUILD=1              do not run cargo; use target/<profile>/goms as it is
#   GOMS_IMAGE=NAME:TAG                image to tag (default goms/goms:latest)
#
# Builds goms/debian-base:bookworm first (docker/offline/build-images.sh) when it is missing.
# Progress goes to stderr; stdout carries only `export GOMS_IMAGE=...`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BASE_IMAGE=goms/debian-base:bookworm
IMAGE=${GOMS_IMAGE:-goms/goms:latest}
PROFILE=${GOMS_BUILD_PROFILE:-release}
export PATH="$HOME/.cargo/bin:$PATH"

log() { echo "[build-goms-image] $*" >&2; }

case "$PROFILE" in
  release) cargo_args=(build --locked --release) ;;
  debug|dev) PROFILE=debug; cargo_args=(build --locked) ;;
  *) log "GOMS_BUILD_PROFILE must be release or debug, not '$PROFILE'"; exit 2 ;;
esac

binary=${GOMS_BINARY:-}
if [ -z "$binary" ]; then
  binary="$ROOT/target/$PROFILE/goms"
  if [ "${GOMS_NO_CARGO_BUILD:-0}" != 1 ] || [ ! -x "$binary" ]; then
    log "cargo ${cargo_args[*]} (on the host)"
    (cd "$ROOT" && cargo "${cargo_args[@]}") >&2
  fi
fi
[ -x "$binary" ] || { log "no goms binary at $binary"; exit 1; }

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  log "$BASE_IMAGE is missing; building the offline images"
  "$HERE/build-images.sh" >/dev/null
fi

ctx="$(mktemp -d /tmp/goms-image-ctx.XXXXXX)"
trap 'rm -rf --one-file-system "$ctx"' EXIT
# Debug info is most of a debug binary's size; the image does not need it.
if command -v strip >/dev/null 2>&1; then
  strip --strip-debug -o "$ctx/goms" "$binary"
else
  cp "$binary" "$ctx/goms"
fi
cp "$ROOT/docker/entrypoint.sh" "$ctx/entrypoint.sh"
cp "$ROOT/docker/healthcheck.sh" "$ctx/healthcheck.sh"
cp "$ROOT/docker/order.sh" "$ctx/order.sh"
mkdir -p "$ctx/examples/order"
cp "$ROOT/examples/order/app.py" "$ctx/examples/order/app.py"
cp -r "$ROOT/config" "$ctx/config"
cp "$HERE/goms/Dockerfile" "$ctx/Dockerfile"

old_id="$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
revision="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
start=$SECONDS
log "docker build $IMAGE ($PROFILE binary $(du -h "$ctx/goms" | cut -f1), commit $revision)"
DOCKER_BUILDKIT=0 docker build -q \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --label "org.opencontainers.image.revision=$revision" \
  --label "goms.build-profile=$PROFILE" \
  -t "$IMAGE" "$ctx" >&2
log "built $IMAGE in $((SECONDS - start))s"

# The previous build of this tag is now untagged; remove it unless a container still uses it.
new_id="$(docker image inspect -f '{{.Id}}' "$IMAGE")"
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ] \
   && [ -z "$(docker image inspect -f '{{join .RepoTags ","}}' "$old_id" 2>/dev/null)" ]; then
  docker image rm "$old_id" >/dev/null 2>&1 && log "removed the previous build ${old_id#sha256:}" || true
fi

echo "export GOMS_IMAGE=$IMAGE"
