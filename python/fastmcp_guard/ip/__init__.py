"""IP policy: allow and deny lists of addresses and CIDRs, IPv4 and IPv6.

Deny wins over allow; an empty allow list admits every address not denied;
IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``) count as their IPv4 address.
Over HTTP the check runs before any token work, so a denied address costs nothing.

Behind a reverse proxy, list the proxy in ``trusted_proxies``: its
``X-Forwarded-For`` header is then honoured. Every line of it counts (joined in order,
as HTTP lists are), read right to left, skipping trusted hops; the first untrusted hop
is the client. A hop that is not an address ends the walk and is the client itself,
which any policy refuses (it is never replaced by the proxy's own address). Nobody
else's ``X-Forwarded-For`` is believed.

A CIDR with host bits set (``10.0.0.1/8``) is refused, naming the network that was
probably meant: a list entry should say exactly what it admits.

``mode="shadow"`` (setting ``ip_mode``) tries a policy without enforcing it: every
address is admitted, and each one the policy would refuse is audited as
``would_refuse`` (rule ``ip``, with the reason), aggregated per address like the
refusals themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from fastmcp_guard._core import ArgumentTypeError, IPMatcher
from fastmcp_guard.errors import ConfigError

__all__ = ["IPPolicy"]


class IPPolicy:
    """Which client addresses may call the server.

    Args:
        allow: addresses / CIDRs admitted (empty: everyone not denied).
        deny: addresses / CIDRs refused, even if also allowed.
        trusted_proxies: proxies whose ``X-Forwarded-For`` is honoured.
        mode: ``"enforce"`` (default) or ``"shadow"``: admit everyone, audit as
            ``would_refuse`` whom the policy would refuse.

    A bad entry raises :class:`~fastmcp_guard.errors.InvalidIPError` (a
    ``ValueError``) naming it.

    ```python
    policy = IPPolicy(allow=["10.0.0.0/8", "192.168.1.100"], deny=["10.99.0.0/16"])
    assert policy.is_allowed("10.0.1.5")
    assert not policy.is_allowed("10.99.0.1")
    ```
    """

    def __init__(
        self,
        allow: Sequence[str] | None = None,
        deny: Sequence[str] | None = None,
        trusted_proxies: Sequence[str] | None = None,
        *,
        mode: Literal["enforce", "shadow"] = "enforce",
    ) -> None:
        if mode not in ("enforce", "shadow"):
            raise ConfigError(f"IPPolicy(mode=...) must be 'enforce' or 'shadow', got {mode!r}")
        #: ``"enforce"`` or ``"shadow"``.
        self.mode = mode
        for name, value in (("allow", allow), ("deny", deny), ("trusted_proxies", trusted_proxies)):
            if isinstance(value, str):
                raise ArgumentTypeError(
                    f"IPPolicy({name}=...) takes a list of strings, not one string: "
                    f"write {name}=[{value!r}]"
                )
        self.allow = list(allow or [])
        self.deny = list(deny or [])
        self.trusted_proxies = list(trusted_proxies or [])
        self._core = IPMatcher(
            allow=self.allow, deny=self.deny, trusted_proxies=self.trusted_proxies
        )

    @property
    def core(self) -> IPMatcher:
        """The Rust matcher."""
        return self._core

    def is_allowed(self, ip: str) -> bool:
        """True if ``ip`` may call; ``False`` for an unparsable address."""
        return self._core.is_allowed(ip)

    def client_ip(self, peer: str, x_forwarded_for: str | None = None) -> str:
        """The caller given the TCP peer and ``X-Forwarded-For`` (every line joined with
        commas, in order): an address, or the unparsable hop itself, which the policy
        refuses."""
        return self._core.client_ip(peer, x_forwarded_for)

    def __repr__(self) -> str:
        shown = f"IPPolicy(allow={self.allow!r}, deny={self.deny!r}"
        return shown + (", mode='shadow')" if self.mode == "shadow" else ")")
