"""Tokens an attacker can make: a real (public) key id with a wrong secret.

The checksum is valid, so each one reaches the store and the hash: what a guess costs.
"""

from __future__ import annotations

from tests.integration.test_http_more import with_checksum

#: Length of a token's secret part and of its checksum (the token format).
_SECRET, _CHECK = 43, 6


def wrong_secret(token: str, n: int = 0) -> str:
    """``token``'s key id with the ``n``-th wrong secret (distinct ``n``: distinct tokens)."""
    return with_checksum(token[: -_CHECK - _SECRET] + str(n).rjust(_SECRET, "A"))


def unknown_key_token(n: int) -> str:
    """A well-formed token of a key id no store holds (distinct ``n``: distinct ids)."""
    kid = f"{n:x}".rjust(16, "0")[-16:].replace("0", "Z")
    return with_checksum(f"fmg_sk_{kid}_" + "B" * _SECRET)
