#!/usr/bin/env bash
# Install a built wheel (default: the one in dist/) into a fresh venv, with no Rust
# toolchain on PATH and binary packages only (nothing may be compiled), then import the
# core, run the CLI both ways and use it once. Not part of `make test` (it downloads
# FastMCP and its dependencies into the new venv).
#   scripts/check_wheel.sh [WHEEL]
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=$(realpath "${1:-$(ls dist/fastmcp_guard-*-abi3-*manylinux*.whl | tail -1)}")
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
env -i HOME="$dir" PATH=/usr/bin:/bin WHEEL="$wheel" DIR="$dir" bash -euo pipefail -c '
  if command -v cargo || command -v rustc; then echo "a Rust toolchain is on PATH" >&2; exit 1; fi
  python3 -m venv "$DIR/venv"
  "$DIR/venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary :all: "$WHEEL"
  cd "$DIR"
  "$DIR/venv/bin/python" -c "import fastmcp_guard, fastmcp_guard._core as c; print(\"imported\", fastmcp_guard.__version__, \"from\", c.__file__)"
  "$DIR/venv/bin/python" -m fastmcp_guard --help >/dev/null
  "$DIR/venv/bin/fastmcp-guard" --version
  "$DIR/venv/bin/fastmcp-guard" keys create --name smoke --scopes read --db "$DIR/keys.db" --audit off --json >/dev/null
  "$DIR/venv/bin/fastmcp-guard" keys list --db "$DIR/keys.db" --audit off
  ls "$DIR"/venv/lib/python3*/site-packages/fastmcp_guard/ | grep -E "^(_core\.abi3\.so|_core\.pyi|py\.typed)$"
'
echo "check_wheel: OK ($(basename "$wheel"))"
