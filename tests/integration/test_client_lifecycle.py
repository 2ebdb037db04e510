"""A client's life around install, close, uninstall, copy and pickle (issue 9, items 9, 11, 12 and 15):
a closed client stays closed, a stale method says why it sends nothing, a copy is the SDK's copy,
and lost events are visible without any logging configured."""

from __future__ import annotations

import copy
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap
import threading
from typing import Any, Callable, List, Set

import pytest

import optimizely_odp_ext
from optimizely_odp_ext.extension import manager_of
from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import TEST_KEY

from ._helpers import FLUSH_TIMEOUT, assert_delivered_exactly_once, ids, send

CLOSED = "ODP event not sent: the ODP event manager is closed."
STALE = ("ODP event not sent: optimizely_odp_ext was uninstalled from this client; this send_odp_event was kept "
         "from before uninstall() (further events through it are discarded without a line).")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _plugin_threads() -> Set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("odp-ext-")}


def _refused(client: Any) -> dict:  # type: ignore[type-arg]
    return {reason: n for reason, n in client.odp_event_stats()["refused"].items() if n}


# ----------------------------------------------------------------- item 9: closed stays closed


def test_class_install_client_closed_before_its_first_send_stays_closed(
        odp_server: FakeOdpServer, class_installed: None, make_client: Callable[..., Any], log: Any) -> None:
    client = make_client(odp_server.url, logger=log[0])
    client.close()
    threads = _plugin_threads()
    send(client, ids("after-close", 3))
    assert log[1].errors() == [CLOSED] * 3
    assert _plugin_threads() == threads  # no worker, no sender started for a closed client
    assert client.flush_odp_events(1) is True
    stats = client.odp_event_stats()
    assert (stats["accepted"], stats["pending"], _refused(client)) == (0, 0, {"closed": 3})
    assert odp_server.requests == []


def test_install_on_a_closed_client_does_not_bring_it_back(
        odp_server: FakeOdpServer, class_installed: None, make_client: Callable[..., Any], log: Any) -> None:
    client = make_client(odp_server.url, logger=log[0])
    client.close()
    assert optimizely_odp_ext.install(client, flush_interval=0.01) is True
    send(client, ids("after-close", 2))
    assert log[1].errors() == [CLOSED] * 2
    assert _plugin_threads() == set()
    assert _refused(client) == {"closed": 2}
    assert odp_server.requests == []


def test_reinstall_after_close_and_uninstall_stays_closed(
        odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    client = installed(odp_server)
    send(client, ids("before", 2))
    client.close()
    assert optimizely_odp_ext.uninstall(client) is True
    assert optimizely_odp_ext.install(client) is True
    send(client, ids("after", 2))
    assert log[1].errors() == [CLOSED] * 2
    assert_delivered_exactly_once(odp_server, ids("before", 2))


# ----------------------------------------------------------------- item 11: stale bound methods


def test_send_kept_across_instance_uninstall_says_why_once(
        odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    client = installed(odp_server)
    kept = client.send_odp_event
    send(client, ids("before", 1))
    assert optimizely_odp_ext.uninstall(client) is True
    errors_before = len(log[1].errors())
    for n in range(3):
        kept("after", {"fs_user_id": f"u{n}"})
    assert log[1].errors()[errors_before:] == [STALE]
    assert_delivered_exactly_once(odp_server, ids("before", 1))


def test_send_kept_across_class_uninstall_says_why_once(
        odp_server: FakeOdpServer, make_client: Callable[..., Any], log: Any) -> None:
    assert optimizely_odp_ext.install(flush_interval=0.01) is True
    try:
        client = make_client(odp_server.url, logger=log[0])
        kept = client.send_odp_event
        send(client, ids("before", 1))
    finally:
        assert optimizely_odp_ext.uninstall() is True
    for n in range(3):
        kept("after", {"fs_user_id": f"u{n}"})
    assert [line for line in log[1].errors() if "uninstalled" in line] == [STALE]
    assert_delivered_exactly_once(odp_server, ids("before", 1))


# ----------------------------------------------------------------- item 12: copy and pickle


def _ours(client: Any) -> List[str]:
    return sorted(name for name, value in client.__dict__.items()
                  if name in ("_odp_ext_state", "_odp_ext_send") or getattr(value, "_odp_ext_applied", False))


def test_copy_of_an_instance_installed_client_is_a_plain_sdk_client(
        odp_server: FakeOdpServer, installed: Callable[..., Any], make_client: Callable[..., Any]) -> None:
    plain = make_client(odp_server.url)
    client = installed(odp_server)
    twin = copy.copy(client)
    assert _ours(client) != []
    assert _ours(twin) == []
    assert sorted(twin.__dict__) == sorted(plain.__dict__)  # what the SDK's own copy would have
    assert manager_of(twin) is None
    send(client, ids("original", 2))
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert client.odp_event_stats()["delivered"] == 2
    deep = copy.deepcopy(twin) if _deep_copies(plain) else None
    assert deep is None or _ours(deep) == []
    assert_delivered_exactly_once(odp_server, ids("original", 2))


def _deep_copies(client: Any) -> bool:
    try:
        copy.deepcopy(client)
    except Exception:
        return False
    return True


def test_copy_with_a_class_install_gets_a_manager_of_its_own(
        odp_server: FakeOdpServer, class_installed: None, make_client: Callable[..., Any], log: Any) -> None:
    client = make_client(odp_server.url, logger=log[0])
    send(client, ids("original", 2))
    twin = copy.copy(client)
    try:
        assert "_odp_ext_state" not in twin.__dict__
        send(twin, ids("twin", 3))
        assert manager_of(twin) is not None
        assert manager_of(twin) is not manager_of(client)
        assert client.flush_odp_events(FLUSH_TIMEOUT) is True
        assert twin.flush_odp_events(FLUSH_TIMEOUT) is True
        assert (client.odp_event_stats()["accepted"], twin.odp_event_stats()["accepted"]) == (2, 3)
    finally:
        twin.close()
    assert_delivered_exactly_once(odp_server, ids("original", 2) + ids("twin", 3))


@pytest.mark.parametrize("level", ["class", "instance"])
def test_a_client_that_pickled_before_install_pickles_after(
        odp_server: FakeOdpServer, make_client: Callable[..., Any], level: str) -> None:
    client = make_client(odp_server.url)
    try:
        pickle.dumps(client)
    except Exception as exc:  # optimizely-sdk 5.x clients hold threads and locks: they never pickled
        pytest.skip(f"this optimizely-sdk's client does not pickle without the plugin either ({exc!r})")
    assert optimizely_odp_ext.install(None if level == "class" else client, flush_interval=0.01) is True
    try:
        client.send_odp_event("pickled", {"fs_user_id": "u"})
        restored = pickle.loads(pickle.dumps(client))
        assert _ours(restored) == []
        assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    finally:
        optimizely_odp_ext.uninstall(None if level == "class" else client)


# ----------------------------------------------------------------- item 15: visible by default

_CHILD = textwrap.dedent("""\
    import logging, sys
    from optimizely import optimizely
    import optimizely_odp_ext
    from optimizely_odp_ext._datafile import datafile

    url, key, mode = sys.argv[1:4]
    logger = None
    if mode == "real":
        logger = logging.getLogger("app")
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("app: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    fast = dict(flush_interval=0.01, request_timeout=1.0, backoff_base=0.01, close_timeout=5.0)
    client = optimizely.Optimizely(datafile(url, key), logger=logger)
    optimizely_odp_ext.install(client, **fast)
    client.send_odp_event("", {"fs_user_id": "u"})      # bad input
    client.send_odp_event("a", {"fs_user_id": "u"})     # refused by ODP: the key is wrong
    client.close()
    refused = optimizely.Optimizely(datafile("http://odp.example.invalid", key), logger=logger)
    optimizely_odp_ext.install(refused, **fast)
    refused.send_odp_event("a", {"fs_user_id": "u"})    # plain http to a remote host: refused
    refused.close()
""")
LINES = ("ODP action is not valid (cannot be empty).", "ODP event manager closed: 0 delivered, 1 dropped (1 rejected).",
         'ODP host "http://odp.example.invalid" uses plain http; refusing to send the API key unencrypted')


def _run_child(server: FakeOdpServer, mode: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", _CHILD, server.url, "wrong-key-0000", mode], capture_output=True,
                          text=True, timeout=60, env=env, cwd=str(ROOT), check=False)


def _count(text: str, line: str) -> int:
    return sum(1 for row in text.splitlines() if line in row)


def test_problems_are_visible_without_logging_configured_and_never_doubled(odp_server: FakeOdpServer) -> None:
    """The SDK's default logger drops every line; ours also reach Python's last-resort handler
    (stderr). With a real logger each line appears there, as often as it is logged, and not on stderr."""
    default = _run_child(odp_server, "default")
    real = _run_child(odp_server, "real")
    assert (default.returncode, real.returncode) == (0, 0), (default.stderr, real.stderr)
    assert default.stdout == ""
    for line in (*LINES, "rejected 1 event(s) with HTTP 401"):
        assert _count(default.stderr, line) >= 1, (line, default.stderr)
        assert _count(default.stderr, line) == _count(real.stdout, line), (line, default.stderr, real.stdout)
        assert _count(real.stderr, line) == 0, (line, real.stderr)
    # Once for the call, once when the datafile named the host: never twice per event.
    assert _count(default.stderr, LINES[2]) == 2


def test_refused_host_is_counted(make_client: Callable[..., Any], log: Any) -> None:
    client = make_client("http://odp.example.invalid", TEST_KEY, logger=log[0])
    assert optimizely_odp_ext.install(client) is True
    client.send_odp_event("a", {"fs_user_id": "u"})
    assert _refused(client) == {"host_refused": 1}
