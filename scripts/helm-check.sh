#!/usr/bin/env bash
# Checks the Helm chart in helm/nerve without a cluster:
#   1. helm lint --strict, with the default values and with each value set in helm/tests/values/;
#   2. helm template of the same value sets, every rendered manifest validated offline against the
#      Kubernetes OpenAPI schemas (kubernetes-validate --strict) of the oldest Kubernetes the chart
#      supports and of the newest the validator knows;
#      Custom resources (the Prometheus Operator's ServiceMonitor) are left out of that validation, since
#      kubernetes-validate has no schema for CRDs; pytest checks their shape instead;
#   3. pytest in helm/tests: assertions on the rendered manifests (probes, security context, secret
#      wiring, TLS/JWT/policy mounts, refused configurations, optional resources, the ServiceMonitor,
#      README values table, schema coverage), and that every NERVE_* setting the chart renders is one the
#      server lists in `nerve-server --help`.
# Needs a nerve-server binary for that: NERVE_SERVER_BIN (scripts/test.sh sets it to the one it built),
# else target/debug/nerve-server or target/release/nerve-server (under CARGO_TARGET_DIR when set); fails
# at once, saying how to build one, when there is none.
# Installs what it needs once, into ~/.cache/nerve-tools (NERVE_TOOLS overrides): helm (go install, needs
# Go and the Go module proxy) and a Python venv with helm/tests/requirements.txt (needs PyPI).
# Exits non-zero, naming the failed step, on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${NERVE_TOOLS:-$HOME/.cache/nerve-tools}"
HELM_VERSION=v3.21.4
# the chart's kubeVersion floor (native gRPC probes are GA in 1.27) and the newest schema set shipped
# with the pinned kubernetes-validate
KUBE_VERSIONS=(1.27.0 1.37.0)
CHART=helm/nerve
# kinds from CRDs, which kubernetes-validate has no schema for (it only warns about them, and this script
# treats warnings as failures): split off before validation; helm/tests/test_chart.py checks their shape
CRD_KINDS=(ServiceMonitor)
VALUES_DIR=helm/tests/values
VENV="$TOOLS/helm-venv"
REQUIREMENTS=helm/tests/requirements.txt

started=$SECONDS
step_started=$SECONDS
step() {
  if [ "${current_step:-}" ]; then printf '    (%ss)\n' $((SECONDS - step_started)); fi
  current_step="$*"
  step_started=$SECONDS
  printf '\n==> %s\n' "$*"
}
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

step "tools"
# the server binary first: without it the chart's settings cannot be checked against the server's
if [ -n "${NERVE_SERVER_BIN:-}" ]; then
  [ -f "$NERVE_SERVER_BIN" ] && [ -x "$NERVE_SERVER_BIN" ] \
    || fail "NERVE_SERVER_BIN=$NERVE_SERVER_BIN is not an executable file"
else
  target="${CARGO_TARGET_DIR:-target}"
  for candidate in "$target/debug/nerve-server" "$target/release/nerve-server"; do
    if [ -f "$candidate" ] && [ -x "$candidate" ]; then NERVE_SERVER_BIN="$candidate"; break; fi
  done
  [ -n "${NERVE_SERVER_BIN:-}" ] || fail "no nerve-server binary: the chart tests compare the chart's NERVE_* settings \
with \`nerve-server --help\`. Build one (cargo build --bin nerve-server) or name one with \
NERVE_SERVER_BIN=/path/to/nerve-server (looked for $target/debug/nerve-server and $target/release/nerve-server)"
fi
NERVE_SERVER_BIN=$(cd "$(dirname "$NERVE_SERVER_BIN")" && pwd)/$(basename "$NERVE_SERVER_BIN")
export NERVE_SERVER_BIN
HELM="$TOOLS/bin/helm"
HELM_STAMP="$TOOLS/bin/.helm-version"
# `go install` leaves the version out of `helm version`, so a stamp file records what was installed
if [ ! -x "$HELM" ] || [ "$(cat "$HELM_STAMP" 2>/dev/null)" != "$HELM_VERSION" ]; then
  echo "installing helm $HELM_VERSION into $TOOLS/bin"
  mkdir -p "$TOOLS/bin"
  GOBIN="$TOOLS/bin" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    || fail "could not install helm (needs Go and the Go module proxy)"
  echo "$HELM_VERSION" > "$HELM_STAMP"
fi
REQ_STAMP="$VENV/.requirements"
if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$REQUIREMENTS" "$REQ_STAMP"; then
  echo "installing $(grep -v '^#' "$REQUIREMENTS" | tr '\n' ' ')into $VENV"
  python3 -m venv "$VENV" || fail "could not create the venv $VENV (needs python3 with venv)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS" \
    || fail "could not install $REQUIREMENTS (needs PyPI)"
  cp "$REQUIREMENTS" "$REQ_STAMP"
fi
echo "nerve-server: $NERVE_SERVER_BIN"
echo "helm: $HELM_VERSION ($HELM)"
echo "kubernetes-validate: $("$VENV/bin/kubernetes-validate" --version)"
echo "pytest: $("$VENV/bin/python" -m pytest --version 2>&1)"

# the value sets: the defaults, then every file in helm/tests/values
sets=(defaults)
for f in "$VALUES_DIR"/*.yaml; do sets+=("$f"); done
values_args() { if [ "$1" != defaults ]; then echo "--values $1"; fi; }

step "helm lint --strict (${#sets[@]} value sets)"
for set in "${sets[@]}"; do
  # shellcheck disable=SC2046
  out=$("$HELM" lint --strict "$CHART" $(values_args "$set") 2>&1) \
    || { echo "$out"; fail "helm lint --strict failed for $set"; }
  echo "ok  $set"
done

RENDERED=$(mktemp -d)
trap 'rm -rf "$RENDERED"' EXIT

# split_crds IN OUT: copies the documents of IN (helm template output, `---`-separated) whose kind is not
# in CRD_KINDS to OUT, as they are; prints how many were left out
split_crds() {
  CRD_KINDS="${CRD_KINDS[*]}" "$VENV/bin/python" - "$1" "$2" <<'PY'
import os, re, sys, yaml
crd_kinds = set(os.environ["CRD_KINDS"].split())
with open(sys.argv[1]) as f:
    chunks = re.split(r"^---[ \t]*$", f.read(), flags=re.M)
kept, left_out = [], 0
for chunk in chunks:
    doc = yaml.safe_load(chunk)
    if not doc:
        continue
    if doc.get("kind") in crd_kinds:
        left_out += 1
    else:
        kept.append(chunk.strip("\n"))
with open(sys.argv[2], "w") as f:
    f.write("".join(f"---\n{c}\n" for c in kept))
print(left_out)
PY
}

step "helm template + kubernetes-validate --strict (Kubernetes ${KUBE_VERSIONS[*]}; not ${CRD_KINDS[*]})"
k_args=()
for k in "${KUBE_VERSIONS[@]}"; do k_args+=(-k "$k"); done
for set in "${sets[@]}"; do
  for k in "${KUBE_VERSIONS[@]}"; do
    file="$RENDERED/$(basename "$set" .yaml)-$k.yaml"
    # shellcheck disable=SC2046
    "$HELM" template nerve "$CHART" --namespace nerve --kube-version "$k" $(values_args "$set") > "$file" \
      || fail "helm template failed for $set (Kubernetes $k)"
    kinds=$(grep -c '^kind: ' "$file")
    builtin="$RENDERED/$(basename "$set" .yaml)-$k.builtin.yaml"
    crds=$(split_crds "$file" "$builtin") || fail "could not split the rendered manifests of $set"
    out=$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$k" "$builtin" 2>&1) \
      || { echo "$out"; fail "rendered manifests of $set do not validate against Kubernetes $k"; }
    # kubernetes-validate only warns about kinds it has no schema for: treat that as a failure too
    if [ -n "$out" ]; then echo "$out"; fail "kubernetes-validate warned about $set (Kubernetes $k)"; fi
    note=""
    if [ "$crds" -gt 0 ]; then note=" + $crds custom resource(s) checked by pytest"; fi
    echo "ok  $set: $((kinds - crds)) manifests valid for Kubernetes $k$note"
  done
done

step "pytest helm/tests"
HELM="$HELM" KUBE_VERSION=1.30.0 NERVE_SERVER_BIN="$NERVE_SERVER_BIN" "$VENV/bin/python" -m pytest helm/tests -q \
  || fail "chart tests failed (the first failure is above)"

step "helm chart checks passed"
printf '    total %ss\n' $((SECONDS - started))
