"""The WSGI application the gunicorn shutdown tests serve (``gunicorn --preload gunicorn_app:app``).

Written as a user writes one: the Optimizely client is created at import (in gunicorn's master
under ``--preload``, before the workers are forked; in each worker without it) and sends an
``app_loaded`` event there; each
request sends one event from the worker that serves it. Every event carries the sending process's
id, so the test can tell whose events ODP holds. The test passes the fake ODP server's address and
``close_timeout`` through the environment. A bare WSGI app: gunicorn is the only framework needed.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile

# What the test reads from gunicorn's output besides gunicorn's own lines: when each process began
# and ended its close ("odp-ext <epoch seconds> <pid> <message>": one clock for every process).
_trace = logging.StreamHandler()
_trace.setFormatter(logging.Formatter("odp-ext %(created).3f %(process)d %(message)s"))
for _name, _level in (("optimizely_odp_ext._lifecycle", logging.DEBUG), ("gunicorn_app", logging.INFO)):
    logging.getLogger(_name).addHandler(_trace)
    logging.getLogger(_name).setLevel(_level)

client = optimizely.Optimizely(datafile(os.environ["ODP_TEST_URL"], os.environ["ODP_TEST_KEY"]),
                               logger=logging.getLogger("gunicorn_app"))
optimizely_odp_ext.install(client, close_timeout=float(os.environ["ODP_TEST_CLOSE_TIMEOUT"]))
client.send_odp_event("app_loaded", {"fs_user_id": "deploy-bot"},
                      data={"idempotence_id": f"app_loaded-{os.getpid()}", "pid": os.getpid()})


def app(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:  # type: ignore[type-arg]
    """``GET /`` answers the process id; ``GET /event?id=X`` also sends one event with idempotence id X."""
    event_id = parse_qs(environ.get("QUERY_STRING", "")).get("id")
    if environ.get("PATH_INFO") == "/event" and event_id:
        client.send_odp_event("request", {"fs_user_id": "u1"},
                              data={"idempotence_id": event_id[0], "pid": os.getpid()})
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
