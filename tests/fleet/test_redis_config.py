"""The shared limiter from the configuration: ``rate_backend``, ``rate_url``,
``rate_on_backend_error`` (``FASTMCP_GUARD_RATE_*``, config files, ``Guard(mcp)``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client, FastMCP
from fastmcp_guard import Guard
from fastmcp_guard.config import GuardConfig, InvalidSettingError

from tests.fleet.conftest import RedisServer


def load(tmp_path: Path, env: dict[str, str]) -> GuardConfig:
    return GuardConfig.load(env=env, cwd=tmp_path)


def test_the_default_is_the_in_process_limiter(tmp_path: Path) -> None:
    config = load(tmp_path, {})
    assert (config.rate_backend, config.rate_url, config.rate_on_backend_error) == (
        "memory", None, "allow")  # fmt: skip
    assert config.rate_limit().is_local


def test_the_environment_selects_redis_and_masks_its_password(tmp_path: Path) -> None:
    env = {"FASTMCP_GUARD_RATE_BACKEND": "Redis", "FASTMCP_GUARD_RATE": "10/minute",
           "FASTMCP_GUARD_RATE_URL": "redis://:s3cr3t@cache.internal:6380/2",
           "FASTMCP_GUARD_RATE_ON_BACKEND_ERROR": "local"}  # fmt: skip
    config = load(tmp_path, env)
    assert config.rate_backend == "redis" and config.rate_on_backend_error == "local"
    assert config.rate_url == "redis://:s3cr3t@cache.internal:6380/2"
    assert config.source("rate_url") == "env FASTMCP_GUARD_RATE_URL"
    shown = [json.dumps(config.to_dict()), repr(config),
             " ".join(v.display for v in config.views())]  # fmt: skip
    for text in shown:
        assert "s3cr3t" not in text
    assert (
        config.to_dict()["settings"]["rate_url"]["value"] == "redis://:****@cache.internal:6380/2"
    )
    limit = config.rate_limit()
    assert not limit.is_local and limit.url == "redis://:s3cr3t@cache.internal:6380/2"
    assert limit.remote is not None and limit.remote.on_backend_error == "local"
    assert "s3cr3t" not in repr(limit)


def test_a_config_file_selects_redis(tmp_path: Path) -> None:
    (tmp_path / "fastmcp-guard.toml").write_text(
        'rate = "5/minute"\nrate_backend = "redis"\nrate_url = "rediss://cache:6380/0"\n'
        'rate_on_backend_error = "deny"\n'
    )
    config = load(tmp_path, {})
    assert (config.rate_backend, config.rate_url, config.rate_on_backend_error) == (
        "redis", "rediss://cache:6380/0", "deny")  # fmt: skip
    assert config.source("rate_backend") == "fastmcp-guard.toml"


def test_redis_without_a_url_uses_the_local_default(tmp_path: Path) -> None:
    limit = load(tmp_path, {"FASTMCP_GUARD_RATE_BACKEND": "redis"}).rate_limit()
    assert limit.url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("env", "setting", "needle"),
    [
        ({"FASTMCP_GUARD_RATE_BACKEND": "memcached"}, "rate_backend", "'memory' (limits per"),
        (
            {"FASTMCP_GUARD_RATE_BACKEND": "redis", "FASTMCP_GUARD_RATE_URL": "http://x:1"},
            "rate_url",
            "not a Redis URL",
        ),
        (
            {"FASTMCP_GUARD_RATE_BACKEND": "redis", "FASTMCP_GUARD_RATE_URL": "redis://:pw@h:x/0"},
            "rate_url",
            "redis://:****@h:x/0",
        ),
        (
            {"FASTMCP_GUARD_RATE_BACKEND": "redis", "FASTMCP_GUARD_RATE_URL": "redis:///0"},
            "rate_url",
            "names no host",
        ),
        (
            {"FASTMCP_GUARD_RATE_ON_BACKEND_ERROR": "ignore"},
            "rate_on_backend_error",
            "'allow', 'deny' or 'local'",
        ),
        (
            {"FASTMCP_GUARD_RATE_URL": "redis://h:6379/0"},
            "rate_url",
            "set rate_backend to redis (FASTMCP_GUARD_RATE_BACKEND=redis)",
        ),
    ],
)
def test_bad_values_say_what_to_fix(
    tmp_path: Path, env: dict[str, str], setting: str, needle: str
) -> None:
    with pytest.raises(InvalidSettingError, match=setting) as info:
        load(tmp_path, env)
    assert info.value.setting == setting and needle in str(info.value)
    assert ":pw@" not in str(info.value)


@pytest.mark.fleet
@pytest.mark.redis
async def test_guard_from_the_environment_limits_in_redis(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTMCP_GUARD_RATE_BACKEND", "redis")
    monkeypatch.setenv("FASTMCP_GUARD_RATE_URL", redis_server.url)
    monkeypatch.setenv("FASTMCP_GUARD_RATE", "2/hour")
    mcp: FastMCP[Any] = FastMCP("env")

    @mcp.tool
    def echo(text: str) -> str:
        return text

    guard = Guard(mcp)
    assert not guard.rate_limit.is_local
    local = (await guard.local_caller()).rate_key  # local:<os user>: no FASTMCP_GUARD_KEY
    await guard.rate_limit.reset_async(local)
    async with Client(mcp) as client:
        for _ in range(2):
            assert (await client.call_tool("echo", {"text": "x"})).data == "x"
        refused = await client.call_tool("echo", {"text": "x"}, raise_on_error=False)
        assert refused.is_error and "per-key limit 2/hour" in refused.content[0].text
    status = await guard.rate_limit.status_async(local)
    assert status["per_key"]["used"] == 2
    await guard.rate_limit.reset_async(local)
    guard.close()
