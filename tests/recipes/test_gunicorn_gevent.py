"""gunicorn's gevent worker, with and without ``--preload``, 2 workers, stopped with SIGTERM (issue 18).

gunicorn's gevent worker monkey-patches in each worker *after* the fork. With ``--preload`` the
client (created in the master, which sent its own startup event) was reset by our fork hook before
that patch: its locks were real OS locks, and the first event's worker greenlet waiting on one froze
the worker (every request timed out, gunicorn killed and respawned the workers, which froze alike).
Here 1,000 requests, 8 at a time, each send one event: every request is answered, every event (and
each process's ``app_loaded``) arrives exactly once, and the stop takes less than ``close_timeout``.

gunicorn and gevent are test-only dependencies (the ``recipes`` nox session); without them these
tests are skipped.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

pytest.importorskip("gunicorn")
pytest.importorskip("gevent")

from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import TEST_KEY

from .test_gunicorn import CLOSE_TIMEOUT, WORKERS, Gunicorn

pytestmark = pytest.mark.recipes

REQUESTS = 1000
CONCURRENCY = 8


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_gevent_workers_answer_every_request_and_deliver_every_event_once(tmp_path: Path, preload: bool) -> None:
    with FakeOdpServer(TEST_KEY) as odp:
        server = Gunicorn(tmp_path, odp, "--worker-class", "gevent", preload=preload)
        try:
            server.start()
            sent = [f"request-{n}" for n in range(REQUESTS)]
            served_by = server.send_requests(sent, concurrency=CONCURRENCY)  # raises if one is not answered
            seconds = server.stop()  # at once: the workers' last events are still queued
        finally:
            server.kill()
        loaded_by = [server.master_pid] if preload else sorted(server.worker_pids)
        expected = collections.Counter([*sent, *(f"app_loaded-{pid}" for pid in loaded_by)])
        odp.wait_for_events(sum(expected.values()), timeout=2.0)  # exited: a short margin
        received = collections.Counter(str(e["data"]["idempotence_id"]) for e in odp.events)
    print(f"gunicorn -k gevent {'--preload ' if preload else ''}SIGTERM to exit: {seconds:.2f} s "
          f"(close_timeout {CLOSE_TIMEOUT:g} s)")
    assert len(server.worker_pids) == WORKERS
    assert served_by <= server.worker_pids
    assert received == expected  # each once: nothing lost, nothing twice, nothing else
    assert seconds < CLOSE_TIMEOUT, server.output()
