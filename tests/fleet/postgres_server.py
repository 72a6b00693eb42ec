"""A real PostgreSQL server for the fleet tests, started from the Debian binaries.

`scripts/test.sh` installs the `postgresql` package when it is missing; this module runs
`initdb` + `pg_ctl` in a temporary directory on a free 127.0.0.1 port (as the `postgres`
user when the tests run as root, since PostgreSQL refuses to run as root) and removes it
afterwards. Nothing is mocked.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from fastmcp.utilities.tests import find_available_port


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): "
            "run scripts/test.sh, which installs the postgresql package"
        )
    return Path(found[-1]).parent


class PostgresServer:
    """One throw-away cluster: ``dsn``, ``stop()``, ``start()``, ``restart()``, ``remove()``."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="fmg-pg-"))
        self.data = self.dir / "data"
        self.port = find_available_port()
        self.root = os.geteuid() == 0
        os.chmod(self.dir, 0o755)
        if self.root:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "fmg", "-E", "UTF8",
                  "--no-sync", "--no-instructions")  # fmt: skip
        self.start()
        self.dsn = f"postgresql://fmg:secret-pw@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed: {proc.stdout}\n{proc.stderr}")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")  # fmt: skip
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"),
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
