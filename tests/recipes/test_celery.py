"""Celery recipe: a real worker in a subprocess delivers every event its tasks sent (issue 13).

A prefork child that is recycled (``--max-tasks-per-child``) or ended by warm shutdown leaves
through ``os._exit()`` right after Celery's ``worker_process_shutdown`` signal: no ``atexit``, no
finalizer. These tests run ``celery worker`` for real on kombu's filesystem broker (no server),
send 1,000 events from 20 tasks of 50, stop the worker with SIGTERM and count every event at a
real FakeOdpServer over loopback HTTP. The flush interval is longer than the test and the batch
larger than any process sends, so no event leaves on the timer or on size: what arrives was
delivered by the exit path under test.

Celery is a test-only dependency (the ``celery`` nox session); without it these tests are skipped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

pytest.importorskip("celery")

from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import TEST_KEY
from tests.integration._helpers import assert_delivered_exactly_once, wait_until

pytestmark = pytest.mark.recipes

HERE = Path(__file__).resolve().parent
TASKS = 20
EVENTS_PER_TASK = 50  # celery_app.EVENTS_PER_TASK (not imported: importing it makes a client here)
# No event leaves on the flush timer while the test runs, nor on a full batch.
NEVER = 600.0
BATCH = TASKS * EVENTS_PER_TASK + 1
# Bounds for the worker's own pace (start-up, 20 forks, 20 one-second billiard exits on 2 cores).
TASKS_TIMEOUT = 120.0
EXIT_TIMEOUT = 60.0


def _sent_ids() -> List[str]:
    return [f"celery-{task}-{n}" for task in range(TASKS) for n in range(EVENTS_PER_TASK)]


@pytest.fixture
def server() -> Iterator[FakeOdpServer]:
    with FakeOdpServer(TEST_KEY) as odp:
        yield odp


class Worker:
    """Runs ``celery -A celery_app worker`` in its own session, with the app configured by env."""

    def __init__(self, tmp_path: Path, server: FakeOdpServer, **env: str) -> None:
        self.broker = tmp_path / "broker"
        self.done = tmp_path / "done"
        self.broker.mkdir()
        (self.broker / "processed").mkdir()
        self.done.mkdir()
        self.log = tmp_path / "worker.log"
        self.env: Dict[str, str] = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "ODP_TEST_BROKER_DIR": str(self.broker),
            "ODP_TEST_DONE_DIR": str(self.done),
            "ODP_TEST_URL": server.url,
            "ODP_TEST_KEY": TEST_KEY,
            "ODP_TEST_FLUSH_INTERVAL": str(NEVER),
            "ODP_TEST_BATCH_SIZE": str(BATCH),
            **env,
        }
        self.cwd = tmp_path
        self.stop_seconds = 0.0  # from SIGTERM to the worker's exit
        self.pids: Set[int] = set()  # the processes that ran tasks

    def publish(self, count: int) -> None:
        """Queues ``count`` tasks (in a separate process: importing the app makes a client)."""
        subprocess.run([sys.executable, "-c", f"import celery_app; celery_app.publish({count})"],
                       env=self.env, cwd=self.cwd, check=True, timeout=60)

    def run_until_done(self, *worker_args: str) -> Set[int]:
        """Starts the worker, waits for every task's marker, stops it with SIGTERM, waits for its exit.

        Returns:
            The process ids that ran tasks.
        """
        with open(self.log, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--loglevel=INFO",
                 "--without-heartbeat", "--without-gossip", "--without-mingle", *worker_args],
                env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                finished = wait_until(lambda: len(self.markers()) >= TASKS or proc.poll() is not None,
                                      timeout=TASKS_TIMEOUT, interval=0.05)
                assert finished, f"tasks did not all run:\n{self.output()}"
                assert proc.poll() is None, f"the worker ended early:\n{self.output()}"
                stopping = time.monotonic()
                proc.send_signal(signal.SIGTERM)  # warm shutdown, as a deploy does
                code = proc.wait(timeout=EXIT_TIMEOUT)
                self.stop_seconds = time.monotonic() - stopping
                assert code == 0, f"worker exited {code}:\n{self.output()}"
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        assert len(self.markers()) == TASKS
        return {int(name.split(".")[1]) for name in self.markers()}

    def markers(self) -> List[str]:
        return os.listdir(self.done)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def _deliver_through(tmp_path: Path, server: FakeOdpServer, *worker_args: str, **env: str) -> Worker:
    worker = Worker(tmp_path, server, **env)
    worker.publish(TASKS)
    worker.pids = worker.run_until_done(*worker_args)
    sent = _sent_ids()
    # The worker has exited: whatever was going to arrive has arrived (the wait is a short margin).
    server.wait_for_events(len(sent), timeout=2.0)
    assert_delivered_exactly_once(server, sent)
    return worker


def test_prefork_recycled_children_deliver_their_last_batch(tmp_path: Path, server: FakeOdpServer) -> None:
    pids = _deliver_through(tmp_path, server, "--pool=prefork", "--concurrency=2", "--max-tasks-per-child=1").pids
    assert len(pids) == TASKS  # every task ran in its own child: each child was recycled


def test_prefork_children_deliver_at_warm_shutdown(tmp_path: Path, server: FakeOdpServer) -> None:
    pids = _deliver_through(tmp_path, server, "--pool=prefork", "--concurrency=2").pids
    assert 1 <= len(pids) <= 2  # no recycling: the two children ran every task and left at shutdown


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_in_process_pools_deliver_at_exit(tmp_path: Path, server: FakeOdpServer, pool: str) -> None:
    pids = _deliver_through(tmp_path, server, f"--pool={pool}", "--concurrency=2").pids
    assert len(pids) == 1  # the tasks ran in the worker's own process, which exits through the interpreter


# Green pools (issue 18): tasks are greenlets in the worker's own process, patched by Celery at start.
# Under eventlet the signal mask of our thread starts used to stay blocked on the process's only OS
# thread: the warm-shutdown SIGTERM never arrived and the worker was killed after EXIT_TIMEOUT.
GREEN_CLOSE_TIMEOUT = 5.0
GREEN_STOP_MARGIN = 10.0  # Celery's own warm shutdown (its pool, the broker's consumer) on 2 shared cores


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_green_pools_deliver_at_warm_shutdown_and_exit_promptly(tmp_path: Path, server: FakeOdpServer,
                                                                pool: str) -> None:
    pytest.importorskip(pool)
    worker = _deliver_through(tmp_path, server, f"--pool={pool}", "--concurrency=10",
                              ODP_TEST_CLOSE_TIMEOUT=str(GREEN_CLOSE_TIMEOUT))
    print(f"celery -P {pool}: SIGTERM to exit {worker.stop_seconds:.2f} s (close_timeout {GREEN_CLOSE_TIMEOUT:g} s)")
    assert len(worker.pids) == 1  # green tasks run in the worker's own process
    assert worker.stop_seconds < GREEN_CLOSE_TIMEOUT + GREEN_STOP_MARGIN, worker.output()


def _run_script(script: str, server: FakeOdpServer) -> str:
    env = {**os.environ, "ODP_TEST_URL": server.url, "ODP_TEST_KEY": TEST_KEY}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


_CLIENT = """
import logging, os, sys
from optimizely import optimizely
import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
optimizely_odp_ext.install()
client = optimizely.Optimizely(datafile(os.environ["ODP_TEST_URL"], os.environ["ODP_TEST_KEY"]),
                               logger=logging.getLogger("app"))
client.send_odp_event("t", {"fs_user_id": "u"})
"""


def test_the_plugin_never_imports_celery(server: FakeOdpServer) -> None:
    out = _run_script(_CLIENT + "client.close()\nprint('celery' in sys.modules)\n", server)
    assert out.split() == ["False"]
    assert server.wait_for_events(1, timeout=5.0)


def test_a_child_forked_after_celery_is_imported_has_the_receiver(server: FakeOdpServer) -> None:
    # The manager registered before celery was imported (nothing to connect to then); the fork of
    # the worker's pool is where the receiver gets connected.
    script = _CLIENT + """
from celery import signals
before = signals.worker_process_shutdown.has_listeners()
pid = os.fork()
if pid == 0:
    os._exit(0 if signals.worker_process_shutdown.has_listeners() else 3)
_, status = os.waitpid(pid, 0)
client.close()
print(before, os.WEXITSTATUS(status))
"""
    assert _run_script(script, server).split() == ["False", "0"]


@pytest.mark.parametrize(("example", "runs"), [("10_celery.py", 1), ("12_celery_gevent_eventlet.py", 2)])
def test_the_celery_examples_run(example: str, runs: int) -> None:
    if runs == 2:
        pytest.importorskip("gevent")
        pytest.importorskip("eventlet")
    script = HERE.parent.parent / "examples" / example
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=360, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ODP received 500 of 500 events, each once") == runs, done.stdout
