"""Soak: the stateful ledger test (tests/integration/test_stateful_ledger.py) for many random schedules.

Run from the repository root::

    .venv/bin/python benchmarks/soak.py --minutes 30            # as many schedules as fit in 30 minutes
    .venv/bin/python benchmarks/soak.py --schedules 2000        # until 2,000 schedules have run
    .venv/bin/python benchmarks/soak.py --schedules 200 --shrink --stop-first

Each round is one pytest process running the state machine with a fresh seed for ``--per-run``
schedules (a failure ends its round: hypothesis stops at the first failing schedule). Printed at the
end: rounds, schedules run, failures with their seeds, failures grouped by their first assertion line,
and the time taken; each failing round's output is kept under ``--out``. Replay a failure with
``ODP_EXT_STATEFUL_SEED=<seed> ODP_EXT_STATEFUL_EXAMPLES=<per-run> .venv/bin/python -m pytest
tests/integration/test_stateful_ledger.py`` (the schedules replay; thread timing does not).

Exit status: 0 when no schedule failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Counter, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/integration/test_stateful_ledger.py"


def _signature(failed_check: str, output: str) -> str:
    """The failed check (or the first assertion line), numbers and ids blanked, to group alike failures."""
    # The test writes "seed N options {...} callback MODE: <the failed check's first line>".
    lines = [found.group(1) for found in map(re.compile(r" callback \w+: (.*)").search, failed_check.splitlines())
             if found]
    lines += [line[line.index("AssertionError"):] for line in output.splitlines() if "AssertionError" in line]
    lines += [line[1:].strip() for line in output.splitlines() if line.startswith("E ") and "Error" in line]
    if not lines:
        return "no assertion line (see the kept output)"
    text = re.sub(r"\{.*", "{...}", lines[0])
    text = re.sub(r"(good|poison)-\d+", r"\1-N", text)
    return re.sub(r"\d+(\.\d+)?", "N", text)[:160]


def _round(seed: int, per_run: int, *, shrink: bool, timeout: float, count_file: Path,
           failure_file: Path) -> Tuple[int, str, bool]:
    """One pytest process; returns (its exit status, its output, whether it timed out)."""
    env = {**os.environ, "ODP_EXT_STATEFUL_SEED": str(seed), "ODP_EXT_STATEFUL_EXAMPLES": str(per_run),
           "ODP_EXT_STATEFUL_SHRINK": "1" if shrink else "0", "ODP_EXT_STATEFUL_COUNT_FILE": str(count_file),
           "ODP_EXT_STATEFUL_FAILURE_FILE": str(failure_file)}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "faulthandler_timeout=0",
               TEST]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output, False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: only what this round started
        output, _ = process.communicate()
        return -1, output, True


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", type=int, default=0, help="stop after this many schedules (0: no limit)")
    parser.add_argument("--minutes", type=float, default=0.0, help="stop after this many minutes (0: no limit)")
    parser.add_argument("--per-run", type=int, default=25, help="schedules per pytest process (one seed)")
    parser.add_argument("--shrink", action="store_true", help="shrink failures (slower; smaller schedules)")
    parser.add_argument("--stop-first", action="store_true", help="stop at the first failure")
    parser.add_argument("--round-timeout", type=float, default=900.0, help="seconds one round may take")
    parser.add_argument("--out", type=Path, default=None, help="where failing rounds' output is kept")
    args = parser.parse_args(argv)
    if args.schedules <= 0 and args.minutes <= 0:
        parser.error("give --schedules or --minutes (or both)")
    out = args.out or Path(tempfile.mkdtemp(prefix="odp-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    count_file = out / "schedules.txt"
    count_file.write_text("")

    started = time.monotonic()
    deadline = started + args.minutes * 60 if args.minutes > 0 else float("inf")
    rounds = 0
    failures: List[Tuple[int, str, Path]] = []
    signatures: Counter[str] = collections.Counter()
    rng = random.SystemRandom()

    def schedules() -> int:
        return len(count_file.read_text().splitlines())

    while time.monotonic() < deadline and (args.schedules <= 0 or schedules() < args.schedules):
        seed = rng.getrandbits(32)
        failure_file = out / f"checks-{seed}.txt"
        status, output, timed_out = _round(seed, args.per_run, shrink=args.shrink, timeout=args.round_timeout,
                                           count_file=count_file, failure_file=failure_file)
        rounds += 1
        if status != 0:
            failed_check = failure_file.read_text() if failure_file.exists() else ""
            signature = "round timed out" if timed_out else _signature(failed_check, output)
            kept = out / f"failure-{seed}.txt"
            kept.write_text(f"{failed_check}\n{output}")
            failures.append((seed, signature, kept))
            signatures[signature] += 1
            print(f"[{time.monotonic() - started:7.0f} s] seed {seed}: FAILED ({signature}) -> {kept}", flush=True)
            if args.stop_first:
                break
        else:
            print(f"[{time.monotonic() - started:7.0f} s] seed {seed}: ok ({schedules()} schedules so far)",
                  flush=True)

    elapsed = time.monotonic() - started
    print()
    print(f"rounds: {rounds}; schedules run: {schedules()} ({args.per_run} per round at most); "
          f"failing rounds: {len(failures)}; time: {elapsed / 60:.1f} min")
    if failures:
        print("failures by first assertion line:")
        for signature, count in signatures.most_common():
            print(f"  {count:4d}  {signature}")
        print("failing seeds: " + ", ".join(str(seed) for seed, _, _ in failures))
    print(f"output of failing rounds and the schedule count: {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
