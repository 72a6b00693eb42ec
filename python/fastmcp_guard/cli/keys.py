"""``fastmcp-guard keys create|list|inspect|credits|rotate|revoke``.

The key store is the one the configuration names (``--db`` / ``--keys`` /
``FASTMCP_GUARD_KEYS`` / config file / ``fastmcp-guard-keys.db``). Management actions
write a lifecycle event (``created`` / ``rotated`` / ``revoked``, with the actor) to
the configured audit log, the same file the server writes. A key may be named by its
id (``fmg_key_...``) or by its token's public part (``fmg_sk_<id>``, or the whole
token); a whole token is never printed back.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from fastmcp_guard.cli._common import (
    UsageError,
    add_command,
    add_group,
    attach_audit,
    cli_config,
    parse_duration,
    store_exists,
    want_json,
)
from fastmcp_guard.cli._output import human_time, iso, print_json, print_table, say, warn

if TYPE_CHECKING:
    from fastmcp_guard.config import GuardConfig
    from fastmcp_guard.keys import ApiKey, KeyStore

__all__ = ["register"]

_SHOWN_ONCE = "this token is shown only once; it will not be shown again, so store it now"

_EPILOG = """\
examples:
  fastmcp-guard keys create --name alice --scopes read:data,write:data --expires 90d
  fastmcp-guard keys list --all
  fastmcp-guard keys inspect fmg_key_3kQ...
  fastmcp-guard keys rotate fmg_key_3kQ... --grace 24h
  fastmcp-guard keys revoke fmg_key_3kQ... --force
  fastmcp-guard keys create --name agent --credits 5000 --refill 5000/month
  fastmcp-guard keys credits fmg_key_3kQ... --add 1000
  fastmcp-guard --db keys.db keys list --json

A key is named by its id (fmg_key_...) or its token's public part (fmg_sk_<id>).
"""


def register(subparsers: Any) -> None:
    """Add the ``keys`` command group."""
    _, commands = add_group(subparsers, "keys", epilog=_EPILOG,
                            help="create, list, inspect, rotate and revoke API keys")  # fmt: skip

    actor = argparse.ArgumentParser(add_help=False)
    actor.add_argument("--actor", metavar="NAME",
                       help="who is acting, for the audit log (default: the OS user)")  # fmt: skip

    create = add_command(
        commands, "create", help="issue a key; its token is printed once", parents=[actor],
        epilog="examples:\n"
        "  fastmcp-guard keys create --name alice --scopes read:data,write:data\n"
        "  fastmcp-guard keys create -n ci-bot -s deploy --expires 30d --meta team=infra\n"
        "  fastmcp-guard keys create -n tmp --expires 12h --json\n\n"
        "--expires: a bare number is days (as in fastmcp-guard 0.2); units s, m, h, d, w.",
    )  # fmt: skip
    create.add_argument("--name", "-n", required=True, help="a label such as alice or ci-bot")
    create.add_argument("--scopes", "-s", default="", metavar="A,B",
                        help="comma-separated scopes granted")  # fmt: skip
    create.add_argument("--expires", metavar="DURATION",
                        help="expire after 30d, 12h, 90 (days)... (default: never)")  # fmt: skip
    create.add_argument("--meta", action="extend", nargs="+", default=[], metavar="K=V",
                        help="metadata shown in audit records (repeatable)")  # fmt: skip
    create.add_argument("--credits", metavar="N",
                        help="a balance calls spend (0 to 2**53; default: unlimited)")  # fmt: skip
    create.add_argument("--refill", metavar="N/PERIOD",
                        help="top up to N every day (N/day, 00:00 UTC) or month (N/month, "
                        "the 1st); without --credits the key starts full")  # fmt: skip
    create.add_argument("--shadow", action="store_true",
                        help="running out of credits is audited as would_refuse, not refused")  # fmt: skip
    create.set_defaults(func=_create)

    credits = add_command(
        commands, "credits", help="set or add to a key's credits; prints the new balance",
        epilog="examples:\n  fastmcp-guard keys credits fmg_key_3kQ... --set 5000\n"
        "  fastmcp-guard keys credits fmg_key_3kQ... --add -100   # stops at 0\n\n"
        "Server processes may still spend the credits they already leased (at most 256\n"
        "per process); after --set those leases are not given back.",
    )  # fmt: skip
    credits.add_argument("key", help="key id (fmg_key_...) or token public part (fmg_sk_...)")
    credits.add_argument("--set", dest="set_to", metavar="N",
                         help="the balance becomes N (a key without credits gets them)")  # fmt: skip
    credits.add_argument("--add", metavar="N",
                         help="add N to the balance (negative: take away; stops at 0)")  # fmt: skip
    credits.set_defaults(func=_credits)

    lst = add_command(
        commands, "list", help="list keys, oldest first",
        epilog="examples:\n  fastmcp-guard keys list\n  fastmcp-guard keys list --all --json",
    )  # fmt: skip
    lst.add_argument("--all", action="store_true", help="include revoked keys")
    lst.set_defaults(func=_list)

    inspect = add_command(
        commands, "inspect", help="show one key (never its token)",
        epilog="examples:\n  fastmcp-guard keys inspect fmg_key_3kQ...\n"
        "  fastmcp-guard keys inspect fmg_sk_3kQ... --json",
    )  # fmt: skip
    inspect.add_argument("key", help="key id (fmg_key_...) or token public part (fmg_sk_...)")
    inspect.set_defaults(func=_inspect)

    rotate = add_command(
        commands, "rotate", help="issue a replacement key; the old token works for a grace period",
        parents=[actor],
        epilog="examples:\n  fastmcp-guard keys rotate fmg_key_3kQ...            # 24 h grace\n"
        "  fastmcp-guard keys rotate fmg_key_3kQ... --grace 0  # old token refused at once\n\n"
        "--grace: a bare number is hours (as in fastmcp-guard 0.2); units s, m, h, d, w.",
    )  # fmt: skip
    rotate.add_argument("key", help="key id (fmg_key_...) or token public part (fmg_sk_...)")
    rotate.add_argument("--grace", default="24", metavar="DURATION",
                        help="how long the old token stays valid (default 24h; 0: none)")  # fmt: skip
    rotate.set_defaults(func=_rotate)

    revoke = add_command(
        commands, "revoke", help="revoke a key: refused from the next request on",
        parents=[actor],
        epilog="examples:\n  fastmcp-guard keys revoke fmg_key_3kQ...          # asks first\n"
        "  fastmcp-guard keys revoke fmg_key_3kQ... --force  # scripts (no terminal)",
    )  # fmt: skip
    revoke.add_argument("key", help="key id (fmg_key_...) or token public part (fmg_sk_...)")
    revoke.add_argument("--force", "-f", action="store_true", help="do not ask for confirmation")
    revoke.set_defaults(func=_revoke)


# -- commands ------------------------------------------------------------------------


def _create(args: argparse.Namespace) -> int:
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    expires_days = None
    if args.expires is not None:
        seconds = parse_duration(args.expires, bare_unit="day", option="--expires",
                                 allow_zero=False)  # fmt: skip
        expires_days = seconds / 86400.0
    metadata = _parse_meta(args.meta)
    credits = None if args.credits is None else _whole(args.credits, "--credits")
    if args.shadow and credits is None and args.refill is None:
        raise UsageError("argument --shadow: give --credits or --refill too (shadow applies "
                         "to a key's credits)")  # fmt: skip
    if args.refill is not None:
        from fastmcp_guard._core import parse_refill

        parse_refill(args.refill)  # before the store is opened: exit 2 with the forms
    config = cli_config(args)
    with ExitStack() as stack:
        store = _open_store(config, stack, audited=True, create=True)
        key = store.create(args.name, scopes=scopes, expires_in_days=expires_days,
                           metadata=metadata or None, actor=args.actor, credits=credits,
                           refill=args.refill, credits_shadow=args.shadow)  # fmt: skip
    if want_json(args):
        print_json({**_key_dict(key), "token": key.token})
        warn(_SHOWN_ONCE)
        return 0
    say(f"Created key {key.id} ({key.name})")
    _print_fields(key, ("scopes", "expires", "metadata", "credits", "refill", "next refill"))
    say()
    say(f"Token ({_SHOWN_ONCE}):")
    say(str(key.token))
    return 0


def _list(args: argparse.Namespace) -> int:
    config = cli_config(args)
    keys: list[ApiKey] = []
    if store_exists(config):  # reading never creates a store
        with ExitStack() as stack:
            store = _open_store(config, stack, audited=False)
            keys = store.list(include_revoked=args.all)
    if want_json(args):
        print_json([_key_dict(k) for k in keys])
        return 0
    if not keys:
        if not store_exists(config):
            say(f"No keys (no key store at {config.keys.path} yet).")
        else:
            say("No keys." if args.all else "No active keys (--all shows revoked ones).")
        return 0
    colours = {"active": "green", "rotating": "yellow", "revoked": "red"}
    rows, styles = [], []
    for k in keys:
        status = _status(k)
        rows.append([k.id, k.name, ", ".join(k.scopes) or "-", status,
                     human_time(k.created_at), human_time(k.last_used_at),
                     human_time(k.expires_at)])  # fmt: skip
        colour = "red" if k.is_expired else colours.get(k.status)
        styles.append([None, None, None, colour, None, None, None])
    print_table(["ID", "Name", "Scopes", "Status", "Created", "Last used", "Expires"], rows,
                title=f"API keys in {config.keys.masked()}", styles=styles,
                no_wrap=("ID",))  # fmt: skip
    return 0


def _inspect(args: argparse.Namespace) -> int:
    config = cli_config(args)
    with ExitStack() as stack:
        store = _open_store(config, stack, audited=False, ref=args.key)
        key = _resolve(store, args.key, config)
    if want_json(args):
        print_json(_key_dict(key))
        return 0
    say(f"Key {key.id} ({key.name})")
    _print_fields(key, ("status", "scopes", "created", "expires", "last used", "last used ip",
                        "grace until", "rotated from", "rotated to", "revoked", "metadata",
                        "credits", "refill", "next refill", "shadow"))  # fmt: skip
    return 0


def _credits(args: argparse.Namespace) -> int:
    if (args.set_to is None) == (args.add is None):
        raise UsageError("give exactly one of --set N or --add N", prog="keys credits")
    if args.set_to is not None:
        amount = _whole(args.set_to, "--set")
    else:
        amount = _whole(args.add, "--add", negative=True)
    config = cli_config(args)
    with ExitStack() as stack:
        store = _open_store(config, stack, audited=False, ref=args.key)
        key = _resolve(store, args.key, config)
        if args.set_to is not None:
            key = store.set_credits(key.id, amount)
        else:
            key = store.add_credits(key.id, amount)
    if want_json(args):
        print_json(_key_dict(key))
        return 0
    say(f"Credits of key {key.id} ({key.name}): {key.credits}")
    _print_fields(key, ("refill", "next refill", "shadow"))
    return 0


def _whole(text: str, option: str, *, negative: bool = False) -> int:
    """A whole number given on the command line (exit 2 naming the option otherwise)."""
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        raise UsageError(f"argument {option}: expected a whole number, got {text!r}") from None
    if value < 0 and not negative:
        raise UsageError(f"argument {option}: {value} is negative; give 0 to 2**53")
    if abs(value) > 2**53:
        raise UsageError(f"argument {option}: {value} is above the largest balance, 2**53")
    return value


def _rotate(args: argparse.Namespace) -> int:
    grace_seconds = parse_duration(args.grace, bare_unit="hour", option="--grace",
                                   allow_zero=True)  # fmt: skip
    config = cli_config(args)
    with ExitStack() as stack:
        store = _open_store(config, stack, audited=False, ref=args.key)
        old = _resolve(store, args.key, config)
        attach_audit(store, config, stack)
        new = store.rotate(old.id, grace_period_hours=grace_seconds / 3600.0, actor=args.actor)
        old = store.inspect(old.id)
    if want_json(args):
        print_json({**_key_dict(new), "token": new.token, "old": _key_dict(old)})
        warn(_SHOWN_ONCE)
        return 0
    say(f"Rotated key {old.id} ({old.name}): the new key is {new.id}")
    if old.status == "revoked":
        old_token = "revoked now (no grace period)"
    else:
        old_token = f"still valid until {human_time(old.grace_until)} (grace period)"
    _print_fields(new, ("old token", "scopes", "expires"), {"old token": old_token})
    say()
    say(f"Token of the new key ({_SHOWN_ONCE}):")
    say(str(new.token))
    return 0


def _revoke(args: argparse.Namespace) -> int:
    config = cli_config(args)
    with ExitStack() as stack:
        store = _open_store(config, stack, audited=False, ref=args.key)
        key = _resolve(store, args.key, config)
        already = key.status == "revoked"
        if already and key.rotated_from:
            # Revoked before predecessors were revoked with it: finish the job.
            attach_audit(store, config, stack)
            key = store.revoke(key.id, actor=args.actor)
        if already:
            if want_json(args):
                print_json(_revoke_dict(key))
            else:
                say(f"Key {key.id} ({key.name}) is already revoked.")
                _say_predecessors(key)
            return 0
        if not args.force:
            if not sys.stdin.isatty():
                raise UsageError(
                    f"not revoking {key.id} without confirmation: stdin is not a terminal; "
                    "pass --force to revoke without asking"
                )
            sys.stderr.write(f"Revoke key {key.id} ({key.name})? It cannot be undone. [y/N] ")
            sys.stderr.flush()
            answer = sys.stdin.readline().strip().lower()
            if answer not in ("y", "yes"):
                sys.stderr.write("Not revoked.\n")
                return 1
        attach_audit(store, config, stack)
        key = store.revoke(key.id, actor=args.actor)
    if want_json(args):
        print_json(_revoke_dict(key))
    else:
        say(f"Revoked key {key.id} ({key.name}): its token is refused from the next request on.")
        _say_predecessors(key)
    return 0


def _revoke_dict(key: ApiKey) -> dict[str, Any]:
    return {**_key_dict(key), "revoked_predecessors": list(key.revoked_predecessors)}


def _say_predecessors(key: ApiKey) -> None:
    """Name the keys revoked with ``key`` (its predecessors still in their grace period)."""
    if key.revoked_predecessors:
        n = len(key.revoked_predecessors)
        which = ("the key it replaced, still in its" if n == 1
                 else f"the {n} keys it replaced, still in their")  # fmt: skip
        say(f"Also revoked {which} rotation grace period: {', '.join(key.revoked_predecessors)}")


# -- helpers -------------------------------------------------------------------------


def _open_store(
    config: GuardConfig,
    stack: ExitStack,
    *,
    audited: bool,
    create: bool = False,
    ref: str | None = None,
) -> KeyStore:
    """The configured key store (closed by ``stack``), with the audit log if ``audited``.

    Unless ``create``, a missing SQLite file is not created: key ``ref`` cannot be there.
    """
    if not create and not store_exists(config):
        from fastmcp_guard._core import token_key_id
        from fastmcp_guard.errors import KeyNotFoundError

        what = "no key" if ref is None else f"no key {_safe_ref(ref, token_key_id(ref.strip()))}"
        raise KeyNotFoundError(
            f"{what}: there is no key store at {config.keys.path} yet (create a key first, "
            "or name the store with --db / --keys / FASTMCP_GUARD_KEYS)"
        )
    store = config.key_store()
    stack.callback(store.close)
    if audited:
        attach_audit(store, config, stack)
    return store


def _resolve(store: KeyStore, ref: str, config: GuardConfig) -> ApiKey:
    """The key named by an id, a token's public part or a whole token."""
    from fastmcp_guard._core import token_key_id
    from fastmcp_guard.errors import KeyNotFoundError

    key_id = token_key_id(ref.strip())
    key = store.get(key_id or ref.strip())
    if key is None:
        raise KeyNotFoundError(
            f"no key {_safe_ref(ref, key_id)} in {config.keys.masked()}; "
            "list keys with `fastmcp-guard keys list --all`"
        )
    return key


def _safe_ref(ref: str, key_id: str | None) -> str:
    """How to name ``ref`` in a message without echoing a token's secret."""
    if key_id is not None:
        return key_id
    ref = ref.strip()
    if ref.startswith("fmg_sk_"):  # a token we could not parse (e.g. 0.2's fmg_sk_<sel>.<secret>)
        return ref.split(".", 1)[0][:23] + "..."
    return repr(ref[:64])


def _parse_meta(items: list[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"argument --meta: expected KEY=VALUE, got {item!r}")
        meta[name.strip()] = value
    return meta


def _status(key: ApiKey) -> str:
    if key.status != "revoked" and key.is_expired:
        return f"{key.status} (expired)"
    return key.status


def _key_dict(key: ApiKey) -> dict[str, Any]:
    """The key as JSON (never its token)."""
    return {
        "id": key.id,
        "name": key.name,
        "scopes": list(key.scopes),
        "metadata": dict(key.metadata),
        "status": key.status,
        "expired": key.is_expired,
        "created_at": iso(key.created_at),
        "expires_at": iso(key.expires_at),
        "last_used_at": iso(key.last_used_at),
        "last_used_ip": key.last_used_ip,
        "grace_until": iso(key.grace_until),
        "rotated_from": key.rotated_from,
        "rotated_to": key.rotated_to,
        "revoked_at": iso(key.revoked_at),
        "credits": key.credits,
        "refill": key.refill,
        "refill_at": iso(key.refill_at),
        "credits_shadow": key.credits_shadow,
    }


_SHADOW_TEXT = "yes (running out is audited as would_refuse, not refused)"


def _credits_text(key: ApiKey) -> str | None:
    if key.credits is None:
        return None
    if key.credits_base and key.credits_base != key.credits:
        return f"{key.credits} of {key.credits_base}"
    return str(key.credits)


def _print_fields(
    key: ApiKey, fields: tuple[str, ...], extra: dict[str, str] | None = None
) -> None:
    """Aligned ``  name: value`` lines for ``fields`` (those without a value are left out)."""
    values: dict[str, str | None] = {
        **(extra or {}),
        "status": _status(key),
        "scopes": ", ".join(key.scopes) or "(none)",
        "created": human_time(key.created_at),
        "expires": human_time(key.expires_at),
        "last used": human_time(key.last_used_at),
        "last used ip": key.last_used_ip,
        "grace until": human_time(key.grace_until, none="") or None,
        "rotated from": key.rotated_from,
        "rotated to": key.rotated_to,
        "revoked": human_time(key.revoked_at, none="") or None,
        "metadata": ", ".join(f"{k}={v}" for k, v in key.metadata.items()) or None,
        "credits": _credits_text(key),
        "refill": key.refill,
        "next refill": human_time(key.refill_at, none="") or None,
        "shadow": _SHADOW_TEXT if key.credits_shadow else None,
    }
    width = max(len(f) for f in fields) + 1
    for name in fields:
        value = values[name]
        if value is not None:
            say(f"  {name + ':':<{width}} {value}")
