"""Output helpers: JSON for scripts, plain lines and rich tables for people.

``rich`` is imported only when a table is printed, to keep start-up fast.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

__all__ = ["error", "iso", "print_json", "print_table", "say", "warn"]

PREFIX = "fastmcp-guard"


def say(text: str = "") -> None:
    """One line on stdout."""
    sys.stdout.write(text + "\n")


def warn(text: str) -> None:
    """``fastmcp-guard: warning: ...`` on stderr."""
    sys.stderr.write(f"{PREFIX}: warning: {text}\n")


def error(text: str) -> None:
    """``fastmcp-guard: error: ...`` on stderr (one line)."""
    one_line = " ".join(str(text).split())
    sys.stderr.write(f"{PREFIX}: error: {one_line}\n")


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout."""
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def iso(when: datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z`` (seconds precision), or ``None``."""
    if when is None:
        return None
    return when.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def human_time(when: datetime | None, none: str = "never") -> str:
    """``2026-03-09 14:00:00Z`` (UTC), or ``none``."""
    text = iso(when)
    return none if text is None else text.replace("T", " ")


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    styles: Sequence[Sequence[str | None]] | None = None,
    no_wrap: Sequence[str] = (),
) -> None:
    """A rich table on stdout. Cells are plain text (never parsed as markup).

    ``styles[i][j]`` styles cell ``j`` of row ``i``. When stdout is not a terminal the
    table is not squeezed to 80 columns, so ids and tokens' public parts stay whole.
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    for name in columns:
        table.add_column(name, no_wrap=name in no_wrap)
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            style = styles[i][j] if styles is not None else None
            cells.append(Text(cell, style=style or ""))
        table.add_row(*cells)
    tty = sys.stdout.isatty()
    Console(width=None if tty else 4096, soft_wrap=not tty, highlight=False).print(table)
