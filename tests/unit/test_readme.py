"""The README's Python blocks run as written: each is marked ``<!-- readme-test: run -->`` (executed
as a script), ``<!-- readme-test: pytest -->`` (a test file, run by pytest) or ``<!-- readme-test:
skip (why) -->`` (needs an account, or is an excerpt of a file tested elsewhere)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"^(?:<!-- readme-test: (\w+)(.*?)-->\n)?```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
RUN_SECONDS = 120.0


def blocks() -> List[Tuple[str, str, str]]:
    """(mode, reason, code) for every ```python block of the README, in order."""
    return [(mode or "", reason.strip(), code) for mode, reason, code in BLOCK.findall(README.read_text())]


def _run(args: List[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=RUN_SECONDS, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_every_python_block_is_marked() -> None:
    found = blocks()
    assert found, "no python blocks found: the pattern no longer matches the README"
    unmarked = [code.splitlines()[0] for mode, _, code in found if mode not in ("run", "pytest", "skip")]
    assert unmarked == []
    assert all(reason for mode, reason, _ in found if mode == "skip"), "a skipped block must say why"
    assert {mode for mode, _, _ in found} >= {"run", "pytest"}


@pytest.mark.parametrize("code", [code for mode, _, code in blocks() if mode == "run"])
def test_run_blocks_run(code: str, tmp_path: Path) -> None:
    script = tmp_path / "readme_block.py"
    script.write_text(code)
    _run([sys.executable, str(script)], tmp_path)


@pytest.mark.parametrize("code", [code for mode, _, code in blocks() if mode == "pytest"])
def test_testing_your_application_snippet_passes(code: str, tmp_path: Path) -> None:
    (tmp_path / "test_readme_snippet.py").write_text(code)
    # A fresh pytest in a directory of its own, as in a user's project: the fixtures come from the
    # installed package's pytest11 entry point, nothing from this repository's conftest.
    output = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--strict-markers",
                   "test_readme_snippet.py"], tmp_path)
    tests = len(re.findall(r"^def test_", code, re.MULTILINE))
    assert re.search(rf"\b{tests} passed\b", output), output
