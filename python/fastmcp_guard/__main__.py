"""``python -m fastmcp_guard``: the ops CLI."""

import sys

from fastmcp_guard.cli import main

sys.exit(main())
