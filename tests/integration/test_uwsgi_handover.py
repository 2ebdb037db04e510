"""The uWSGI hand-over without uWSGI: a stand-in for uWSGI's embedded ``uwsgi`` module, real forks.

A process that uWSGI forks its workers from (``uwsgi.worker_id() == 0``) starts no thread; after the
fork exactly one worker delivers its held events, every other process starts with zero counts. The
real server is exercised in tests/recipes/test_uwsgi_preload.py (``nox -s recipes``); this covers the
glue in every cell of the matrix. The stand-in only answers the process-identity calls uWSGI's own
module answers (``worker_id``, ``mule_id``, ``masterpid``, ``i_am_the_spooler``) and holds
``post_fork_hook``, which the test calls where uWSGI would.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import types
from typing import Any, Callable, Dict, Iterator, List

import pytest

from optimizely_odp_ext import _uwsgi
from optimizely_odp_ext.extension import manager_of
from optimizely_odp_ext.testing import FakeOdpServer

from ._helpers import FLUSH_TIMEOUT, assert_delivered_exactly_once, ids, send
from .test_lifecycle import _fork, _wait_child

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")


@pytest.fixture
def uwsgi_master(monkeypatch: pytest.MonkeyPatch) -> Iterator[Dict[str, int]]:
    """This process as a uWSGI master: ``identity`` holds what the stand-in answers."""
    identity = {"worker_id": 0, "mule_id": 0, "masterpid": os.getpid()}
    module = types.ModuleType("uwsgi")
    module.worker_id = lambda: identity["worker_id"]  # type: ignore[attr-defined]
    module.mule_id = lambda: identity["mule_id"]  # type: ignore[attr-defined]
    module.masterpid = lambda: identity["masterpid"]  # type: ignore[attr-defined]
    module.i_am_the_spooler = lambda: 0  # type: ignore[attr-defined]
    module.opt = {"master": True, "processes": b"2"}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uwsgi", module)
    for name, value in (("_token", None), ("_token_pid", 0), ("_decided", None), ("_hooked", False)):
        monkeypatch.setattr(_uwsgi, name, value)
    yield identity
    _uwsgi._forget_token()


def _child(client: Any, write_end: int, worker_id: int, body: Callable[[], Dict[str, Any]]) -> None:
    """In a forked child: become uWSGI worker ``worker_id`` (its post-fork hook), report ``body()``."""
    code = 70
    try:
        uwsgi = sys.modules["uwsgi"]
        uwsgi.worker_id = lambda: worker_id  # type: ignore[attr-defined]
        uwsgi.post_fork_hook()  # type: ignore[attr-defined]
        os.write(write_end, json.dumps(body()).encode())
        code = 0
    finally:
        os._exit(code)


def test_master_starts_no_thread_and_exactly_one_worker_delivers_its_events(
        odp_server: FakeOdpServer, installed: Callable[..., Any], uwsgi_master: Dict[str, int]) -> None:
    client = installed(odp_server)
    threads_before = threading.active_count()
    send(client, ids("master", 30))
    manager = manager_of(client)
    assert manager is not None
    assert manager._worker is None  # held: no thread in a process uWSGI forks from
    assert threading.active_count() == threads_before
    assert client.odp_event_stats()["queued"] == 30

    reports: List[Dict[str, Any]] = []
    children = []
    for worker_id in (1, 2, 3):  # the third: a worker respawned later finds the token gone
        read_end, write_end = os.pipe()
        pid = _fork()
        if pid == 0:
            os.close(read_end)
            _child(client, write_end, worker_id, lambda worker_id=worker_id: {
                "before": client.odp_event_stats()["accepted"],
                "flushed": client.flush_odp_events(FLUSH_TIMEOUT) if worker_id != 3 else None,
                "own": (send(client, ids(f"worker{worker_id}", 5)), client.flush_odp_events(FLUSH_TIMEOUT))[1],
                "stats": client.odp_event_stats()})
        os.close(write_end)
        children.append((pid, read_end))
        assert _wait_child(pid, 30) == 0  # one after the other: "respawned" really comes last
    for _pid, read_end in children:
        with os.fdopen(read_end, "rb") as pipe:
            reports.append(json.loads(pipe.read()))

    # Exactly one worker took the master's 30; every other one started from zero.
    assert sorted(report["before"] for report in reports) == [0, 0, 30]
    assert all(report["own"] is True for report in reports)
    delivered = sorted(report["stats"]["delivered"] for report in reports)
    assert delivered == [5, 5, 35]
    assert manager._worker is None  # the master still runs no thread
    assert_delivered_exactly_once(odp_server, ids("master", 30) + ids("worker1", 5) + ids("worker2", 5)
                                  + ids("worker3", 5))


def test_a_worker_whose_post_fork_hook_did_not_run_takes_them_at_its_first_send(
        odp_server: FakeOdpServer, installed: Callable[..., Any], uwsgi_master: Dict[str, int]) -> None:
    client = installed(odp_server)
    send(client, ids("master", 10))
    read_end, write_end = os.pipe()
    pid = _fork()
    if pid == 0:
        code = 70
        try:
            os.close(read_end)
            sys.modules["uwsgi"].worker_id = lambda: 1  # type: ignore[attr-defined]
            send(client, ids("worker", 5))  # no post_fork_hook call: the send notices the fork
            report = {"flushed": client.flush_odp_events(FLUSH_TIMEOUT), "stats": client.odp_event_stats()}
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    assert _wait_child(pid, 30) == 0
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read())
    assert report["flushed"] is True
    assert (report["stats"]["accepted"], report["stats"]["delivered"]) == (15, 15)
    assert_delivered_exactly_once(odp_server, ids("master", 10) + ids("worker", 5))


@pytest.mark.parametrize("fork_hooks", [False, True])
def test_other_threads_in_the_master_one_error_naming_the_flag(
        odp_server: FakeOdpServer, installed: Callable[..., Any], uwsgi_master: Dict[str, int], log: Any,
        fork_hooks: bool) -> None:
    if fork_hooks:
        sys.modules["uwsgi"].opt["py-call-uwsgi-fork-hooks"] = True  # type: ignore[attr-defined]
    stop = threading.Event()
    poller = threading.Thread(target=stop.wait, args=(30,), name="PollThread", daemon=True)  # an sdk_key client's
    poller.start()
    try:
        installed(odp_server)
        installed(odp_server)  # a second client: still one line per process
    finally:
        stop.set()
        poller.join(5)
    errors = [line for line in log[1].errors() if "uWSGI forks its workers" in line]
    if fork_hooks:
        assert errors == []  # uWSGI takes the GIL and runs Python's fork hooks: nothing to add
    else:
        assert len(errors) == 1
        assert "PollThread" in errors[0]
        assert "OdpThread" not in errors[0]  # the SDK's ODP thread: stopped at install there
        assert "--py-call-uwsgi-fork-hooks" in errors[0]
