"""Celery's gevent and eventlet pools: the same app and tasks as example 10, every event delivered.

Run: ``pip install "celery>=5.3" gevent eventlet`` then ``.venv/bin/python examples/12_celery_gevent_eventlet.py``
(a pool whose library is not installed is skipped, and says so). Example 10's demo, with
``celery worker --pool=gevent --concurrency=10`` and then ``--pool=eventlet``: Celery monkey-patches
the worker at start, the tasks run as greenlets in the worker's own process, the plugin's worker and
senders run as greenlets beside them, and the warm shutdown (SIGTERM) delivers what is queued before
the process exits. Nothing to configure.

Expected output (for each pool; pids differ):
    fake ODP server listening on http://127.0.0.1:PORT
    queued 10 tasks of 50 events
    worker: gevent pool, 10 at a time
    tasks ran in 1 worker processes; worker stopped with SIGTERM, exit code 0
    ODP received 500 of 500 events, each once
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent / "10_celery.py"


def run() -> int:
    failed = 0
    for pool in ("gevent", "eventlet"):
        if importlib.util.find_spec(pool) is None:
            print(f"{pool} is not installed: pip install {pool}")
            continue
        failed |= subprocess.run([sys.executable, str(DEMO), pool], check=False, timeout=300).returncode
    return failed


if __name__ == "__main__":
    sys.exit(run())
