"""The structure README's Architecture section promises: imports go one way, importing has no side effects,
functions are short enough to read at once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

FRAMEWORK = Path(__file__).resolve().parents[1] / "framework"
# Each package may import only packages of lower layers (and itself): tasks wire everything; engine, launch and
# tracking stand beside each other; models, data, optim and config below them; neutral ground at the bottom.
LAYERS = {
    "tasks": 3,
    "engine": 2,
    "launch": 2,
    "tracking": 2,
    "models": 1,
    "data": 1,
    "optim": 1,
    "config": 1,
    "runtime": 0,
    "errors": 0,
    "paths": 0,
    "schema": 0,
}
MAX_FUNCTION_LINES = 60
LONG_MARK = "# long:"  # on the def line (or the line above): why this function is longer, if it must be


def _package(path: Path) -> str:
    return path.relative_to(FRAMEWORK).parts[0].removesuffix(".py")


def _imported_packages(path: Path) -> set[str]:
    """The framework packages a module imports (at any depth in the file, including inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("framework.")}
    return found


def _modules() -> list[Path]:
    return sorted(p for p in FRAMEWORK.rglob("*.py") if p != FRAMEWORK / "__init__.py")


def test_every_package_has_a_layer():
    assert {_package(p) for p in _modules()} <= set(LAYERS)


def test_imports_go_one_way():
    wrong = []
    for path in _modules():
        source = _package(path)
        for target in _imported_packages(path) - {source}:
            if LAYERS[target] >= LAYERS[source]:
                wrong.append(f"{path.relative_to(FRAMEWORK.parent)} imports framework.{target}")
    assert not wrong, "imports against the layers (README, Architecture):\n" + "\n".join(wrong)


def test_the_layer_check_sees_a_wrong_way_import(tmp_path):
    """The check above reads function-level imports too (where a cycle would otherwise hide)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from framework.tracking import MlflowRun\n")
    assert _imported_packages(module) == {"tracking"}


def _python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=FRAMEWORK.parent, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("package", ["framework.models", "framework.data", "framework.optim", "framework.engine"])
def test_lower_layers_do_not_import_mlflow(package):
    assert _python(f"import sys, {package}; print('mlflow' in sys.modules)") == "False"


def test_importing_framework_has_no_side_effects():
    code = (
        "import os, sys; before = dict(os.environ); import framework; from omegaconf import OmegaConf; "
        "print(dict(os.environ) == before, OmegaConf.has_resolver('project_root'), "
        "[m for m in sys.modules if m.startswith('framework.')])"
    )
    assert _python(code) == "True False []"


def _functions() -> list[tuple[int, str, bool]]:
    """(lines, qualified name, marked long with a reason) of every function in framework/."""
    found = []
    for path in _modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                marked = any(LONG_MARK in lines[i - 1] for i in (first - 1, node.lineno) if i >= 1)
                name = f"{path.relative_to(FRAMEWORK.parent)}::{node.name}"
                found.append((node.end_lineno - node.lineno + 1, name, marked))
    return found


def test_functions_are_short_or_say_why():
    long = [f"{name}: {n} lines" for n, name, marked in _functions() if n > MAX_FUNCTION_LINES and not marked]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines without a '{LONG_MARK} <why>' comment:\n" + "\n".join(
        long
    )
