"""SMPP accounts (collection `smpp_accounts`): how an ESME of a tenant binds to msgcore's SMPP server.

A document:

    _id             the system_id (unique: it is the login), also the account id (`dlr:<_id>` is the
                    topic of its receipts, `esme|dlr:<_id>` the owner key of its receipt sender)
    tenant_id       the tenant whose messages the ESME submits
    password        {salt, hash, n, r, p}: scrypt; the password is shown once (create, rotate)
    allowed_ips     CIDR ranges the ESME may connect from; [] = any
    max_binds       binds of the account open at once (all types together)
    window          PDUs an ESME may have outstanding (submitted, not yet answered)
    tps             submit_sm per second (over it: ESME_RTHROTTLED); None = unlimited
    transactional   the lane of its messages: True = the shared transactional lane, False = the
                    tenant's marketing lane ("default priority"; priority_flag >= 1 is transactional)
    alphabet        what data_coding 0 means in its submits (and in the MO it receives): "gsm" (GSM
                    03.38) or "latin1"
    receive_mo      MO for the tenant's numbers go to this account (its `dlr:<_id>` topic, beside the
                    receipts); when several accounts of a tenant have it, the oldest (created_at, then
                    _id) gets them all (`mo_topics`). Default false: MO are kept in the log only.
    intermediate_since  set once, when the account's first submit asked for intermediate notifications
                    (registered_delivery bit 4): from then on its receipt sender also follows the
                    routes' `await:<route>` topics (checkpoints `esme-i:<_id>|await:<route>`, started at
                    that moment's counters) for the `sent` of such messages (smsc/esme_server/intermediate.py)
    enabled, created_at, changed_at

A disabled account with `receive_mo` still gets MO in its topic: they wait there, like its receipts,
until it is enabled and binds again.

SMPP passwords are at most 8 characters (the field holds 9 octets with its NUL), so they are short:
they are stretched with scrypt, unlike API keys (high-entropy tokens, SHA-256 is enough there).
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import ipaddress
import re
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from core.store.errors import StoreUnavailable
from core.store.topics import EventLog, checkpoint_id

SYSTEM_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # system_id: 16 octets with the NUL
PASSWORD_LEN = 8
ALPHABETS = ("gsm", "latin1")
MAX_BINDS_LIMIT, MAX_WINDOW, MAX_TPS = 64, 1000, 100_000.0
UPDATABLE = ("allowed_ips", "max_binds", "window", "tps", "transactional", "alphabet", "receive_mo")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_PASSWORD_CHARS = string.ascii_letters + string.digits


def intermediate_consumer(system_id: str) -> str:
    """The consumer name of an account's intermediate notifications on the await topics."""
    return f"esme-i:{system_id}"


class SmppAccountExists(Exception):
    def __init__(self, system_id: str) -> None:
        super().__init__(f"SMPP account {system_id!r} exists")
        self.system_id = system_id


class SmppAccountNotFound(Exception):
    def __init__(self, system_id: str) -> None:
        super().__init__(f"no SMPP account {system_id!r}")
        self.system_id = system_id


class InvalidSmppAccount(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SmppAccount:
    """An account as the SMPP server uses it (never its password hash)."""

    system_id: str
    tenant_id: str
    allowed_ips: tuple[str, ...] = ()
    max_binds: int = 4
    window: int = 100
    tps: float | None = None
    transactional: bool = True
    alphabet: str = "gsm"
    enabled: bool = True
    receive_mo: bool = False
    intermediate: bool = False  # `intermediate_since` is set

    @property
    def notify_topic(self) -> str:
        """The topic its messages' outcomes are reported to (core.domain.message.notify_topic)."""
        return f"dlr:{self.system_id}"

    def ip_allowed(self, ip: str) -> bool:
        if not self.allowed_ips:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in ipaddress.ip_network(net, strict=False) for net in self.allowed_ips)


def new_password() -> str:
    return "".join(secrets.choice(_PASSWORD_CHARS) for _ in range(PASSWORD_LEN))


def hash_password(password: str, salt: bytes | None = None) -> dict[str, Any]:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return {"salt": salt.hex(), "hash": digest.hex(), **_SCRYPT}


def password_matches(password: str, stored: dict[str, Any]) -> bool:
    """Constant-time comparison of `password` with the stored scrypt hash. CPU-heavy (~50 ms): call it
    off the event loop."""
    digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(stored["salt"]), dklen=32,
                            n=int(stored["n"]), r=int(stored["r"]), p=int(stored["p"]))
    return hmac.compare_digest(digest.hex(), stored["hash"])


def validate(fields: dict[str, Any]) -> dict[str, Any]:
    """Checked settings (raises InvalidSmppAccount); CIDR ranges normalised."""
    out = dict(fields)
    if "allowed_ips" in out:
        try:
            out["allowed_ips"] = [str(ipaddress.ip_network(n, strict=False)) for n in out["allowed_ips"] or []]
        except ValueError as e:
            raise InvalidSmppAccount("allowed_ips", str(e)) from e
    for name, top in (("max_binds", MAX_BINDS_LIMIT), ("window", MAX_WINDOW)):
        if name in out and not (isinstance(out[name], int) and 1 <= out[name] <= top):
            raise InvalidSmppAccount(name, f"an integer from 1 to {top}")
    tps = out.get("tps")
    if tps is not None and not (isinstance(tps, int | float) and 0 < tps <= MAX_TPS):
        raise InvalidSmppAccount("tps", f"a number above 0 and at most {MAX_TPS:g}, or null")
    if "alphabet" in out and out["alphabet"] not in ALPHABETS:
        raise InvalidSmppAccount("alphabet", f"one of {', '.join(ALPHABETS)}")
    for name in ("transactional", "receive_mo"):
        if name in out and not isinstance(out[name], bool):
            raise InvalidSmppAccount(name, "true or false")
    return out


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without its password hash; `system_id` instead of `_id`."""
    out = {k: v for k, v in doc.items() if k not in ("_id", "password")}
    return {"system_id": doc["_id"], **out}


def account_of(doc: dict[str, Any]) -> SmppAccount:
    return SmppAccount(system_id=doc["_id"], tenant_id=doc["tenant_id"], allowed_ips=tuple(doc.get("allowed_ips", ())),
                       max_binds=int(doc.get("max_binds", 4)), window=int(doc.get("window", 100)),
                       tps=doc.get("tps"), transactional=bool(doc.get("transactional", True)),
                       alphabet=doc.get("alphabet", "gsm"), enabled=bool(doc.get("enabled", True)),
                       receive_mo=bool(doc.get("receive_mo", False)),
                       intermediate=doc.get("intermediate_since") is not None)


class SmppAccountStore:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self.accounts = db["smpp_accounts"]

    async def ensure_indexes(self) -> None:
        await self.accounts.create_index("tenant_id", name="tenant")
        # MO routing (`mo_topics`): only accounts that receive MO are in it.
        await self.accounts.create_index([("tenant_id", 1), ("created_at", 1), ("_id", 1)], name="tenant_mo",
                                         partialFilterExpression={"receive_mo": True})

    async def create(self, system_id: str, tenant_id: str, now: datetime, *, allowed_ips: list[str] | None = None,
                     max_binds: int = 4, window: int = 100, tps: float | None = None, transactional: bool = True,
                     alphabet: str = "gsm", receive_mo: bool = False,
                     password: str | None = None) -> tuple[dict[str, Any], str]:
        """Create an account; returns (public document, password): the only time the password is
        visible. Raises InvalidSmppAccount or SmppAccountExists. The tenant is not checked here (the
        admin API and the CLI check it; the server refuses a bind of an unknown tenant)."""
        if not SYSTEM_ID_RE.match(system_id):
            raise InvalidSmppAccount("system_id", "1-15 of A-Z, a-z, 0-9, '_', '.' and '-'")
        settings = validate({"allowed_ips": allowed_ips or [], "max_binds": max_binds, "window": window, "tps": tps,
                             "alphabet": alphabet, "receive_mo": receive_mo})
        password = password or new_password()
        doc = {"_id": system_id, "tenant_id": tenant_id, **settings, "transactional": transactional,
               "password": hash_password(password), "enabled": True, "created_at": now, "changed_at": now}
        try:
            await self.accounts.insert_one(doc)
        except DuplicateKeyError as e:
            raise SmppAccountExists(system_id) from e
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return public(doc), password

    async def _update(self, system_id: str, update: dict[str, Any]) -> dict[str, Any]:
        try:
            doc = await self.accounts.find_one_and_update({"_id": system_id}, update,
                                                          return_document=ReturnDocument.AFTER)
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        if doc is None:
            raise SmppAccountNotFound(system_id)
        return public(doc)

    async def set_enabled(self, system_id: str, enabled: bool, now: datetime) -> dict[str, Any]:
        """Enable or disable; a disabled account cannot bind (open binds are not cut: the server
        checks the account at every bind)."""
        return await self._update(system_id, {"$set": {"enabled": enabled, "changed_at": now}})

    async def update(self, system_id: str, fields: dict[str, Any], now: datetime) -> dict[str, Any]:
        """Change settings (any of UPDATABLE); raises InvalidSmppAccount or SmppAccountNotFound. Open
        binds keep the settings they bound with; `receive_mo` applies to the next MO batch."""
        unknown = set(fields) - set(UPDATABLE)
        if unknown:
            raise InvalidSmppAccount(sorted(unknown)[0], "cannot be changed")
        return await self._update(system_id, {"$set": {**validate(fields), "changed_at": now}})

    async def mo_topics(self, tenant_ids: Iterable[str]) -> dict[str, str]:
        """tenant -> the topic its MO go to: that of its oldest account with `receive_mo` (created_at,
        then system_id: deterministic, and stable while that account exists). Tenants with none are
        absent. One query through the partial index `tenant_mo`."""
        ids = sorted(set(tenant_ids))
        if not ids:
            return {}
        out: dict[str, str] = {}
        try:
            async for d in self.accounts.find({"tenant_id": {"$in": ids}, "receive_mo": True},
                                              {"_id": 1, "tenant_id": 1}).sort([("created_at", 1), ("_id", 1)]):
                out.setdefault(d["tenant_id"], SmppAccount(system_id=d["_id"], tenant_id=d["tenant_id"]).notify_topic)
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return out

    async def start_intermediate(self, system_id: str, topics: builtins.list[str], now: datetime) -> bool:
        """Mark the account as asking for intermediate notifications, once: in one transaction, set
        `intermediate_since` and start its checkpoints on `topics` (the routes' await topics) at their
        counters. True if this call did it; False if it was done before. The caller accepts the first
        such submit only after this returns, so the `sent` of that message lies past the checkpoints."""
        log = EventLog(self.accounts.database)

        async def body(session: Any) -> bool:
            res = await self.accounts.update_one({"_id": system_id, "intermediate_since": None},
                                                 {"$set": {"intermediate_since": now}}, session=session)
            if res.modified_count == 0:
                return False
            counters = {d["_id"]: int(d["pos"]) async for d in log.topics.find({"_id": {"$in": topics}},
                                                                              session=session)}
            for topic in topics:
                await log.checkpoints.update_one({"_id": checkpoint_id(intermediate_consumer(system_id), topic)},
                                                 {"$set": {"pos": counters.get(topic, 0)}}, upsert=True,
                                                 session=session)
            return True

        started: bool = await log.transaction(body)
        return started

    async def rotate_password(self, system_id: str, now: datetime) -> tuple[dict[str, Any], str]:
        password = new_password()
        doc = await self._update(system_id, {"$set": {"password": hash_password(password), "changed_at": now}})
        return doc, password

    async def get(self, system_id: str) -> dict[str, Any] | None:
        doc = await self._raw(system_id)
        return public(doc) if doc else None

    async def _raw(self, system_id: str) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] | None = await self.accounts.find_one({"_id": system_id})
            return doc
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def list(self, tenant_id: str | None = None) -> builtins.list[dict[str, Any]]:
        query = {} if tenant_id is None else {"tenant_id": tenant_id}
        try:
            return [public(d) async for d in self.accounts.find(query).sort("_id")]
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def credentials(self, system_id: str) -> tuple[SmppAccount, dict[str, Any]] | None:
        """(account, stored password hash) for a bind; None for an unknown system_id."""
        doc = await self._raw(system_id)
        return None if doc is None else (account_of(doc), doc["password"])
