"""The domain decides; it does no I/O. Its modules import only the standard library, pydantic and
the domain itself (STYLE.md, habit 1)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

DOMAIN = Path(__file__).resolve().parents[2] / "core" / "domain"
ALLOWED_THIRD_PARTY = {"pydantic"}
FORBIDDEN_STDLIB = {"socket", "subprocess", "asyncio", "threading", "sqlite3", "urllib", "http"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_domain_imports_only_stdlib_pydantic_and_itself() -> None:
    offenders = {}
    for path in sorted(DOMAIN.glob("*.py")):
        bad = {r for r in imported_roots(path)
               if r not in sys.stdlib_module_names and r not in ALLOWED_THIRD_PARTY and r not in ("core", "__future__")}
        bad |= imported_roots(path) & FORBIDDEN_STDLIB
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_domain_imports_of_core_stay_in_the_domain() -> None:
    for path in sorted(DOMAIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("core."):
                assert node.module.startswith("core.domain"), f"{path.name} imports {node.module}"
