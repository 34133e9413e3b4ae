"""Campaign message templates: text with `{{tag}}` placeholders filled per recipient.

Pure: standard library only, no I/O.

Syntax: a tag is `{{name}}`, optionally with spaces or tabs inside the braces (`{{ first_name }}`);
a name matches `[A-Za-z_][A-Za-z0-9_]*`. Everything else is literal text, including single braces
and a stray `}}` outside a tag.

Tag names are case-insensitive: they are normalised to lower case here, and the CSV reader
normalises its column names the same way, so `{{First_Name}}` is filled from a column `FIRST_NAME`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

OPEN = "{{"
CLOSE = "}}"
_TAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TAG_PADDING = " \t"


class TemplateError(ValueError):
    """A template that cannot be used; `offset` is the character offset of the problem in the source."""

    def __init__(self, problem: str, offset: int) -> None:
        super().__init__(f"{problem} (at character {offset})")
        self.problem = problem
        self.offset = offset


class MissingTag(ValueError):
    """A row has no value (missing, empty or whitespace-only) for a tag the template uses."""

    def __init__(self, tag: str) -> None:
        super().__init__(f"no value for tag {tag}")
        self.tag = tag


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template; build it with `parse_template`.

    `tags` are the normalised (lower-case) tag names, unique, in order of first appearance.
    `segments` alternates literal text and tag names, starting and ending with a literal (possibly
    empty): `("Hi ", "first_name", "!")`. Odd indexes are tags, so rendering is one list copy, a
    value per odd index and a join.
    """

    source: str
    tags: tuple[str, ...]
    segments: tuple[str, ...]


def parse_template(source: str) -> Template:
    """Parse `source`; raises `TemplateError` for an empty/whitespace-only template, an unclosed `{{`,
    an empty tag, an invalid tag name or a `{{` nested inside a tag. A template without tags is valid."""
    if not source.strip():
        raise TemplateError("the template is empty", 0)
    segments: list[str] = []
    tags: dict[str, None] = {}  # an ordered set
    pos = 0
    while (start := source.find(OPEN, pos)) != -1:
        end = source.find(CLOSE, start + len(OPEN))
        if end == -1:
            raise TemplateError("'{{' is never closed with '}}'", start)
        nested = source.find(OPEN, start + len(OPEN), end)
        if nested != -1:
            raise TemplateError(f"'{{{{' inside the tag opened at character {start} (is a '}}}}' missing?)", nested)
        name = _tag_name(source[start + len(OPEN):end], start)
        segments += (source[pos:start], name)
        tags[name] = None
        pos = end + len(CLOSE)
    segments.append(source[pos:])
    return Template(source=source, tags=tuple(tags), segments=tuple(segments))


def _tag_name(inner: str, offset: int) -> str:
    """The normalised name of a tag whose text between the braces is `inner`."""
    name = inner.strip(_TAG_PADDING)
    if not name:
        raise TemplateError("empty tag '{{}}'", offset)
    if not _TAG_NAME.fullmatch(name):
        raise TemplateError(
            f"invalid tag name {name!r}: use letters, digits and '_', not starting with a digit", offset
        )
    return name.lower()


def render(template: Template, values: Mapping[str, str]) -> str:
    """The template's text with each tag replaced by its value.

    `values` is keyed by normalised (lower-case) tag name, as `Template.tags` lists them; other keys
    are ignored. Each value is inserted with its leading and trailing whitespace stripped (spreadsheet
    cells often carry stray spaces; a name never should) and otherwise verbatim: a value that contains
    `{{x}}` is not expanded again. Raises `MissingTag` for the first tag whose value is missing, empty
    or whitespace-only: a message must never go out with a blank where a name belongs.
    """
    parts = list(template.segments)
    for i in range(1, len(parts), 2):
        tag = parts[i]
        value = values.get(tag)
        if value is None or not (value := value.strip()):
            raise MissingTag(tag)
        parts[i] = value
    return "".join(parts)
