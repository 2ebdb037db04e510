"""Exit, fork and close over real HTTP: a process that exits without close(), a forked child,
close() against a server that hangs, close() twice, sends after close, flush_odp_events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from typing import Any, Callable, Dict, Optional

import pytest

import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.extension import manager_of
from optimizely_odp_ext.testing import NO_RESPONSE, FakeOdpServer
from tests.conftest import SDK5, TEST_KEY, requires_sdk5

from ._helpers import (
    CLOSED_LINE,
    FLUSH_TIMEOUT,
    DatafileServer,
    assert_delivered_exactly_once,
    close_polling_client,
    ids,
    no_drops,
    polling_client,
    send,
    wait_until,
)

CLOSED_AFTER_CLOSE = "ODP event not sent: the ODP event manager is closed."


def _closed_lines(log: Any) -> list:  # type: ignore[type-arg]
    return [line for line in log[1].lines() if line.startswith(CLOSED_LINE)]


# ----------------------------------------------------------------- exit without close()

_EXIT_SCRIPT = textwrap.dedent("""
    import json, logging, os, sys
    from optimizely import optimizely
    import optimizely_odp_ext
    from optimizely_odp_ext._datafile import datafile

    logger = logging.getLogger("exit-test")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    options = json.loads(os.environ["OPTIONS"])
    if os.environ["INSTALL"] == "class":
        optimizely_odp_ext.install(**options)
    client = optimizely.Optimizely(datafile(os.environ["ODP_URL"], os.environ["ODP_KEY"]), logger=logger)
    if os.environ["INSTALL"] == "instance":
        optimizely_odp_ext.install(client, **options)
    for i in range(500):
        client.send_odp_event("exit-test", {"fs_user_id": "u%d" % i}, data={"idempotence_id": "exit-%d" % i})
    print(json.dumps(client.odp_event_stats()), flush=True)
    # No close(), no flush: the interpreter exits here.
""")


def _run_exit_script(server: FakeOdpServer, install: str, **options: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ODP_URL": server.url, "ODP_KEY": TEST_KEY, "INSTALL": install,
           "OPTIONS": json.dumps(options)}
    return subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("install", ["instance", "class"])
def test_exit_without_close_delivers_everything(install: str) -> None:
    with FakeOdpServer(TEST_KEY) as server:
        server.set_latency(0.05)  # batches are still in flight when the script ends
        # 3 full batches go out at once; the last 50 wait for a flush interval that never comes:
        # only the exit hook can deliver them.
        done = _run_exit_script(server, install, batch_size=150, flush_interval=60, request_timeout=2,
                                close_timeout=10)
        assert done.returncode == 0, done.stderr
        at_exit: Dict[str, Any] = json.loads(done.stdout)
        assert at_exit["accepted"] == 500
        assert_delivered_exactly_once(server, ids("exit", 500))
        # The last 50 went in a batch of their own, after the script's last line: a partial batch goes
        # out only at its flush interval (60 s, never reached) or when flushed, so the exit hook sent it.
        batches = sorted(tuple(str(e["data"]["idempotence_id"]) for e in json.loads(r.body))
                         for r in server.requests)
        assert batches == sorted(tuple(ids("exit", n, start)) for start, n in ((0, 150), (150, 150), (300, 150),
                                                                                (450, 50)))
        assert [r.status for r in server.requests] == [202] * 4
        assert "INFO ODP event manager closed: 500 delivered, 0 dropped." in done.stderr.splitlines()


def test_exit_while_the_server_hangs_is_bounded_by_close_timeout() -> None:
    with FakeOdpServer(TEST_KEY) as server:
        server.hang_next(10_000)
        done = _run_exit_script(server, "instance", flush_interval=60, request_timeout=0.5, close_timeout=1.0)
        assert done.returncode == 0, done.stderr
        closed = [line for line in done.stderr.splitlines() if "ODP event manager closed" in line]
        # Never sent, or sent with no answer by the deadline ("unconfirmed"): all 500 accounted for.
        assert len(closed) == 1
        assert _split_drops(closed[0], "WARNING ODP event manager closed: 0 delivered, 500 dropped")
        assert server.events == []
        # Bounded: every request hangs until the server stops, and the retry window is 300 s, so only
        # the close deadline could end the script within subprocess.run's 60 s; no duration asserted
        # (interpreter start-up on a loaded machine varies far more than the 1 s deadline).


# ----------------------------------------------------------------- fork


def _fork() -> int:
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a multi-threaded process; that is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _wait_child(pid: int, timeout: float) -> int:
    """The child's exit code; kills it (and fails) if it does not exit in time."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status), f"child ended abnormally: status {status}"
            return os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(f"forked child did not exit within {timeout} s")
        wait_until(lambda: False, timeout=0.01)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_fork_each_event_sent_exactly_once(odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    # A long flush interval: the parent's first 50 are still queued at the fork.
    client = installed(odp_server, flush_interval=60)
    send(client, ids("parent-before", 50))
    assert odp_server.requests == []
    assert client.odp_event_stats()["queued"] == 50

    read_end, write_end = os.pipe()
    pid = _fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.close(read_end)
            send(client, ids("child", 50))
            flushed = client.flush_odp_events(5)
            report = {"flushed": flushed, "stats": client.odp_event_stats()}
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)

    os.close(write_end)
    send(client, ids("parent-after", 50))
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert _wait_child(pid, 20) == 0
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read())

    assert report["flushed"] is True
    child_stats = report["stats"]
    # The child starts fresh: only its own 50 events, none of the parent's queue.
    assert (child_stats["accepted"], child_stats["delivered"], child_stats["pending"]) == (50, 50, 0)
    parent_stats = client.odp_event_stats()
    assert (parent_stats["accepted"], parent_stats["delivered"], parent_stats["pending"]) == (100, 100, 0)
    assert_delivered_exactly_once(odp_server, ids("parent-before", 50) + ids("child", 50) + ids("parent-after", 50))


# ----------------------------------------------------------------- close()


def test_close_returns_by_its_deadline_while_the_server_hangs(
        odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    client = installed(odp_server, request_timeout=0.5, close_timeout=1.0)
    odp_server.hang_next(1000)
    send(client, ids("stuck", 20))
    assert odp_server.wait_for_requests(1, timeout=5)

    started = time.monotonic()
    client.close()  # every request hangs until the server stops: only the deadline can end close()
    elapsed = time.monotonic() - started

    assert elapsed >= 0.9, elapsed  # it kept trying until the deadline, not giving up at once
    assert all(r.status == NO_RESPONSE for r in odp_server.requests)  # returned with none answered
    assert odp_server.events == []
    stats = client.odp_event_stats()
    assert (stats["accepted"], stats["delivered"], stats["pending"]) == (20, 0, 0)
    drops = no_drops(stats)
    assert set(drops) <= {"shutdown", "unconfirmed"}
    assert sum(drops.values()) == 20
    [closed] = _closed_lines(log)
    assert _split_drops(closed, "ODP event manager closed: 0 delivered, 20 dropped")


def test_at_the_close_deadline_only_events_of_requests_sent_count_as_unconfirmed(
        odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    # A backlog while ODP hangs: the adaptive limit stays at its start (no round trip ends), so 4
    # requests go out. Their events are `unconfirmed` (ODP may have them); every other event was never
    # sent and is `shutdown`, however many batches max_in_flight (16) would allow. Counted against
    # what the server received, not against our own counters.
    client = installed(odp_server, request_timeout=30, close_timeout=1.0)
    odp_server.hang_next(1000)
    send(client, ids("backlog", 3000))
    assert odp_server.wait_for_requests(4, timeout=10)
    client.close()
    received = sum(len(json.loads(r.body)) for r in odp_server.requests)  # every one hung: none answered
    stats = client.odp_event_stats()
    assert stats["dropped"]["unconfirmed"] == received
    assert stats["dropped"]["shutdown"] == 3000 - received
    assert len(odp_server.requests) == 4


def test_close_right_after_a_hung_request_still_delivers_everything(
        odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    client = installed(odp_server, request_timeout=0.5, close_timeout=5.0)
    odp_server.hang_next(1)
    send(client, ids("late", 20))
    assert odp_server.wait_for_requests(1, timeout=5)  # the hung one

    client.close()

    assert_delivered_exactly_once(odp_server, ids("late", 20))
    stats = client.odp_event_stats()
    assert (stats["delivered"], stats["pending"], no_drops(stats)) == (20, 0, {})
    assert _closed_lines(log) == ["ODP event manager closed: 20 delivered, 0 dropped."]


def test_close_delivers_what_is_queued(odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server, flush_interval=60)
    send(client, ids("queued", 30))
    assert odp_server.requests == []

    client.close()
    assert_delivered_exactly_once(odp_server, ids("queued", 30))


def test_close_twice_is_harmless_and_sends_after_close_are_discarded(
        odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    client = installed(odp_server)
    send(client, ids("before-close", 3))
    client.close()
    client.close()
    assert _closed_lines(log) == ["ODP event manager closed: 3 delivered, 0 dropped."]
    requests_at_close = len(odp_server.requests)
    stats_at_close = client.odp_event_stats()

    send(client, ["after-close"])
    assert log[1].errors() == [CLOSED_AFTER_CLOSE]
    assert client.flush_odp_events(1) is True
    stats_at_close["refused"]["closed"] += 1  # the call after close: refused, never accepted
    assert client.odp_event_stats() == stats_at_close
    assert len(odp_server.requests) == requests_at_close
    assert_delivered_exactly_once(odp_server, ids("before-close", 3))


def test_class_level_close_delivers_then_runs_the_sdks_close(
        odp_server: FakeOdpServer, class_installed: None, make_client: Callable[..., Any], log: Any) -> None:
    client = make_client(odp_server.url, logger=log[0])
    send(client, ids("class", 4))
    client.close()
    assert_delivered_exactly_once(odp_server, ids("class", 4))
    assert _closed_lines(log) == ["ODP event manager closed: 4 delivered, 0 dropped."]
    if SDK5:
        # The SDK's own close() ran too: its event processor and ODP manager are stopped.
        assert client.event_processor.is_running is False


@requires_sdk5
def test_instance_level_close_runs_the_sdks_close_too(
        odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server)
    assert client.event_processor.is_running is True
    client.close()
    assert client.event_processor.is_running is False


def test_uninstall_delivers_what_is_queued(odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server, flush_interval=60)
    send(client, ids("uninstall", 7))
    assert optimizely_odp_ext.uninstall(client) is True
    assert_delivered_exactly_once(odp_server, ids("uninstall", 7))


def test_close_cuts_a_long_retry_after_short(odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server, close_timeout=5.0)
    odp_server.rate_limit_next(1, "30")  # honoured: the retry would wait 30 s
    send(client, ids("patient", 10))
    assert wait_until(lambda: client.odp_event_stats()["retries"] == 1, timeout=5)

    client.close()
    # Delivered by a close whose budget (5 s) is shorter than the Retry-After (30 s): the close cut it.
    assert_delivered_exactly_once(odp_server, ids("patient", 10))
    assert [r.status for r in odp_server.requests] == [429, 202]


@pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")  # optimizely-sdk 4.1.1's polling thread
def test_close_with_events_held_for_a_datafile_that_never_comes(log: Any) -> None:
    with DatafileServer(datafile(None, None)) as datafile_server:
        client = polling_client(datafile_server, log[0], close_timeout=5.0)
        try:
            assert datafile_server.requested.wait(10)
            send(client, ids("held", 4))
            # Nothing can send them: close does not wait out its deadline (300 s here; the join bounds a hang).
            closer = threading.Thread(target=_close_plugin, args=(client, 300.0), name="test-closer", daemon=True)
            closer.start()
            closer.join(30)
            assert not closer.is_alive(), "close() waited for a datafile that cannot come"
            stats = client.odp_event_stats()
            assert (stats["state"], stats["accepted"], stats["pending"], no_drops(stats)) == \
                ("undetermined", 4, 0, {"shutdown": 4})
        finally:
            close_polling_client(client, datafile_server)


def _close_plugin(client: Any, timeout: Optional[float] = None) -> None:
    """Closes only the plugin's manager (the SDK's close would wait on the held datafile fetch)."""
    manager = manager_of(client)
    assert manager is not None
    manager.close(timeout)


# ----------------------------------------------------------------- flush_odp_events()


def test_flush_returns_true_once_delivered(odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server, flush_interval=60)
    send(client, ids("flush", 10))
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    # Already there when flush returns: no waiting on the server needed.
    assert_delivered_exactly_once(odp_server, ids("flush", 10))


def test_flush_returns_false_on_a_hung_server(odp_server: FakeOdpServer, installed: Callable[..., Any],
                                               log: Any) -> None:
    client = installed(odp_server, request_timeout=0.5, close_timeout=0.5)
    odp_server.hang_next(1000)
    send(client, ids("hung", 5))

    started = time.monotonic()
    assert client.flush_odp_events(0.3) is False  # returned while the request still hangs
    assert time.monotonic() - started >= 0.3  # it waited its timeout
    assert odp_server.events == []

    client.close()
    drops = no_drops(client.odp_event_stats())
    assert set(drops) <= {"shutdown", "unconfirmed"}
    assert sum(drops.values()) == 5


def _split_drops(line: str, prefix: str) -> bool:
    """The close line names only shutdown/unconfirmed drops, and they add up to the total."""
    head, _, reasons = line.partition(" (")
    if head != prefix:
        return False
    total = int(prefix.rsplit(", ", 1)[1].split(maxsplit=1)[0])
    counts = {}
    for part in reasons.rstrip(").").split(", "):
        number, reason = part.split(" ", 1)
        counts[reason] = int(number)
    return set(counts) <= {"shutdown", "unconfirmed"} and sum(counts.values()) == total
