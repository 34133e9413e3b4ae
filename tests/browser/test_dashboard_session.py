"""The dashboard's session cookie and CSRF token (api/dashboard/session.py): pure functions, no browser."""

from __future__ import annotations

from api.dashboard import session as s

SECRET = s.session_secret("admin-key")


def test_a_cookie_verifies_until_it_expires() -> None:
    cookie, issued = s.issue(SECRET, now=1000.0, ttl_s=60)
    assert s.verify(SECRET, cookie, now=1059.0) == issued
    assert s.verify(SECRET, cookie, now=1060.0) is None
    assert "admin-key" not in cookie


def test_a_tampered_or_foreign_cookie_is_refused() -> None:
    cookie, _ = s.issue(SECRET, now=1000.0)
    body, signature = cookie.split(".")
    assert s.verify(SECRET, body[:-1] + ("A" if body[-1] != "A" else "B") + "." + signature, now=1000.0) is None
    assert s.verify(s.session_secret("another-key"), cookie, now=1000.0) is None  # the admin key changed
    for junk in (None, "", "x", "a.b.c", "." * 600, "e30.AAAA"):
        assert s.verify(SECRET, junk, now=1000.0) is None


def test_the_csrf_token_belongs_to_its_session() -> None:
    _, one = s.issue(SECRET)
    _, other = s.issue(SECRET)
    token = s.csrf_token(SECRET, one)
    assert s.csrf_ok(SECRET, one, token)
    assert not s.csrf_ok(SECRET, other, token)
    assert not s.csrf_ok(SECRET, one, "") and not s.csrf_ok(SECRET, one, None)


def test_no_admin_key_never_logs_in() -> None:
    assert not s.key_ok("", "")
    assert s.key_ok("k", "k") and not s.key_ok("k", "K")
