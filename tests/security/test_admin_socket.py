"""The local admin socket cannot be squatted by another local user (probe finding 7).

Before: with the key store in a directory others may write, another user listening on the
socket path first made the server give up its socket and the CLI talk to hers (exit 0, her
made-up answer, the key ids sent to her); for a store without a file, the socket went to a
``<tmp>/fastmcp-guard-<uid>/`` directory even when another user had made it 0777.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastmcp.utilities.tests import find_available_port

from tests.cli.test_cli_keys import cli, create
from tests.cli.test_cli_run import start_server, stop_server

pytestmark = [
    pytest.mark.http,
    pytest.mark.skipif(os.geteuid() != 0, reason="making another user's socket needs root"),
]

OTHER_UID = 54321


class Squatter:
    """A listening Unix socket owned by another user, recording what it is sent."""

    def __init__(self, path: Path) -> None:
        self.received = b""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chown(path, OTHER_UID, OTHER_UID)
        self.sock.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.received += conn.recv(65536)
            conn.sendall(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n'
                         b'content-length: 36\r\n\r\n{"reset": "made up", "was_tracked":1}')  # fmt: skip
            conn.close()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    # A short path: the socket goes beside the key store only if its path fits a socket.
    shared = Path(tempfile.mkdtemp(prefix="fg-", dir="/tmp"))
    shared.chmod(0o1777)  # like /tmp: everyone may create files, nobody may swap others'
    yield shared
    shutil.rmtree(shared, ignore_errors=True)


def test_a_squatted_socket_is_refused_by_the_server_and_ignored_by_the_cli(
    shared_dir: Path,
) -> None:
    port = find_available_port()
    path = shared_dir / f".fastmcp-guard-admin-{port}.sock"
    assert len(str(path)) < 100
    squatter = Squatter(path)
    key = create(shared_dir, "--name", "alice")
    server = start_server(shared_dir, port=port)
    try:
        log = (shared_dir / "server.log").read_text()
        assert "no local admin socket" in log and str(OTHER_UID) in log
        proc = cli(shared_dir, "rate", "reset", key["id"], "--json", env=server.env())
    finally:
        stop_server(server)
    assert "ignoring the admin socket" in proc.stderr and str(OTHER_UID) in proc.stderr
    assert proc.returncode == 0, proc.stderr  # answered by the real server, over TCP
    assert json.loads(proc.stdout)["reset"] == key["id"]
    assert squatter.received == b""


def test_a_foreign_socket_directory_is_not_used(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    foreign = tmp / f"fastmcp-guard-{os.getuid()}"
    foreign.mkdir()
    os.chown(foreign, OTHER_UID, OTHER_UID)
    foreign.chmod(0o777)
    server = start_server(tmp_path, "--keys", "memory://", env={"TMPDIR": str(tmp)})
    try:
        log = (tmp_path / "server.log").read_text()
    finally:
        stop_server(server)
    assert "no local admin socket" in log and "another user could swap it" in log
    assert list(foreign.iterdir()) == []
