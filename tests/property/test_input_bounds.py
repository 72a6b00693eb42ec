"""Property tests over every duration, time, count and size parser of the CLI and the
configuration (issue 10, finding 13): any string either parses to a value within the
parser's bounds or raises that parser's own error (``UsageError`` /
``argparse.ArgumentTypeError`` in the CLI, ``InvalidSettingError`` naming the setting in
the configuration); never another exception."""

from __future__ import annotations

import argparse
import math

import pytest
from fastmcp_guard.cli._common import (
    MAX_DURATION_SECONDS,
    UsageError,
    bounded_int,
    parse_duration,
    parse_instant,
)
from fastmcp_guard.config import (
    MAX_FLUSH_INTERVAL_MS,
    MAX_RETENTION,
    MAX_ROTATE_BYTES,
    MIN_FLUSH_INTERVAL_MS,
    GuardConfig,
    InvalidSettingError,
)
from hypothesis import given, settings
from hypothesis import strategies as st

#: Text that looks like the inputs: numbers (huge ones too) with units, ISO times, junk.
NUMBERS = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text("0123456789", min_size=1, max_size=400),
)
UNITS = st.sampled_from(["", "s", "m", "h", "d", "w", "days", "hours", " w", "x", "ms",
                         "KB", "MiB", "GiB", "TB", "kib", " MB", "_000"])  # fmt: skip
LIKE_INPUT = st.one_of(
    st.builds(lambda n, u: f"{n}{u}", NUMBERS, UNITS),
    st.datetimes().map(lambda d: d.isoformat()),
    st.builds(lambda d, off: d.isoformat() + off, st.datetimes(),
              st.sampled_from(["Z", "+14:00", "-14:00", "+00:00", "+23:59"])),
    st.text(max_size=60),
    st.sampled_from(["off", "none", "OFF", "²", "١٢٣", "1e400", "nan", "inf", "-0", " 5 d "]),
)

OPTIONS = [
    # (option, bare unit, zero allowed): as the commands call parse_duration
    ("--expires", "day", False),
    ("--grace", "hour", True),
    ("--since", "second", True),
]


@pytest.mark.parametrize(("option", "unit", "zero"), OPTIONS)
@settings(max_examples=400)
@given(text=LIKE_INPUT)
def test_durations_parse_within_bounds_or_raise_a_usage_error(
    option: str, unit: str, zero: bool, text: str
) -> None:
    try:
        seconds = parse_duration(text, bare_unit=unit, option=option, allow_zero=zero)
    except UsageError as exc:
        assert str(exc).startswith(f"argument {option}: ") and "\n" not in str(exc)
        return
    assert math.isfinite(seconds) and 0 <= seconds <= MAX_DURATION_SECONDS
    assert zero or seconds > 0


@settings(max_examples=400)
@given(text=LIKE_INPUT)
def test_instants_parse_within_years_1_to_9999_or_raise_a_usage_error(text: str) -> None:
    try:
        stamp = parse_instant(text, option="--since", now=1.8e9)
    except UsageError as exc:
        assert str(exc).startswith("argument --since: ") and "\n" not in str(exc)
        return
    assert -62135596800.0 <= stamp <= 253402300799.0  # 0001-01-01 .. 9999-12-31


@settings(max_examples=400)
@given(text=LIKE_INPUT)
def test_counts_parse_within_bounds_or_raise_an_argument_type_error(text: str) -> None:
    parse = bounded_int(0, 2**62)
    try:
        value = parse(text)
    except argparse.ArgumentTypeError:
        return
    assert 0 <= value <= 2**62


SETTING_BOUNDS = {
    "audit_rotate_bytes": (1, MAX_ROTATE_BYTES),
    "audit_retention": (0, MAX_RETENTION),
    "audit_flush_interval_ms": (MIN_FLUSH_INTERVAL_MS, MAX_FLUSH_INTERVAL_MS),
    "port": (1, 65535),
}


@pytest.mark.parametrize("setting", sorted(SETTING_BOUNDS))
@settings(max_examples=300)
@given(text=LIKE_INPUT)
def test_numeric_settings_parse_within_bounds_or_name_the_setting(
    setting: str, text: str
) -> None:
    if "\0" in text:
        return  # an environment variable cannot hold NUL
    try:
        config = GuardConfig.load(env={f"FASTMCP_GUARD_{setting.upper()}": text}, cwd="/")
    except InvalidSettingError as exc:
        assert exc.setting == setting and f"FASTMCP_GUARD_{setting.upper()}" in exc.source
        return
    value = getattr(config, setting)
    low, high = SETTING_BOUNDS[setting]
    assert value is None or low <= value <= high
    assert value is not None or setting in ("audit_rotate_bytes", "audit_retention")


@pytest.mark.parametrize("setting", sorted(SETTING_BOUNDS))
@settings(max_examples=200)
@given(value=st.one_of(st.integers(-(10**40), 10**40), st.floats(), st.booleans(),
                       st.none(), st.lists(st.integers(), max_size=2)))  # fmt: skip
def test_numeric_settings_from_a_toml_file_take_typed_values_safely(
    setting: str, value: object
) -> None:
    try:
        config = GuardConfig.load({setting: value})
    except InvalidSettingError as exc:
        assert exc.setting == setting
        return
    got = getattr(config, setting)
    low, high = SETTING_BOUNDS[setting]
    assert got is None or low <= got <= high
