"""uWSGI with the app loaded in the master (``--master --processes 2``, no ``--lazy-apps``), issue 14.

The master sends events at import, before uWSGI forks the workers in C (without Python's fork
hooks). Booted many times: every worker must answer (a worker forked while a thread of the master
held a lock blocked forever: 4 of 40 boots with 50 events), and every event, the master's and the
workers', must reach ODP exactly once (the master runs no exit hook: its own events are handed to
one worker). Each worker gets its own port (``--map-socket``) so the test knows both answered.

uWSGI is a test-only dependency (the ``recipes`` nox session); without it this test is skipped.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import TEST_KEY
from tests.integration._helpers import wait_until

pytestmark = pytest.mark.recipes

HERE = Path(__file__).resolve().parent
UWSGI = Path(sys.executable).parent / "uwsgi"  # pip installs it beside this Python
BOOTS = int(os.environ.get("ODP_EXT_UWSGI_BOOTS", "20"))
MASTER_EVENTS = int(os.environ.get("ODP_EXT_UWSGI_MASTER_EVENTS", "200"))
WORKERS = 2
REQUESTS_PER_WORKER = 3
ANSWER_TIMEOUT = 10.0  # a worker answers within a second; one that has not by then is hung
EXIT_TIMEOUT = 20.0


def _free_ports(count: int) -> List[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _get(url: str, timeout: float = 2.0) -> Optional[str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return str(reply.read().decode())
    except OSError:
        return None


class Boot:
    """One ``uwsgi --master --processes 2`` run; worker n listens on ``ports[n - 1]``."""

    def __init__(self, number: int, odp: FakeOdpServer, log_path: Path, flags: Tuple[str, ...],
                 env: Optional[Dict[str, str]] = None) -> None:
        self.number = number
        self.ports = _free_ports(WORKERS)
        sockets = [arg for port in self.ports for arg in ("--http-socket", f"127.0.0.1:{port}")]
        mapping = [arg for n in range(WORKERS) for arg in ("--map-socket", f"{n}:{n + 1}")]
        env = {**os.environ, "ODP_TEST_URL": odp.url, "ODP_TEST_KEY": TEST_KEY, "ODP_TEST_BOOT": f"b{number}",
               "ODP_TEST_MASTER_EVENTS": str(MASTER_EVENTS),
               "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]),
               **(env or {})}
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(UWSGI), "--master", "--processes", str(WORKERS), *sockets, *mapping, "--die-on-term", *flags,
                 "--module", "uwsgi_app:app", "--need-app"],
                env=env, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def answers(self) -> Dict[int, str]:
        """``GET /stats`` of each worker that answers within ANSWER_TIMEOUT (port index -> answer)."""
        answers: Dict[int, str] = {}

        def poll() -> bool:
            for index, port in enumerate(self.ports):
                if index not in answers:
                    answer = _get(f"http://127.0.0.1:{port}/stats")
                    if answer is not None:
                        answers[index] = answer
            return len(answers) == WORKERS or self.process.poll() is not None

        wait_until(poll, timeout=ANSWER_TIMEOUT, interval=0.05)
        return answers

    def send(self) -> Optional[List[str]]:
        """REQUESTS_PER_WORKER events from each worker; None when a worker stops answering."""
        sent = []
        for index, port in enumerate(self.ports):
            for n in range(REQUESTS_PER_WORKER):
                event_id = f"b{self.number}-w{index}-{n}"
                if _get(f"http://127.0.0.1:{port}/event?id={event_id}") is None:
                    return None
                sent.append(event_id)
        return sent

    def stop(self) -> Optional[int]:
        """SIGTERM (``--die-on-term``: uWSGI stops, each worker's interpreter exits); None if it hangs."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left: a hung worker
            if self.process.poll() is None:
                self.process.wait(5)


@pytest.mark.parametrize(("flags", "boots"), [
    ((), BOOTS),
    # uWSGI takes the GIL and runs Python's fork hooks around each fork: the hand-over starts in
    # them, before uWSGI has set the worker's id, and ends in the post-fork hook.
    (("--py-call-uwsgi-fork-hooks",), max(BOOTS // 4, 1)),
], ids=["default", "py-call-uwsgi-fork-hooks"])
def test_preloaded_app_every_worker_answers_every_event_delivered_once(tmp_path: Path, flags: Tuple[str, ...],
                                                                        boots: int) -> None:
    if not UWSGI.exists():
        pytest.skip("uWSGI is not installed beside this Python (nox -s recipes installs it)")
    hung: List[Tuple[int, int, str]] = []  # boot, workers that kept answering, log tail
    stats_wrong: List[Tuple[int, List[int]]] = []
    bad_exits: List[Tuple[int, Optional[int], str]] = []  # boot, exit code (None: still running), log tail
    expected: List[str] = []
    with FakeOdpServer(TEST_KEY) as odp:
        for number in range(boots):
            boot = Boot(number, odp, tmp_path / f"uwsgi-{number}.log", flags)
            try:
                answers = boot.answers()
                if len(answers) < WORKERS:
                    hung.append((number, len(answers), boot.log_path.read_text()[-1500:]))
                    continue
                # Each worker starts with zero counts; exactly one carries the master's held events.
                accepted = sorted(int(answer.split()[1]) for answer in answers.values())
                if accepted != [0, MASTER_EVENTS]:
                    stats_wrong.append((number, accepted))
                expected += [f"b{number}-master-{n}" for n in range(MASTER_EVENTS)]
                sent = boot.send()
                if sent is None:
                    hung.append((number, WORKERS - 1, boot.log_path.read_text()[-1500:]))
                    continue
                expected += sent
                # Delivered while running: uWSGI skips a worker's exit hooks when SIGTERM lands while
                # it still finishes a request (uwsgi_python_atexit: "if busy"), which is not what
                # this test is about.
                flushed = [_get(f"http://127.0.0.1:{port}/flush") for port in boot.ports]
                if not all(answer is not None and answer.endswith(" True") for answer in flushed):
                    hung.append((number, sum(answer is not None for answer in flushed), str(flushed)))
            finally:
                code = boot.stop()
                if code != 0:
                    bad_exits.append((number, code, boot.log_path.read_text()[-1500:]))
        # Every worker delivered at its exit (uWSGI waits for them): what ODP has now is final.
        received = collections.Counter(str(event["data"]["idempotence_id"]) for event in odp.events)
    lost = [event_id for event_id in expected if event_id not in received]
    twice = {event_id: n for event_id, n in received.items() if n > 1}
    summary = (f"{len(hung)} of {boots} boots hung (a worker never answered), {len(bad_exits)} did not stop "
               f"cleanly; of {len(expected)} events: {len(lost)} lost, {len(twice)} delivered more than once; "
               f"workers' accepted counts wrong in {len(stats_wrong)} boots")
    assert not hung, f"{summary}\nhung (boot, workers answering): {[(b, n) for b, n, _ in hung]}\n{hung[0][2]}"
    assert not bad_exits, f"{summary}\n{[(b, c) for b, c, _ in bad_exits]}\n{bad_exits[0][2]}"
    assert not lost, f"{summary}: e.g. {lost[:5]}"
    assert not twice, f"{summary}: e.g. {list(twice.items())[:5]}"
    assert not stats_wrong, f"{summary}: accepted per worker (expected [0, {MASTER_EVENTS}]): {stats_wrong}"
    assert len(received) == len(expected) == boots * (MASTER_EVENTS + WORKERS * REQUESTS_PER_WORKER)


# uWSGI 2.0's SIGTERM with --die-on-term is its brutal stop: workers get SIGINT and exit at once, and
# a worker still in a request skips every Python exit hook ("if busy", uwsgi_python_atexit). This hook
# (uWSGI's documented recipe) makes SIGTERM its graceful stop: workers finish their request, then exit
# with their exit hooks.
GRACEFUL_SIGTERM = ("--hook-master-start", "unix_signal:15 gracefully_kill_them_all")
HOLD_SECONDS = 3.0  # how long the held request takes: the SIGTERM lands inside it


def test_sigterm_while_a_worker_is_mid_request_loses_nothing_with_the_graceful_hook(tmp_path: Path) -> None:
    """The documented flags: a SIGTERM landing while a worker serves a slow request. The event that
    request sent is still queued (``flush_interval`` 60 s), so only the worker's exit can deliver it:
    it arrives once, the request is answered, and uWSGI exits 0. (Without the hook the worker dies
    busy and the event is lost: run with ``GRACEFUL_SIGTERM = ()`` to see it.)"""
    if not UWSGI.exists():
        pytest.skip("uWSGI is not installed beside this Python (nox -s recipes installs it)")
    with FakeOdpServer(TEST_KEY) as odp:
        boot = Boot(0, odp, tmp_path / "uwsgi.log", GRACEFUL_SIGTERM,
                    env={"ODP_TEST_MASTER_EVENTS": "0", "ODP_TEST_FLUSH_INTERVAL": "60",
                         "ODP_TEST_HOLD_SECONDS": str(HOLD_SECONDS)})
        answers: List[Optional[str]] = []
        holder = threading.Thread(target=lambda: answers.append(
            _get(f"http://127.0.0.1:{boot.ports[0]}/hold?id=held", timeout=HOLD_SECONDS + 10)))
        try:
            assert len(boot.answers()) == WORKERS, boot.log_path.read_text()[-1500:]
            holder.start()
            assert wait_until(lambda: "holding held" in boot.log_path.read_text(), timeout=ANSWER_TIMEOUT,
                              interval=0.02), boot.log_path.read_text()[-1500:]
            assert odp.events == []  # queued in the busy worker: its exit is what delivers it
        finally:
            code = boot.stop()
            holder.join(HOLD_SECONDS + 15)
        log = boot.log_path.read_text()[-3000:]
        assert [e["data"]["idempotence_id"] for e in odp.events] == ["held"], log
        assert code == 0, log
        assert len(answers) == 1, log
        assert answers[0] is not None, log  # the request was answered
