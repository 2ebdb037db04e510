"""The README and every page under ``docs/`` cannot drift from the code.

Every fenced block carries a marker on the line just above it, ``<!-- readme-test: MODE ... -->``:

- ``run``: executed (``python`` as a script, ``sh`` with bash and this venv's scripts on ``PATH``), in a
  fresh directory; it must exit 0.
- ``output``: what the ``run`` block just before it prints on standard output, compared after
  normalising what legitimately varies (ports, timings, rates, ids, line breaks).
- ``pytest``: a test file, run by a fresh pytest in a directory of its own (as a user's project).
- ``excerpt PATH``: an excerpt of a file in this repository; its lines must appear there, in order.
- ``skip (why)``: not runnable offline (needs an account, a broker, a server); the reason is required.

A block introduced by a line saying it "prints" must be an ``output`` block. Every relative link and
anchor must resolve, the README must link every page of ``docs/``, and every option of ``install()``,
every key of ``odp_event_stats()`` and every drop and refusal reason must be defined by exactly one
table row across all pages (tables whose first header is ``option``, ``key``, ``dropped reason``,
``refused reason``), with no row for a name the code does not have; a default written as a literal in
the options table must be the code's.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

from optimizely_odp_ext._stats import DROP_REASONS, REFUSE_REASONS, OdpEventStats
from optimizely_odp_ext.settings import OPTION_NAMES, Options

ROOT = Path(__file__).resolve().parents[2]
RUN_SECONDS = 120.0
README_MAX_LINES = 250
MARKER = re.compile(r"^<!-- readme-test: (\w+)(.*?)-->$")
FENCE = re.compile(r"^```(\S*)$")
PRINTS = re.compile(r"\bprints\b[^.]*:$", re.IGNORECASE)
MODES = ("run", "output", "pytest", "excerpt", "skip")


def pages() -> List[Path]:
    """The README, then every page of ``docs/`` (pages added later are covered without a change here)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclasses.dataclass
class Block:
    page: Path
    line: int          # 1-based line of the opening fence
    lang: str
    mode: str          # "" when unmarked
    arg: str
    code: str
    intro: str         # the last line of prose before the block

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> List[Block]:
    """Every fenced block of ``page``, with its marker and the prose line that introduces it."""
    found: List[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j] == "```"), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: unclosed code block"
        before = [line for line in lines[:i] if line.strip()]
        marker = MARKER.match(before[-1]) if before else None
        prose = [line for line in before if not MARKER.match(line)]
        found.append(Block(page, i + 1, fence.group(1), marker.group(1) if marker else "",
                           marker.group(2).strip() if marker else "", "\n".join(lines[i + 1:end]) + "\n",
                           prose[-1].strip() if prose else ""))
        i = end + 1
    return found


def all_blocks() -> List[Block]:
    return [block for page in pages() for block in blocks(page)]


def _run(args: List[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=RUN_SECONDS, check=False,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def run_block(block: Block, tmp_path: Path) -> str:
    """Runs a ``run`` block in ``tmp_path``; returns its standard output."""
    if block.lang == "python":
        script = tmp_path / "doc_block.py"
        script.write_text(block.code)
        return _run([sys.executable, str(script)], tmp_path)
    assert block.lang == "sh", f"{block.where}: cannot run a {block.lang!r} block"
    return _run(["bash", "-euo", "pipefail", "-c", block.code], tmp_path)


def normalise(text: str) -> str:
    """What may differ between two correct runs, made alike: ports, timings, rates, ids, line breaks."""
    text = re.sub(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", "<id>", text)
    text = re.sub(r"\b(127\.0\.0\.1|localhost):\d+", r"\1:<port>", text)
    text = re.sub(r"\d[\d,]*(\.\d+)?\s*(events/s|µs|us|ms|s)\b", r"<n> \2", text)
    return " ".join(text.split())


def _id(block: Block) -> str:
    return block.where


def _marked(mode: str) -> List[Block]:
    return [block for block in all_blocks() if block.mode == mode]


def test_every_block_is_marked() -> None:
    found = all_blocks()
    assert found, "no code blocks found: the pattern no longer matches the pages"
    assert [b.where for b in found if b.mode not in MODES] == [], f"mark each block with one of {MODES}"
    assert [b.where for b in found if b.mode in ("skip", "excerpt") and not b.arg] == [], \
        "a skipped block must say why, an excerpt where from"
    assert {b.mode for b in found} >= {"run", "output", "pytest"}


def test_every_prints_block_is_compared() -> None:
    unchecked = [b.where for b in all_blocks() if PRINTS.search(b.intro) and b.mode != "output"]
    assert unchecked == [], "a block introduced as what the code prints must be an `output` block"


def test_every_output_block_follows_a_run_block() -> None:
    for page in pages():
        found = blocks(page)
        for before, block in zip(found, found[1:]):
            if block.mode == "output":
                assert before.mode == "run", f"{block.where}: an output block must follow a run block"
        assert not found or found[0].mode != "output", f"{found[0].where}: output of nothing"


@pytest.mark.parametrize("block", [b for b in _marked("run")], ids=_id)
def test_run_blocks_run_and_print_what_the_page_says(block: Block, tmp_path: Path) -> None:
    found = blocks(block.page)
    following: Optional[Block] = next((b for b in found if b.line > block.line), None)
    printed = run_block(block, tmp_path)
    if following is not None and following.mode == "output":
        assert normalise(printed) == normalise(following.code), \
            f"{following.where}: the page shows output the code no longer prints; a real run printed:\n{printed}"


@pytest.mark.parametrize("block", [b for b in _marked("pytest")], ids=_id)
def test_pytest_blocks_pass(block: Block, tmp_path: Path) -> None:
    (tmp_path / "test_doc_snippet.py").write_text(block.code)
    # A fresh pytest in a directory of its own, as in a user's project: the fixtures come from the
    # installed package's pytest11 entry point, nothing from this repository's conftest.
    output = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--strict-markers",
                   "test_doc_snippet.py"], tmp_path)
    tests = len(re.findall(r"^def test_", block.code, re.MULTILINE))
    assert re.search(rf"\b{tests} passed\b", output), output


@pytest.mark.parametrize("block", [b for b in _marked("excerpt")], ids=_id)
def test_excerpts_match_their_file(block: Block) -> None:
    source = (ROOT / block.arg).read_text(encoding="utf-8").splitlines()
    at = 0
    for line in (line.strip() for line in block.code.splitlines()):
        if not line:
            continue
        at = next((i + 1 for i in range(at, len(source)) if source[i].strip() == line), -1)
        assert at > 0, f"{block.where}: {line!r} is not in {block.arg} (in this order)"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> Set[str]:
    seen: Dict[str, int] = {}
    out: Set[str] = set()
    for line in _prose(page).splitlines():
        heading = re.match(r"^#{1,6} (.+)$", line)
        if heading:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def _prose(page: Path) -> str:
    """The page without its code blocks, where a link or heading is not one."""
    text = re.sub(r"^```.*?^```$", "", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    return text


def links(page: Path) -> List[Tuple[str, str]]:
    """(target path, anchor) of every relative link of ``page``."""
    text = re.sub(r"`[^`\n]*`", "", _prose(page))
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        out.append((path, anchor))
    return out


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for path, anchor in links(page):
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{path}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{path}#{anchor}: no such heading")
    assert broken == [], f"{page.relative_to(ROOT)}: {broken}"


def test_readme_is_short_and_links_every_docs_page() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES
    linked = {(readme.parent / path).resolve() for path, _ in links(readme) if path}
    assert [str(p.relative_to(ROOT)) for p in pages()[1:] if p.resolve() not in linked] == []


def table_rows() -> Dict[str, List[List[str]]]:
    """For each table kind (its first header cell, lower case), the cells of each of its rows."""
    rows: Dict[str, List[List[str]]] = {}
    for page in pages():
        kind: Optional[str] = None
        for line in _prose(page).splitlines():
            if not line.startswith("|"):
                kind = None
                continue
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if kind is None:
                kind = cells[0].strip("`").lower()
            elif not set(cells[0]) <= set("-: "):
                rows.setdefault(kind, []).append(cells)
    return rows


def defined_names() -> Dict[str, List[str]]:
    """For each table kind, the backquoted names of each row's first cell."""
    return {kind: [name for cells in rows for name in re.findall(r"`([^`]+)`", cells[0])]
            for kind, rows in table_rows().items()}


@pytest.mark.parametrize(("kind", "expected"), [
    ("option", sorted(OPTION_NAMES)),
    ("key", sorted(OdpEventStats.__annotations__)),
    ("dropped reason", sorted(DROP_REASONS)),
    ("refused reason", sorted(REFUSE_REASONS)),
])
def test_each_name_is_defined_exactly_once(kind: str, expected: List[str]) -> None:
    rows = defined_names().get(kind, [])
    assert sorted(rows) == expected, (
        f"{kind}: missing {sorted(set(expected) - set(rows))}, unknown {sorted(set(rows) - set(expected))}, "
        f"twice {sorted({n for n in rows if rows.count(n) > 1})}")


def test_option_defaults_match_the_code() -> None:
    """A default written as a literal (``100``, ``"drop_newest"``, ``0.5, 30``, ``None``) is the code's.

    Prose defaults (``from the datafile``, ``256 MiB``) are not literals and are left to the reader."""
    defaults = {field.name: field.default for field in dataclasses.fields(Options)}
    checked, wrong = 0, []
    for cells in table_rows().get("option", []):
        names = re.findall(r"`([^`]+)`", cells[0])
        parts = [part.strip().strip("`") for part in cells[1].split(",")]
        if len(parts) != len(names):
            continue
        for name, part in zip(names, parts):
            try:
                documented = ast.literal_eval(part)
            except (ValueError, SyntaxError):
                continue
            checked += 1
            if documented != defaults[name] or type(documented) is bool is not type(defaults[name]):
                wrong.append(f"{name}: documented {part}, the code says {defaults[name]!r}")
    assert wrong == []
    assert checked >= len(defaults) // 2, "the options table's defaults are no longer literals the test can read"


def test_the_module_map_names_every_module() -> None:
    """Each file of the package is named in a ``module`` table (a subpackage's ``__init__.py`` as ``name/``)."""
    named = set(defined_names().get("module", []))
    named |= {name for cells in table_rows().get("module", []) for name in re.findall(r"`([^`]+)`", cells[1])}
    package = ROOT / "optimizely_odp_ext"
    missing = []
    for path in sorted(package.rglob("*.py")):
        inner = path.parent != package
        name = f"{path.parent.name}/" if inner and path.name == "__init__.py" else path.name
        if name not in named:
            missing.append(str(path.relative_to(ROOT)))
    assert missing == [], "add them to the module map in docs/development.md"
