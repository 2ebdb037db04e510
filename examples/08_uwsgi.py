"""uWSGI: the flags the plugin needs (--enable-threads, --die-on-term, SIGTERM made graceful); SIGTERM loses nothing."""

# Run it: pip install uwsgi && python examples/08_uwsgi.py
# Serve it:
#   uwsgi --http-socket 127.0.0.1:8000 --chdir examples --module "08_uwsgi:create_app()" \
#         --master --processes 2 --enable-threads --die-on-term \
#         --hook-master-start "unix_signal:15 gracefully_kill_them_all"
# --enable-threads: without it older uWSGI releases run no Python thread but the request's, so the
#   plugin's sender never runs and events wait until exit. --die-on-term: SIGTERM stops uWSGI (uWSGI
#   2.0 reloads on SIGTERM otherwise); each worker's interpreter then exits and the plugin's exit hook
#   delivers. The hook makes that SIGTERM uWSGI's graceful stop: on uWSGI 2.0 it is otherwise the brutal
#   one, and a worker still finishing a request dies without running any Python exit hook (what it
#   queued is lost). No --lazy-apps needed: the app (and its client) may be loaded in the master; the plugin
#   starts no thread there and hands the master's events to one worker.
# Expected output (the demo serves it under uWSGI against a fake ODP server, then sends SIGTERM):
#   sent 40, ODP received 40 events ({'request': 40}), lost 0, duplicated 0, 2 worker process(es),
#   first half delivered while running: True, server exit code 0

from __future__ import annotations

import os
import sys
import urllib.parse
from typing import Any, Callable, Iterable

import optimizely_odp_ext

StartResponse = Callable[..., Any]


def create_app() -> Callable[[dict, StartResponse], Iterable[bytes]]:  # type: ignore[type-arg]
    from _demo import optimizely_client

    client = optimizely_client()
    optimizely_odp_ext.install(client)

    def application(environ: dict, start_response: StartResponse) -> Iterable[bytes]:  # type: ignore[type-arg]
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        if environ.get("PATH_INFO") == "/event":
            client.send_odp_event("request", {"fs_user_id": "u1"}, data={"idempotence_id": query["id"][0]})
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]

    return application


FLAGS = ["--master", "--processes", "2", "--enable-threads", "--die-on-term",
         "--hook-master-start", "unix_signal:15 gracefully_kill_them_all"]

if __name__ == "__main__":
    import _demo

    port = _demo.free_port()
    uwsgi = os.path.join(os.path.dirname(sys.executable), "uwsgi")  # the one pip installed beside this Python
    served = _demo.serve([uwsgi if os.path.exists(uwsgi) else "uwsgi", "--http-socket", f"127.0.0.1:{port}",
                          "--module", "08_uwsgi:create_app()", *FLAGS], port, workers=2)
    sys.exit(_demo.report(served, {"request": 40}))
