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
python -m pip install -q --disable-pip-version-check "maturin>=1.8,<2" \
  "fastmcp>=4.2.3,<5" "anyio>=4" "pytest>=8" "pytest-asyncio>=0.24" "pytest-timeout>=2.3" \
  "hypothesis>=6.100" "bcrypt>=4" "mypy>=1.10" "ruff>=0.5" "psycopg[binary]>=3.2" \
  "redis>=5.0.1" "opentelemetry-sdk>=1.20"

# The released fastmcp-guard 0.2.2 wheel: tests import its key files (drop-in check).
if ! ls .cache/legacy/fastmcp_guard-0.2.2-*.whl >/dev/null 2>&1; then
  python -m pip download -q --disable-pip-version-check --no-deps "fastmcp-guard==0.2.2" -d .cache/legacy
fi

# Build the extension into the venv (the stale .so goes first).
rm -f python/fastmcp_guard/_core*.so
if [ "${PROFILE:-dev}" = "release" ]; then
  maturin develop --release -q
else
  maturin develop -q
fi
