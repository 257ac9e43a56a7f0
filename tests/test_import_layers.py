"""The package graph imports only downward (pyproject.toml's import-linter contracts, also run
by .ci/run): the contracts hold on this tree, and they do fail when a lower package imports a
higher one, so a passing run means something."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["runtime", "modelfiles", "kernels", "loaders", "quant"]
LINT = shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def tree_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the packages and pyproject.toml with `line` appended to `module`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "native")
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}\n")
    return tmp_path


def test_the_contracts_hold_on_this_tree():
    res = lint(REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


@pytest.mark.parametrize(
    "module, line",
    [
        ("quant/formats.py", "import runtime.llm  # noqa"),  # the bottom importing the top
        ("loaders/config.py", "from modelfiles import names  # noqa"),
        ("runtime/kv/kv_pool.py", "from runtime.engine import scheduler  # noqa"),
    ],
)
def test_an_upward_import_breaks_a_contract(tmp_path, module, line):
    res = lint(tree_with(tmp_path, module, line))
    assert res.returncode != 0
    assert "BROKEN" in res.stdout, res.stdout + res.stderr
