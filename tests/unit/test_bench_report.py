"""``benchmarks/RESULTS.md`` is what ``benchmarks/run.py`` renders from the raw figures beside it.

The results file is generated (never edited by hand): rendering the committed raw figures
(``RESULTS.json``) again with ``run.py --render`` must give the committed file byte for byte, so a change
to the report's code that changes its text shows up here until the file is rendered again.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
RENDER_SECONDS = 60.0


def test_results_file_is_rendered_from_its_raw_figures(tmp_path: Path) -> None:
    raw, results = BENCH / "RESULTS.json", BENCH / "RESULTS.md"
    if not (raw.exists() and results.exists()):
        pytest.skip("no benchmark results in this tree")
    # Render over a copy: run.py keeps the section import_bench.py wrote into the file it replaces.
    output = tmp_path / "RESULTS.md"
    shutil.copyfile(results, output)
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--render", str(raw), "--output", str(output)],
                          capture_output=True, text=True, timeout=RENDER_SECONDS, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert output.read_bytes() == results.read_bytes(), (
        "benchmarks/RESULTS.md differs from what run.py renders from RESULTS.json: render it again with "
        "`.venv/bin/python benchmarks/run.py --render benchmarks/RESULTS.json`")
