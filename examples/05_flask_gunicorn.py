"""Flask under gunicorn --preload with 2 workers: SIGTERM loses nothing and sends nothing twice."""

# Run it: pip install flask gunicorn && python examples/05_flask_gunicorn.py
# Serve it: gunicorn --preload --workers 2 --chdir examples "05_flask_gunicorn:create_app()"
# Expected output (the demo serves it under gunicorn against a fake ODP server, then sends SIGTERM):
#   sent 40, ODP received 41 events ({'app_loaded': 1, 'request': 40}), lost 0, duplicated 0,
#   2 worker process(es), first half delivered while running: True, server exit code 0

from __future__ import annotations

import os
import sys

from _demo import optimizely_client
from flask import Flask, request

import optimizely_odp_ext


def create_app() -> Flask:
    # With --preload this runs once, in gunicorn's master, before it forks the workers. Each worker
    # starts its own queue, thread and connection on its first event; the master's queued events
    # stay the master's, delivered once by it (at exit at the latest): nothing is sent twice.
    client = optimizely_client()
    optimizely_odp_ext.install(client)
    client.send_odp_event("app_loaded", {"fs_user_id": "deploy-bot"})
    app = Flask(__name__)

    @app.get("/")
    def ready() -> str:
        return str(os.getpid())

    @app.get("/event")
    def event() -> str:
        client.send_odp_event("request", {"fs_user_id": "u1"}, data={"idempotence_id": request.args["id"]})
        return str(os.getpid())

    # No shutdown hook needed: a gunicorn worker stopping gracefully exits the interpreter, and the
    # plugin's exit hook delivers what is queued within close_timeout (15 s, inside gunicorn's 30 s
    # graceful timeout); the master delivers its own as the graceful stop begins, alongside them.
    return app


if __name__ == "__main__":
    import _demo

    port = _demo.free_port()
    served = _demo.serve([sys.executable, "-m", "gunicorn", "--preload", "--workers", "2", "--bind",
                          f"127.0.0.1:{port}", "05_flask_gunicorn:create_app()"], port, workers=2)
    sys.exit(_demo.report(served, {"request": 40, "app_loaded": 1}))
