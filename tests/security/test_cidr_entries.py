"""A CIDR with host bits set is refused, naming the network meant (issue 10, finding 18).

Before: ``10.0.0.1/8`` was silently taken as ``10.0.0.0/8``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastmcp_guard import IPPolicy
from fastmcp_guard.config import GuardConfig
from fastmcp_guard.errors import ConfigError, InvalidIPError


@pytest.mark.parametrize(
    ("entry", "meant"),
    [("10.0.0.1/8", "10.0.0.0/8"), ("192.168.1.77/24", "192.168.1.0/24"),
     ("2001:db8::1/32", "2001:db8::/32")],
)  # fmt: skip
@pytest.mark.parametrize("which", ["allow", "deny", "trusted_proxies"])
def test_host_bits_are_refused_naming_the_network(entry: str, meant: str, which: str) -> None:
    with pytest.raises(InvalidIPError, match="host bits") as info:
        IPPolicy(**{which: [entry]})
    assert meant in str(info.value) and which in str(info.value)


def test_the_configuration_refuses_it_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"10\.0\.0\.0/8"):
        GuardConfig.load(env={"FASTMCP_GUARD_ALLOW": "10.0.0.1/8"}, config_file=None).ip_policy()


def test_exact_networks_and_addresses_still_parse() -> None:
    policy = IPPolicy(allow=["10.0.0.0/8", "10.0.0.1", "10.0.0.1/32", "2001:db8::/32"])
    assert policy.is_allowed("10.200.3.4") and not policy.is_allowed("11.0.0.1")
