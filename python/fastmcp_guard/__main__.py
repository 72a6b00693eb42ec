"""``python -m fastmcp_guard``: the same CLI as the ``fastmcp-guard`` console script."""

from fastmcp_guard.cli import run_main

if __name__ == "__main__":
    run_main()
