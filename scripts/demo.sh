#!/usr/bin/env bash
# Install fastmcp-guard and serve examples/server.py under `fastmcp-guard run` on the
# embedded defaults: keys in demo-data/fastmcp-guard-keys.db (SQLite), the audit log in
# demo-data/fastmcp-guard-audit.jsonl. Prints a demo key first (shown once).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=release scripts/bootstrap.sh
mkdir -p demo-data
cd demo-data
cli=../.venv/bin/fastmcp-guard
"$cli" keys create --name demo --scopes read:data,write:data --expires 1d --actor demo.sh
cat <<'TXT'
In another terminal (from the repository root):
  .venv/bin/python examples/call_server.py http://127.0.0.1:8765/mcp <the token above>
  cd demo-data && ../.venv/bin/fastmcp-guard audit tail -f
  cd demo-data && ../.venv/bin/fastmcp-guard rate status --url http://127.0.0.1:8765
TXT
exec "$cli" run ../examples/server.py --port "${PORT:-8765}" --rate 100/minute --global-rate 1000/minute
