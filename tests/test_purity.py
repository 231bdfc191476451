"""Deciders read no clock and make no ids: replay must get the same answer (STYLE §1).

Imports are held by the import-linter contracts in pyproject.toml; this catches the calls that
an allowed import (`datetime`) could still make.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parent.parent / "services"
DECIDERS = sorted(SERVICES.glob("*/decider.py")) + [SERVICES / "catalog.py"]
FORBIDDEN_CALLS = {"now", "utcnow", "today", "uuid4", "uuid1", "time", "monotonic", "perf_counter", "random"}


@pytest.mark.parametrize("path", DECIDERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_decider_calls_no_clock_or_randomness(path: Path) -> None:
    tree = ast.parse(path.read_text())
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
             for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not calls & FORBIDDEN_CALLS, f"{path} calls {calls & FORBIDDEN_CALLS}"


def test_every_service_decider_exposes_the_same_three_names() -> None:
    for path in SERVICES.glob("*/decider.py"):
        names = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        # the auditor's decision is a row, not an event: `row_for` takes the place of `decide`
        expected = {"initial_state", "evolve", "row_for" if path.parent.name == "auditor" else "decide"}
        assert expected <= names, f"{path} lacks {expected - names}"
