"""The Celery app of ``celery_child_exit.py``: example 04's tasks, with timestamps at a prefork
child's exit (Celery's ``worker_process_shutdown``, the plugin's close, billiard's ``os._exit``).

Imported by the worker's parent before it forks, so the timing receiver is connected before the
plugin's own (which connects when the child's manager registers, on its first event).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import signals

import optimizely_odp_ext
from optimizely_odp_ext import _lifecycle

# First, so the example's own install() (no options) is the no-op: close_timeout comes from here.
optimizely_odp_ext.install(close_timeout=float(os.environ["BENCH_CLOSE_TIMEOUT"]))

from celery_tasks import app  # noqa: E402, F401 - the worker's app (-A celery_exit_app)

_marks: dict[str, float] = {}
_record = os.path.join(os.environ["EXAMPLE_CELERY_DIR"], "exits.jsonl")


@signals.worker_process_shutdown.connect(weak=False)
def _signal_received(**_: Any) -> None:
    _marks["signal"] = time.monotonic()


_close_all = _lifecycle.close_all


def _timed_close_all(*args: Any, **kwargs: Any) -> int:
    _marks["close_start"] = time.monotonic()
    try:
        return _close_all(*args, **kwargs)
    finally:
        _marks["close_end"] = time.monotonic()


_lifecycle.close_all = _timed_close_all  # type: ignore[assignment]
_real_exit = os._exit


def _timed_exit(code: int) -> None:
    # billiard ends the child here; the line goes out before the process does.
    if "signal" in _marks:
        marks = {k: v - _marks["signal"] for k, v in _marks.items()}
        marks["os._exit"] = time.monotonic() - _marks["signal"]
        with open(_record, "a") as out:
            out.write(json.dumps({"pid": os.getpid(), **marks}) + "\n")
    _real_exit(code)


os._exit = _timed_exit  # type: ignore[assignment]
