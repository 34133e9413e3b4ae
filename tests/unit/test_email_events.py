"""The e-mail provider's events, pure: SendGrid's signature (its own published test vector), parsing,
the mapping to msgcore events and suppressions, and the lifecycle's transitions for them."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from core.domain.email_events import (
    HARD,
    MAX_EVENTS,
    SOFT,
    InvalidEvents,
    ProviderEvent,
    applicable,
    event_data,
    parse_sendgrid,
    provider_message_id,
    signed_content,
)
from core.domain.errors import InvalidTransition
from core.domain.events import EventType
from core.domain.message import TERMINAL_STATES, MessageState, event_doc
from core.email_signatures import (
    BadKey,
    load_private_key,
    new_private_key,
    private_key_pem,
    public_key_text,
    sign,
    verify,
)

# SendGrid's own test vector for the Signed Event Webhook (sendgrid-python, test/unit/test_eventwebhook.py):
# the body ends with CRLF, and the signature covers timestamp + body byte for byte.
SG_PUBLIC_KEY = ("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaIN"
                 "XvVpiglSI8eNEc6wEA3F+g==")
SG_SIGNATURE = "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM="
SG_TIMESTAMP = "1600112502"
SG_BODY = (json.dumps([{
    "email": "hello@world.com", "event": "dropped", "reason": "Bounced Address",
    "sg_event_id": "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",
    "sg_message_id": "LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
    "smtp-id": "<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>", "timestamp": 1600112492,
}], sort_keys=True, separators=(",", ":")) + "\r\n").encode()
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def test_sendgrids_published_signature_verifies_and_any_change_does_not() -> None:
    assert verify(SG_PUBLIC_KEY, SG_TIMESTAMP, SG_BODY, SG_SIGNATURE)
    assert not verify(SG_PUBLIC_KEY, "1600112503", SG_BODY, SG_SIGNATURE)
    assert not verify(SG_PUBLIC_KEY, SG_TIMESTAMP, SG_BODY.rstrip(), SG_SIGNATURE)  # without the CRLF
    assert not verify(SG_PUBLIC_KEY, SG_TIMESTAMP, SG_BODY, SG_SIGNATURE[:-4] + "AAA=")
    assert not verify(SG_PUBLIC_KEY, SG_TIMESTAMP, SG_BODY, "not base64!")
    other = public_key_text(new_private_key())
    assert not verify(other, SG_TIMESTAMP, SG_BODY, SG_SIGNATURE)
    assert signed_content("12", b"[]") == b"12[]"


def test_our_signing_round_trips_and_bad_keys_are_named() -> None:
    key = load_private_key(private_key_pem(new_private_key()))
    body = b'[{"event":"delivered"}]'
    signature = sign(key, "1700000000", body)
    assert verify(public_key_text(key), "1700000000", body, signature)
    with pytest.raises(BadKey):
        verify("bm90IGEga2V5", "1700000000", body, signature)
    with pytest.raises(BadKey):
        load_private_key(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


def test_parse_maps_each_sendgrid_event_and_skips_unusable_items() -> None:
    items = [
        {"event": "delivered", "sg_event_id": "e1", "sg_message_id": "Q1.filter-1.0", "email": "a@x.org",
         "timestamp": 1700000000, "response": "250 OK"},
        {"event": "bounce", "type": "bounce", "sg_event_id": "e2", "sg_message_id": "Q2.f", "email": "b@x.org",
         "status": "5.1.1", "reason": "550 5.1.1 no such user", "timestamp": 1700000001},
        {"event": "bounce", "type": "blocked", "sg_event_id": "e3", "sg_message_id": "Q3.f", "status": "4.7.1"},
        {"event": "dropped", "reason": "Bounced Address", "sg_event_id": "e4", "sg_message_id": "Q4.f"},
        {"event": "dropped", "reason": "Invalid SMTPAPI header", "sg_event_id": "e5", "sg_message_id": "Q5.f"},
        {"event": "spamreport", "sg_event_id": "e6", "sg_message_id": "Q6.f", "timestamp": "soon"},
        {"event": "open", "sg_event_id": "e7", "sg_message_id": "Q7.f"},
        {"event": "delivered", "sg_message_id": "Q8.f"},  # no event id
        {"event": "bounce", "sg_event_id": "e9"},  # no message id
        "not an object",
    ]
    batch = parse_sendgrid(json.dumps(items).encode())
    got = [(e.event_id, e.kind, e.bounce_type, e.provider_message_id, e.suppresses) for e in batch.events]
    assert got == [("e1", "delivered", "", "Q1", False), ("e2", "bounced", HARD, "Q2", True),
                   ("e3", "bounced", SOFT, "Q3", False), ("e4", "bounced", HARD, "Q4", True),
                   ("e5", "bounced", SOFT, "Q5", False), ("e6", "complained", "", "Q6", True),
                   ("e7", "ignored", "", "Q7", False)]
    assert batch.events[0].at == datetime.fromtimestamp(1700000000, UTC) and batch.events[5].at is None
    assert batch.events[1].status == "5.1.1" and batch.events[1].reason.startswith("550")
    assert [m.split(":")[0] for m in batch.malformed] == ["item 7", "item 8", "item 9"]
    assert provider_message_id("LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-9.0") == "LRzXl_NHStOGhQ4kofSm_A"


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "invalid_json"), (b'{"event": "delivered"}', "invalid_events"),
    (json.dumps([{}] * (MAX_EVENTS + 1)).encode(), "invalid_events")])
def test_a_body_that_is_no_event_array_is_refused_whole(body: bytes, code: str) -> None:
    with pytest.raises(InvalidEvents) as e:
        parse_sendgrid(body)
    assert e.value.code == code


def email_state(state: str = "sent") -> MessageState:
    return MessageState(message_id="m1", tenant_id="acme", state=state, version=4, channel="email",
                        to="bob@example.org", sender="shop@acme.example", route_id="mail", billed=True)


def event(kind: str, bounce_type: str = "") -> ProviderEvent:
    return ProviderEvent(event_id="e1", kind=kind, provider_event=kind, provider_message_id="Q1",
                         email="bob@example.org", at=NOW, bounce_type=bounce_type, status="5.1.1", reason="no user")


def test_the_lifecycle_takes_delivered_then_a_bounce_or_a_complaint_and_nothing_after() -> None:
    sent = email_state()
    for kind in ("delivered", "bounced", "complained"):
        assert applicable(sent, event(kind))
        doc = event_doc(sent, EventType(kind), NOW, event_data(event(kind, HARD), "mail"), route_id="mail")
        assert doc["seq"] == 5 and doc["type"] == kind and doc["data"]["provider_event_id"] == "e1"
        assert kind in TERMINAL_STATES
    delivered = replace(sent, state="delivered")
    assert applicable(delivered, event("bounced", HARD)) and applicable(delivered, event("complained"))
    assert not applicable(delivered, event("delivered"))
    for final in ("bounced", "complained"):
        after = replace(sent, state=final)
        assert not any(applicable(after, event(k)) for k in ("delivered", "bounced", "complained"))
    assert not applicable(replace(sent, channel="sms"), event("delivered"))  # not an SMS receipt path
    assert not applicable(sent, event("ignored"))
    with pytest.raises(InvalidTransition):
        event_doc(replace(sent, state="routed"), EventType.BOUNCED, NOW, {})


def test_event_data_names_the_provider_facts() -> None:
    assert event_data(event("delivered"), "mail") == {
        "route_id": "mail", "provider_event_id": "e1", "provider_message_id": "Q1", "provider_event": "delivered",
        "done_at": NOW, "response": ""}
    bounced = event_data(event("bounced", HARD), "mail")
    assert (bounced["bounce_type"], bounced["code"], bounced["reason"], bounced["bounced_at"]) == (
        HARD, "5.1.1", "no user", NOW)
    assert event_data(event("complained"), "mail")["complained_at"] == NOW


def test_mail_sim_reports_by_recipient_pattern_in_sendgrid_format() -> None:
    from ops.mail_sim.events import EventSettings, events_for, recipient_of

    settings = EventSettings(url="http://127.0.0.1:1/x", key=new_private_key())
    kinds = {to: [(e["event"], e.get("type")) for e in events_for(to, "qid1", settings, 1700000000.0)]
             for to in ("ann@example.org", "Bounce@Example.org", "blocked+7@example.org", "complaint@example.org")}
    assert kinds == {"ann@example.org": [("delivered", None)], "Bounce@Example.org": [("bounce", "bounce")],
                     "blocked+7@example.org": [("bounce", "blocked")],
                     "complaint@example.org": [("delivered", None), ("spamreport", None)]}
    parsed = parse_sendgrid(json.dumps(events_for("bounce@example.org", "qid1", settings, 1700000000.0)).encode())
    assert [(e.kind, e.bounce_type, e.provider_message_id) for e in parsed.events] == [("bounced", HARD, "qid1")]
    raw = b"From: shop@acme.example\r\nTo: =?utf-8?q?Bob?= <bob@example.org>\r\nSubject: x\r\n\r\nbody"
    assert recipient_of(raw) == "bob@example.org" and recipient_of(b"Subject: x\r\n\r\n") == ""
