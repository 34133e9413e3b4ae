"""Consent (opt-out): stop and start keywords, suppression entries and who they block. Pure: no I/O.

A *suppression entry* is `(tenant_id, channel, address, scope)`: the tenant must not send on
`channel` ("sms"; e-mail later feeds the same list) to `address` from the sender id `scope`, or from
any sender when `scope` is `ALL_SENDERS` ("*"). Each entry is a stream in the event log
(`stream_id`): `opted_out` and `opted_in` events, whose fold is the entry's current state
(core/domain/message.py); core/store/suppressions.py keeps that fold as a document.

Keywords: an MO whose trimmed, case-insensitive text is a keyword acts on the handset's number:
- `stop`: opts it out of the sender it wrote to (the tenant's number the MO was sent to);
- `stop_all`: opts it out of every sender of the tenant ("*");
- `start`: opts it back in for that sender, and lifts an all-senders entry (after STOPALL, START to
  any of the tenant's numbers resumes everything: a handset user cannot be expected to know which
  scope they stopped).
English keywords are always on; a tenant adds languages (`LANGUAGES`) and keywords of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

ALL_SENDERS = "*"
CHANNELS = frozenset({"sms"})
STREAM_PREFIX = "sup:"
# Why a message to a suppressed recipient is `rejected` (at acceptance, by the router, or refused in a
# campaign upload): an SMS recipient opted out; an e-mail address is suppressed (also by a hard bounce
# or a complaint).
OPTED_OUT, SUPPRESSED = "opted_out", "suppressed"
REJECTION_REASONS = frozenset({OPTED_OUT, SUPPRESSED})


def rejection_reason(channel: str) -> str:
    return SUPPRESSED if channel == "email" else OPTED_OUT
MAX_KEYWORD_LEN = 20
MAX_TENANT_KEYWORDS = 50
MAX_CONFIRM_TEXT = 160
KEYWORD_RE = re.compile(r"^[^\s\x00-\x1f]{1,20}$")


class ConsentAction(StrEnum):
    STOP = "stop"
    STOP_ALL = "stop_all"
    START = "start"


# Built-in keyword sets; "en" is always on (the list the issue names, as the US carriers' rules).
LANGUAGES: dict[str, dict[str, ConsentAction]] = {
    "en": {"STOP": ConsentAction.STOP, "UNSUBSCRIBE": ConsentAction.STOP, "CANCEL": ConsentAction.STOP,
           "END": ConsentAction.STOP, "QUIT": ConsentAction.STOP, "STOPALL": ConsentAction.STOP_ALL,
           "START": ConsentAction.START, "UNSTOP": ConsentAction.START},
    "de": {"STOPP": ConsentAction.STOP, "ABMELDEN": ConsentAction.STOP, "ENDE": ConsentAction.STOP,
           "ANMELDEN": ConsentAction.START},
    "fr": {"ARRET": ConsentAction.STOP, "ARRÊT": ConsentAction.STOP, "DESABONNER": ConsentAction.STOP,
           "DÉSABONNER": ConsentAction.STOP, "DEMARRER": ConsentAction.START, "DÉMARRER": ConsentAction.START},
    "es": {"BAJA": ConsentAction.STOP, "ALTO": ConsentAction.STOP, "PARAR": ConsentAction.STOP,
           "ALTA": ConsentAction.START},
    "it": {"ANNULLA": ConsentAction.STOP, "BASTA": ConsentAction.STOP, "INIZIA": ConsentAction.START},
    "nl": {"AFMELDEN": ConsentAction.STOP, "STOPPEN": ConsentAction.STOP, "AANMELDEN": ConsentAction.START},
}

DEFAULT_CONFIRMATIONS: dict[ConsentAction, str] = {
    ConsentAction.STOP: "You have been unsubscribed and will receive no more messages from this number. "
                        "Reply START to resubscribe.",
    ConsentAction.STOP_ALL: "You have been unsubscribed from all our messages. Reply START to resubscribe.",
    ConsentAction.START: "You have been resubscribed. Reply STOP to unsubscribe.",
}


class InvalidConsentSetting(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class ConsentSettings:
    """A tenant's keyword settings: extra `languages`, extra `keywords` (word -> action), and whether
    a keyword that changed the list is answered (`confirm`, default off), with optional texts."""

    languages: tuple[str, ...] = ()
    keywords: Mapping[str, ConsentAction] = field(default_factory=dict)
    confirm: bool = False
    confirm_texts: Mapping[ConsentAction, str] = field(default_factory=dict)

    def keyword_table(self) -> dict[str, ConsentAction]:
        """Every keyword in force, case-folded -> action; the tenant's own win over the built-ins."""
        table: dict[str, ConsentAction] = {}
        for lang in ("en", *self.languages):
            table.update({k.casefold(): a for k, a in LANGUAGES[lang].items()})
        table.update({k.casefold(): a for k, a in self.keywords.items()})
        return table

    def confirmation(self, action: ConsentAction) -> str:
        return self.confirm_texts.get(action) or DEFAULT_CONFIRMATIONS[action]

    def to_doc(self) -> dict[str, object]:
        return {"languages": list(self.languages), "keywords": {k: a.value for k, a in self.keywords.items()},
                "confirm": self.confirm, "confirm_texts": {a.value: t for a, t in self.confirm_texts.items()}}


def parse_settings(raw: Mapping[str, object]) -> ConsentSettings:
    """Validated settings from a document or request body; raises InvalidConsentSetting."""
    unknown = set(raw) - {"languages", "keywords", "confirm", "confirm_texts"}
    if unknown:
        raise InvalidConsentSetting(sorted(unknown)[0], "not a consent setting")
    languages = raw.get("languages") or []
    if not isinstance(languages, list) or any(lang not in LANGUAGES for lang in languages):
        raise InvalidConsentSetting("languages", f"a list of {', '.join(sorted(LANGUAGES))}")
    keywords = _parse_keywords(raw.get("keywords") or {})
    confirm = raw.get("confirm", False)
    if not isinstance(confirm, bool):
        raise InvalidConsentSetting("confirm", "true or false")
    texts = raw.get("confirm_texts") or {}
    if not isinstance(texts, dict):
        raise InvalidConsentSetting("confirm_texts", "an object action -> text")
    confirm_texts: dict[ConsentAction, str] = {}
    for action, text in texts.items():
        if action not in ConsentAction.__members__.values() or not isinstance(text, str) \
                or not 0 < len(text.strip()) <= MAX_CONFIRM_TEXT:
            raise InvalidConsentSetting("confirm_texts", f"{action!r}: an action (stop, stop_all, start) and a "
                                        f"text of 1-{MAX_CONFIRM_TEXT} characters")
        confirm_texts[ConsentAction(action)] = text
    return ConsentSettings(tuple(dict.fromkeys(lang for lang in languages if lang != "en")), keywords, confirm,
                           confirm_texts)


def _parse_keywords(raw: object) -> dict[str, ConsentAction]:
    if not isinstance(raw, dict) or len(raw) > MAX_TENANT_KEYWORDS:
        raise InvalidConsentSetting("keywords", f"an object of at most {MAX_TENANT_KEYWORDS} keyword -> action")
    out: dict[str, ConsentAction] = {}
    for word, action in raw.items():
        if not isinstance(word, str) or not KEYWORD_RE.match(word.strip()):
            raise InvalidConsentSetting("keywords", f"{word!r}: one word of 1-{MAX_KEYWORD_LEN} characters")
        if action not in ConsentAction.__members__.values():
            raise InvalidConsentSetting("keywords", f"{word!r}: action must be stop, stop_all or start")
        out[word.strip().upper()] = ConsentAction(action)
    return out


def keyword_action(text: str, settings: ConsentSettings) -> ConsentAction | None:
    """The action of an MO text, or None when it is not a keyword (trimmed, case-insensitive)."""
    word = text.strip()
    if not word or len(word) > MAX_KEYWORD_LEN:
        return None
    return settings.keyword_table().get(word.casefold())


def may_be_keyword(text: str) -> bool:
    """Cheap pre-check: could this text be a keyword at all (before reading any tenant's settings)."""
    word = text.strip()
    return 0 < len(word) <= MAX_KEYWORD_LEN and not any(c.isspace() for c in word)


def normalize_address(address: str) -> str:
    """A number or sender id as msgcore spells it: "+digits" for an all-digit address of 7 or more
    digits (with or without "+"), anything else (short codes, alphanumeric ids, "*") as given. The
    same rule as smsc.inbound.e164, so a scope taken from an MO matches the sender of a submission."""
    digits = address.strip().lstrip("+")
    return f"+{digits}" if digits.isdigit() and len(digits) >= 7 else address.strip()


def stream_id(tenant_id: str, channel: str, address: str, scope: str) -> str:
    """The event stream (`message_id` in `events`) of one suppression entry."""
    return f"{STREAM_PREFIX}{tenant_id}:{channel}:{address}:{scope}"


def is_consent_stream(message_id: str) -> bool:
    return message_id.startswith(STREAM_PREFIX)


@dataclass(frozen=True)
class Change:
    """Opt `address` out of (`opt_out`) or back into `scope` on `channel`, with who and why.

    `source`: "keyword" (an MO), "api", "import", "cli"; `actor`: who (e.g. "mo:<inbound id>",
    "api:<key prefix>"); `reason`: free text; `extra`: more audit data (the keyword)."""

    channel: str
    address: str
    scope: str
    opt_out: bool
    source: str
    actor: str
    reason: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)


def keyword_changes(action: ConsentAction, handset: str, tenant_number: str, source: str, actor: str,
                    keyword: str) -> list[Change]:
    """The changes an MO keyword asks for (see the module docstring for START)."""
    extra = {"keyword": keyword.strip()}
    reason = f"keyword {keyword.strip()!r}"
    if action == ConsentAction.STOP:
        return [Change("sms", handset, tenant_number, True, source, actor, reason, extra)]
    if action == ConsentAction.STOP_ALL:
        return [Change("sms", handset, ALL_SENDERS, True, source, actor, reason, extra)]
    return [Change("sms", handset, scope, False, source, actor, reason, extra)
            for scope in (tenant_number, ALL_SENDERS)]


def blocked(items: Sequence[tuple[str, str, str]], active: Iterable[tuple[str, str, str]]) -> dict[int, str]:
    """Index -> blocking scope for each item `(channel, to, sender)` that an active entry
    `(channel, address, scope)` suppresses (its sender's scope or "*")."""
    entries = set(active)
    if not entries:
        return {}
    out: dict[int, str] = {}
    for i, (channel, to, sender) in enumerate(items):
        address = normalize_address(to)
        for scope in (normalize_address(sender), ALL_SENDERS):
            if (channel, address, scope) in entries:
                out[i] = scope
                break
    return out
