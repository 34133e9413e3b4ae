"""The e-mail campaign CSV reader (pure domain): address column, per-row codes, HTML escaping in html
only. The address check is the api's (email-validator), passed in as at acceptance."""

from __future__ import annotations

import pytest

from api.email_submission import normal_address
from core.domain.email_campaign import EmailRecipient, EmailRecipientReader, EmailTemplates
from core.domain.recipients import CsvHeaderError, RowProblem
from core.domain.templates import parse_template


def reader(text: str | None = "Hi {{name}}", html: str | None = "<p>{{name}} &amp; {{city}}</p>",
           subject: str = "For {{name}}", max_body_bytes: int = 10_000) -> EmailRecipientReader:
    templates = EmailTemplates(subject=parse_template(subject), text=parse_template(text) if text else None,
                               html=parse_template(html) if html else None)
    return EmailRecipientReader(templates, sender="shop@acme.example", address=normal_address,
                                max_body_bytes=max_body_bytes)


def rows(r: EmailRecipientReader, csv: str) -> list[EmailRecipient | RowProblem]:
    return list(r.read(csv.splitlines(keepends=True)))  # type: ignore[arg-type]


def test_tags_come_from_all_three_templates_in_order() -> None:
    assert reader().tags == ("name", "city")
    assert reader(text=None, html="<p>{{x}}</p>", subject="{{y}} {{x}}").tags == ("y", "x")


@pytest.mark.parametrize("column", ["email", "E-Mail", "MAIL", " address "])
def test_any_address_column_name_is_taken(column: str) -> None:
    [row] = rows(reader(), f"name,{column},city\nAnn,ann@Example.ORG,Köln\n")
    assert row == EmailRecipient(2, "ann@example.org", "For Ann", "Hi Ann", "<p>Ann &amp; Köln</p>")


def test_a_header_without_an_address_column_is_refused() -> None:
    with pytest.raises(CsvHeaderError) as e:
        rows(reader(), "name,phone,city\nAnn,+4915100000001,Köln\n")
    assert e.value.code == "no_email_column"


def test_values_are_escaped_in_html_only() -> None:
    [row] = rows(reader(), 'email,name,city\nx@example.org,"<script>alert(\'&\')</script>",A "B"\n')
    assert isinstance(row, EmailRecipient)
    assert row.subject == "For <script>alert('&')</script>" and row.text == "Hi <script>alert('&')</script>"
    assert row.html == "<p>&lt;script&gt;alert(&#x27;&amp;&#x27;)&lt;/script&gt; &amp; A &quot;B&quot;</p>"


def test_each_bad_row_has_its_code() -> None:
    csv = ("email,name,city\n"
           "not-an-address,Ann,Köln\n"  # 2
           ",Ann,Köln\n"  # 3
           "bob@example.org,  ,Köln\n"  # 4
           '"eve@example.org","Eve\nBcc: x@example.org",Köln\n'  # 5 (two lines)
           "zoe@example.org,Zoë\n"  # 7
           ",,\n")  # 8
    got = [(p.row, p.code, p.phone) for p in rows(reader(), csv) if isinstance(p, RowProblem)]
    assert got == [(2, "invalid_email", None), (3, "invalid_email", None), (4, "missing_tag", "bob@example.org"),
                   (5, "header_injection", "eve@example.org"), (7, "field_count", "zoe@example.org"),
                   (8, "empty_row", None)]


def test_a_line_break_in_text_or_html_is_fine_and_limits_apply() -> None:
    [row] = rows(reader(subject="Hello"), 'email,name,city\nx@example.org,"A\nB",C\n')
    assert isinstance(row, EmailRecipient) and row.text == "Hi A\nB"
    [big] = rows(reader(max_body_bytes=20), "email,name,city\nx@example.org,Annabelle-Marie,Köln\n")
    assert isinstance(big, RowProblem) and big.code == "body_too_large"
    [long] = rows(reader(subject="{{name}}"), f"email,name,city\nx@example.org,{'a' * 999},C\n")
    assert isinstance(long, RowProblem) and long.code == "subject_too_long"


def test_html_only_and_text_only_campaigns() -> None:
    [html_only] = rows(reader(text=None), "email,name,city\nx@example.org,A,B\n")
    [text_only] = rows(reader(html=None), "email,name,city\nx@example.org,A,B\n")
    assert (html_only.text, html_only.html) == ("", "<p>A &amp; B</p>")  # type: ignore[union-attr]
    assert (text_only.text, text_only.html) == ("Hi A", "")  # type: ignore[union-attr]
