#!/usr/bin/env bash
# The one test command (README: `make test`; CI: .ci/run). Rust tests, then the Python
# suite against the installed release wheel, not the development build.
set -euo pipefail
cd "$(dirname "$0")/.."
# The venv and maturin only: the extension is built once, as the wheel below.
BOOTSTRAP_BUILD=0 scripts/bootstrap.sh
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"

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
echo "== cargo test ($(date -u +%T) UTC, ${SECONDS}s in)"
cargo test --locked

echo "== wheel ($(date -u +%T) UTC, ${SECONDS}s in)"
wheel=$(scripts/wheel.sh | tail -1)
# Replace whatever is installed (the editable development build, or an older wheel)
# with the wheel and the `test` extra's dependencies. pip must not build anything.
python -m pip uninstall -q -y --disable-pip-version-check fastmcp-guard 2>/dev/null || true
python -m pip install -q --disable-pip-version-check --only-binary fastmcp-guard "$wheel[test]"
python - <<'PY'
import pathlib
import fastmcp_guard._core as core

where = pathlib.Path(core.__file__).resolve()
assert "site-packages" in where.parts, f"_core loaded from {where}, not from the installed wheel"
print(f"== pytest against the wheel ({where})")
PY
echo "== pytest ($(date -u +%T) UTC, ${SECONDS}s in; load average $(cut -d' ' -f1-3 /proc/loadavg))"
python -m pytest -q -p no:cacheprovider "$@"
echo "== done in ${SECONDS}s"
echo "(the venv now holds the wheel; scripts/bootstrap.sh puts the development build back)"
