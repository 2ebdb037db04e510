"""gunicorn with ``--preload`` and 2 workers, stopped with SIGTERM (issue 14, item 3).

The master sends an event at import (the app is preloaded there) and each worker sends one per
request. With ODP not answering, every process spends up to ``close_timeout`` delivering at its
exit; the master's must overlap its workers' (it starts when gunicorn's graceful stop begins), so
the whole server is down within ``close_timeout`` of SIGTERM plus what gunicorn itself takes to
stop -- not twice ``close_timeout``, which overran gunicorn's and Kubernetes' 30 s with the defaults.
With ODP answering, every event arrives exactly once.

gunicorn is a test-only dependency (the ``recipes`` nox session); without it these tests are skipped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

import pytest

pytest.importorskip("gunicorn")

from optimizely_odp_ext.testing import NO_RESPONSE, FakeOdpServer, RecordedRequest
from tests.conftest import TEST_KEY
from tests.integration._helpers import wait_until

pytestmark = pytest.mark.recipes

HERE = Path(__file__).resolve().parent
# The app's close_timeout: 15 s by default, short here so the test stays fast (the variable measures
# the default: ODP_EXT_GUNICORN_CLOSE_TIMEOUT=15).
CLOSE_TIMEOUT = float(os.environ.get("ODP_EXT_GUNICORN_CLOSE_TIMEOUT", "3"))
# EventManager.end_close waits for its worker thread until the close deadline plus this margin.
END_CLOSE_MARGIN = 1.0
WORKERS = 2
REQUESTS = 20
BOOT_TIMEOUT = 60.0  # gunicorn boots in a second or two; 2 shared cores under load take longer
EXIT_TIMEOUT = 60.0  # far beyond any bound asserted here: a hung server fails, it does not stall
LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+) \((\d+)\)")


class Gunicorn:
    """``gunicorn --preload --workers 2 gunicorn_app:app`` in its own session, on a free port."""

    def __init__(self, tmp_path: Path, odp: FakeOdpServer, *args: str, preload: bool = True) -> None:
        self.args = ("--preload", *args) if preload else args
        self.log_path = tmp_path / "gunicorn.log"
        self.env: Dict[str, str] = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "ODP_TEST_URL": odp.url,
            "ODP_TEST_KEY": TEST_KEY,
            "ODP_TEST_CLOSE_TIMEOUT": str(CLOSE_TIMEOUT),
        }
        self.cwd = tmp_path
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.base = ""
        self.master_pid = 0
        self.worker_pids: Set[int] = set()

    def start(self) -> None:
        """Starts the server and returns once both workers have answered a request."""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--workers", str(WORKERS), "--bind", "127.0.0.1:0",
                 "--log-level", "info", *self.args, "gunicorn_app:app"],
                env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        listening = wait_until(lambda: LISTENING.search(self.output()) is not None or self.process.poll() is not None,
                               timeout=BOOT_TIMEOUT, interval=0.05)
        match = LISTENING.search(self.output())
        assert listening, f"gunicorn did not start:\n{self.output()}"
        assert match is not None, f"gunicorn exited before listening:\n{self.output()}"
        self.base, self.master_pid = f"http://127.0.0.1:{match.group(1)}", int(match.group(2))
        # Both workers up before the test goes on: a stop while one still boots tests boot, not stop.
        assert wait_until(self._answered_by_both, timeout=BOOT_TIMEOUT, interval=0.05), self.output()

    def _answered_by_both(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, f"gunicorn exited:\n{self.output()}"
        for _ in range(2 * WORKERS):
            try:
                self.worker_pids.add(int(self.get("/")))
            except OSError:
                return False  # not accepting yet
        return len(self.worker_pids) >= WORKERS

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.base + path, timeout=10) as reply:
            return str(reply.read().decode())

    def send_requests(self, ids: List[str], concurrency: int = 1) -> Set[int]:
        """One request per id (each makes a worker send one event), ``concurrency`` at a time; returns
        the workers that served them. A request not answered (200) raises."""
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            return {int(pid) for pid in pool.map(lambda event_id: self.get(f"/event?id={event_id}"), ids)}

    def stop(self) -> float:
        """SIGTERM to the master; returns the seconds until the whole server has exited (exit code 0)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=EXIT_TIMEOUT)
        seconds = time.monotonic() - started
        assert code == 0, f"gunicorn exited {code}:\n{self.output()}"
        return seconds

    def kill(self) -> None:
        """Whatever is left of the server's process group (after a failed assertion) is killed."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout=10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@dataclasses.dataclass
class HealthyRun:
    """One boot, requests and SIGTERM with ODP answering: what arrived, and how long the stop took."""

    sent: List[str]
    events: List[Dict[str, Any]]
    master_pid: int
    worker_pids: Set[int]
    served_by: Set[int]
    stop_seconds: float


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> HealthyRun:
    """The healthy run, once for the module: its exactly-once check and the stop time it measures."""
    with FakeOdpServer(TEST_KEY) as odp:
        server = Gunicorn(tmp_path_factory.mktemp("healthy"), odp)
        try:
            server.start()
            sent = [f"request-{n}" for n in range(REQUESTS)]
            served_by = server.send_requests(sent)
            seconds = server.stop()  # at once: the workers' last events are still queued
        finally:
            server.kill()
        # The server has exited: what was going to arrive has arrived (the wait is a short margin).
        odp.wait_for_events(len(sent) + 1, timeout=2.0)
        return HealthyRun(sent, odp.events, server.master_pid, server.worker_pids, served_by, seconds)


@pytest.fixture
def odp() -> Iterator[FakeOdpServer]:
    with FakeOdpServer(TEST_KEY) as server:
        yield server


@pytest.fixture
def gunicorn(tmp_path: Path, odp: FakeOdpServer) -> Iterator[Callable[..., Gunicorn]]:
    """Makes the server (with extra gunicorn arguments); kills what is left of it at the end."""
    made: List[Gunicorn] = []

    def make(*args: str) -> Gunicorn:
        made.append(Gunicorn(tmp_path, odp, *args))
        return made[-1]

    try:
        yield make
    finally:
        for server in made:
            server.kill()


def _senders(request: RecordedRequest) -> Set[int]:
    """The process ids in the events of one request (hung requests included)."""
    body = request.body
    if request.headers.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    events: Any = json.loads(body)
    return {int(e["data"]["pid"]) for e in (events if isinstance(events, list) else [events])}


def _hung_senders(odp: FakeOdpServer) -> Set[int]:
    return {pid for r in odp.requests if r.status == NO_RESPONSE for pid in _senders(r)}


def test_healthy_odp_every_event_delivered_once(healthy: HealthyRun) -> None:
    assert len(healthy.worker_pids) == WORKERS
    assert healthy.served_by <= healthy.worker_pids
    # app_loaded was sent by the master before the fork: once, not once per worker.
    counts = collections.Counter(str(e["data"]["idempotence_id"]) for e in healthy.events)
    assert counts == collections.Counter([f"app_loaded-{healthy.master_pid}", *healthy.sent])
    senders = {int(e["data"]["pid"]) for e in healthy.events if e["action"] == "request"}
    assert senders <= healthy.worker_pids
    assert [int(e["data"]["pid"]) for e in healthy.events if e["action"] == "app_loaded"] == [healthy.master_pid]


def _stop_with_odp_hanging(server: Gunicorn, odp: FakeOdpServer) -> float:
    """Boots with every ODP request hanging, has each process send, stops: the seconds the stop took."""
    odp.hang_next(1000)  # every request hangs until the test ends: no process can deliver anything
    server.start()
    # The master and both workers each have events in flight that ODP does not answer. Which worker
    # serves a request is the kernel's choice: send rounds (bounded) until each worker has served.
    everyone = {server.master_pid, *server.worker_pids}
    served: Set[int] = set()
    for round_ in range(10):
        served |= server.send_requests([f"request-{round_}-{n}" for n in range(REQUESTS)])
        if served >= server.worker_pids:
            break
    assert wait_until(lambda: _hung_senders(odp) >= everyone, timeout=10.0, interval=0.05), \
        (_hung_senders(odp), everyone, served)
    seconds = server.stop()
    assert not odp.events  # nothing could be delivered: every process spent its budget
    return seconds


TRACE = re.compile(r"^odp-ext (\d+\.\d+) (\d+) (closing \d+ ODP event manager|ODP event manager closed)", re.M)


def _closes(output: str) -> Dict[int, List[float]]:
    """Each process's close as its own trace tells it (gunicorn_app.py): [began, ended] per pid, on
    one clock. A process that closed twice, or began and never ended, has more or fewer times."""
    closes: Dict[int, List[float]] = collections.defaultdict(list)
    for when, pid, _what in TRACE.findall(output):
        closes[int(pid)].append(float(when))
    return dict(closes)


def test_hanging_odp_whole_server_down_within_close_timeout(healthy: HealthyRun, gunicorn: Callable[..., Gunicorn],
                                                             odp: FakeOdpServer) -> None:
    """The master's close overlaps its workers' (it begins before they end), and each process's
    close takes its budget plus the join margin at most: so the server is down within one
    ``close_timeout`` plus what gunicorn takes to stop, not two. Told by the processes' own clocks,
    not the stop's wall time alone: a loaded CI machine stretches what gunicorn takes, not the budget."""
    server = gunicorn()
    seconds = _stop_with_odp_hanging(server, odp)
    output = server.output()
    closes = _closes(output)
    print(f"SIGTERM to exit with ODP hanging: {seconds:.2f} s; with ODP answering: {healthy.stop_seconds:.2f} s; "
          f"close_timeout {CLOSE_TIMEOUT:g} s; closes (began, ended): {closes}")
    assert set(closes) == {server.master_pid, *server.worker_pids}, output
    assert all(len(times) == 2 for times in closes.values()), output  # one close per process, finished
    for began, ended in closes.values():
        assert ended - began <= CLOSE_TIMEOUT + END_CLOSE_MARGIN, output
    master_began, master_ended = closes[server.master_pid]
    for pid in server.worker_pids:
        worker_began, worker_ended = closes[pid]
        assert master_began < worker_ended, output  # concurrent, not in turn
        assert worker_began < master_ended, output
    # Backstop for a process that hangs after its close: twice the budget is what the fix removed.
    assert seconds < 2 * CLOSE_TIMEOUT + healthy.stop_seconds + END_CLOSE_MARGIN, output


def test_graceful_timeout_below_close_timeout_caps_the_master_too(gunicorn: Callable[..., Gunicorn],
                                                                  odp: FakeOdpServer) -> None:
    # gunicorn kills the workers still delivering at graceful_timeout; the master stops delivering
    # then as well, rather than spending the rest of its close_timeout alone (it started when the
    # stop began: uncapped, the stop takes at least close_timeout).
    graceful = CLOSE_TIMEOUT / 3
    server = gunicorn("--graceful-timeout", f"{graceful:g}")
    seconds = _stop_with_odp_hanging(server, odp)
    print(f"SIGTERM to exit with ODP hanging, graceful_timeout {graceful:g} s: {seconds:.2f} s")
    assert graceful <= seconds < CLOSE_TIMEOUT, server.output()


_WRAPPING = """
import os, sys
from optimizely import optimizely
import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile

def client():
    made = optimizely.Optimizely(datafile(os.environ["ODP_TEST_URL"], os.environ["ODP_TEST_KEY"]))
    optimizely_odp_ext.install(made)
    made.send_odp_event("t", {"fs_user_id": "u"})
    return made

def wrapped(function):
    return getattr(function, "_optimizely_odp_ext_applied", False)

first = client()
print("gunicorn" in sys.modules)  # the plugin never imports gunicorn itself
from gunicorn.arbiter import Arbiter
original = Arbiter.stop
print(wrapped(Arbiter.stop))  # importing gunicorn wraps nothing: a client made while it is loaded does
second, third = client(), client()
print(wrapped(Arbiter.stop), Arbiter.stop.__wrapped__ is original)  # wrapped once, however many clients
for made in (first, second, third):
    made.close()
"""


def test_arbiter_stop_wrapped_once_only_where_gunicorn_and_a_client_are(odp: FakeOdpServer) -> None:
    env = {**os.environ, "ODP_TEST_URL": odp.url, "ODP_TEST_KEY": TEST_KEY}
    done = subprocess.run([sys.executable, "-c", _WRAPPING], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["False", "False", "True", "True"]
    assert odp.wait_for_events(3, timeout=5.0)
