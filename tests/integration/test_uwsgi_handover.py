"""The uWSGI hand-over without uWSGI: a stand-in for uWSGI's embedded ``uwsgi`` module, real forks in C.

A process that uWSGI forks its workers from (``uwsgi.worker_id() == 0``) starts no thread; after the
fork exactly one worker delivers its held events, every other process starts with zero counts. The
real server is exercised in tests/recipes/test_uwsgi_preload.py (``nox -s recipes``); this covers the
glue in every cell of the matrix. The stand-in only answers the process-identity calls uWSGI's own
module answers (``worker_id``, ``mule_id``, ``masterpid``, ``i_am_the_spooler``) and holds
``post_fork_hook``, which the scenario calls where uWSGI would.

The forks are made as uWSGI makes them: ``fork()`` called from C (through ``ctypes.PyDLL``, which keeps
the GIL), so Python's fork hooks (``os.register_at_fork``) do not run in the child and only the plugin's
own fork detection (its pid checks) can notice the fork. Python's locks are not reset in such a child
either, so the "master" is a scenario process of its own with no other Python thread, as a uWSGI master
must be (the fake ODP server, whose thread polls 100 times a second, stays in the test's process).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

import pytest

from optimizely_odp_ext import _uwsgi
from optimizely_odp_ext.testing import FakeOdpServer

from ._helpers import assert_delivered_exactly_once, ids
from .test_processes import _env, _run, _script

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

# The stand-in uwsgi module and a C fork, in the scenario process (after test_processes' prelude).
_UWSGI = """
    import ctypes, types
    from optimizely_odp_ext.extension import manager_of

    IDENTITY = {"worker_id": int(os.environ.get("WORKER_ID", "0")), "mule_id": 0, "masterpid": os.getpid()}
    uwsgi = types.ModuleType("uwsgi")
    uwsgi.worker_id = lambda: IDENTITY["worker_id"]
    uwsgi.mule_id = lambda: IDENTITY["mule_id"]
    uwsgi.masterpid = lambda: IDENTITY["masterpid"]
    uwsgi.i_am_the_spooler = lambda: 0
    uwsgi.opt = {"master": True, "processes": b"2"}
    sys.modules["uwsgi"] = uwsgi

    def in_child(worker_id, body, hook=True):
        \"\"\"Forks in C, as uWSGI does; the child becomes worker ``worker_id`` (its post-fork hook unless
        ``hook`` is False) and reports ``body()``; returns the report once the child has exited.\"\"\"
        read_end, write_end = os.pipe()
        pid = ctypes.PyDLL(None).fork()
        if pid == 0:
            code = 70
            try:
                # A hung child prints its own stacks and ends (the test's SIGUSR1 comes later).
                faulthandler.dump_traceback_later(60, exit=True)
                os.close(read_end)
                IDENTITY["worker_id"] = worker_id
                if hook:
                    uwsgi.post_fork_hook()
                os.write(write_end, json.dumps(body()).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        # The child's end, then what it wrote (a report is far smaller than a pipe's buffer): not an
        # EOF, which a copy of the write end held elsewhere would never let come.
        _, status = os.waitpid(pid, 0)
        os.set_blocking(read_end, False)
        try:
            report = os.read(read_end, 1 << 20)
        except BlockingIOError:
            report = b""
        finally:
            os.close(read_end)
        assert status == 0 and report, "worker %d ended with status %d" % (worker_id, status)
        return json.loads(report)
"""

_OPTIONS = {"flush_interval": 0.05, "request_timeout": 5.0, "close_timeout": 5.0}

_MASTER = """
    client = make_client()
    threads_before = sorted(t.name for t in threading.enumerate())
    send(client, "master", 30)
    manager = manager_of(client)
    threads_after = sorted(t.name for t in threading.enumerate())
    result = {"held": manager._life.worker is None, "threads": [threads_before, threads_after],
              "queued": client.odp_event_stats()["queued"], "reports": []}
    for worker_id in (1, 2, 3):  # the third: a worker respawned later finds the token gone
        def body(worker_id=worker_id):
            return {"before": client.odp_event_stats()["accepted"],
                    "flushed": client.flush_odp_events(15) if worker_id != 3 else None,
                    "own": (send(client, "worker%d" % worker_id, 5), client.flush_odp_events(15))[1],
                    "stats": client.odp_event_stats()}
        result["reports"].append(in_child(worker_id, body))  # one after the other
    result["held_after"] = manager._life.worker is None
    client.close()
    result["master"] = client.odp_event_stats()
    print(json.dumps(result), flush=True)
"""


def _scenario(tmp_path: Path, server: FakeOdpServer, body: str) -> Dict[str, Any]:
    result = _run(_script(tmp_path, _UWSGI + body), _env(server, **_OPTIONS))
    assert result.returncode == 0, result.stderr
    report: Dict[str, Any] = json.loads(result.stdout)
    return report


def test_master_starts_no_thread_and_exactly_one_worker_delivers_its_events(
        odp_server: FakeOdpServer, tmp_path: Path) -> None:
    result = _scenario(tmp_path, odp_server, _MASTER)
    assert result["held"] is True  # held: no thread in a process uWSGI forks from
    before, after = result["threads"]
    assert after == before  # sending started no thread
    assert not [name for name in after if name.startswith("odp-ext-")]
    assert result["queued"] == 30
    reports = result["reports"]
    # Exactly one worker took the master's 30; every other one started from zero.
    assert sorted(report["before"] for report in reports) == [0, 0, 30]
    assert all(report["own"] is True for report in reports)
    assert sorted(report["stats"]["delivered"] for report in reports) == [5, 5, 35]
    assert result["held_after"] is True  # the master still runs no thread
    assert result["master"]["delivered"] == 0  # and never sends what a worker took
    assert_delivered_exactly_once(odp_server, ids("master", 30) + ids("worker1", 5) + ids("worker2", 5)
                                  + ids("worker3", 5))


_NO_HOOK = """
    client = make_client()
    send(client, "master", 10)
    def body():
        send(client, "worker", 5)  # no post_fork_hook call: the send notices the fork
        return {"flushed": client.flush_odp_events(15), "stats": client.odp_event_stats()}
    report = in_child(1, body, hook=False)
    client.close()
    print(json.dumps(report), flush=True)
"""


def test_a_worker_whose_post_fork_hook_did_not_run_takes_them_at_its_first_send(
        odp_server: FakeOdpServer, tmp_path: Path) -> None:
    report = _scenario(tmp_path, odp_server, _NO_HOOK)
    assert report["flushed"] is True
    assert (report["stats"]["accepted"], report["stats"]["delivered"]) == (15, 15)
    assert_delivered_exactly_once(odp_server, ids("master", 10) + ids("worker", 5))


_RUNNING_WORKER = """
    client = make_client()  # installed in worker 1 (WORKER_ID): nothing is held, the manager runs here
    send(client, "worker", 10)
    assert client.flush_odp_events(15)
    assert manager_of(client)._life.worker is not None
    def body():
        send(client, "forked", 5)  # no Python fork hook reset the manager: only its pid check can
        return {"flushed": client.flush_odp_events(15), "stats": client.odp_event_stats()}
    report = in_child(1, body, hook=False)
    report["parent"] = client.odp_event_stats()
    client.close()
    print(json.dumps(report), flush=True)
"""


def test_a_process_forked_in_c_from_a_running_worker_delivers_its_own_events_only(
        odp_server: FakeOdpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_ID", "1")
    report = _scenario(tmp_path, odp_server, _RUNNING_WORKER)
    assert report["flushed"] is True
    assert (report["stats"]["accepted"], report["stats"]["delivered"]) == (5, 5)
    assert (report["parent"]["accepted"], report["parent"]["delivered"]) == (10, 10)  # its own counts
    assert_delivered_exactly_once(odp_server, ids("worker", 10) + ids("forked", 5))


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

