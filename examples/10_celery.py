"""Celery: events sent from tasks all reach ODP, also from prefork children recycled after 3 tasks.

Run: ``pip install "celery>=5.3"`` then ``.venv/bin/python examples/10_celery.py`` (without Celery
it says so and exits 0). The app and its tasks are in ``examples/celery_tasks.py``; this script
plays the rest of the system: a fake ODP server, a broker in a temporary folder, a real
``celery worker`` (prefork, 2 processes, each replaced after 3 tasks), stopped with SIGTERM as a
deploy does.

Expected output (pids differ):
    fake ODP server listening on http://127.0.0.1:PORT
    queued 10 tasks of 50 events
    worker: prefork, 2 processes, each replaced after 3 tasks
    tasks ran in 4 worker processes; worker stopped with SIGTERM, exit code 0
    ODP received 500 of 500 events, each once
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from optimizely_odp_ext.testing import FakeOdpServer

TASKS = 10
ITEMS = 50
QUIET = ["--loglevel=WARNING", "--without-heartbeat", "--without-gossip", "--without-mingle"]
WORKER = ["--pool=prefork", "--concurrency=2", "--max-tasks-per-child=3", *QUIET]


def main(worker_args: Sequence[str] = WORKER, description: str = "prefork, 2 processes, each replaced after 3 tasks",
         ) -> int:
    """Runs the demo with ``celery worker *worker_args`` (example 12 runs it on green pools)."""
    try:
        import celery  # noqa: F401 - only to tell whether it is installed
    except ImportError:
        print('this example needs Celery: pip install "celery>=5.3"')
        return 0
    with FakeOdpServer("demo-public-key") as odp, tempfile.TemporaryDirectory() as folder:
        print(f"fake ODP server listening on {odp.url}")
        for sub in ("broker", "results"):
            os.mkdir(os.path.join(folder, sub))
        here = str(Path(__file__).resolve().parent)
        os.environ.update(EXAMPLE_CELERY_DIR=folder, EXAMPLE_ODP_URL=odp.url)
        sys.path.insert(0, here)
        import celery_tasks  # the producer side: this process only queues tasks, it sends no event

        results = [celery_tasks.checkout.delay(order, ITEMS) for order in range(TASKS)]
        print(f"queued {TASKS} tasks of {ITEMS} events")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
        log_path = os.path.join(folder, "worker.log")  # shown only if something goes wrong
        with open(log_path, "w") as log:
            worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", *worker_args],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            print(f"worker: {description}")
            pids = {result.get(timeout=120) for result in results}
            worker.send_signal(signal.SIGTERM)  # warm shutdown: the running children deliver, then exit
            code = worker.wait(timeout=60)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)
        print(f"tasks ran in {len(pids)} worker processes; worker stopped with SIGTERM, exit code {code}")
        ids = [str(event["data"]["idempotence_id"]) for event in odp.events]
        once = len(ids) == len(set(ids)) == TASKS * ITEMS
        print(f"ODP received {len(set(ids))} of {TASKS * ITEMS} events" + (", each once" if once else ""))
        if once and code == 0:
            return 0
        print(Path(log_path).read_text())
        return 1


if __name__ == "__main__":
    # python 10_celery.py POOL (example 12): 10 tasks at a time on that pool, in the worker's process.
    pool = sys.argv[1] if len(sys.argv) > 1 else None
    sys.exit(main([f"--pool={pool}", "--concurrency=10", *QUIET], f"{pool} pool, 10 at a time") if pool else main())
