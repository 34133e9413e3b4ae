"""Identifiers: time-ordered, URL-safe message ids and random secrets."""

from __future__ import annotations

import hashlib
import os
import secrets
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_message_id() -> str:
    """A 26-character ULID-style id: 48 bits of milliseconds, then 80 random bits.

    Ids sort by creation time, which keeps the `events` index on (message_id, seq) append-mostly.
    """
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_token(prefix: str = "", nbytes: int = 24) -> str:
    return prefix + secrets.token_urlsafe(nbytes)


def new_campaign_id() -> str:
    return "cmp_" + new_message_id()


def campaign_message_id(campaign_id: str, phone: str) -> str:
    """The id of a campaign's message to `phone`: the same number in the same campaign always gets the
    same id, so an upload repeated after a lost answer creates nothing twice. The campaign id's time
    part comes first (a campaign's messages sit together in the indexes), then 80 bits of a hash."""
    digest = int.from_bytes(hashlib.sha256(f"{campaign_id}\n{phone}".encode()).digest()[:10], "big")
    suffix = []
    for _ in range(16):
        suffix.append(_CROCKFORD[digest & 31])
        digest >>= 5
    stamp = campaign_id.removeprefix("cmp_")[:10]
    return stamp + "".join(reversed(suffix))
