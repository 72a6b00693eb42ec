"""``fastmcp-guard config``: the effective configuration and where each value came from."""

from __future__ import annotations

import argparse
from typing import Any

from fastmcp_guard.cli._common import add_command, cli_config, want_json
from fastmcp_guard.cli._output import print_json, print_table, say

__all__ = ["register"]

_EPILOG = """\
examples:
  fastmcp-guard config
  fastmcp-guard config --json
  FASTMCP_GUARD_RATE=100/minute fastmcp-guard --db keys.db config

Precedence: command-line options > FASTMCP_GUARD_* environment > config file
(--config FILE, FASTMCP_GUARD_CONFIG, ./fastmcp-guard.toml, or [tool.fastmcp-guard]
in ./pyproject.toml) > defaults. Secrets are masked.
"""


def register(subparsers: Any) -> None:
    """Add the ``config`` command."""
    cmd = add_command(subparsers, "config",
                      help="show the effective configuration, each value with its source",
                      epilog=_EPILOG)  # fmt: skip
    cmd.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    config = cli_config(args)
    if want_json(args):
        print_json(config.to_dict())
        return 0
    if config.config_file is None:
        say("config file: none")
    else:
        say(f"config file: {config.config_file} ({config.config_file_source})")
    views = config.views()
    print_table(["Setting", "Value", "Source", "Environment variable"],
                [[v.name, v.display, v.source, v.env] for v in views],
                styles=[[None, None, "dim" if v.source == "default" else "cyan", "dim"]
                        for v in views],
                no_wrap=("Setting",))  # fmt: skip
    return 0
