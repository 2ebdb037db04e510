"""The WSGI application the uWSGI preload tests serve (``uwsgi --master --processes 2``, no ``--lazy-apps``).

Written as a user writes one: the Optimizely client is created at import, which uWSGI runs in its
master before forking the workers, and the master sends ``ODP_TEST_MASTER_EVENTS`` events there
(ids ``{ODP_TEST_BOOT}-master-{n}``). ``GET /event?id=X`` sends one event with idempotence id X from
the worker that serves it; ``GET /stats`` answers ``pid accepted`` (that worker's
``odp_event_stats()``); ``GET /flush`` answers ``pid True`` once that worker's events are delivered
(``flush_odp_events(10)``); ``GET /hold?id=X`` sends one event, prints ``holding X`` and takes
``ODP_TEST_HOLD_SECONDS`` to answer (a slow request, for a SIGTERM to land in); ``GET /`` answers the
process id. ``ODP_TEST_FLUSH_INTERVAL`` (optional) is the plugin's ``flush_interval``. A bare WSGI app:
uWSGI is the only server.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext import odp
from optimizely_odp_ext._datafile import datafile

client = optimizely.Optimizely(datafile(os.environ["ODP_TEST_URL"], os.environ["ODP_TEST_KEY"]),
                               logger=logging.getLogger("uwsgi_app"))
optimizely_odp_ext.install(client, **({"flush_interval": float(os.environ["ODP_TEST_FLUSH_INTERVAL"])}
                                      if "ODP_TEST_FLUSH_INTERVAL" in os.environ else {}))
for n in range(int(os.environ["ODP_TEST_MASTER_EVENTS"])):
    client.send_odp_event("app_loaded", {"fs_user_id": "deploy-bot"},
                          data={"idempotence_id": f"{os.environ['ODP_TEST_BOOT']}-master-{n}", "pid": os.getpid()})


def app(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:  # type: ignore[type-arg]
    """See the module docstring."""
    event_id = parse_qs(environ.get("QUERY_STRING", "")).get("id")
    path = environ.get("PATH_INFO")
    answer = str(os.getpid())
    if path == "/event" and event_id:
        client.send_odp_event("request", {"fs_user_id": "u1"},
                              data={"idempotence_id": event_id[0], "pid": os.getpid()})
    elif path == "/hold" and event_id:
        client.send_odp_event("request", {"fs_user_id": "u1"},
                              data={"idempotence_id": event_id[0], "pid": os.getpid()})
        print(f"holding {event_id[0]}", flush=True)
        time.sleep(float(os.environ.get("ODP_TEST_HOLD_SECONDS", "3")))  # the app's slow work
    elif path == "/stats":
        answer += f" {odp(client).odp_event_stats()['accepted']}"
    elif path == "/flush":
        answer += f" {odp(client).flush_odp_events(10)}"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [answer.encode()]
