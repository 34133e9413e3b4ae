"""E-mail rules, MIME and provider answers (core/domain/email.py, core/domain/email_mime.py): pure."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from typing import Any

import pytest

from api.email_submission import normal_address
from core.domain.email import (
    MAX_SUBJECT_CHARS,
    EmailContent,
    EmailRefused,
    MailResult,
    check_email,
    circuit_open_decision,
    decide_mail,
)
from core.domain.email_mime import build_mime
from core.domain.outcomes import Verdict
from core.domain.routing import Route, RouteStatus, choose_route

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def fields(**overrides: str) -> dict[str, str]:
    return {"to": "Bob@Example.org", "from": "shop@acme.example", "subject": "Your order", "text": "Thanks",
            **overrides}


def check(**overrides: Any) -> EmailContent:
    return check_email(fields(**overrides), max_body_bytes=1000, address=normal_address)


def refused(**overrides: Any) -> EmailRefused:
    with pytest.raises(EmailRefused) as e:
        check(**overrides)
    return e.value


def test_a_valid_email_is_normalised() -> None:
    c = check(reply_to="help@acme.example", from_name="Acme", html="<b>Thanks</b>")
    assert (c.to, c.sender, c.reply_to, c.from_name) == ("Bob@example.org", "shop@acme.example",
                                                         "help@acme.example", "Acme")
    assert c.accepted_fields() == {"subject": "Your order", "html": "<b>Thanks</b>", "from_name": "Acme",
                                   "reply_to": "help@acme.example"}


@pytest.mark.parametrize("name", ["to", "from", "from_name", "reply_to", "subject"])
@pytest.mark.parametrize("breaker", ["\r\n", "\n", "\r"])
def test_cr_or_lf_in_any_header_field_is_header_injection(name: str, breaker: str) -> None:
    value = f"x@acme.example{breaker}Bcc: victim@example.org"
    e = refused(**{name: value})
    assert (e.code, e.field) == ("header_injection", name)


@pytest.mark.parametrize(("name", "value"), [("to", "not-an-address"), ("from", "a@b"), ("to", "x@@acme.example"),
                                             ("reply_to", "nobody"), ("to", "jürgen@acme.example")])
def test_bad_addresses_are_invalid_email(name: str, value: str) -> None:
    e = refused(**{name: value})
    assert (e.code, e.field) == ("invalid_email", name)


def test_subject_over_998_characters_is_refused() -> None:
    assert check(subject="s" * MAX_SUBJECT_CHARS).subject == "s" * MAX_SUBJECT_CHARS
    e = refused(subject="s" * (MAX_SUBJECT_CHARS + 1))
    assert (e.code, e.field) == ("subject_too_long", "subject")


def test_text_and_html_together_over_the_limit_are_body_too_large() -> None:
    assert check(text="t" * 500, html="h" * 500)
    e = refused(text="t" * 500, html="h" * 501)
    assert e.code == "body_too_large"
    assert refused(text="ü" * 501).code == "body_too_large"  # counted in UTF-8 bytes


def test_mime_of_text_and_html_is_multipart_alternative_with_rfc2047_headers() -> None:
    c = EmailContent(to="bob@example.org", sender="shop@acme.example", subject="Grüße, 20 % Rabatt",
                     text="Hallo Jürgen", html="<p>Hallo Jürgen</p>", from_name="Café Acme",
                     reply_to="help@acme.example")
    raw = build_mime(c, "01MSG", NOW).raw
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii() and b"=?utf-8?" in head
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == "Grüße, 20 % Rabatt"
    assert parsed["From"].addresses[0].display_name == "Café Acme"  # type: ignore[attr-defined]
    assert parsed["Message-ID"] == "<01MSG@acme.example>" and parsed["Reply-To"] == "help@acme.example"
    assert parsed.get_content_type() == "multipart/alternative"
    parts = list(parsed.iter_parts())  # type: ignore[attr-defined]
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().strip() == "Hallo Jürgen" and "Jürgen" in parts[1].get_content()


@pytest.mark.parametrize(("text", "html", "kind"), [("only text", "", "text/plain"), ("", "<p>x</p>", "text/html")])
def test_a_single_body_is_a_single_part(text: str, html: str, kind: str) -> None:
    c = EmailContent(to="bob@example.org", sender="shop@acme.example", subject="s", text=text, html=html)
    parsed = email.message_from_bytes(build_mime(c, "01MSG", NOW).raw, policy=email.policy.default)
    assert parsed.get_content_type() == kind and not parsed.is_multipart()


@pytest.mark.parametrize(("result", "verdict", "exclude", "failed_route"), [
    (MailResult(code=250, text="ok", provider_id="q1"), Verdict.SENT, False, False),
    (MailResult(code=451, text="try later"), Verdict.RETRY, True, True),
    (MailResult(code=421, text="closing"), Verdict.RETRY, True, True),
    (MailResult(code=550, text="no such user"), Verdict.FAILED, False, False),
    (MailResult(code=202, protocol="http"), Verdict.SENT, False, False),
    (MailResult(code=429, protocol="http"), Verdict.RETRY, True, True),
    (MailResult(code=503, protocol="http"), Verdict.RETRY, True, True),
    (MailResult(code=401, protocol="http"), Verdict.RETRY, True, True),
    (MailResult(code=400, text="bad", protocol="http"), Verdict.FAILED, False, False),
    (MailResult(error="connection refused"), Verdict.RETRY, True, True),
])
def test_provider_answers(result: MailResult, verdict: Verdict, exclude: bool, failed_route: bool) -> None:
    d = decide_mail(result, policy="resend", attempt=1)
    assert d.verdict == verdict and d.exclude_route == exclude and result.route_failed == failed_route
    if verdict == Verdict.FAILED:
        assert d.error_code == result.code and d.reason == result.text


def test_no_answer_after_data_follows_the_unknown_outcome_policy() -> None:
    lost = MailResult(error="connection lost during DATA", maybe_sent=True)
    resend = decide_mail(lost, policy="resend", attempt=1)
    assert resend.verdict == Verdict.RETRY and resend.possible_duplicate and resend.error_name == "OUTCOME_UNKNOWN"
    assert decide_mail(lost, policy="hold", attempt=1).verdict == Verdict.UNKNOWN


def test_an_open_circuit_retries_elsewhere() -> None:
    d = circuit_open_decision("open")
    assert d.verdict == Verdict.RETRY and d.exclude_route and d.error_name == "CIRCUIT_OPEN" and "open" in d.reason


def test_email_goes_only_to_email_routes_and_sms_only_to_smpp_routes() -> None:
    sms = Route(id="smsc", priority=1)
    mail = Route(id="mail", kind="smtp", priority=2)
    status = {"smsc": RouteStatus.UP, "mail": RouteStatus.UP}
    assert choose_route([sms, mail], "bob@example.org", status, channel="email").id == "mail"
    assert choose_route([sms, mail], "+4915112345678", status).id == "smsc"
    assert mail.channel == "email" and Route(id="sg", kind="http", provider="sendgrid").channel == "email"
