"""One benchmark server process: ``python benches/_server.py KIND --port P --dir D``.

KIND is one of

- ``bare``:   FastMCP, no auth;
- ``static``: FastMCP + ``StaticTokenVerifier`` (a dict lookup) -- the baseline;
- ``guard``:  FastMCP + ``Guard`` with a SQLite key store (one key, created here:
  argon2id once), ``RateLimit(per_key, global_limit)`` set high, an ``IPPolicy``
  (allow 127.0.0.0/8 + 2 others, deny 1) and a JSONL audit log;
- ``guard-keys``: the guard with keys only (no limits, IP policy or audit), and
  ``guard-noaudit``: keys + limits + IP policy, no audit log (both for the breakdown).

The token to call with is written to ``D/token`` before the server listens. The
server runs uvicorn through ``mcp.run(transport="http")`` with access logs off.

``--profile cprofile|pyinstrument`` arms a profiler on the event-loop thread
between SIGUSR1 (start) and SIGUSR2 (stop and write ``D/profile.*``), so the
parent profiles only the measured calls. On SIGTERM the guard prints its
counters (``keys.core.stats()``, ``audit.stats()``) to stderr as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

STATIC_TOKEN = "static-bench-token-6f1d0c3b9a8e4f27b5c1d2e3f4a5b6c7"
IP_ALLOW = ["127.0.0.0/8", "10.0.0.0/8", "192.168.0.0/16"]
IP_DENY = ["10.99.0.0/16"]
HIGH_PER_KEY = "100000000/minute"
HIGH_GLOBAL = "1000000000/minute"


def build(kind: str, d: Path) -> tuple[Any, dict[str, Any]]:
    from fastmcp import FastMCP

    extras: dict[str, Any] = {}
    if kind == "static":
        from fastmcp.server.auth.providers.jwt import StaticTokenVerifier

        auth = StaticTokenVerifier(
            tokens={STATIC_TOKEN: {"client_id": "alice", "scopes": ["read:data"]}}
        )
        mcp = FastMCP("bench", auth=auth)
        (d / "token").write_text(STATIC_TOKEN)
    else:
        mcp = FastMCP("bench")

    @mcp.tool
    def echo(text: str) -> str:
        return text

    if kind == "bare":
        (d / "token").write_text("")
    elif kind in ("guard", "guard-keys", "guard-noaudit"):
        from fastmcp_guard import AuditLog, FileBackend, Guard, IPPolicy, KeyStore, RateLimit

        keys = KeyStore(backend="sqlite", path=str(d / "keys.db"))
        if kind == "guard":
            guard = Guard(
                mcp,
                keys=keys,
                rate_limit=RateLimit(per_key=HIGH_PER_KEY, global_limit=HIGH_GLOBAL),
                ip=IPPolicy(allow=IP_ALLOW, deny=IP_DENY),
                audit=AuditLog(backend=FileBackend(str(d / "audit.jsonl"))),
            )
        elif kind == "guard-noaudit":
            guard = Guard(
                mcp,
                keys=keys,
                rate_limit=RateLimit(per_key=HIGH_PER_KEY, global_limit=HIGH_GLOBAL),
                ip=IPPolicy(allow=IP_ALLOW, deny=IP_DENY),
            )
        else:
            guard = Guard(mcp, keys=keys)
        key = guard.keys.create(name="alice", scopes=["read:data"], metadata={"team": "data"})
        (d / "token").write_text(key.token or "")
        extras["guard"] = guard
    elif kind != "static":
        raise SystemExit(f"unknown server kind {kind!r}")
    return mcp, extras


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--profile", choices=["cprofile", "pyinstrument"], default=None)
    args = ap.parse_args(argv)

    mcp, extras = build(args.kind, args.dir)

    if args.profile:
        _arm_profiler(args.profile, args.dir)

    guard = extras.get("guard")

    def on_term(signum: int, frame: Any) -> None:
        if guard is not None:
            guard.close()
            try:  # another build (bench_guard.py --against) may name its counters otherwise
                stats = {"keys": dict(guard.keys.core.stats())}
                if guard.audit is not None:
                    stats["audit"] = dict(guard.audit.stats())
            except Exception as exc:  # noqa: BLE001 - reported in place of the counters
                stats = {"error": f"{type(exc).__name__}: {exc}"}
            print("GUARD_STATS " + json.dumps(stats), file=sys.stderr, flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    mcp.run(
        transport="http",
        host="127.0.0.1",
        port=args.port,
        show_banner=False,
        log_level="warning",
        uvicorn_config={"access_log": False},
    )
    return 0


def _arm_profiler(which: str, d: Path) -> None:
    state: dict[str, Any] = {}

    def start(signum: int, frame: Any) -> None:
        if which == "cprofile":
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        else:
            from pyinstrument import Profiler

            prof = Profiler(interval=0.0002, async_mode="disabled")
            prof.start()
        state["p"] = prof

    def stop(signum: int, frame: Any) -> None:
        prof = state.pop("p", None)
        if prof is None:
            return
        if which == "cprofile":
            prof.disable()
            prof.dump_stats(str(d / "profile.cprof"))
        else:
            prof.stop()
            (d / "profile.txt").write_text(
                prof.output_text(unicode=False, color=False, show_all=False)
            )
            from pyinstrument.renderers import JSONRenderer

            (d / "profile.json").write_text(prof.output(JSONRenderer()))
        (d / "profile.done").write_text("1")

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


if __name__ == "__main__":
    sys.exit(main())
