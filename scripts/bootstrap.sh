#!/usr/bin/env bash
# Install what building fastmcp-guard needs on a fresh machine, then build the
# package into .venv. Idempotent: a second run only rebuilds.
#   PROFILE=release scripts/bootstrap.sh   (benchmarks; tests use the dev profile)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cargo >/dev/null 2>&1 || need_apt+=(cargo rustc)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-venv python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need_apt[*]} (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
python -m pip install -q --disable-pip-version-check "maturin>=1.8,<2"

# The released fastmcp-guard 0.2.2 wheel: tests import its key files (drop-in check).
if ! ls .cache/legacy/fastmcp_guard-0.2.2-*.whl >/dev/null 2>&1; then
  python -m pip download -q --disable-pip-version-check --no-deps "fastmcp-guard==0.2.2" -d .cache/legacy
fi

# BOOTSTRAP_BUILD=0: only the venv and maturin (scripts/test.sh installs the wheel).
if [ "${BOOTSTRAP_BUILD:-1}" = "0" ]; then
  exit 0
fi

# Build the extension into the venv as an editable install (the stale .so goes first).
# maturin also installs the dependencies and the extras named in pyproject.toml: the
# one list of what the tests, lint and benchmarks need.
rm -f python/fastmcp_guard/_core*.so
extras=(-E test,lint,bench)
if [ "${PROFILE:-dev}" = "release" ]; then
  maturin develop --release -q "${extras[@]}"
else
  maturin develop -q "${extras[@]}"
fi
