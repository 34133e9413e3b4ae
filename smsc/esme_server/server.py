"""The SMPP server ESMEs bind to: binds checked against `smpp_accounts`, submits into the pipeline
through group commit, query_sm / cancel_sm, and one receipt sender per account with a receiver bind.

Limits: `max_binds` counts the account's binds in every server process: each bind holds a lease in
the store (core/store/esme_binds.py), renewed by its process every `bind_lease_s / 3`, deleted at
unbind; a process that dies stops counting one lease later. The throughput limit (ESME_RTHROTTLED) is
a token bucket per account per process, shared by its binds, plus the tenant's own `submit_tps` as the
REST API applies it; the window (ESME_RMSGQFUL) is per bind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core import metrics
from core.domain.esme_receipts import wants_intermediate
from core.domain.message import await_topic
from core.domain.ratelimit import SubmissionLimiter, effective_burst
from core.store.database import Database
from core.store.errors import StoreError, StoreUnavailable
from core.store.esme_binds import BindLeases
from core.store.eventstore import EventStore
from core.store.lanes import LaneStore
from core.store.routes import RouteStore, RouteTable
from core.store.smpp_accounts import SmppAccount, SmppAccountStore, password_matches
from core.store.tenants import ACTIVE, TenantStore
from core.submission_service import SubmissionService
from smsc.esme_server import queries, wire
from smsc.esme_server.committer import GroupCommitter
from smsc.esme_server.concat import Reassembler
from smsc.esme_server.receipts import ReceiptSender
from smsc.esme_server.session import EsmeSession
from smsc.esme_server.submit import SubmitRefused, SubmitRequest, parse_submit, to_submission
from smsc.pdu import (
    ESME_RALYBND,
    ESME_RBINDFAIL,
    ESME_RINVPASWD,
    ESME_RINVSYSID,
    ESME_ROK,
    ESME_RSUBMITFAIL,
    ESME_RSYSERR,
    ESME_RTHROTTLED,
    as_str,
)

log = logging.getLogger(__name__)

TENANT_TTL_S = 10.0
Waiter = tuple[EsmeSession, int]


@dataclass(frozen=True)
class EsmeServerConfig:
    port: int = 2776
    host: str = "127.0.0.1"
    commit_window_s: float = 0.005  # group commit: submits within this share one transaction
    max_parts: int = 10
    default_validity_s: int = 48 * 3600
    receipt_timeout_s: float = 10.0  # a deliver_sm without its resp by then is sent again
    receipt_batch: int = 100
    poll_s: float = 0.05
    lease_s: float = 10.0
    part_hold_s: float = 60.0  # parts of a long message wait this long for the others
    bind_lease_s: float = 15.0  # a bind of a dead process stops counting towards max_binds after this
    tls: ssl.SSLContext | None = None  # SMPP over TLS on `tls_port` too (plain TCP stays on `port`)
    tls_port: int = 3550


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The server side of SMPP over TLS: the certificate chain and its key (PEM), TLS 1.2 or later.
    Raises OSError / ssl.SSLError when the files cannot be read or do not match."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class EsmeServer:
    def __init__(self, db: Database, config: EsmeServerConfig, clock: Callable[[], datetime]) -> None:
        if config.host != "127.0.0.1":
            raise ValueError("the SMPP server listens on 127.0.0.1 only")
        self.db, self.config, self.clock = db, config, clock
        self.accounts = SmppAccountStore(db)
        self.leases = BindLeases(db)
        self.tenants = TenantStore(db)
        self.events = EventStore(db)
        # One-time passwords over SMPP are routed at acceptance too when their route is UP.
        service = SubmissionService(self.events, LaneStore(db), set(), routes=RouteTable(RouteStore(db)))
        self.committer = GroupCommitter(service, clock,
                                        config.commit_window_s)
        self.parts: Reassembler[Waiter] = Reassembler(config.part_hold_s)
        self.limiter = SubmissionLimiter()
        self.binds: dict[str, set[EsmeSession]] = {}
        self.holder = f"esme-server-{uuid.uuid4().hex[:8]}"
        self.senders: dict[str, ReceiptSender] = {}
        self.intermediate_on: set[str] = set()  # accounts known to ask for intermediate notifications
        self._tenants: dict[str, tuple[str, float | None, int | None, float]] = {}
        self._server: asyncio.Server | None = None
        self._tls_server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._sessions: set[EsmeSession] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("SMPP server not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def tls_port(self) -> int | None:
        """The port of SMPP over TLS, None without a certificate."""
        return None if self._tls_server is None else int(self._tls_server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        await self.accounts.ensure_indexes()
        await self.leases.ensure_indexes()
        self._server = await asyncio.start_server(self._handle, self.config.host, self.config.port)
        if self.config.tls is not None:
            # A failed handshake never reaches _handle (asyncio drops that connection alone).
            self._tls_server = await asyncio.start_server(self._handle, self.config.host, self.config.tls_port,
                                                          ssl=self.config.tls)
            log.info("esme-server listening with TLS on %s:%d", self.config.host, self.tls_port)
        self._sweeper = asyncio.create_task(self._sweep_parts(), name="esme-parts")
        self._renewer = asyncio.create_task(self._renew_leases(), name="esme-bind-leases")
        log.info("esme-server listening on %s:%d", self.config.host, self.port)

    async def stop(self) -> None:
        """Stop listening, close every session, stop the receipt senders, flush group commits."""
        for listener in (self._server, self._tls_server):
            if listener is not None:
                listener.close()
        for session in list(self._sessions):
            session.send(wire.request("unbind", session.sequence.next_sequence()))
            await session.close()
        for sender in list(self.senders.values()):
            await sender.stop()
        await self.committer.drain()
        for task in (self._sweeper, self._renewer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(StoreUnavailable):  # they expire by themselves otherwise
            await self.leases.release_holder(self.holder)
        for listener in (self._server, self._tls_server):
            if listener is not None:
                await listener.wait_closed()
        log.info("esme-server stopped (%d transactions, %d messages accepted)", self.committer.transactions,
                 self.committer.accepted)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = EsmeSession(self, reader, writer)
        self._sessions.add(session)
        try:
            await session.run()
        except Exception:  # one session's bug must not take the server (or other sessions) down
            log.exception("esme-server %s (system_id %s): session failed", session.peer, session.system_id)
        finally:
            self._sessions.discard(session)
            await session.close()

    # ---- binds -------------------------------------------------------------------------------------

    async def bind(self, session: EsmeSession, pdu: Any, mode: str) -> None:
        name = f"{pdu.command}_resp"
        if session.mode is not None or session.binding:
            session.send(wire.response(name, pdu.sequence, ESME_RALYBND))
            return
        session.binding = True
        try:
            status, account = await self._check_bind(session, as_str(pdu.system_id) or "",
                                                     as_str(pdu.password) or "", mode)
        except StoreError as e:
            log.warning("esme-server %s: bind failed, store unavailable: %s", session.peer, e)
            status, account = ESME_RSYSERR, None
        finally:
            session.binding = False
        metrics.ESME_BINDS.labels(status=f"0x{status:02x}").inc()
        if status != ESME_ROK or account is None or session.closing:
            if session.bind_id is not None:  # closed while its slot was being taken
                await self.unbound(session)
            session.send(wire.response(name, pdu.sequence, status))
            return
        session.account, session.mode = account, mode
        self.binds.setdefault(account.system_id, set()).add(session)
        session.send(wire.response(name, pdu.sequence, system_id="msgcore"))
        log.info("esme-server %s bound as %s (system_id %s, tenant %s)", session.peer, mode, account.system_id,
                 account.tenant_id)
        if session.can_receive:
            self._sender_for(account).wake()

    async def _check_bind(self, session: EsmeSession, system_id: str, password: str,
                          mode: str) -> tuple[int, SmppAccount | None]:
        found = await self.accounts.credentials(system_id)
        if found is None:
            log.info("esme-server %s: bind refused, unknown system_id %r", session.peer, system_id)
            return ESME_RINVSYSID, None
        account, stored = found
        if not await asyncio.to_thread(password_matches, password, stored):
            log.info("esme-server %s: bind refused for %s: wrong password", session.peer, system_id)
            return ESME_RINVPASWD, None
        reason = await self._refusal(session, account, mode)
        if reason:
            log.info("esme-server %s: bind refused for %s: %s", session.peer, system_id, reason)
            return ESME_RBINDFAIL, None
        return ESME_ROK, account

    async def _refusal(self, session: EsmeSession, account: SmppAccount, mode: str) -> str | None:
        if not account.enabled:
            return "account disabled"
        if not account.ip_allowed(session.ip):
            return f"source address {session.ip} not allowed"
        if len(self.binds.get(account.system_id, ())) >= account.max_binds:
            return f"already {account.max_binds} bind(s) open here (max_binds)"
        status, _, _ = await self._tenant(account.tenant_id, fresh=True)
        if status != ACTIVE:
            return f"tenant {account.tenant_id} is {status}"
        # Last: a slot taken is a slot held (released by unbound()).
        bind_id = uuid.uuid4().hex
        admitted, live = await self.leases.acquire(
            system_id=account.system_id, bind_id=bind_id, holder=self.holder, max_binds=account.max_binds,
            now=self.clock(), lease_s=self.config.bind_lease_s, peer=session.peer, mode=mode)
        if not admitted:
            return f"already {live} bind(s) open in all server processes (max_binds {account.max_binds})"
        session.bind_id = bind_id
        return None

    async def _tenant(self, tenant_id: str, fresh: bool = False) -> tuple[str, float | None, int | None]:
        """(status, submit_tps, burst) of a tenant, cached TENANT_TTL_S ("missing" for no tenant)."""
        hit = self._tenants.get(tenant_id)
        if hit is None or fresh or hit[3] <= time.monotonic():
            doc = await self.tenants.get(tenant_id)
            status = "missing" if doc is None else doc.get("status", ACTIVE)
            tps = None if doc is None else doc.get("submit_tps")
            burst = None if doc is None else effective_burst(tps, doc.get("submit_burst"))
            hit = (status, tps, burst, time.monotonic() + TENANT_TTL_S)
            self._tenants[tenant_id] = hit
        return hit[0], hit[1], hit[2]

    async def unbound(self, session: EsmeSession) -> None:
        """Forget a closed session's bind and free its slot in the store."""
        if session.account is not None:
            self.binds.get(session.account.system_id, set()).discard(session)
        session.mode = None
        bind_id, session.bind_id = session.bind_id, None
        if bind_id is not None:
            try:
                await self.leases.release(bind_id)
            except StoreUnavailable as e:
                log.warning("esme-server %s (system_id %s): bind slot not freed (its lease expires): %s",
                            session.peer, session.system_id, e)

    async def _renew_leases(self) -> None:
        """Keep this process's binds counted (max_binds across processes)."""
        lease_s = self.config.bind_lease_s
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                held = await self.leases.renew(self.holder, self.clock(), lease_s)
            except StoreUnavailable as e:
                log.warning("esme-server %s: bind leases not renewed: %s", self.holder, e)
                continue
            open_here = sum(1 for sessions in self.binds.values() for s in sessions if s.bind_id is not None)
            if held < open_here:  # expired while the store was away, and freed by another process
                log.warning("esme-server %s: %d bind(s) open, %d lease(s) in the store", self.holder,
                            open_here, held)

    def receivers(self, system_id: str) -> list[EsmeSession]:
        return [s for s in self.binds.get(system_id, ()) if s.can_receive]

    def _sender_for(self, account: SmppAccount) -> ReceiptSender:
        sender = self.senders.get(account.system_id)
        if sender is None or sender.finished:
            sender = ReceiptSender(self, account)
            self.senders[account.system_id] = sender
            sender.start()
        return sender

    # ---- submit_sm ---------------------------------------------------------------------------------

    async def submit(self, session: EsmeSession, pdu: Any) -> None:
        account = session.account
        assert account is not None
        try:
            await self._throttle(account)
            req = parse_submit(pdu, account)
        except SubmitRefused as e:
            self._refuse(session, pdu.sequence, e)
            return
        if req.segment is None:
            await self._accept(req, account, [(session, pdu.sequence)])
            return
        try:
            whole = self.parts.add(account.system_id, req, (session, pdu.sequence), time.monotonic())
        except OverflowError as e:
            self._refuse(session, pdu.sequence, SubmitRefused(ESME_RTHROTTLED, str(e)))
            return
        if whole is not None:
            await self._accept(whole[0], account, whole[1])

    async def _throttle(self, account: SmppAccount) -> None:
        now = self.limiter.clock()
        if account.tps is not None:
            own_burst = max(1, math.ceil(account.tps))
            if self.limiter.check(f"esme:{account.system_id}", 1, account.tps, own_burst, now) is not None:
                raise SubmitRefused(ESME_RTHROTTLED, f"over {account.tps:g} submit_sm/s")
        status, tps, burst = await self._tenant(account.tenant_id)
        if status != ACTIVE:
            raise SubmitRefused(ESME_RSUBMITFAIL, f"tenant {account.tenant_id} is {status}")
        if tps is not None and burst is not None and self.limiter.check(account.tenant_id, 1, tps, burst,
                                                                        now) is not None:
            raise SubmitRefused(ESME_RTHROTTLED, f"tenant {account.tenant_id} over {tps:g} messages/s")

    async def _accept(self, req: SubmitRequest, account: SmppAccount, waiters: list[Waiter]) -> None:
        try:
            item = to_submission(req, account, self.clock(), self.config.max_parts, self.config.default_validity_s)
            if wants_intermediate(req.registered_delivery):
                await self._start_intermediate(account)
            message_id = await self.committer.submit(account.tenant_id, item)
        except SubmitRefused as e:
            for session, seq in waiters:
                self._refuse(session, seq, e)
            return
        except StoreError as e:
            log.warning("esme-server %s: submit not accepted, store unavailable: %s", account.system_id, e)
            for session, seq in waiters:
                self._refuse(session, seq, SubmitRefused(ESME_RSYSERR, "store unavailable"))
            return
        for session, seq in waiters:
            session.answer(wire.response("submit_sm_resp", seq, message_id=message_id))

    async def _start_intermediate(self, account: SmppAccount) -> None:
        """Before the account's first submit that asks for intermediate notifications is accepted:
        its receipt sender must follow the await topics from before that message's `sent`."""
        if account.intermediate or account.system_id in self.intermediate_on:
            return
        topics = [await_topic(r.id) for r in await RouteStore(self.db).list(include_disabled=True)]
        if await self.accounts.start_intermediate(account.system_id, topics, self.clock()):
            log.info("esme-server %s: asks for intermediate notifications from now on", account.system_id)
        self.intermediate_on.add(account.system_id)
        sender = self.senders.get(account.system_id)
        if sender is not None:
            sender.wake()

    def _refuse(self, session: EsmeSession, seq: int, e: SubmitRefused) -> None:
        metrics.ESME_SUBMITS_REFUSED.labels(status=f"0x{e.status:02x}").inc()
        log.info("esme-server %s (system_id %s): submit_sm seq %d refused 0x%02x: %s", session.peer,
                 session.system_id, seq, e.status, e.reason)
        session.answer(wire.response("submit_sm_resp", seq, e.status))

    async def _sweep_parts(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for waiters in self.parts.expired(time.monotonic()):
                for session, seq in waiters:
                    self._refuse(session, seq, SubmitRefused(ESME_RSUBMITFAIL, "other parts never arrived"))

    # ---- query_sm, cancel_sm -----------------------------------------------------------------------

    async def query(self, session: EsmeSession, pdu: Any) -> None:
        assert session.account is not None
        session.answer(await queries.query_sm(self.events, session.account, pdu))

    async def cancel(self, session: EsmeSession, request: wire.CancelSm, seq: int) -> None:
        assert session.account is not None
        session.answer(await queries.cancel_sm(self.events, session.account, request, seq, self.clock()))
