"""Every input the OpenAPI document declares is bounded, and every operation documents its errors.

A generated request can only reach a database with values the document allows, so the document must
allow nothing a database refuses (MongoDB stores integers of 64 bits at most) or that costs without
limit (strings, lists). The property-based run (tests/e2e/test_api_contract.py) checks the api keeps
what the document says; this checks the document says enough. No servers: it reads app.openapi().
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from api.app import create_app
from core.config import Settings

INT64 = 2**63 - 1
BODY_METHODS = {"post", "put", "patch"}


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    return create_app(Settings(mongo_url="mongodb://unused.invalid", admin_key="k")).openapi()


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = doc["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _bounded_pattern(pattern: str) -> bool:
    """A pattern whose every repetition has an upper count (`{1,16}`, never `*` or `+`)."""
    return "{" in pattern and "*" not in pattern and "+" not in pattern.replace("\\+", "")


def _scalar_problem(node: dict[str, Any]) -> str | None:
    kind = node.get("type")
    if kind == "integer":
        low, high = node.get("minimum", node.get("exclusiveMinimum")), node.get("maximum", node.get("exclusiveMaximum"))
        if low is None or high is None or not -INT64 <= low <= high <= INT64:
            return f"integer in [{low}, {high}]"
    if kind == "number" and node.get("maximum", node.get("exclusiveMaximum")) is None:
        return "number without a maximum"
    if kind == "string" and not ({"maxLength", "enum", "const", "format"} & node.keys()
                                 or _bounded_pattern(node.get("pattern", ""))):
        return "string without a maximum length"
    return None


def _unbounded(doc: dict[str, Any], schema: dict[str, Any], where: str, seen: frozenset[str] = frozenset()
               ) -> Iterator[str]:
    """Paths to the unbounded values of a request schema."""
    ref = schema.get("$ref")
    if ref in seen:
        return
    node = _resolve(doc, schema)
    seen = seen | {ref} if ref else seen
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(node.get(key, [])):
            yield from _unbounded(doc, sub, f"{where}/{key}{i}", seen)
    problem = _scalar_problem(node)
    if problem:
        yield f"{where}: {problem}"
    if node.get("type") == "array":
        if "maxItems" not in node:
            yield f"{where}: array without maxItems"
        yield from _unbounded(doc, node.get("items", {}), f"{where}[]", seen)
    for name, prop in node.get("properties", {}).items():
        yield from _unbounded(doc, prop, f"{where}.{name}", seen)
    if node.get("type") == "object" and node.get("additionalProperties", False) not in (False, None):
        yield f"{where}: object open to any property"


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield f"{method.upper()} {path}", op


def test_every_request_input_is_bounded(openapi: dict[str, Any]) -> None:
    problems: list[str] = []
    for label, op in _operations(openapi):
        for param in op.get("parameters", []):
            if param["in"] != "header" or param["name"].lower() != "authorization":
                problems += _unbounded(openapi, param["schema"], f"{label} {param['in']}.{param['name']}")
        for media, content in op.get("requestBody", {}).get("content", {}).items():
            if media == "application/json":
                problems += _unbounded(openapi, content["schema"], f"{label} body")
    assert not problems, "\n".join(problems)


def test_every_operation_documents_its_errors(openapi: dict[str, Any]) -> None:
    problems: list[str] = []
    for label, op in _operations(openapi):
        documented = set(op["responses"])
        needed = {"422"}
        if label.split()[1].startswith("/v1/"):
            needed |= {"401", "403", "503"}  # authenticated, and every /v1 operation reads MongoDB
        if "{" in label and not label.endswith("/recipients"):
            needed.add("404")
        if label.split()[0].lower() in BODY_METHODS and "application/json" in op.get("requestBody", {}).get(
                "content", {}):
            needed |= {"400", "413", "415"}
        if not label.startswith("GET /healthz"):
            problems += [f"{label}: {status} not documented" for status in sorted(needed - documented)]
        for status, response in op["responses"].items():
            if status >= "400":
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if schema.get("$ref", "").rsplit("/", 1)[-1] != "ErrorResponse":
                    problems.append(f"{label}: {status} without the ErrorResponse schema")
    assert not problems, "\n".join(problems)
