"""The dashboard's session: a signed cookie, and the CSRF token of its forms.

The cookie holds `<payload>.<signature>`: the payload is base64url JSON {"exp": unix seconds,
"sid": random id}, the signature an HMAC-SHA256 of the payload under the SESSION SECRET. That secret is
derived from the admin key (HMAC of a fixed label), so every api process behind a load balancer
accepts the same cookies, and changing the admin key logs every operator out. No key is ever put in
the cookie or a URL. A session is valid until `exp` (SESSION_TTL_S after login) or logout, which
clears the cookie (stateless: a copied cookie stays valid until it expires, like any bearer token,
hence the short lifetime).

CSRF: every POST made from the page carries `csrf`, an HMAC of the session id under the same secret;
the cookie alone (which a browser would attach to a forged cross-site form) is not enough. The cookie
is also `SameSite=Strict` and `HttpOnly`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

COOKIE = "msgcore_dashboard"
SESSION_TTL_S = 8 * 3600
_LABEL = b"msgcore dashboard session v1"


@dataclass(frozen=True)
class Session:
    sid: str
    expires_at: int  # unix seconds


def session_secret(admin_key: str) -> bytes:
    """The key that signs cookies and CSRF tokens, derived from the admin key (never the key itself)."""
    return hmac.new(admin_key.encode(), _LABEL, hashlib.sha256).digest()


def _sign(secret: bytes, data: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.new(secret, data, hashlib.sha256).digest()).decode().rstrip("=")


def issue(secret: bytes, now: float | None = None, ttl_s: int = SESSION_TTL_S) -> tuple[str, Session]:
    """A new session and its cookie value."""
    session = Session(sid=secrets.token_urlsafe(16), expires_at=int((now or time.time()) + ttl_s))
    payload = base64.urlsafe_b64encode(json.dumps({"exp": session.expires_at, "sid": session.sid}).encode())
    body = payload.decode().rstrip("=")
    return f"{body}.{_sign(secret, body.encode())}", session


def verify(secret: bytes, cookie: str | None, now: float | None = None) -> Session | None:
    """The session of a cookie value, or None if it is missing, malformed, forged or expired."""
    if not cookie or cookie.count(".") != 1 or len(cookie) > 512:
        return None
    body, signature = cookie.split(".")
    if not hmac.compare_digest(signature.encode(), _sign(secret, body.encode()).encode()):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        session = Session(sid=str(data["sid"]), expires_at=int(data["exp"]))
    except (ValueError, KeyError, TypeError):
        return None
    return session if session.expires_at > (now or time.time()) else None


def csrf_token(secret: bytes, session: Session) -> str:
    return _sign(secret, b"csrf:" + session.sid.encode())


def csrf_ok(secret: bytes, session: Session, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(str(token).encode(), csrf_token(secret, session).encode())


def key_ok(admin_key: str, offered: str) -> bool:
    """The offered key is the admin key (constant time); never true when no admin key is configured."""
    return bool(admin_key) and hmac.compare_digest(offered.encode(), admin_key.encode())
