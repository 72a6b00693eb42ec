"""``keys create --credits/--refill/--shadow``, ``keys credits``, and what inspect shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_cli_keys import assert_user_error, cli, create, ok


def test_create_with_credits_and_inspect_them(tmp_path: Path) -> None:
    key = create(tmp_path, "--name", "agent", "--credits", "5000", "--refill", "5000/month")
    assert (key["credits"], key["refill"], key["credits_shadow"]) == (5000, "5000/month", False)
    assert key["refill_at"].endswith("Z") or "+00:00" in key["refill_at"]
    text = ok(tmp_path, "keys", "inspect", key["id"]).stdout
    assert "credits:" in text and "5000" in text and "5000/month" in text
    assert "next refill:" in text
    listed = json.loads(ok(tmp_path, "keys", "list", "--json").stdout)
    assert listed[0]["credits"] == 5000
    shadow = create(tmp_path, "--name", "s", "--refill", "10/day", "--shadow")
    assert (shadow["credits"], shadow["credits_shadow"]) == (10, True)
    assert "would_refuse" in ok(tmp_path, "keys", "inspect", shadow["id"]).stdout


def test_keys_credits_set_and_add_print_the_new_balance(tmp_path: Path) -> None:
    key = create(tmp_path, "--name", "agent", "--credits", "100")
    out = ok(tmp_path, "keys", "credits", key["id"], "--add", "-30").stdout
    assert out.splitlines()[0] == f"Credits of key {key['id']} (agent): 70"
    out = ok(tmp_path, "keys", "credits", key["id"], "--set", "5", "--json").stdout
    assert json.loads(out)["credits"] == 5
    out = ok(tmp_path, "keys", "credits", key["id"], "--add", "-50").stdout
    assert out.splitlines()[0].endswith(": 0"), "the balance stops at 0"
    plain = create(tmp_path, "--name", "plain")
    assert plain["credits"] is None
    ok(tmp_path, "keys", "credits", plain["id"], "--set", "9")
    assert json.loads(ok(tmp_path, "keys", "inspect", plain["id"], "--json").stdout)[
        "credits"] == 9  # fmt: skip


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--credits", "-1"), ("-1 is negative",)),
        (("--credits", "lots"), ("--credits", "whole number")),
        (("--credits", "9007199254740993"), ("2**53",)),
        (("--refill", "5/fortnight"), ("N/day", "N/month")),
        (("--refill", "0/day"), ("N/day",)),
        (("--refill=-1/day",), ("N/day",)),
        (("--refill", "5/week"), ("N/day",)),
        (("--shadow",), ("--credits or --refill",)),
    ],
)
def test_bad_credits_on_create_exit_2_with_the_reason(
    tmp_path: Path, args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    assert_user_error(cli(tmp_path, "keys", "create", "--name", "x", *args), 2, *needles)
    assert not (tmp_path / "fastmcp-guard-keys.db").exists(), "checked before the store opens"


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ((), ("exactly one of --set N or --add N",)),
        (("--set", "1", "--add", "1"), ("exactly one",)),
        (("--set", "-3"), ("negative",)),
        (("--add", "x"), ("--add", "whole number")),
    ],
)
def test_keys_credits_needs_exactly_one_whole_number(
    tmp_path: Path, args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    key = create(tmp_path, "--name", "agent", "--credits", "10")
    assert_user_error(cli(tmp_path, "keys", "credits", key["id"], *args), 2, *needles)
    assert json.loads(ok(tmp_path, "keys", "inspect", key["id"], "--json").stdout)[
        "credits"] == 10  # fmt: skip


def test_credit_output_never_shows_hashes_or_tokens(tmp_path: Path) -> None:
    key = create(tmp_path, "--name", "agent", "--credits", "10", "--refill", "10/day")
    outputs = [
        ok(tmp_path, "keys", "credits", key["id"], "--add", "1").stdout,
        ok(tmp_path, "keys", "credits", key["id"], "--set", "3", "--json").stdout,
        ok(tmp_path, "keys", "inspect", key["id"]).stdout,
        ok(tmp_path, "keys", "inspect", key["id"], "--json").stdout,
        ok(tmp_path, "keys", "list", "--json").stdout,
    ]
    secret = key["token"][len("fmg_sk_") + 16:]
    for out in outputs:
        assert "argon2" not in out and "phc" not in out and secret not in out, out
