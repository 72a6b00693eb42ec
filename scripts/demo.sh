#!/usr/bin/env bash
# Install fastmcp-guard and start the guarded example server (SQLite keys + JSONL audit).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=release scripts/bootstrap.sh
exec .venv/bin/python examples/guarded_server.py "$@"
