"""Keyword parsing and suppression matching (core/domain/consent.py): pure, no servers."""

from __future__ import annotations

import pytest

from core.domain.consent import (
    ALL_SENDERS,
    ConsentAction,
    ConsentSettings,
    InvalidConsentSetting,
    blocked,
    keyword_action,
    keyword_changes,
    may_be_keyword,
    normalize_address,
    parse_settings,
    stream_id,
)

DEFAULT = ConsentSettings()


@pytest.mark.parametrize(("text", "action"), [
    ("STOP", ConsentAction.STOP), ("  stop \n", ConsentAction.STOP), ("Unsubscribe", ConsentAction.STOP),
    ("cancel", ConsentAction.STOP), ("END", ConsentAction.STOP), ("quit", ConsentAction.STOP),
    ("StopAll", ConsentAction.STOP_ALL), ("start", ConsentAction.START), ("UNSTOP", ConsentAction.START),
])  # fmt: skip
def test_english_keywords_are_always_on_trimmed_and_case_insensitive(text: str, action: ConsentAction) -> None:
    assert keyword_action(text, DEFAULT) == action


@pytest.mark.parametrize("text", ["", "   ", "stop please", "STOP!", "stopp", "please STOP", "s t o p", "x" * 30])
def test_other_texts_are_not_keywords(text: str) -> None:
    assert keyword_action(text, DEFAULT) is None


def test_tenant_languages_and_keywords_add_to_english() -> None:
    settings = parse_settings({"languages": ["de", "fr"], "keywords": {"Halt": "stop_all", "weiter": "start"}})
    assert keyword_action("stopp", settings) == ConsentAction.STOP
    assert keyword_action("Arrêt", settings) == ConsentAction.STOP
    assert keyword_action("HALT", settings) == ConsentAction.STOP_ALL
    assert keyword_action("Weiter", settings) == ConsentAction.START
    assert keyword_action("STOP", settings) == ConsentAction.STOP  # English stays on
    assert keyword_action("baja", settings) is None  # Spanish was not chosen


def test_a_tenant_keyword_overrides_a_builtin_one() -> None:
    settings = parse_settings({"keywords": {"END": "stop_all"}})
    assert keyword_action("end", settings) == ConsentAction.STOP_ALL


@pytest.mark.parametrize(("raw", "field"), [
    ({"languages": ["xx"]}, "languages"), ({"languages": "de"}, "languages"),
    ({"keywords": {"two words": "stop"}}, "keywords"), ({"keywords": {"HALT": "pause"}}, "keywords"),
    ({"keywords": ["HALT"]}, "keywords"), ({"confirm": "yes"}, "confirm"),
    ({"confirm_texts": {"stop": ""}}, "confirm_texts"), ({"confirm_texts": {"later": "x"}}, "confirm_texts"),
    ({"colour": "red"}, "colour"),
])  # fmt: skip
def test_bad_settings_name_their_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidConsentSetting) as e:
        parse_settings(raw)
    assert e.value.field == field


def test_settings_round_trip_through_their_document() -> None:
    settings = parse_settings({"languages": ["es"], "keywords": {"alto2": "stop"}, "confirm": True,
                               "confirm_texts": {"stop": "Bye"}})
    again = parse_settings(settings.to_doc())
    assert again == settings
    assert again.confirmation(ConsentAction.STOP) == "Bye"
    assert "START" in again.confirmation(ConsentAction.STOP_ALL)  # the default text


def test_stop_targets_the_sender_stopall_every_sender_and_start_lifts_both() -> None:
    stop = keyword_changes(ConsentAction.STOP, "+4915112345678", "+4930111111", "keyword", "mo:1", " stop ")
    assert [(c.address, c.scope, c.opt_out) for c in stop] == [("+4915112345678", "+4930111111", True)]
    assert stop[0].extra == {"keyword": "stop"}
    stop_all = keyword_changes(ConsentAction.STOP_ALL, "+4915112345678", "+4930111111", "keyword", "mo:1", "STOPALL")
    assert [(c.scope, c.opt_out) for c in stop_all] == [(ALL_SENDERS, True)]
    start = keyword_changes(ConsentAction.START, "+4915112345678", "+4930111111", "keyword", "mo:1", "START")
    assert [(c.scope, c.opt_out) for c in start] == [("+4930111111", False), (ALL_SENDERS, False)]


def test_blocked_matches_the_senders_scope_or_every_sender() -> None:
    active = [("sms", "+4915100000001", "+4930111111"), ("sms", "+4915100000002", ALL_SENDERS)]
    items = [("sms", "+4915100000001", "4930111111"),  # numeric sender without "+": same scope
             ("sms", "+4915100000001", "AcmeShop"),  # another sender: not blocked
             ("sms", "+4915100000002", "AcmeShop"),  # all senders
             ("sms", "+4915100000003", "+4930111111")]  # not on the list
    assert blocked(items, active) == {0: "+4930111111", 2: ALL_SENDERS}
    assert blocked(items, []) == {}


def test_addresses_are_normalised_like_mo_numbers() -> None:
    assert normalize_address("4930111111") == "+4930111111"
    assert normalize_address("+4930111111") == "+4930111111"
    assert normalize_address("12345") == "12345"  # a short code stays as it is
    assert normalize_address("AcmeShop") == "AcmeShop"
    assert normalize_address(ALL_SENDERS) == ALL_SENDERS
    assert stream_id("acme", "sms", "+49151", "*") == "sup:acme:sms:+49151:*"


def test_may_be_keyword_is_a_cheap_superset() -> None:
    assert may_be_keyword(" STOP ") and may_be_keyword("Arrêt")
    assert not may_be_keyword("stop please") and not may_be_keyword("") and not may_be_keyword("x" * 21)
