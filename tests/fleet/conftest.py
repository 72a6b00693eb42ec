"""Fleet fixtures: real ``redis-server`` processes on 127.0.0.1, started by the tests.

Each server runs on a free loopback port in its own temporary directory, with no
persistence, and is stopped at teardown. ``scripts/test.sh`` installs ``redis-server``
(Debian package) when it is missing; without it these tests fail, never skip.

- ``redis_server`` (session): one server shared by the tests that do not stop it;
  each test isolates itself with its own ``key_prefix``.
- ``own_redis`` (function): a server of the test's own, for outage tests that stop and
  restart it.
- ``make_limit`` (parametrized over ``BACKENDS``): the same contract test runs on the
  in-process and the Redis limiter.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastmcp.utilities.tests import find_available_port
from fastmcp_guard import RateLimit

#: Every rate-limit backend, each with its mark (limits' ``tests/utils.py`` pattern).
BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=[pytest.mark.fleet, pytest.mark.redis]),
]


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1; ``stop`` / ``start`` keep the port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server not found: scripts/test.sh installs it "
                "(apt-get install redis-server); run the tests through `make test`"
            )
        self.binary = binary
        self.workdir = workdir
        self.port = find_available_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def start(self) -> None:
        """Start the server and wait until it answers ``PING`` (fails loudly with its log)."""
        assert self.proc is None, "already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                 "--daemonize", "no", "--loglevel", "warning"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.005)  # polling readiness: there is no event to wait on

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then wait): the port refuses connections afterwards."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis server for this test alone (it may stop and restart it)."""
    server = RedisServer(tmp_path_factory.mktemp("own-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def key_prefix() -> str:
    """A key prefix of this test's own, so tests sharing one Redis never meet."""
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_limit(
    backend: str, request: pytest.FixtureRequest, key_prefix: str
) -> Iterator[Callable[..., RateLimit]]:
    """``make_limit(per_key, global_limit, **options)``: a RateLimit on this test's backend."""
    made: list[RateLimit] = []

    def factory(
        per_key: str | None = None, global_limit: str | None = None, **options: Any
    ) -> RateLimit:
        if backend == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            options = {"url": server.url, "key_prefix": key_prefix, **options}
            limit = RateLimit(per_key, global_limit, backend="redis", **options)
        else:
            limit = RateLimit(per_key, global_limit, **options)
        made.append(limit)
        return limit

    yield factory
    for limit in made:
        limit.close()


#: A realistic start time (ns since the Unix epoch), with a sub-second part.
T0 = 1_732_500_000_123_456_789
SEC = 1_000_000_000


class Clocked:
    """One limiter driven at explicit times: the core's ``check_at`` / ``status_at``, or
    the Redis script with ``now_ns`` in place of Redis's clock. Same inputs, same answers."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit

    def check(self, key: str, tool: str | None, now: int) -> tuple[str, str, float, float] | None:
        """``None`` (admitted) or ``(scope, limit, retry_after, reset_after)``."""
        remote = self.limit.remote
        if remote is None:
            r: Any = self.limit.core.check_at(key, tool, now)
        else:
            r = remote.check(key, tool, now_ns=now)
        return None if r is None else (r.scope, r.limit, r.retry_after, r.reset_after)

    def status(self, key: str, now: int) -> dict[str, Any]:
        remote = self.limit.remote
        if remote is None:
            return self.limit.core.status_at(key, now)
        return remote.status(key, now_ns=now)
