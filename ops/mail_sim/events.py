"""mail-sim posts its providers' later events back, as SendGrid's Event Webhook does: for each mail it
took, after `delay_s`, a signed JSON array of events to `url` (msgcore's `POST
/v1/providers/{route}/events`), signed with an ECDSA P-256 key (core/email_signatures.py) whose
public half is the route's `events_key`.

What each mail gets depends on its recipient (the `To` header), matched case-insensitively against
shell-style patterns: `complaint@*` -> delivered, then spamreport; `bounce@*` -> bounce (type
"bounce", 550 5.1.1: a hard bounce); `blocked@*` -> bounce (type "blocked", 4.7.1: a soft bounce);
any other -> delivered. `sg_message_id` is `<queue id>.mailsim.0`: the queue id is what the SMTP reply
("queued as") or the HTTP `X-Message-Id` told the sender.

Delivery of the posts: at least once. Events due are posted in batches of up to `batch_max`; a post
that fails (no answer, 5xx, 429) is retried after `delay_s` with the same event ids (msgcore applies
each once); a 4xx other than 429 drops the batch (logged: a retry would be refused the same way).

`EventingMailSim` is the MailSim that feeds a poster: every mail it keeps (SMTP or HTTP) through
`MailSim.store`, the one place both paths hand a taken mail to.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from core.domain.email_events import SIGNATURE_HEADER, TIMESTAMP_HEADER
from core.email_signatures import load_private_key, new_private_key, private_key_pem, public_key_text, sign
from ops.mail_sim.server import MailSim

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventSettings:
    url: str
    key: ec.EllipticCurvePrivateKey
    delay_s: float = 1.0
    batch_max: int = 100
    hard_bounce: tuple[str, ...] = ("bounce@*", "bounce+*@*")
    soft_bounce: tuple[str, ...] = ("blocked@*", "blocked+*@*")
    complaint: tuple[str, ...] = ("complaint@*", "complaint+*@*")


def events_for(recipient: str, queue_id: str, settings: EventSettings, now: float) -> list[dict[str, Any]]:
    """The SendGrid events mail-sim reports for one mail to `recipient`."""
    base = {"email": recipient, "sg_message_id": f"{queue_id}.mailsim.0", "smtp-id": f"<{queue_id}@mail-sim>"}

    def event(name: str, at: float, **extra: Any) -> dict[str, Any]:
        return {**base, "event": name, "timestamp": int(at), "sg_event_id": uuid.uuid4().hex, **extra}

    address = recipient.lower()
    if any(fnmatch.fnmatchcase(address, p) for p in settings.hard_bounce):
        return [event("bounce", now, type="bounce", status="5.1.1",
                      reason="550 5.1.1 The email account that you tried to reach does not exist (mail-sim)")]
    if any(fnmatch.fnmatchcase(address, p) for p in settings.soft_bounce):
        return [event("bounce", now, type="blocked", status="4.7.1",
                      reason="421 4.7.1 Temporarily rate limited (mail-sim)")]
    delivered = event("delivered", now, response="250 2.0.0 OK (mail-sim)")
    if any(fnmatch.fnmatchcase(address, p) for p in settings.complaint):
        return [delivered, event("spamreport", now + 1)]
    return [delivered]


def recipient_of(raw: bytes) -> str:
    """The first `To` address of a raw mail ("" if none)."""
    headers = BytesHeaderParser().parsebytes(raw)
    found = getaddresses(headers.get_all("To", []))
    return found[0][1] if found else ""


@dataclass
class EventPoster:
    """Queues each taken mail's events and posts them, signed, once due (see the module doc)."""

    settings: EventSettings
    pending: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (due monotonic time, event)
    stats: dict[str, int] = field(default_factory=lambda: {"queued": 0, "posted": 0, "failed_posts": 0,
                                                           "dropped": 0})
    _task: asyncio.Task[None] | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def mail_taken(self, raw: bytes, queue_id: str) -> None:
        recipient = recipient_of(raw)
        if not recipient:
            log.warning("mail-sim events: mail %s has no To address: no events", queue_id)
            return
        due = time.monotonic() + self.settings.delay_s
        for e in events_for(recipient, queue_id, self.settings, time.time()):
            self.pending.append((due, e))
            self.stats["queued"] += 1
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mail-sim-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=10.0) as client:
            while True:
                if not self.pending:
                    self._wake.clear()
                    await self._wake.wait()
                wait = min(t for t, _ in self.pending) - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.post_due(client)

    async def post_due(self, client: httpx.AsyncClient) -> None:
        """Post every due event, `batch_max` per request; a failed batch is due again after delay_s."""
        now = time.monotonic()
        due = [e for t, e in self.pending if t <= now]
        self.pending = [(t, e) for t, e in self.pending if t > now]
        for i in range(0, len(due), self.settings.batch_max):
            batch = due[i:i + self.settings.batch_max]
            if not await self._post(client, batch):
                retry_at = time.monotonic() + self.settings.delay_s
                self.pending = [(retry_at, e) for e in batch] + self.pending

    async def _post(self, client: httpx.AsyncClient, batch: list[dict[str, Any]]) -> bool:
        """True when the batch is done with (taken, or refused for good)."""
        body = json.dumps(batch, separators=(",", ":")).encode() + b"\r\n"
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp,
                   SIGNATURE_HEADER: sign(self.settings.key, timestamp, body)}
        try:
            r = await client.post(self.settings.url, content=body, headers=headers)
        except httpx.HTTPError as e:
            self.stats["failed_posts"] += 1
            log.info("mail-sim events: posting %d event(s) to %s failed (%r): retrying", len(batch),
                     self.settings.url, e)
            return False
        if r.status_code < 300:
            self.stats["posted"] += len(batch)
            return True
        if r.status_code == 429 or r.status_code >= 500:
            self.stats["failed_posts"] += 1
            log.info("mail-sim events: %s answered %d: retrying %d event(s)", self.settings.url, r.status_code,
                     len(batch))
            return False
        self.stats["dropped"] += len(batch)
        log.warning("mail-sim events: %s refused %d event(s) with %d %s: dropped", self.settings.url, len(batch),
                    r.status_code, r.text[:200])
        return True


class EventingMailSim(MailSim):
    """A MailSim whose every kept mail queues its provider events on `events`."""

    def __init__(self, *args: Any, events: EventPoster, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events = events

    async def start(self) -> None:
        await super().start()
        self.events.start()

    async def stop(self) -> None:
        await self.events.stop()
        await super().stop()

    def store(self, raw: bytes) -> str:
        qid = super().store(raw)
        self.events.mail_taken(raw, qid)
        return qid


def load_or_create_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """The signing key in `path` (PEM); a new one written there (mode 0600) when the file is missing.
    Returns the key and whether it was created."""
    if path.exists():
        return load_private_key(path.read_bytes()), False
    key = new_private_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(private_key_pem(key))
    return key, True


def verification_key(key: ec.EllipticCurvePrivateKey) -> str:
    """What to set as the route's `events_key` for mail-sim's events."""
    return public_key_text(key)


def eventing_sim(sink: Path, url: str, key_path: Path, **kwargs: Any) -> EventingMailSim:
    """A MailSim posting its events to `url`, signed with the key in `key_path` (created if missing);
    prints the verification key to set as the route's `events_key`."""
    key, created = load_or_create_key(key_path)
    print(f"mail-sim: events to {url}, signed with {key_path}{' (new key)' if created else ''}; set the route's "
          f"events_key to {verification_key(key)}", flush=True)
    return EventingMailSim(sink, events=EventPoster(EventSettings(url=url, key=key)), **kwargs)
