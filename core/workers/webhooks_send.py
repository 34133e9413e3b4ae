"""One webhook POST: resolve and check the target (SSRF guard, again at send time: a name may resolve
elsewhere now than at registration; the POST then goes to the checked address), sign, send, time it.
Never raises for the endpoint's failures: a refused address, a timeout or a connection error is an
outcome like a status code.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from core.domain.webhooks import (
    EVENT_ID_HEADER,
    MAX_URL_CHARS,
    SIGNATURE_HEADER,
    InvalidWebhookUrl,
    body_bytes,
    forbidden_addresses,
    signature,
)
from core.workers.webhooks_http import HttpClient, HttpError, Target

log = logging.getLogger(__name__)

DNS_TTL_S = 5.0


@dataclass(frozen=True)
class SendResult:
    status: int | None  # None: no HTTP answer (timeout, refused, forbidden address)
    latency_ms: float
    error: str | None = None


class AddressForbidden(Exception):
    pass


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL; InvalidWebhookUrl if it is not one a webhook can use."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidWebhookUrl(f"URL longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidWebhookUrl(f"not a URL: {e}") from e
    if parts.scheme not in ("http", "https"):
        raise InvalidWebhookUrl("the URL must start with http:// or https://")
    if not parts.hostname:
        raise InvalidWebhookUrl("the URL has no host")
    if parts.username or parts.password:
        raise InvalidWebhookUrl("credentials in the URL are not allowed: authenticate with the signature")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def check_target(url: str, allow_loopback: bool) -> list[str]:
    """The addresses `url`'s host resolves to, all allowed. Raise InvalidWebhookUrl (not usable, or
    the name does not resolve) or AddressForbidden (it resolves to a private, loopback, link-local
    or metadata address that is not allowed)."""
    host, port = split_url(url)
    try:
        addresses = await resolve(host, port)
    except OSError as e:
        raise InvalidWebhookUrl(f"host {host!r} does not resolve: {e}") from e
    bad = forbidden_addresses(addresses, allow_loopback)
    if bad:
        raise AddressForbidden(", ".join(f"{a} ({c.value})" for a, c in sorted(bad.items())))
    if not addresses:
        raise InvalidWebhookUrl(f"host {host!r} resolves to no address")
    return addresses


class HookSender:
    """POSTs signed events over pooled keep-alive connections (core/workers/webhooks_http.py), each
    to an address resolved and checked at most DNS_TTL_S ago."""

    def __init__(self, *, timeout_s: float, allow_loopback: bool) -> None:
        # Connections per target are bounded by the POSTs in flight (the dispatcher's semaphores).
        self.client = HttpClient()
        self.timeout_s = timeout_s
        self.allow_loopback = allow_loopback
        self._checked: dict[str, tuple[float, Target | None, str | None]] = {}  # url -> (until, target, refusal)

    async def close(self) -> None:
        await self.client.close()

    async def _target(self, url: str) -> tuple[Target | None, str | None]:
        """Where to send `url` now, or why not; resolved and checked again every DNS_TTL_S."""
        hit = self._checked.get(url)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1], hit[2]
        target, refusal = None, None
        try:
            addresses = await check_target(url, self.allow_loopback)
            target = Target.of(url, addresses[0])
        except (InvalidWebhookUrl, AddressForbidden) as e:
            refusal = f"webhook_url_forbidden: {e}"
        self._checked[url] = (time.monotonic() + DNS_TTL_S, target, refusal)
        return target, refusal

    async def send(self, url: str, secret: str, item: dict[str, Any], now_unix: int) -> SendResult:
        started = time.perf_counter()
        target, refusal = await self._target(url)
        if target is None:
            return SendResult(None, 0.0, refusal)
        body = body_bytes(item)
        headers = [("Content-Type", "application/json"), (SIGNATURE_HEADER, signature(secret, now_unix, body)),
                   (EVENT_ID_HEADER, item["id"]), ("User-Agent", "msgcore-webhooks/1")]
        try:
            status = await self.client.post(target, body, headers, self.timeout_s)
            return SendResult(status, (time.perf_counter() - started) * 1000)
        except (HttpError, TimeoutError) as e:
            return SendResult(None, (time.perf_counter() - started) * 1000, f"{type(e).__name__}: {e}"[:200])
