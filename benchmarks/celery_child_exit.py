"""What a Celery prefork child's exit costs with the plugin (issue 13): from Celery's
``worker_process_shutdown`` to billiard's ``os._exit()``, with ODP healthy and with ODP hanging.

Run from the repository root (Celery installed in the venv)::

    .venv/bin/python benchmarks/celery_child_exit.py

A real ``celery worker`` (prefork, ``--concurrency=2``, ``--max-tasks-per-child=1``) runs example
04's tasks (50 events each) against a FakeOdpServer in this process; ``celery_exit_app.py`` stamps
each child's exit. Per child: the plugin's close (``close_all``, started by the signal) and the
whole exit (billiard then tells the parent and sleeps 1 s before ``os._exit``, with or without the
plugin). Hanging ODP: every request is left unanswered; the close is bounded by ``close_timeout``
(plus the one-second join margin of ``close_all``). Not part of the test suite.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from optimizely_odp_ext.testing import FakeOdpServer

ROOT = Path(__file__).resolve().parent.parent
WORKER = ["--pool=prefork", "--concurrency=2", "--max-tasks-per-child=1", "--loglevel=WARNING",
          "--without-heartbeat", "--without-gossip", "--without-mingle"]


def run(tasks: int, hang: bool, close_timeout: float) -> List[Dict[str, float]]:
    with FakeOdpServer("demo-public-key") as odp, tempfile.TemporaryDirectory() as folder:
        if hang:
            odp.hang_next(100_000)  # every request, until the server stops
        for sub in ("broker", "results"):
            os.mkdir(os.path.join(folder, sub))
        env = {**os.environ, "EXAMPLE_CELERY_DIR": folder, "EXAMPLE_ODP_URL": odp.url,
               "BENCH_CLOSE_TIMEOUT": str(close_timeout),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT / "examples")])}
        os.environ.update(EXAMPLE_CELERY_DIR=folder, EXAMPLE_ODP_URL=odp.url)
        sys.path[:0] = [str(ROOT / "examples")]
        import celery_tasks

        results = [celery_tasks.checkout.delay(order, 50) for order in range(tasks)]
        start = time.monotonic()
        with open(os.path.join(folder, "worker.log"), "w") as log:
            worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "celery_exit_app", "worker", *WORKER],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for result in results:
                result.get(timeout=300)
            stop = time.monotonic()
            print(f"    {tasks} tasks done {stop - start:.2f} s after the worker started")
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=300)
            print(f"    warm shutdown (SIGTERM to worker exit): {time.monotonic() - stop:.2f} s; "
                  f"ODP accepted {len(odp.events)} of {tasks * 50} events")
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)
        lines = Path(folder, "exits.jsonl").read_text().splitlines()
        del sys.modules["celery_tasks"]  # the next run imports it afresh, with its own folder
        return [json.loads(line) for line in lines]


def report(name: str, exits: List[Dict[str, float]]) -> None:
    close = [e["close_end"] - e["close_start"] for e in exits if "close_end" in e]
    total = [e["os._exit"] for e in exits]
    print(f"    {name}: {len(exits)} child exits; plugin close median {statistics.median(close) * 1000:.0f} ms, "
          f"max {max(close) * 1000:.0f} ms; signal to os._exit median {statistics.median(total) * 1000:.0f} ms, "
          f"max {max(total) * 1000:.0f} ms")


def main() -> int:
    # This process imports the tasks module once per run; its install() repeats are expected.
    logging.getLogger("optimizely_odp_ext").setLevel(logging.ERROR)
    print("Celery prefork child exit (concurrency 2, max-tasks-per-child 1, 50 events per task)")
    print("  healthy ODP, 10 tasks, close_timeout 15 s (default):")
    report("healthy", run(10, hang=False, close_timeout=15.0))
    print("  ODP hanging, 6 tasks, close_timeout 3 s:")
    report("hanging", run(6, hang=True, close_timeout=3.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
