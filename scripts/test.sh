#!/usr/bin/env bash
# The one test command (README: `make test`; CI: .ci/run). Rust tests, then Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"

# tests/fleet starts its own servers on 127.0.0.1 (free ports, temporary directories):
# a PostgreSQL cluster (tests/fleet/postgres_server.py) and redis-server
# (tests/fleet/conftest.py). Install the Debian packages that provide them when missing,
# with one apt-get update.
fleet_apt=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || fleet_apt+=(postgresql)
command -v redis-server >/dev/null 2>&1 || fleet_apt+=(redis-server)
if [ ${#fleet_apt[@]} -gt 0 ]; then
  echo "== installing ${fleet_apt[*]} (Debian packages) for tests/fleet"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${fleet_apt[@]}"
fi
echo "== cargo test"
cargo test --locked
echo "== pytest"
python -m pytest -q -p no:cacheprovider "$@"
