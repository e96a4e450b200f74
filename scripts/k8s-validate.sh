#!/usr/bin/env bash
# Validates deploy/k8s without a cluster: every manifest the kustomization lists against the
# Kubernetes 1.30 schemas and the newest ones kubernetes-validate knows (strict: unknown
# fields are errors), every file of the folder listed, and the goms.yml and services.yml the
# ConfigMap carries checked by `goms check-config`. The manifests are validated, not run.
#
#   scripts/k8s-validate.sh [path/to/goms]     (default: target/debug/goms, then goms on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
folder=deploy/k8s
goms=${1:-target/debug/goms}
[ -x "$goms" ] || goms=$(command -v goms || true)

if ! command -v kubernetes-validate >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

mapfile -t listed < <(python3 - "$folder/kustomization.yaml" <<'PY'
import sys, yaml
print("\n".join(yaml.safe_load(open(sys.argv[1]))["resources"]))
PY
)
for file in "$folder"/*.yaml; do
  name=$(basename "$file")
  [ "$name" = kustomization.yaml ] && continue
  if ! printf '%s\n' "${listed[@]}" | grep -qx "$name"; then
    echo "k8s-validate: $file is not in $folder/kustomization.yaml" >&2
    exit 1
  fi
done

for version in 1.30.0 ""; do
  kubernetes-validate --strict --quiet ${version:+-k "$version"} "${listed[@]/#/$folder/}"
done

if [ -n "$goms" ]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  python3 - "$folder/config.yaml" "$scratch" <<'PY'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "goms-config":
        for name, text in doc["data"].items():
            open(f"{sys.argv[2]}/{name}", "w").write(text)
PY
  "$goms" check-config --config "$scratch/goms.yml" --routes "$scratch/services.yml"
else
  echo "k8s-validate: no goms binary; the ConfigMap's goms.yml and services.yml were not checked" >&2
fi
echo "k8s-validate: ${#listed[@]} manifests valid against Kubernetes 1.30 and the newest schemas"
