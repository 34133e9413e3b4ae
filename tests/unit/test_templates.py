"""Campaign templates: parsing `{{tag}}` placeholders and rendering them per row (pure)."""

from __future__ import annotations

import pytest

from core.domain.encoding import count_parts
from core.domain.templates import MissingTag, Template, TemplateError, parse_template, render


def test_parse_lists_tags_in_order_of_first_appearance() -> None:
    template = parse_template("Hi {{first_name}}! Stop by {{store_name}}, {{first_name}}.")
    assert template.tags == ("first_name", "store_name")
    assert template.segments == ("Hi ", "first_name", "! Stop by ", "store_name", ", ", "first_name", ".")
    assert template.source == "Hi {{first_name}}! Stop by {{store_name}}, {{first_name}}."


def test_parse_allows_spaces_inside_the_braces() -> None:
    assert parse_template("Hi {{ first_name }} and {{\tstore }}").tags == ("first_name", "store")


def test_tag_names_are_case_insensitive_and_normalised_to_lower_case() -> None:
    template = parse_template("{{First_Name}} {{FIRST_NAME}} {{_x9}}")
    assert template.tags == ("first_name", "_x9")
    assert render(template, {"first_name": "Ann", "_x9": "y"}) == "Ann Ann y"


def test_template_without_tags_renders_as_is() -> None:
    template = parse_template("Sale today only } {single} braces and a stray }} stay")
    assert template.tags == ()
    assert render(template, {}) == "Sale today only } {single} braces and a stray }} stay"


@pytest.mark.parametrize(
    ("source", "offset", "fragment"),
    [
        ("", 0, "empty"),
        ("  \n\t", 0, "empty"),
        ("Hi {{first_name", 3, "never closed"),
        ("Hi {{}} there", 3, "empty tag"),
        ("Hi {{   }} there", 3, "empty tag"),
        ("Hi {{first name}}", 3, "invalid tag name 'first name'"),
        ("Hi {{1x}}", 3, "invalid tag name '1x'"),
        ("Hi {{näme}}", 3, "invalid tag name"),
        ("Hi {{first-name}}", 3, "invalid tag name"),
        ("{{{x}}}", 0, "invalid tag name"),
        ("Hi {{a {{b}} }}", 7, "inside the tag opened at character 3"),
        ("Hi {{name, see {{store}}", 15, "inside the tag"),
    ],
)
def test_parse_errors_name_the_problem_and_offset(source: str, offset: int, fragment: str) -> None:
    with pytest.raises(TemplateError) as info:
        parse_template(source)
    assert info.value.offset == offset
    assert fragment in str(info.value)
    assert f"at character {offset}" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_render_fills_tags_and_strips_surrounding_whitespace_of_values() -> None:
    template = parse_template("Hi {{first_name}}! Stop by {{ store_name }}.")
    values = {"first_name": "  Anna Maria\t", "store_name": "Main St", "unused": "x"}
    assert render(template, values) == "Hi Anna Maria! Stop by Main St."


@pytest.mark.parametrize("value", [None, "", "   ", "\t\r\n"])
def test_render_refuses_a_missing_or_blank_value(value: str | None) -> None:
    template = parse_template("Hi {{first_name}}, see you at {{store}}")
    values = {"store": "Main St"} if value is None else {"store": "Main St", "first_name": value}
    with pytest.raises(MissingTag) as info:
        render(template, values)
    assert info.value.tag == "first_name"
    assert str(info.value) == "no value for tag first_name"


def test_render_reports_the_first_missing_tag_in_template_order() -> None:
    with pytest.raises(MissingTag) as info:
        render(parse_template("{{a}} {{b}} {{c}}"), {"a": "1"})
    assert info.value.tag == "b"


def test_unicode_values_make_the_text_ucs2() -> None:
    template = parse_template("Hi {{first_name}}, your order is ready")
    text = render(template, {"first_name": "أحمد"})
    assert text == "Hi أحمد, your order is ready"
    assert count_parts(text) == ("ucs2", 1)
    assert count_parts(render(template, {"first_name": "Ann"})) == ("gsm7", 1)


def test_values_are_inserted_verbatim_and_never_expanded_again() -> None:
    template = parse_template("Hi {{first_name}} from {{store}}")
    text = render(template, {"first_name": "{{store}} {x} {0}", "store": "Main St"})
    assert text == "Hi {{store}} {x} {0} from Main St"


def test_template_is_a_frozen_value() -> None:
    template = parse_template("Hi {{x}}")
    assert template == parse_template("Hi {{x}}")
    assert isinstance(template, Template)
    with pytest.raises(AttributeError):
        template.source = "other"  # type: ignore[misc]
