"""The delta package and the merging package import in any order in a fresh interpreter, with no cycle inside delta."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def fresh(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(
    "first, second", [("rankwise.delta", "rankwise.merging"), ("rankwise.merging", "rankwise.delta")]
)
def test_delta_and_merging_import_in_either_order(first, second):
    names = [
        "Delta",
        "extract_delta",
        "apply_delta_",
        "apply_delta_checkpoint",
        "load_peft",
        "save_peft",
        "allocate_delta_ranks",
    ]
    code = (
        f"import {first}, {second}, rankwise.peft_export, rankwise; "
        f"print(all(callable(getattr(rankwise.delta, n)) for n in {names!r}), "
        "rankwise.extract_delta is rankwise.delta.extract_delta, "
        "rankwise.peft_export.load_peft is rankwise.delta.load_peft, callable(rankwise.merging.merge))"
    )
    assert fresh(code) == "True True True True"


def delta_imports(module: str) -> set[str]:
    """The sibling modules of rankwise/delta/ that ``module`` imports, at module level or inside functions."""
    tree = ast.parse((Path(SRC) / "rankwise" / "delta" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rankwise.delta."):
            found.add(node.module.split(".")[2])
    return found


def test_delta_modules_import_only_those_below_them():
    # the PEFT format module does not import the data class, which imports it: the cycle delta.py and
    # peft_export.py had (one of them importing inside a method) is gone
    order = ["peft", "core", "extract", "apply"]
    assert sorted(p.stem for p in (Path(SRC) / "rankwise" / "delta").glob("*.py")) == sorted([*order, "__init__"])
    for i, module in enumerate(order):
        assert delta_imports(module) <= set(order[:i]), module
