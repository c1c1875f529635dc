#!/usr/bin/env bash
# Installs the Python client with its test extras into a cached venv and runs its checks: mypy --strict over
# the package, then the pytest suite (each test starts its own nerve-server: build it first with
# `cargo build --bin nerve-server`, or point NERVE_SERVER_BIN at one). Run from anywhere.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS="${NERVE_TOOLS:-$HOME/.cache/nerve-tools}"
VENV="$TOOLS/py-venv"

if [ ! -x "$VENV/bin/python" ]; then
  python="${PYTHON:-$(command -v python3)}"
  echo "creating $VENV with $("$python" --version)"
  "$python" -m venv "$VENV"
fi
# the install is editable, so it is redone only when pyproject.toml (the dependencies) or the location changes
stamp="$(cat "$HERE/pyproject.toml" | sha256sum | cut -d' ' -f1) $HERE"
if [ "$(cat "$VENV/.nerve-client" 2>/dev/null)" != "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$HERE[test]"
  printf '%s' "$stamp" >"$VENV/.nerve-client"
fi

cd "$HERE"
echo "==> mypy --strict"
"$VENV/bin/python" -m mypy

echo "==> pytest"
set +e
"$VENV/bin/python" -m pytest "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
  echo "FAILED: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
