"""Status webhooks, the pure part: signature (checked by an independent implementation), back-off,
event matching, payload, and the SSRF address classes."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from core.domain.webhooks import (
    AddressClass,
    InvalidWebhookUrl,
    backoff_s,
    body_bytes,
    classify_address,
    forbidden_addresses,
    gives_up,
    payload,
    signature,
    wants,
)
from core.workers.webhooks_send import split_url


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"id":"m1:1"}'
    header = signature("whsec_abc", 1_700_000_000, body)
    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    expected = hmac.HMAC(b"whsec_abc", b"1700000000." + body, "sha256").hexdigest()
    assert t == "1700000000" and v1 == expected
    assert signature("other", 1_700_000_000, body) != header


def test_payload_has_the_documented_fields_and_is_json() -> None:
    at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    doc = {"message_id": "M1", "seq": 4, "type": "delivered", "at": at, "tenant_id": "acme",
           "data": {"smsc_message_id": "x", "done_at": at, "codes": (1, 2)}, "topic": "t", "pos": 9}
    item = payload(doc)
    assert set(item) == {"id", "message_id", "type", "seq", "at", "data"}
    assert item["id"] == "M1:4" and item["at"] == "2026-11-30T12:00:00Z"
    assert json.loads(body_bytes(item))["data"] == {"smsc_message_id": "x", "done_at": "2026-11-30T12:00:00Z",
                                                    "codes": [1, 2]}


def test_event_matching() -> None:
    assert wants(["*"], "billed") and wants(["*"], "rejected")
    assert not wants(["*"], "opted_out")  # a suppression entry's fact, not a message's
    assert wants(["delivered", "undelivered"], "delivered")
    assert not wants(["delivered"], "sent")


def test_backoff_grows_exponentially_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    delays = [backoff_s(n, base_s=1.0, cap_s=60.0, rng=rng) for n in range(1, 12)]
    for n, d in enumerate(delays, start=1):
        ceiling = min(60.0, 2 ** (n - 1))
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 60.0
    assert len({round(d, 6) for d in delays[7:]}) > 1  # jitter: capped delays still differ


def test_gives_up_after_max_age() -> None:
    t0 = datetime(2026, 11, 30, tzinfo=UTC)
    assert not gives_up(t0, t0 + timedelta(hours=23), 24 * 3600)
    assert gives_up(t0, t0 + timedelta(hours=24), 24 * 3600)


@pytest.mark.parametrize(("address", "cls"), [
    ("93.184.216.34", AddressClass.PUBLIC), ("2606:4700::1111", AddressClass.PUBLIC),
    ("127.0.0.1", AddressClass.LOOPBACK), ("::1", AddressClass.LOOPBACK), ("::ffff:127.0.0.1", AddressClass.LOOPBACK),
    ("10.1.2.3", AddressClass.PRIVATE), ("192.168.0.10", AddressClass.PRIVATE), ("172.16.5.5", AddressClass.PRIVATE),
    ("100.64.0.1", AddressClass.PRIVATE), ("fd12::1", AddressClass.PRIVATE),
    ("169.254.10.10", AddressClass.LINK_LOCAL), ("fe80::1", AddressClass.LINK_LOCAL),
    ("169.254.169.254", AddressClass.METADATA), ("100.100.100.200", AddressClass.METADATA),
    ("fd00:ec2::254", AddressClass.METADATA), ("0.0.0.0", AddressClass.RESERVED), ("224.0.0.1", AddressClass.RESERVED),
])
def test_address_classes(address: str, cls: AddressClass) -> None:
    assert classify_address(address) is cls


def test_loopback_allowed_only_when_asked_and_any_bad_address_refuses() -> None:
    assert forbidden_addresses(["127.0.0.1"], allow_loopback=True) == {}
    assert forbidden_addresses(["127.0.0.1"], allow_loopback=False) == {"127.0.0.1": AddressClass.LOOPBACK}
    assert forbidden_addresses(["93.184.216.34", "10.0.0.1"], allow_loopback=True) == {"10.0.0.1": AddressClass.PRIVATE}
    assert forbidden_addresses(["169.254.169.254"], allow_loopback=True) == {"169.254.169.254": AddressClass.METADATA}


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http://", "https://user:pw@example.com/", "example.com",
                                 "http://[::1", "http://example.com:99999/"])
def test_unusable_urls(url: str) -> None:
    with pytest.raises(InvalidWebhookUrl):
        split_url(url)


def test_split_url_default_ports() -> None:
    assert split_url("https://example.com/hook") == ("example.com", 443)
    assert split_url("http://127.0.0.1:8081/h") == ("127.0.0.1", 8081)


def test_independent_hmac_check_of_a_whole_body() -> None:
    item = payload({"message_id": "M", "seq": 1, "type": "accepted", "at": datetime(2026, 1, 1, tzinfo=UTC),
                    "data": {"text": "Grüße"}})
    body = body_bytes(item)
    header = signature("s3cret", 42, body)
    mac = hmac.new(b"s3cret", b"42." + body, hashlib.sha256).hexdigest()
    assert header == f"t=42,v1={mac}"
