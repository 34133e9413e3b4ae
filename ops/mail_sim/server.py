"""The mail simulator: an SMTP server (aiosmtpd) and optionally a SendGrid-v3-compatible HTTP
endpoint, both on 127.0.0.1, that keep every e-mail they take as an `.eml` file under `sink_dir`
(one file per accepted call, named `<n>-<queue id>.eml`), with switchable faults (ops/mail_sim/faults.py).

The HTTP port also serves the control API (JSON):

    POST /v3/mail/send   SendGrid v3 body; 202 + `X-Message-Id` (Authorization: Bearer <api_key> if set)
    GET  /faults         {"faults": {...}, "stats": {...}}
    PUT  /faults         merge the body's fields into the faults (422 on bad input)
    POST /reset          faults back to those it started with; counters cleared

Both run in the caller's event loop (tests run them next to the mailer).

SMTP extras for the tests of the mailer's client (core/workers/mailer_smtp.py): PIPELINING is
advertised unless `pipelining=False` (aiosmtpd reads one command line at a time, so pipelined
commands are safe; environment MSGCORE_MAIL_SIM_PIPELINING=0 turns it off for a whole process);
`auth=(user, password)` asks for AUTH (PLAIN or LOGIN, without TLS: loopback only);
`auth_mechanisms` limits what it offers; `tls` (a server context) offers STARTTLS;
`refused_recipients` are refused at RCPT (550); `drop_next_mail` N drops the connection at the next
N MAIL commands (before anything of the e-mail was sent); `multiline` answers an accepted e-mail
with a multi-line 250 reply (the queue id on its second line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import uuid
import warnings
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from pydantic import ValidationError

from core.domain.email import EmailContent
from core.domain.email_mime import build_mime
from core.domain.events import utcnow
from ops.mail_sim.faults import FaultPlan, MailFaults

log = logging.getLogger(__name__)

MAX_HTTP_BODY = 8 * 1024 * 1024


class MailSim:
    def __init__(self, sink_dir: Path | str, *, port: int = 0, http_port: int | None = None, api_key: str = "",
                 faults: MailFaults | dict[str, Any] | None = None, pipelining: bool | None = None,
                 auth: tuple[str, str] | None = None, auth_mechanisms: Iterable[str] = ("PLAIN", "LOGIN"),
                 refused_recipients: Iterable[str] = (), tls: ssl.SSLContext | None = None) -> None:
        self.sink_dir = Path(sink_dir)
        self.requested = (port, http_port)
        self.api_key = api_key
        initial = faults if isinstance(faults, MailFaults) else MailFaults(**(faults or {}))
        self.plan = FaultPlan(initial)
        self.port = 0
        self.http_port: int | None = None
        self.connections = 0  # SMTP connections accepted
        self.http_connections = 0  # HTTP connections accepted
        self.pipelining = os.environ.get("MSGCORE_MAIL_SIM_PIPELINING", "1") != "0" if pipelining is None \
            else pipelining
        self.auth = auth
        self.auth_mechanisms = {m.upper() for m in auth_mechanisms}
        self.tls = tls
        self.multiline = False  # answer an accepted e-mail with a multi-line 250 reply
        self.refused_recipients = {r.lower() for r in refused_recipients}
        self.drop_next_mail = 0
        self.transactions = 0  # MAIL commands taken
        self._servers: list[asyncio.Server] = []
        self._stored = 0

    async def start(self) -> None:
        self.sink_dir.mkdir(parents=True, exist_ok=True)
        # aiosmtpd logs every MAIL and RCPT at INFO: 5 % of mail-sim's CPU in a profile of the benchmark
        logging.getLogger("mail.log").setLevel(max(logging.WARNING, logging.getLogger("mail.log").level))
        loop = asyncio.get_running_loop()
        factory = partial(self._smtp_protocol)
        smtp = await loop.create_server(factory, "127.0.0.1", self.requested[0])
        self._servers.append(smtp)
        self.port = smtp.sockets[0].getsockname()[1]
        if self.requested[1] is not None:
            http = await asyncio.start_server(self._http, "127.0.0.1", self.requested[1])
            self._servers.append(http)
            self.http_port = http.sockets[0].getsockname()[1]
        log.info("mail-sim: SMTP on 127.0.0.1:%d%s; mails kept under %s", self.port,
                 f", HTTP (SendGrid v3, control) on 127.0.0.1:{self.http_port}" if self.http_port else "",
                 self.sink_dir)

    def _smtp_protocol(self) -> SMTP:
        self.connections += 1
        auth: dict[str, Any] = {}
        if self.auth is not None:
            auth = {"authenticator": self._authenticate, "auth_required": True, "auth_require_tls": False,
                    "auth_exclude_mechanism": [m for m in ("PLAIN", "LOGIN") if m not in self.auth_mechanisms]}
        with warnings.catch_warnings():  # "AUTH without TLS": loopback only, on purpose
            warnings.simplefilter("ignore", UserWarning)
            return SMTP(_Handler(self), hostname="mail-sim", data_size_limit=MAX_HTTP_BODY, command_call_limit=None,
                        tls_context=self.tls, **auth)

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and self.auth is not None \
            and (data.login.decode(), data.password.decode()) == self.auth
        return AuthResult(success=ok, handled=False)

    async def stop(self) -> None:
        for s in self._servers:
            s.close()
        for s in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 2.0)
        self._servers.clear()

    def eml_files(self) -> list[Path]:
        return sorted(self.sink_dir.glob("*.eml"))

    def store(self, raw: bytes) -> str:
        """Keep one accepted e-mail; returns its queue id."""
        self._stored += 1
        qid = uuid.uuid4().hex[:16]
        (self.sink_dir / f"{self._stored:06d}-{qid}.eml").write_bytes(raw)
        return qid

    def stats(self) -> dict[str, Any]:
        return {**self.plan.counts, "stored": self._stored, "smtp_connections": self.connections}

    # ---- HTTP: SendGrid v3 and the control API ------------------------------------------------

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.http_connections += 1
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                method, path, headers, body = request
                status, payload, extra = await self._route(method, path, headers, body)
                data = json.dumps(payload).encode() if payload is not None else b""
                head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(data)}", "Content-Type: application/json",
                        *[f"{k}: {v}" for k, v in extra.items()]]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str, headers: dict[str, str],
                     body: bytes) -> tuple[int, Any, dict[str, str]]:
        if (method, path) == ("POST", "/v3/mail/send"):
            return await self._sendgrid(headers, body)
        if (method, path) == ("GET", "/faults"):
            return 200, {"faults": self.plan.faults.model_dump(), "stats": self.stats()}, {}
        if (method, path) == ("PUT", "/faults"):
            try:
                self.plan.faults = MailFaults(**{**self.plan.faults.model_dump(), **json.loads(body or b"{}")})
            except (ValidationError, ValueError, TypeError) as e:
                return 422, {"error": str(e)}, {}
            return 200, {"faults": self.plan.faults.model_dump()}, {}
        if (method, path) == ("POST", "/reset"):
            self.plan = FaultPlan(self.plan.initial)
            return 200, {"faults": self.plan.faults.model_dump()}, {}
        return 404, {"error": f"no {method} {path}"}, {}

    async def _sendgrid(self, headers: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, {"errors": [{"message": "authorization required"}]}, {}
        try:
            content, msgcore_id = _content_of(json.loads(body))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            return 400, {"errors": [{"message": f"bad request: {e}"}]}, {}
        verdict = self.plan.next_call()
        if self.plan.faults.delay_s:
            await asyncio.sleep(self.plan.faults.delay_s)
        if verdict.drop:
            raise ConnectionError("mail-sim: dropping the connection (fault)")
        if verdict.fail:
            code = self.plan.faults.temporary_http if verdict.fail == "temporary" else self.plan.faults.permanent_http
            return code, {"errors": [{"message": f"mail-sim {verdict.fail} failure"}]}, {}
        qid = self.store(build_mime(content, msgcore_id or uuid.uuid4().hex, utcnow()).raw)
        return 202, None, {"X-Message-Id": qid}


class _Handler:
    def __init__(self, sim: MailSim) -> None:
        self.sim = sim

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.sim.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        if self.sim.drop_next_mail > 0:
            self.sim.drop_next_mail -= 1
            if server.transport is not None:
                server.transport.close()
            return "421 4.4.2 connection dropped at MAIL (mail-sim)"
        self.sim.transactions += 1
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        if address.lower() in self.sim.refused_recipients:
            return f"550 5.1.1 <{address}>: Recipient address rejected (mail-sim)"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        plan = self.sim.plan
        verdict = plan.next_call()
        if plan.faults.delay_s:
            await asyncio.sleep(plan.faults.delay_s)
        if verdict.drop:
            if server.transport is not None:
                server.transport.close()
            return "421 4.4.2 connection dropped (mail-sim)"
        if verdict.fail:
            return plan.faults.temporary_smtp if verdict.fail == "temporary" else plan.faults.permanent_smtp
        raw = envelope.original_content or b""
        qid = self.sim.store(raw if isinstance(raw, bytes) else raw.encode())
        if self.sim.multiline:
            return f"250-2.0.0 Message accepted (mail-sim)\r\n250-2.0.0 Ok: queued as {qid}\r\n250 2.0.0 Bye for now"
        return f"250 2.0.0 Ok: queued as {qid}"


def _content_of(body: dict[str, Any]) -> tuple[EmailContent, str]:
    parts = {c["type"]: c["value"] for c in body.get("content", [])}
    sender = body["from"]
    content = EmailContent(to=body["personalizations"][0]["to"][0]["email"], sender=sender["email"],
                           subject=body.get("subject", ""), text=parts.get("text/plain", ""),
                           html=parts.get("text/html", ""), from_name=sender.get("name", ""),
                           reply_to=(body.get("reply_to") or {}).get("email", ""))
    return content, str((body.get("custom_args") or {}).get("msgcore_id", ""))


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    line = await reader.readline()
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if length > MAX_HTTP_BODY:
        raise ValueError("body too large")
    body = await reader.readexactly(length) if length else b""
    return method, target.split("?", 1)[0], headers, body
