"""The hand-written MIME document (core/domain/email_mime.py) read back by the standard library's
parser, and SMTP dot-stuffing (core/workers/mailer_smtp.py): pure."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

import pytest

from core.domain.email import EmailContent
from core.domain.email_mime import build_mime
from core.workers.mailer_smtp import dot_stuffed

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def content(**overrides: str) -> EmailContent:
    fields = {"to": "bob@example.org", "sender": "shop@acme.example", "subject": "Your order", "text": "Thanks",
              **overrides}
    return EmailContent(**fields)


def parsed(c: EmailContent, longest: int = 78) -> email.message.EmailMessage:
    raw = build_mime(c, "01MSG", NOW).raw
    assert raw.isascii() and b"\n" not in raw.replace(b"\r\n", b"")  # 7-bit, CRLF only
    assert max(len(line) for line in raw.split(b"\r\n")) <= longest  # RFC 5322: SHOULD be <= 78, MUST <= 998
    return email.message_from_bytes(raw, policy=email.policy.default)


@pytest.mark.parametrize("subject", ["s" * 998, "Grüße " * 150, "a literal =?utf-8?q?x?= is no encoded word",
                                     "tab\tand  two spaces", ""])
def test_long_or_odd_subjects_come_back_unchanged(subject: str) -> None:
    assert parsed(content(subject=subject))["Subject"] == subject


@pytest.mark.parametrize("name", ['Acme "Best" Shop', "Müller, Söhne & Co.", "O'Brien (sales)", "Acme, " * 40,
                                  "Café " * 60])
def test_display_names_with_specials_or_non_ascii_come_back_unchanged(name: str) -> None:
    msg = parsed(content(from_name=name), longest=998)
    assert msg["From"].addresses[0].display_name == name
    assert msg["From"].addresses[0].addr_spec == "shop@acme.example"


def test_a_display_name_too_long_for_one_line_is_folded() -> None:
    name = "Café Acme " * 150
    msg = parsed(content(from_name=name), longest=998)
    got = msg["From"].addresses[0].display_name
    assert "".join(got.split()) == "".join(name.split())  # readers differ on the space between encoded words


def test_bodies_are_quoted_printable_utf8_and_come_back_unchanged() -> None:
    text = "Zeile 1 mit Ümlaut = gleich\n\n" + "lang " * 40 + "\ntrailing space \n.\nFrom here"
    html = "<p>" + "€" * 100 + "</p>"
    msg = parsed(content(text=text, html=html))
    plain, rich = msg.iter_parts()
    for part, body in ((plain, text), (rich, html)):
        assert part["Content-Transfer-Encoding"] == "quoted-printable" and part.get_content_charset() == "utf-8"
        assert part.get_content().replace("\r\n", "\n").rstrip("\n") == body


def test_headers_of_a_single_html_part() -> None:
    msg = parsed(content(text="", html="<b>x</b>", reply_to="help@acme.example"))
    assert msg.get_content_type() == "text/html" and not msg.is_multipart()
    assert msg["MIME-Version"] == "1.0" and msg["X-Msgcore-Id"] == "01MSG"
    assert msg["Message-ID"] == "<01MSG@acme.example>" and msg["Reply-To"] == "help@acme.example"
    assert msg["Date"].datetime == NOW
    mime = build_mime(content(), "01MSG", NOW)
    assert (mime.message_id_header, mime.msgcore_id) == ("<01MSG@acme.example>", "01MSG")


@pytest.mark.parametrize("field", ["subject", "from_name", "to", "reply_to"])
def test_cr_or_lf_never_reaches_a_header(field: str) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        build_mime(content(**{field: "x@acme.example\r\nBcc: victim@example.org"}), "01MSG", NOW)


@pytest.mark.parametrize(("raw", "wire"), [
    (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
    (b".first\r\nx", b"..first\r\nx\r\n.\r\n"),
    (b"a\r\n.\r\n..\r\n", b"a\r\n..\r\n...\r\n.\r\n"),
    (b"no dots", b"no dots\r\n.\r\n"),
])
def test_dot_stuffing(raw: bytes, wire: bytes) -> None:
    assert dot_stuffed(raw) == wire
