#!/usr/bin/env bash
# The one test command (README: `make test`; CI: .ci/run). Rust tests, then Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# The fleet tests start their own PostgreSQL cluster (tests/fleet/postgres_server.py)
# from the Debian server binaries: install them when missing.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "test: installing postgresql (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
fi
export PATH="$PWD/.venv/bin:$PATH"
echo "== cargo test"
cargo test --locked
echo "== pytest"
python -m pytest -q -p no:cacheprovider "$@"
