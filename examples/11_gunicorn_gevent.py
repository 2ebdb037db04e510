"""The Flask app of example 05 under gunicorn's gevent worker, --preload, 2 workers: nothing changes."""

# Run it: pip install flask gunicorn gevent && python examples/11_gunicorn_gevent.py
# Serve it: gunicorn -k gevent --preload --workers 2 --chdir examples "05_flask_gunicorn:create_app()"
# Expected output (the demo serves it under gunicorn against a fake ODP server, then sends SIGTERM):
#   sent 40, ODP received 41 events ({'app_loaded': 1, 'request': 40}), lost 0, duplicated 0,
#   2 worker process(es), first half delivered while running: True, server exit code 0
#
# gunicorn's gevent worker monkey-patches each worker after the fork, long after the app (and its
# client) was loaded in the master: the plugin notices when its first event in a worker starts the
# worker's thread, and runs on greenlets from then on. No patch order to follow, no setting.
# (gunicorn's eventlet worker is gone from current gunicorn releases: use gevent.)

from __future__ import annotations

import sys

if __name__ == "__main__":
    import _demo

    port = _demo.free_port()
    served = _demo.serve([sys.executable, "-m", "gunicorn", "--worker-class", "gevent", "--preload", "--workers", "2",
                          "--bind", f"127.0.0.1:{port}", "05_flask_gunicorn:create_app()"], port, workers=2)
    sys.exit(_demo.report(served, {"request": 40, "app_loaded": 1}))
