#!/usr/bin/env bash
# The one test command (README: `make test`; CI: .ci/run). Rust tests, then Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== cargo test"
cargo test --locked
echo "== pytest"
python -m pytest -q -p no:cacheprovider "$@"
