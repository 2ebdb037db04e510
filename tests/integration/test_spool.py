"""Issue 4, the durable spool, over real HTTP and real processes.

Child processes are real Python interpreters (``sys.executable -c``) running a real Optimizely
client with the plugin installed; the test drives them with one-line commands on stdin and reads
one JSON line per answer on stdout (every wait is bounded). They are killed with SIGKILL where the
scenario says so. Each test counts the idempotence ids the FakeOdpServer accepted: delivered, lost
and duplicated, exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from optimizely_odp_ext.event import validate
from optimizely_odp_ext.manager import EventManager
from optimizely_odp_ext.settings import make_options
from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import TEST_KEY, RecordingHandler

from . import _spool_disk as disk
from ._helpers import ACTION, FAST, FLUSH_TIMEOUT, assert_delivered_exactly_once, ids, no_drops, send, wait_until

REPO = Path(__file__).resolve().parents[2]
OUTAGE = 120.0  # a 503 window longer than any test: cleared explicitly with fail_for(0)
ANSWER_TIMEOUT = 20.0  # the longest a child may take to answer one command (never reached when things work)

# The options every test here delivers with. Short backoffs, so a heal is seen fast. What these
# tests check is exactly once through the spool, and a sender that gives up on a slow answer sends
# the batch again (at least once, by design): so requests may take as long as a loaded 2-core CI
# machine takes to answer, and a duplicate is then the spool's. (Every 503 here is answered at once.)
CHILD_OPTIONS: Dict[str, Any] = {
    "flush_interval": 0.05, "backoff_base": 0.05, "backoff_max": 0.3,
    "request_timeout": 10.0, "connect_timeout": 0.5, "close_timeout": 5.0,
}
DELIVERING: Dict[str, Any] = {"request_timeout": CHILD_OPTIONS["request_timeout"]}  # the clients of the tests

CHILD = r'''
import json, logging, os, signal, sys, threading, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(process)d %(levelname)s %(message)s")
cfg = json.loads(sys.argv[1])
from optimizely import optimizely
import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
from tests.integration import _spool_disk as disk

def say(event, **fields):
    print(json.dumps({"event": event, "pid": os.getpid(), **fields}), flush=True)

def send(prefix, start, count):
    for i in range(start, start + count):
        client.send_odp_event("spool", {"fs_user_id": f"user-{prefix}-{i}"}, data={"idempotence_id": f"{prefix}-{i}"})

def wait_spooled(count, timeout=10.0):
    # A bounded wait on a condition: this process's folder holds `count` unacknowledged records.
    deadline, pause = time.monotonic() + timeout, threading.Event()
    while disk.count_unacked(cfg["spool_dir"], os.getpid()) < count and time.monotonic() < deadline:
        pause.wait(0.002)
    return disk.count_unacked(cfg["spool_dir"], os.getpid())

if cfg.get("wait_go"):
    say("waiting")
    sys.stdin.readline()
client = optimizely.Optimizely(datafile(cfg["url"], cfg["key"]), logger=logging.getLogger("child"))
optimizely_odp_ext.install(client, spool_dir=cfg["spool_dir"], **cfg["options"])
say("ready")
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "send":
        send(args[0], int(args[1]), int(args[2]))
        say("sent", count=int(args[2]))
    elif cmd == "send_and_die":  # no pause at all between the last send and the kill
        send(args[0], int(args[1]), int(args[2]))
        os.kill(os.getpid(), signal.SIGKILL)
    elif cmd == "spooled":
        say("spooled", records=wait_spooled(int(args[0])))
    elif cmd == "flush":
        say("flushed", ok=client.flush_odp_events(float(args[0])), stats=client.odp_event_stats())
    elif cmd == "fork":
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the child once it is killed
        pid = os.fork()
        if pid == 0:
            try:
                send(args[0], 0, int(args[1]))
                say("forked", records=wait_spooled(int(args[1])))
                signal.pause()  # until the test kills it
            finally:
                os._exit(0)
        say("fork", child=pid)
    elif cmd == "close":
        client.close()
        say("closed", stats=client.odp_event_stats())
        break
'''


class Child:
    """One child process running CHILD; stopped (SIGKILL) at teardown if still alive."""

    def __init__(self, server: FakeOdpServer, spool_dir: Path, log_path: Path, *, wait_go: bool = False,
                 extra_env: Optional[Dict[str, str]] = None, **options: Any) -> None:
        config = {"url": server.url, "key": TEST_KEY, "spool_dir": str(spool_dir), "wait_go": wait_go,
                  "options": {**CHILD_OPTIONS, **options}}
        self.log_path = log_path
        self._stderr = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(config)], cwd=str(REPO), env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self.pid = self.proc.pid
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"spool-child-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.log_path.read_text()

    def expect(self, event: str, timeout: float = ANSWER_TIMEOUT) -> Dict[str, Any]:
        """The next line this process (or a child it forked) prints for ``event``."""
        try:
            while True:
                line = self._lines.get(timeout=timeout)
                if line is None:
                    raise AssertionError(f"child {self.pid} ended before {event!r}; stderr:\n{self.stderr()}")
                message: Dict[str, Any] = json.loads(line)
                if message["event"] == event:
                    return message
        except queue.Empty:
            raise AssertionError(f"no {event!r} from child {self.pid} within {timeout} s; "
                                 f"stderr:\n{self.stderr()}") from None

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.wait() == -signal.SIGKILL

    def wait(self, timeout: float = ANSWER_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):  # a broken pipe to a process that is gone
                    pipe.close()
        self._reader.join(10)
        self._stderr.close()


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Starts Child processes; kills whatever is left of them (and pids they forked) at teardown."""
    started: List[Child] = []
    extra_pids: List[int] = []

    def start(server: FakeOdpServer, spool_dir: Path, **kwargs: Any) -> Child:
        child = Child(server, spool_dir, tmp_path / f"child-{len(started)}.log", **kwargs)
        started.append(child)
        return child

    start.forked = extra_pids  # type: ignore[attr-defined]
    yield start
    for pid in extra_pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for child in started:
        child.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _quiet(server: FakeOdpServer) -> bool:
    """No connection open to ``server``: every request a dead or closed sender made was answered.

    Healing the server before that could accept a request sent before the crash or the close (at
    least once: the events are in the spool too, so they would arrive twice)."""
    with server._cond:
        return not server._open


def _no_plugin_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("odp-ext-")]


def _spool_lines(handler: RecordingHandler, start: int = 0, level: Optional[int] = None) -> List[str]:
    return [r.getMessage() for r in handler.records[start:]
            if "spool" in r.getMessage() and (level is None or r.levelno == level)]


# ----------------------------------------------------------------- kill -9, then the next start


@pytest.mark.parametrize("queue_capacity", [10_000, 100], ids=["backlog-fits-the-queue", "backlog-10x-the-queue"])
def test_kill_9_during_an_outage_then_the_next_start_delivers_every_event_once(
        odp_server: FakeOdpServer, tmp_path: Path, children: Callable[..., Child], installed: Callable[..., Any],
        queue_capacity: int) -> None:
    spool = tmp_path / "spool"
    sent = ids("id", 1000)
    odp_server.fail_for(OUTAGE)
    child = children(odp_server, spool)
    child.expect("ready")
    child.command("send id 0 1000")
    child.expect("sent")
    child.command("spooled 1000")
    assert child.expect("spooled")["records"] == 1000
    child.kill()
    assert wait_until(lambda: _quiet(odp_server))

    assert odp_server.events == []  # every request of the child got 503
    held = disk.unacked(str(spool))
    assert list(held.values()) == [sent], "one folder, the child's, holding the 1000 events in order"
    assert next(iter(held)).startswith(f"p-{child.pid}-")

    odp_server.fail_for(0)
    client = installed(odp_server, spool_dir=str(spool), queue_capacity=queue_capacity, **DELIVERING)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    outcome = assert_delivered_exactly_once(odp_server, sent)
    assert (len(outcome.delivered), len(outcome.lost), len(outcome.duplicates)) == (1000, 0, 0)
    # The original events, byte for byte what the child encoded.
    first = next(e for e in odp_server.events if e["data"]["idempotence_id"] == "id-7")
    assert (first["action"], first["identifiers"]) == ("spool", {"fs_user_id": "user-id-7"})
    stats = client.odp_event_stats()
    assert (stats["recovered"], stats["delivered"], stats["pending"], no_drops(stats)) == (1000, 1000, 0, {})
    client.close()
    assert disk.tree(str(spool)) == [], "the adopted folder and this process's own are removed"


def test_kill_9_right_after_sending_loses_only_events_not_yet_spooled(
        odp_server: FakeOdpServer, tmp_path: Path, children: Callable[..., Child], installed: Callable[..., Any],
        record_property: Callable[[str, object], None]) -> None:
    """The crash window. Events confirmed on disk are never lost; of the events sent after the last
    completed spool write (500, in a tight loop, then SIGKILL with no pause at all), at most those
    are lost, and only a suffix of them: the spool keeps order. The worker writes what is queued
    as soon as it runs (and at least every SPOOL_INTERVAL, 50 ms); a caller that sends in a tight
    loop holds the GIL, so here (500 sends in ~5 ms) usually all 500 are lost. Measured
    separately: a caller that releases the GIL between sends loses none (spool_fsync off) or
    about 1 ms of events at most (spool_fsync on)."""
    spool = tmp_path / "spool"
    durable, last = ids("durable", 500), ids("last", 500)
    odp_server.fail_for(OUTAGE)
    child = children(odp_server, spool)
    child.expect("ready")
    child.command("send durable 0 500")
    child.command("spooled 500")
    assert child.expect("spooled")["records"] == 500  # the last completed spool write we know of
    child.command("send_and_die last 0 500")
    assert child.wait() == -signal.SIGKILL
    assert wait_until(lambda: _quiet(odp_server))

    on_disk = [i for folder_ids in disk.unacked(str(spool)).values() for i in folder_ids]
    assert on_disk[:500] == durable
    assert on_disk[500:] == last[:len(on_disk) - 500], "spooled in order: a prefix of the last group"

    odp_server.fail_for(0)
    client = installed(odp_server, spool_dir=str(spool), **DELIVERING)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    lost_count = 500 - (len(on_disk) - 500)
    outcome = assert_delivered_exactly_once(odp_server, durable + last, lost=last[500 - lost_count:])
    assert not (outcome.lost & set(durable))
    assert len(outcome.lost) <= len(last)
    assert not outcome.duplicates
    record_property("lost_in_crash_window", len(outcome.lost))
    client.close()
    assert disk.tree(str(spool)) == []


def test_a_backlog_is_spooled_as_it_is_encoded_in_groups_of_at_most_batch_size(
        odp_server: FakeOdpServer, tmp_path: Path, log: Any) -> None:
    """A caller that outpaces the worker leaves a backlog; the worker writes it to the spool a batch
    at a time while it encodes, not all at the end (which left thousands of encoded events in
    memory only, for as long as the caller kept sending). The backlog here is made deterministic by
    sending before the ODP settings are known, then giving them."""
    spool = tmp_path / "spool"
    manager = EventManager(make_options(**{**FAST, "spool_dir": str(spool), "batch_size": 10}), log[0])
    assert manager._spool.disk is not None
    groups: List[int] = []
    append = manager._spool.disk.append

    def recording_append(records: List[Any]) -> int:
        groups.append(len(records))
        return append(records)

    manager._spool.disk.append = recording_append  # type: ignore[method-assign]
    try:
        sent = ids("backlog", 500)
        for event_id in sent:
            assert manager.enqueue(validate(ACTION, {"fs_user_id": "u"}, None, {"idempotence_id": event_id}))
        assert groups == []  # no target yet: nothing can be written (nor sent)
        manager.update_config(odp_server.url, TEST_KEY, True)
        assert manager.flush(FLUSH_TIMEOUT) is True
        assert sum(groups) == 500
        assert max(groups) == 10, groups
        assert_delivered_exactly_once(odp_server, sent)
    finally:
        manager.close()
    assert disk.tree(str(spool)) == []


# ----------------------------------------------------------------- a torn or corrupted last record


def _spool_during_outage(server: FakeOdpServer, installed: Callable[..., Any], spool: Path, sent: List[str]) -> None:
    """A client sends ``sent`` while ODP answers 503, then closes: the events stay in the spool."""
    server.fail_for(OUTAGE)
    client = installed(server, spool_dir=str(spool), close_timeout=0.2)
    send(client, sent)
    assert wait_until(lambda: disk.count_unacked(str(spool)) == len(sent))
    client.close()
    assert client.odp_event_stats()["left_in_spool"] == len(sent)
    assert wait_until(_no_plugin_threads)  # a request abandoned at the close deadline has its answer (503)
    server.fail_for(0)


@pytest.mark.parametrize("damage", ["truncated-mid-record", "flipped-byte"])
def test_a_torn_or_corrupted_last_record_is_skipped_with_one_warning(
        odp_server: FakeOdpServer, tmp_path: Path, installed: Callable[..., Any],
        log: Any, damage: str) -> None:
    spool = tmp_path / "spool"
    sent = ids("rec", 20)
    _spool_during_outage(odp_server, installed, spool, sent)
    [folder] = disk.folders(str(spool))
    [segment] = disk.segments(folder)
    offset, length, last_id = disk.segment_records(segment)[-1]
    assert last_id == sent[-1]
    with open(segment, "r+b") as file:
        if damage == "truncated-mid-record":
            file.truncate(offset + length // 2)
        else:
            file.seek(offset + length - 20)  # inside the event's JSON
            byte = file.read(1)
            file.seek(offset + length - 20)
            file.write(bytes([byte[0] ^ 0x01]))
    assert [r[2] for r in disk.segment_records(segment)] == sent[:-1]

    handler: RecordingHandler = log[1]
    mark = len(handler.records)
    client = installed(odp_server, spool_dir=str(spool), **DELIVERING)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    outcome = assert_delivered_exactly_once(odp_server, sent, lost=[sent[-1]])
    assert (len(outcome.delivered), len(outcome.lost), len(outcome.duplicates)) == (19, 1, 0)
    problem = "torn record" if damage == "truncated-mid-record" else "corrupted record (checksum mismatch)"
    assert _spool_lines(handler, mark, logging.WARNING) == [
        f"ODP spool: skipped record 19 of {segment}, a {problem} at byte {offset} (a crash during a write); "
        "the 19 record(s) before it are delivered."]
    assert [r.getMessage() for r in handler.records[mark:] if r.levelno >= logging.ERROR] == []
    stats = client.odp_event_stats()
    assert (stats["recovered"], stats["delivered"], no_drops(stats)) == (19, 19, {})
    client.close()
    assert disk.tree(str(spool)) == [], "the damaged segment and its folder are removed"


# ----------------------------------------------------------------- a full spool


def test_a_full_spool_drops_new_events_as_queue_full_and_frees_space_once_delivered(
        odp_server: FakeOdpServer, tmp_path: Path, installed: Callable[..., Any], log: Any) -> None:
    spool = tmp_path / "spool"
    cap = 10_000
    sent = [f"full-{i:03d}" for i in range(100)]  # equal sizes: every record takes the same bytes
    odp_server.fail_for(OUTAGE)
    client = installed(odp_server, spool_dir=str(spool), spool_max_bytes=cap, **DELIVERING)
    send(client, sent)
    handler: RecordingHandler = log[1]
    # Settled: every event is either on disk or counted as dropped (and the warning is out).
    assert wait_until(lambda: disk.count_unacked(str(spool)) + client.odp_event_stats()["dropped"]["queue_full"]
                      == len(sent) and bool(_spool_lines(handler, level=logging.WARNING)))
    [folder] = disk.folders(str(spool))
    records = [r for segment in disk.segments(folder) for r in disk.segment_records(segment)]
    kept, record_bytes = len(records), records[0][1]
    assert {r[1] for r in records} == {record_bytes}
    assert kept * record_bytes <= cap < (kept + 1) * record_bytes, "filled up to the cap, not beyond"
    assert [r[2] for r in records] == sent[:kept], "the oldest kept, the newest dropped"
    stats = client.odp_event_stats()
    assert (stats["accepted"], no_drops(stats)) == (100, {"queue_full": 100 - kept})
    [warning] = _spool_lines(handler, level=logging.WARNING)  # one line, however many groups overflowed
    found = re.fullmatch(rf"ODP spool is full \(spool_max_bytes={cap}\); dropped (\d+) new event\(s\) "
                         r"since the last warning\.", warning)
    assert found is not None, warning
    assert 0 < int(found.group(1)) <= 100 - kept, warning

    odp_server.fail_for(0)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    outcome = assert_delivered_exactly_once(odp_server, sent, lost=sent[kept:])
    assert (len(outcome.delivered), len(outcome.lost), len(outcome.duplicates)) == (kept, 100 - kept, 0)

    # Delivered events free their space: three more rounds, each as large as the cap, all delivered.
    more = [f"more-{i:03d}" for i in range(3 * kept)]
    for start in range(0, len(more), kept):
        send(client, more[start:start + kept])
        assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert_delivered_exactly_once(odp_server, sent + more, lost=sent[kept:])
    assert no_drops(client.odp_event_stats()) == {"queue_full": 100 - kept}
    client.close()
    assert disk.tree(str(spool)) == []


# ----------------------------------------------------------------- two processes, one directory


@pytest.mark.slow
def test_two_live_processes_share_a_directory_and_exactly_one_of_two_starts_adopts_the_dead_ones_folder(
        odp_server: FakeOdpServer, tmp_path: Path, children: Callable[..., Child]) -> None:
    spool = tmp_path / "spool"
    a, b = children(odp_server, spool), children(odp_server, spool)
    for child in (a, b):
        child.expect("ready")
    a.command("send a 0 200")
    b.command("send b 0 200")
    for child in (a, b):
        child.command(f"flush {FLUSH_TIMEOUT}")
        assert child.expect("flushed")["ok"] is True
    assert_delivered_exactly_once(odp_server, ids("a", 200) + ids("b", 200))

    odp_server.fail_for(OUTAGE)  # both keep sending during an outage; then A dies
    a.command("send a2 0 100")
    b.command("send b2 0 100")
    for child in (a, b):
        child.command("spooled 100")
        assert child.expect("spooled")["records"] == 100
    a.kill()
    held = disk.unacked(str(spool))
    assert sorted(held) == sorted(os.path.basename(f) for f in disk.folders(str(spool)))
    assert {name.split("-")[1]: ids_ for name, ids_ in held.items()} == {
        str(a.pid): ids("a2", 100), str(b.pid): ids("b2", 100)}, "each process wrote only its own folder"

    # Two processes start at the same moment: exactly one adopts A's folder, neither touches B's.
    c = children(odp_server, spool, wait_go=True)
    d = children(odp_server, spool, wait_go=True)
    for child in (c, d):
        child.expect("waiting")
    for child in (c, d):
        child.command("go")
    for child in (c, d):
        child.expect("ready")
    odp_server.fail_for(0)
    recovered = []
    for child in (b, c, d):
        child.command(f"flush {FLUSH_TIMEOUT}")
        answer = child.expect("flushed")
        assert answer["ok"] is True
        recovered.append(answer["stats"]["recovered"])
    assert recovered[0] == 0, "B delivered its own events and adopted nothing"
    assert sorted(recovered[1:]) == [0, 100], "exactly one of C and D adopted A's folder"

    sent = ids("a", 200) + ids("b", 200) + ids("a2", 100) + ids("b2", 100)
    outcome = assert_delivered_exactly_once(odp_server, sent)
    assert (len(outcome.delivered), len(outcome.lost), len(outcome.duplicates)) == (600, 0, 0)
    for child in (b, c, d):
        child.command("close")
        assert no_drops(child.expect("closed")["stats"]) == {}
        assert child.wait() == 0
    assert disk.tree(str(spool)) == []


# ----------------------------------------------------------------- a spool that cannot be used


def _unusable(tmp_path: Path, kind: str) -> Path:
    if kind == "read-only-directory":
        locked = tmp_path / "locked"
        locked.mkdir(0o500)
        return locked
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    return blocker / "spool" if kind == "under-a-regular-file" else blocker


@pytest.mark.parametrize("kind", [
    "under-a-regular-file",
    "is-a-regular-file",
    pytest.param("read-only-directory", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root writes through permission bits; the regular-file cases fail as root")),
])
def test_an_unusable_spool_dir_logs_one_error_at_install_and_falls_back_to_memory(
        odp_server: FakeOdpServer, tmp_path: Path, installed: Callable[..., Any], log: Any, kind: str) -> None:
    path = _unusable(tmp_path, kind)
    before = disk.tree(str(tmp_path))
    handler: RecordingHandler = log[1]
    client = installed(odp_server, spool_dir=str(path), **DELIVERING)
    reason = {"under-a-regular-file": "NotADirectoryError: Not a directory",
              "is-a-regular-file": "FileExistsError: File exists",
              "read-only-directory": "PermissionError: Permission denied"}[kind]
    assert _spool_lines(handler, level=logging.ERROR) == [
        f'ODP spool directory "{path}" cannot be used ({reason}).']
    assert _spool_lines(handler, level=logging.WARNING) == []
    assert [r.getMessage() for r in handler.records if r.levelno == logging.WARNING] == [
        "ODP events are kept in memory only: a crash can lose queued events."]

    sent = ids("mem", 50)
    send(client, sent)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert_delivered_exactly_once(odp_server, sent)
    client.close()
    assert [r.getMessage() for r in handler.records if r.levelno >= logging.ERROR] == [
        f'ODP spool directory "{path}" cannot be used ({reason}).'], "one error line in all"
    assert disk.tree(str(tmp_path)) == before


# ----------------------------------------------------------------- close() during an outage


def test_close_during_an_outage_leaves_the_events_in_the_spool_for_the_next_start(
        odp_server: FakeOdpServer, tmp_path: Path, installed: Callable[..., Any], log: Any) -> None:
    spool = tmp_path / "spool"
    sent = ids("left", 40)
    odp_server.fail_for(OUTAGE)
    client = installed(odp_server, spool_dir=str(spool), close_timeout=0.2)
    send(client, sent)
    client.close()  # right away: some may still be in the queue; the close writes them too
    stats = client.odp_event_stats()
    assert (stats["left_in_spool"], stats["delivered"], stats["pending"], no_drops(stats)) == (40, 0, 0, {})
    handler: RecordingHandler = log[1]
    assert [line for line in handler.lines() if line.startswith("ODP event manager closed")] == [
        "ODP event manager closed: 0 delivered, 0 dropped, 40 left in the spool for the next start."]
    assert [i for folder_ids in disk.unacked(str(spool)).values() for i in folder_ids] == sent

    assert wait_until(_no_plugin_threads)  # a request abandoned at the close deadline has its answer (503)
    odp_server.fail_for(0)
    again = installed(odp_server, spool_dir=str(spool), **DELIVERING)
    assert again.flush_odp_events(FLUSH_TIMEOUT) is True
    outcome = assert_delivered_exactly_once(odp_server, sent)
    assert (len(outcome.delivered), len(outcome.lost), len(outcome.duplicates)) == (40, 0, 0)
    assert again.odp_event_stats()["recovered"] == 40
    again.close()
    assert disk.tree(str(spool)) == []


# ----------------------------------------------------------------- without spool_dir: no disk at all


AUDIT = r'''
import os, sys
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.link", "os.symlink",
           "os.chmod", "os.chown", "os.utime", "shutil.copyfile", "shutil.rmtree", "tempfile.mkstemp",
           "tempfile.mkdtemp"}
touched = []
def hook(event, args):
    if event == "open" and isinstance(args[2], int) and args[2] & WRITES and args[0] != "/dev/null":
        touched.append(f"open {args[0]}")
    elif event in CHANGES:
        touched.append(f"{event} {args[0]}")
sys.addaudithook(hook)
import json, logging
from optimizely import optimizely
import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
url, key, spool_dir = sys.argv[1], sys.argv[2], sys.argv[3] or None
client = optimizely.Optimizely(datafile(url, key), logger=logging.getLogger("child"))
optimizely_odp_ext.install(client, spool_dir=spool_dir, flush_interval=0.05)
for i in range(200):
    client.send_odp_event("disk", {"fs_user_id": "u"}, data={"idempotence_id": f"disk-{i}"})
ok = client.flush_odp_events(15)
client.close()
print(json.dumps({"ok": ok, "touched": sorted(set(touched))}), flush=True)
'''


@pytest.mark.parametrize("with_spool", [False, True], ids=["no-spool_dir", "spool_dir-control"])
def test_without_spool_dir_nothing_touches_the_disk(odp_server: FakeOdpServer, tmp_path: Path,
                                                    with_spool: bool) -> None:
    """Every file opened for writing and every directory change in a child process, seen by an
    audit hook set before the plugin is imported. The control case shows the hook does see the
    spool's writes."""
    spool = tmp_path / "spool"
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(home),
           "TMPDIR": str(home)}
    result = subprocess.run(
        [sys.executable, "-c", AUDIT, odp_server.url, TEST_KEY, str(spool) if with_spool else ""],
        cwd=str(home), env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["ok"] is True
    assert_delivered_exactly_once(odp_server, ids("disk", 200))
    if with_spool:
        assert answer["touched"], "the audit hook sees the spool's writes"
        assert all(str(spool) in entry for entry in answer["touched"]), answer["touched"]
        assert disk.tree(str(spool)) == []
    else:
        assert answer["touched"] == []
        assert not spool.exists()
    assert disk.tree(str(home)) == []


# ----------------------------------------------------------------- fork


def test_a_forked_child_spools_to_its_own_folder_and_the_live_parents_is_not_adopted(
        odp_server: FakeOdpServer, tmp_path: Path, children: Callable[..., Child],
        installed: Callable[..., Any]) -> None:
    spool = tmp_path / "spool"
    odp_server.fail_for(OUTAGE)
    parent = children(odp_server, spool)
    parent.expect("ready")
    parent.command("send parent 0 30")
    parent.command("spooled 30")
    assert parent.expect("spooled")["records"] == 30
    parent.command("fork child 20")
    child_pid = parent.expect("fork")["child"]
    children.forked.append(child_pid)  # type: ignore[attr-defined]
    assert parent.expect("forked")["records"] == 20
    assert {name.split("-")[1]: held for name, held in disk.unacked(str(spool)).items()} == {
        str(parent.pid): ids("parent", 30), str(child_pid): ids("child", 20)}

    os.kill(child_pid, signal.SIGKILL)
    assert wait_until(lambda: not _alive(child_pid), timeout=10)
    # A new start while the parent lives: it adopts the dead child's folder, not the parent's.
    odp_server.fail_for(0)
    adopter = installed(odp_server, spool_dir=str(spool), **DELIVERING)
    assert adopter.flush_odp_events(FLUSH_TIMEOUT) is True
    assert adopter.odp_event_stats()["recovered"] == 20
    parent.command(f"flush {FLUSH_TIMEOUT}")
    answer = parent.expect("flushed")
    assert answer["ok"] is True
    assert answer["stats"]["recovered"] == 0, "the parent adopted nothing"
    outcome = assert_delivered_exactly_once(odp_server, ids("parent", 30) + ids("child", 20))
    assert (len(outcome.delivered), len(outcome.lost), len(outcome.duplicates)) == (50, 0, 0)
    parent.command("close")
    parent.expect("closed")
    assert parent.wait() == 0
    adopter.close()
    assert disk.tree(str(spool)) == []

