"""``python -m fastmcp_guard.cli``: the ``fastmcp-guard`` command."""

from fastmcp_guard.cli import run_main

run_main()
