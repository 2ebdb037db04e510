"""Runs every nox session (the support matrix and the checks), a few at a time, and summarises.

``make test`` calls this. Sessions run in parallel (``--jobs``, default 3: the tests mostly wait on
sockets and timeouts, so three fit on two cores); each session's output goes to
``.nox/logs/<session>.log`` and is printed in full when the session fails. Exits non-zero when any
session fails. The last line adds up the test counts of every session.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".nox" / "logs"
# pytest's closing line, with or without the "=====" frame (-q drops it).
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|errors?)\b.*?) in [0-9.]+s\b.*$")


def sessions(nox: List[str]) -> List[str]:
    listing = subprocess.run([*nox, "--list", "--json"], cwd=ROOT, check=True, capture_output=True, text=True)
    return [entry["session"] for entry in json.loads(listing.stdout)]


def run(nox: List[str], session: str) -> Tuple[str, int, float, str]:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", session) + ".log")
    start = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.run([*nox, "-s", session], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, check=False).returncode
    return session, code, time.monotonic() - start, str(log)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("ODP_EXT_JOBS", "3")))
    args = parser.parse_args()
    nox = [sys.executable, "-m", "nox"]
    names = sessions(nox)
    # The slowest sessions first, so the pool stays busy to the end.
    # The longest sessions first (real servers and workers, a local Spark), then the matrix, then the rest.
    names.sort(key=lambda name: 0 if name in ("recipes", "spark") else 1 if name.startswith("tests") else 2)
    print(f"running {len(names)} nox sessions, {args.jobs} at a time; logs in {LOGS}", flush=True)
    failed: List[str] = []
    passed = failed_tests = 0
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for session, code, seconds, log in pool.map(lambda n: run(nox, n), names):
            text = Path(log).read_text(errors="replace")
            summaries = [m.group(1) for line in text.splitlines() if (m := SUMMARY.match(line.strip()))]
            summary = summaries[-1] if summaries else ""
            passed += sum(int(n) for n in re.findall(r"(\d+) passed", summary))
            failed_tests += sum(int(n) for n in re.findall(r"(\d+) (?:failed|error)", summary))
            status = "ok" if code == 0 else f"FAILED (exit {code})"
            print(f"{session:<32} {status:<16} {seconds:6.0f} s  {summary}", flush=True)
            if code != 0:
                failed.append(session)
                print(f"----- {log} -----\n{text}\n----- end of {session} -----", flush=True)
    if failed:
        print(f"failed sessions: {', '.join(failed)}")
    print(f"matrix: {passed} passed, {failed_tests} failed")
    return 1 if failed or failed_tests else 0


if __name__ == "__main__":
    sys.exit(main())
