"""The benchmark's shared parts: the targets' configuration, one worker subprocess and its protocol,
the server's records, and the per-target runner every scenario uses (``Runner.repeat``).

A scenario is a worker config (``Runner.cfg``) plus, in ``bench_worker.py``, a function that runs it;
``run.py`` lists the scenarios and writes their tables (with ``bench_tables.py``).
"""

from __future__ import annotations

import gzip
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from optimizely_odp_ext.testing import FakeOdpServer  # noqa: E402

WORKER = os.path.join(HERE, "bench_worker.py")
API_KEY = "bench-odp-key"
TARGETS = ("sdk", "ours")
# The paced scenario's third row: a plain function doing the same argument checks and a deque.append.
PACED_TARGETS = ("floor", "sdk", "ours")
# The paced scenario's fourth run per round: ours and the floor alternating in one process (bench_worker).
PACED_PAIRED = "paired"
SDK_QUIET_SECONDS = 2.5  # the SDK is done when no request came for this long (its flush interval is 1 s)


# Target "ours" in the caller-cost and throughput scenarios: install()'s defaults except a queue sized for
# the 20,000-event burst. The default queue_capacity (10,000) is fixed on purpose by issue 3 (it bounds memory
# during an outage at ~7 MB per client); a burst larger than the queue is dropped as queue_full by design,
# counted, with a warning. The memory/outage scenario and the "defaults" section use no options at all.
OURS_OPTIONS: Dict[str, Any] = {"queue_capacity": 25_000}
DEFAULT_CAPACITY = 10_000  # Options().queue_capacity (issue 3), for the report's wording


def install_call(options: Dict[str, Any]) -> str:
    """``optimizely_odp_ext.install(client, queue_capacity=25_000)`` for these keyword options."""
    keywords = "".join(f", {k}={v:_}" if type(v) is int else f", {k}={v!r}" for k, v in options.items())
    return f"optimizely_odp_ext.install(client{keywords})"


OURS_CALL = install_call(OURS_OPTIONS)
DEFAULTS_CALL = install_call({})
# For information: the target's options plus more requests in flight (the default max_in_flight is read from
# the package at run time and written into the results file).
MORE_IN_FLIGHT: Dict[str, Any] = {**OURS_OPTIONS, "max_in_flight": 8}

# The spool section (issue 4): OURS_OPTIONS plus these; "spool_dir" is replaced by a fresh temporary directory
# for every run (removed afterwards). Keys of the results: spool_caller1, spool_tput0, spool_tput50.
SPOOL_VARIANTS: Tuple[Tuple[str, str, Dict[str, Any]], ...] = (
    ("memory", "memory only", {}),
    ("spool", "+ spool_dir", {"spool_dir": "<temp dir>"}),
    ("spool_fsync", "+ spool_dir, spool_fsync=True", {"spool_dir": "<temp dir>", "spool_fsync": True}),
)
SPOOL_KEYS = ("spool_caller1", "spool_tput0", "spool_tput50")
SPOOL_SAMPLE_SECONDS = 0.01  # how often this process measures the spool directory's size


# ----------------------------------------------------------------------------- settings


class Settings:
    def __init__(self, quick: bool, repeats: Optional[int], spool_repeats: Optional[int] = None,
                 paced_repeats: Optional[int] = None) -> None:
        self.quick = quick
        self.caller_calls = 4_000 if quick else 20_000
        self.caller_warmup = 500 if quick else 1_000
        self.events = 5_000 if quick else 20_000
        self.memory_events = 10_000  # the default queue_capacity of ours; the SDK keeps at most 1,000
        self.memory_warmup = 200
        self.repeats = repeats if repeats is not None else (1 if quick else 3)
        self.spool_repeats = spool_repeats if spool_repeats is not None else self.repeats
        # A paced run's p50 moves up to 2x from one process to the next (layout, CPU placement: its calls
        # meet cold caches), for the floor as much as for ours; the runs are short, so more of them.
        self.paced_repeats = paced_repeats if paced_repeats is not None else (
            self.repeats if quick else max(self.repeats, 7))
        self.paced_calls = 1_000 if quick else 2_000
        self.paced_seconds = 3.0 if quick else 6.0
        self.paced_warmup = 200
        self.latency = 0.05
        self.deliver_deadline = 60.0 if quick else 120.0


# ----------------------------------------------------------------------------- one subprocess


class WorkerError(RuntimeError):
    pass


class Worker:
    """A bench_worker.py subprocess and its line protocol (every wait bounded)."""

    def __init__(self, cfg: Dict[str, Any]) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=ROOT,
        )
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="bench-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, phase: str, timeout: float) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"no '{phase}' from the worker within {timeout:.0f} s")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise WorkerError(f"worker exited before '{phase}' (rc={self.proc.poll()}): {self.stderr_tail()}")
            if not line.startswith("@@"):
                continue
            message: Dict[str, Any] = json.loads(line[2:])
            if message.get("phase") == phase:
                return message

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read()[-2000:].strip()
        except (OSError, ValueError):
            return ""

    def finish(self, timeout: float = 30.0) -> None:
        """Waits for the worker to exit; kills it (this process's own child, by handle) if it does not."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        self._stderr.close()


# ----------------------------------------------------------------------------- server records


def wait_for_delivery(server: FakeOdpServer, expected: int, deadline: float, quiet: float) -> str:
    """Until all ``expected`` events are recorded, or no request came for ``quiet`` s, or the deadline."""
    seen = 0
    end = time.monotonic() + deadline
    while True:
        if server.wait_for_events(expected, 0):
            return "all"
        remaining = end - time.monotonic()
        if remaining <= 0:
            return "deadline"
        if not server.wait_for_requests(seen + 1, min(quiet, remaining)):
            return "quiet" if remaining > quiet else "deadline"
        seen += 1


def server_view(server: FakeOdpServer, tag: str, sent: int, latency: float) -> Dict[str, Any]:
    """Exact delivery counts from the server's records for the ids ``{tag}-00000000`` .. ``sent - 1``."""
    expected = {f"{tag}-{i:08d}" for i in range(sent)}
    ids = [event.get("data", {}).get("idempotence_id") for event in server.events]
    unique = set(ids)
    requests = server.requests
    accepted = [r for r in requests if r.status == 202]
    statuses: Dict[str, int] = {}
    for r in requests:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {
        "delivered": len(unique & expected),
        "lost": len(expected - unique),
        "duplicated": len(ids) - len(unique),
        "foreign": len(unique - expected),
        "requests": len(requests),
        "statuses": statuses,
        "connections": server.connection_count,
        "agents": sorted({str(r.headers.get("user-agent")) for r in requests}),
        "t_last_event": (max(r.received_at for r in accepted) + latency) if accepted else None,
    }


def delivery_latency(server: FakeOdpServer, tag: str, send_at: List[float], first: int) -> Dict[str, float]:
    """Seconds from each timed call (``time.monotonic()`` in the worker: one clock per machine) to the
    server having read the request that carried its event: p50, p99, max over the events delivered."""
    arrived: Dict[str, float] = {}
    for request in server.requests:
        if request.status != 202:
            continue
        body = request.body
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        for event in json.loads(body):
            arrived.setdefault(str(event.get("data", {}).get("idempotence_id")), request.received_at)
    waits = sorted(arrived[f"{tag}-{first + i:08d}"] - at for i, at in enumerate(send_at)
                   if f"{tag}-{first + i:08d}" in arrived)
    if not waits:
        return {}
    return {"p50_s": waits[len(waits) // 2], "p99_s": waits[min(len(waits) - 1, int(len(waits) * 0.99))],
            "max_s": waits[-1], "count": len(waits)}


def run_one(server: FakeOdpServer, cfg: Dict[str, Any], latency: float, settings: Settings) -> Dict[str, Any]:
    """One scenario for one target in a fresh subprocess; returns the worker's and the server's figures."""
    server.reset()
    server.set_latency(latency)
    worker = Worker(cfg)
    try:
        if cfg["scenario"] == "memory":
            ready = worker.expect("ready", 90)
            server.fail_for(3600)  # an outage: every request gets 503 until cleared below
            worker.command("go")
            sent = worker.expect("sent", 90)
            sent["warm_drained"] = ready.get("warm_drained")
            server.fail_for(0)  # ODP answers again: the worker drains what it held, then closes
            worker.command("drain")
            final = worker.expect("final", settings.deliver_deadline + 60)
            delivery = "drained" if final.get("drained") else "not drained"
        else:
            sent = worker.expect("sent", settings.deliver_deadline + 60)
            delivery = wait_for_delivery(server, sent["sent"], settings.deliver_deadline, SDK_QUIET_SECONDS)
            worker.command("close")
            final = worker.expect("final", 60)
        view = server_view(server, cfg["tag"], sent["sent"], latency)
        send_at = sent.pop("send_at", None)
        if send_at:
            view["delivery_latency"] = delivery_latency(server, cfg["tag"], send_at, sent.get("warmup", 0))
        return {"ok": True, "sent": sent, "final": final, "server": view, "delivery": delivery}
    except WorkerError as exc:
        return {"ok": False, "error": str(exc)}
    finally:
        worker.finish()
        server.reset()


# ----------------------------------------------------------------------------- the per-target runner


class Runner:
    """Runs worker configs against the one server, target by target, and logs a line per run."""

    def __init__(self, server: FakeOdpServer, settings: Settings) -> None:
        self.server = server
        self.settings = settings
        self.counter = 0
        self.log: List[str] = []

    def cfg(self, target: str, scenario: str, options: Optional[Dict[str, Any]] = None,
            **extra: Any) -> Dict[str, Any]:
        """One worker's config; ``options`` (install()'s keywords, ours only) default to OURS_OPTIONS."""
        self.counter += 1
        if target not in ("ours", PACED_PAIRED):
            options = {}
        elif options is None:
            options = dict(OURS_OPTIONS)
        return {"target": target, "scenario": scenario, "url": self.server.url, "key": API_KEY,
                "tag": f"r{self.counter:03d}{target}", "options": options, **extra}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.append(text)

    def repeat(self, label: str, make_cfg: Callable[[str], Dict[str, Any]], latency: float,
               targets: Sequence[str] = TARGETS, repeats: Optional[int] = None) -> Dict[str, List[Dict[str, Any]]]:
        runs: Dict[str, List[Dict[str, Any]]] = {t: [] for t in targets}
        count = self.settings.repeats if repeats is None else repeats
        for index in range(count):
            for target in targets:
                started = time.monotonic()
                result = run_one(self.server, make_cfg(target), latency, self.settings)
                runs[target].append(result)
                self.say(f"  {label} [{target}] run {index + 1}/{count}: "
                         f"{summary(result)} ({time.monotonic() - started:.1f} s)")
        return runs


def dir_usage(directory: str) -> Tuple[int, int]:
    """(bytes, files) under ``directory`` now; files removed while it is walked are skipped."""
    size = files = 0
    for folder, _dirs, names in os.walk(directory):
        for name in names:
            try:
                size += os.stat(os.path.join(folder, name)).st_size
                files += 1
            except OSError:
                continue
    return size, files


def filesystem_of(path: str) -> str:
    """``ext4 on /dev/vda (/)``: the mount holding ``path`` (fsync costs differ a lot between filesystems)."""
    path = os.path.realpath(path)
    best = ("", "unknown", "unknown")
    try:
        with open("/proc/mounts") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1]
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) > len(best[0]):
                    best = (point, fields[2], fields[0])
    except OSError:
        pass
    return f"{best[1]} on {best[2]} ({best[0] or '?'})"


class DirSampler:
    """Measures a directory's size every SPOOL_SAMPLE_SECONDS in a thread of this (the parent) process,
    so the worker under test pays nothing for it; keeps the peak."""

    def __init__(self, directory: str, limit_seconds: float = 900.0) -> None:
        self.directory = directory
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._limit = limit_seconds
        self._thread = threading.Thread(target=self._run, name="bench-spool-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        end = time.monotonic() + self._limit  # bounded even if stop() is never called
        while not self._stop.wait(SPOOL_SAMPLE_SECONDS) and time.monotonic() < end:
            self.peak = max(self.peak, dir_usage(self.directory)[0])
            self.samples += 1

    def stop(self) -> Tuple[int, int]:
        self._stop.set()
        self._thread.join(10)
        return self.peak, self.samples


def events_per_second(result: Dict[str, Any]) -> Optional[float]:
    if not result.get("ok") or "t_first" not in result["sent"]:
        return None
    t_last = result["server"]["t_last_event"]
    if t_last is None:
        return 0.0
    span = t_last - result["sent"]["t_first"]
    return result["server"]["delivered"] / span if span > 0 else None


def summary(result: Dict[str, Any]) -> str:
    if not result.get("ok"):
        return f"ERROR {result.get('error')}"
    sent, view = result["sent"], result["server"]
    parts = [f"sent {sent['sent']}", f"delivered {view['delivered']}", f"lost {view['lost']}",
             f"dup {view['duplicated']}", f"requests {view['requests']}", f"connections {view['connections']}"]
    if "p50_us" in sent:
        parts.append(f"p50 {sent['p50_us']:.1f} us p99 {sent['p99_us']:.1f} us max {sent['max_us']:.0f} us")
    waited = view.get("delivery_latency")
    if waited:
        parts.append(f"delivery p50 {waited['p50_s'] * 1000:.0f} ms p99 {waited['p99_s'] * 1000:.0f} ms "
                     f"max {waited['max_s'] * 1000:.0f} ms")
    if "held" in sent:
        parts.append(f"held {sent['held']} rss +{sent['hwm_kib'] - sent['rss0_kib']} KiB")
    rate = events_per_second(result)
    if rate is not None:
        parts.append(f"{rate:,.0f} ev/s")
    dropped = (result.get("final") or {}).get("stats_before_close", {}).get("dropped") or {}
    if any(dropped.values()):
        parts.append("ours dropped " + " ".join(f"{k}={v}" for k, v in dropped.items() if v))
    if "cpu_after_send_and_flush" in sent:
        parts.append(f"cpu {sent['cpu_after_send_and_flush']:.2f} s")
    if sent.get("thread_cpu"):
        groups: Dict[str, float] = {}
        for name, seconds in sent["thread_cpu"].items():
            group = ("senders" if name.startswith("odp-ext-sender") else
                     "worker" if name in ("odp-ext-worker", "OdpThread") else
                     "main" if name == "main" else "other")
            groups[group] = groups.get(group, 0.0) + seconds
        parts.append("thread cpu since start " + " ".join(f"{k} {v:.2f}" for k, v in sorted(groups.items())))
    io = sent.get("io") or {}
    if "wchar" in io and sent.get("sent"):
        parts.append(f"written {io['wchar'] / sent['sent']:.0f} B/event in {io.get('syscw', 0)} write calls")
    disk = result.get("spool_disk")
    if disk:
        parts.append(f"spool peak {disk['peak_bytes'] / 1024:.0f} KiB, left after close {disk['left_bytes']} B "
                     f"in {disk['left_files']} file(s)")
    return ", ".join(parts)
