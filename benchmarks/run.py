"""Side-by-side benchmark: the SDK's own ``send_odp_event`` against ``optimizely_odp_ext`` (issue 5).

Run from the repository root::

    make bench                                  # = .venv/bin/python benchmarks/run.py
    .venv/bin/python benchmarks/run.py --quick  # a smaller run (about a minute)

One ``FakeOdpServer`` on 127.0.0.1 runs in this process for the whole run. Every scenario of every
target runs in a fresh subprocess (``bench_worker.py``) so RSS, CPU and threads are its own:

* target ``sdk``  — a plain ``optimizely.Optimizely`` client whose datafile integrates ODP at the fake
  server: the SDK's own ODP event manager (batch size 10, flush interval 1 s, queue of 1,000);
* target ``ours`` — another plain client with ``optimizely_odp_ext.install(client, queue_capacity=25_000)``
  in the caller-cost and throughput scenarios: the defaults except a queue sized for the 20,000-event
  burst (issue 3 fixes the default capacity at 10,000; a larger burst is dropped as queue_full by design,
  counted, with a warning). The memory/outage scenario uses ``install(client)`` with all defaults, and one
  informational section shows ours with all defaults under the same burst.

Section "Spool: cost on the caller and on throughput" (issue 4), in the same invocation: ours as above
(memory only) against the same options plus ``spool_dir`` (a fresh temporary directory per run, removed
afterwards) and plus ``spool_dir`` with ``spool_fsync=True``, interleaved run by run, each in a fresh
subprocess: caller cost from 1 thread, throughput with no added latency and with 50 ms, and the bytes the
process wrote (``/proc/self/io``) and the spool directory's peak size (sampled by this process).

Every event carries a unique ``idempotence_id``, so delivered / lost / duplicated are counted
exactly from the server's records. Results go to ``benchmarks/RESULTS.md`` (regenerated every run)
and to stdout. Not part of the test suite. Only the standard library and the package's venv are used.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import shutil
import statistics
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
    def __init__(self, quick: bool, repeats: Optional[int], spool_repeats: Optional[int] = None) -> None:
        self.quick = quick
        self.caller_calls = 4_000 if quick else 20_000
        self.caller_warmup = 500 if quick else 1_000
        self.events = 5_000 if quick else 20_000
        self.memory_events = 10_000  # the default queue_capacity of ours; the SDK keeps at most 1,000
        self.memory_warmup = 200
        self.repeats = repeats if repeats is not None else (1 if quick else 3)
        self.spool_repeats = spool_repeats if spool_repeats is not None else self.repeats
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
        "t_last_event": (max(r.received_at for r in accepted) + latency) if accepted else None,
    }


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
        return {"ok": True, "sent": sent, "final": final, "server": view, "delivery": delivery}
    except WorkerError as exc:
        return {"ok": False, "error": str(exc)}
    finally:
        worker.finish()
        server.reset()


# ----------------------------------------------------------------------------- the scenarios


class Bench:
    def __init__(self, server: FakeOdpServer, settings: Settings) -> None:
        self.server = server
        self.settings = settings
        self.counter = 0
        self.log: List[str] = []

    def cfg(self, target: str, scenario: str, options: Optional[Dict[str, Any]] = None,
            **extra: Any) -> Dict[str, Any]:
        """One worker's config; ``options`` (install()'s keywords, ours only) default to OURS_OPTIONS."""
        self.counter += 1
        if target != "ours":
            options = {}
        elif options is None:
            options = dict(OURS_OPTIONS)
        return {"target": target, "scenario": scenario, "url": self.server.url, "key": API_KEY,
                "tag": f"r{self.counter:03d}{target}", "options": options, **extra}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.append(text)

    def repeat(self, label: str, make_cfg: Callable[[str], Dict[str, Any]], latency: float,
               targets: Sequence[str] = TARGETS) -> Dict[str, List[Dict[str, Any]]]:
        runs: Dict[str, List[Dict[str, Any]]] = {t: [] for t in targets}
        for index in range(self.settings.repeats):
            for target in targets:
                started = time.monotonic()
                result = run_one(self.server, make_cfg(target), latency, self.settings)
                runs[target].append(result)
                self.say(f"  {label} [{target}] run {index + 1}/{self.settings.repeats}: "
                         f"{summary(result)} ({time.monotonic() - started:.1f} s)")
        return runs

    def caller(self, threads: int) -> Dict[str, List[Dict[str, Any]]]:
        s = self.settings
        return self.repeat(f"caller cost, {threads} thread(s)",
                           lambda t: self.cfg(t, "caller", threads=threads, calls=s.caller_calls,
                                              warmup=s.caller_warmup, deadline=s.deliver_deadline), 0.0)

    def throughput(self, latency: float, options: Optional[Dict[str, Any]] = None,
                   targets: Sequence[str] = TARGETS) -> Dict[str, List[Dict[str, Any]]]:
        s = self.settings
        shown = "" if options is None else f" options={options}"
        return self.repeat(f"throughput, {latency * 1000:.0f} ms{shown}",
                           lambda t: self.cfg(t, "throughput", options, events=s.events,
                                              deadline=s.deliver_deadline), latency, targets)

    def ceiling(self, latency: float, connections: int) -> Dict[str, List[Dict[str, Any]]]:
        s = self.settings
        started = time.monotonic()
        result = run_one(self.server, self.cfg("bare", "ceiling", events=s.events, connections=connections,
                                                deadline=s.deliver_deadline), latency, s)
        self.say(f"  ceiling, {latency * 1000:.0f} ms, {connections} connections [bare requests]: {summary(result)} "
                 f"({time.monotonic() - started:.1f} s)")
        return {"bare": [result]}

    def memory(self) -> Dict[str, List[Dict[str, Any]]]:
        s = self.settings
        runs: Dict[str, List[Dict[str, Any]]] = {}
        for target in TARGETS:
            started = time.monotonic()
            result = run_one(self.server, self.cfg(target, "memory", {}, events=s.memory_events,
                                                   warmup=s.memory_warmup, settle=1.0,
                                                   deadline=s.deliver_deadline), 0.0, s)
            runs[target] = [result]
            self.say(f"  memory during an outage [{target}]: {summary(result)} ({time.monotonic() - started:.1f} s)")
        return runs


    def spool(self) -> Dict[str, Dict[str, List[Dict[str, Any]]]]:
        """The spool section: each scenario, each variant in turn, ``spool_repeats`` times (interleaved)."""
        s = self.settings
        runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {k: {v: [] for v, _, _ in SPOOL_VARIANTS}
                                                             for k in SPOOL_KEYS}
        for index in range(s.spool_repeats):
            for key in SPOOL_KEYS:
                for variant, label, extra in SPOOL_VARIANTS:
                    started = time.monotonic()
                    result = self.spool_one(key, extra)
                    runs[key][variant].append(result)
                    name = {"spool_caller1": "caller cost, 1 thread", "spool_tput0": "throughput, 0 ms",
                            "spool_tput50": f"throughput, {s.latency * 1000:.0f} ms"}[key]
                    self.say(f"  spool: {name} [ours {label}] run {index + 1}/{s.spool_repeats}: "
                             f"{summary(result)} ({time.monotonic() - started:.1f} s)")
        return runs

    def spool_one(self, key: str, extra: Dict[str, Any]) -> Dict[str, Any]:
        s = self.settings
        options = {**OURS_OPTIONS, **extra}
        directory: Optional[str] = None
        if "spool_dir" in extra:
            directory = tempfile.mkdtemp(prefix="odp-bench-spool-")
            options["spool_dir"] = directory
        if key == "spool_caller1":
            cfg = self.cfg("ours", "caller", options, threads=1, calls=s.caller_calls, warmup=s.caller_warmup,
                           deadline=s.deliver_deadline)
            latency = 0.0
        else:
            cfg = self.cfg("ours", "throughput", options, events=s.events, deadline=s.deliver_deadline)
            latency = s.latency if key == "spool_tput50" else 0.0
        sampler = DirSampler(directory) if directory is not None else None
        disk: Optional[Dict[str, Any]] = None
        try:
            result = run_one(self.server, cfg, latency, s)
        finally:
            if sampler is not None and directory is not None:
                peak, samples = sampler.stop()
                left_bytes, left_files = dir_usage(directory)  # the worker has exited: what close() left
                disk = {"peak_bytes": peak, "samples": samples, "left_bytes": left_bytes, "left_files": left_files,
                        "filesystem": filesystem_of(directory)}
                shutil.rmtree(directory, ignore_errors=True)
        if disk is not None:
            result["spool_disk"] = disk
        return result


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


def summary(result: Dict[str, Any]) -> str:
    if not result.get("ok"):
        return f"ERROR {result.get('error')}"
    sent, view = result["sent"], result["server"]
    parts = [f"sent {sent['sent']}", f"delivered {view['delivered']}", f"lost {view['lost']}",
             f"dup {view['duplicated']}", f"requests {view['requests']}", f"connections {view['connections']}"]
    if "p50_us" in sent:
        parts.append(f"p50 {sent['p50_us']:.1f} us p99 {sent['p99_us']:.1f} us max {sent['max_us']:.0f} us")
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


# ----------------------------------------------------------------------------- derived figures


def events_per_second(result: Dict[str, Any]) -> Optional[float]:
    if not result.get("ok") or "t_first" not in result["sent"]:
        return None
    t_last = result["server"]["t_last_event"]
    if t_last is None:
        return 0.0
    span = t_last - result["sent"]["t_first"]
    return result["server"]["delivered"] / span if span > 0 else None


def span_seconds(result: Dict[str, Any]) -> Optional[float]:
    t_last = result["server"]["t_last_event"] if result.get("ok") else None
    return None if t_last is None else t_last - result["sent"]["t_first"]


def median(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ok_runs(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in runs if r.get("ok")]


def med(runs: List[Dict[str, Any]], getter: Callable[[Dict[str, Any]], Optional[float]]) -> Optional[float]:
    return median([getter(r) for r in ok_runs(runs)])


def total(runs: List[Dict[str, Any]], getter: Callable[[Dict[str, Any]], int]) -> Optional[int]:
    good = ok_runs(runs)
    return sum(getter(r) for r in good) if good else None


def server_total(runs: List[Dict[str, Any]], key: str) -> Optional[int]:
    """A count summed over the good runs: ``sent`` from the worker, anything else from the server."""
    good = ok_runs(runs)
    if not good:
        return None
    return sum(int(r["sent"]["sent"] if key == "sent" else r["server"][key]) for r in good)


def lossless(runs: List[Dict[str, Any]]) -> bool:
    good = ok_runs(runs)
    return bool(good) and len(good) == len(runs) and all(
        r["server"]["lost"] == 0 and r["server"]["duplicated"] == 0 for r in good)


def send_seconds(result: Dict[str, Any]) -> Optional[float]:
    value = result["sent"].get("send_seconds")
    return None if value is None else float(value)


def per_1000(runs: List[Dict[str, Any]], key: str) -> Optional[float]:
    def one(r: Dict[str, Any]) -> Optional[float]:
        delivered = r["server"]["delivered"]
        return r["server"][key] * 1000 / delivered if delivered else None
    return med(runs, one)


def cpu_per_10k(runs: List[Dict[str, Any]], per: str = "delivered") -> Optional[float]:
    """Process CPU per 10,000 events ``delivered`` (server) or ``sent`` (calls made)."""
    def one(r: Dict[str, Any]) -> Optional[float]:
        cpu = r["final"].get("cpu_seconds")
        count = r["server"]["delivered"] if per == "delivered" else r["sent"]["sent"]
        return cpu * 10_000 / count if cpu is not None and count else None
    return med(runs, one)


def background_cpu_per_10k(runs: List[Dict[str, Any]]) -> Optional[float]:
    """CPU of the target's own threads (everything but the caller's) per 10,000 delivered events."""
    def one(r: Dict[str, Any]) -> Optional[float]:
        threads = r["final"].get("thread_cpu_before_close") or {}
        cpu = sum(seconds for name, seconds in threads.items() if name != "main")
        delivered = r["server"]["delivered"]
        return cpu * 10_000 / delivered if threads and delivered else None
    return med(runs, one)


def effective_options(results: Dict[str, Dict[str, List[Dict[str, Any]]]], key: str) -> Dict[str, Any]:
    """The options ours ran with in scenario ``key``, as the worker read them back (empty when unknown)."""
    for r in ok_runs(results.get(key, {}).get("ours", [])):
        found = r["sent"].get("effective_options")
        if found:
            return dict(found)
    return {}


def describe_options(options: Dict[str, Any]) -> str:
    """``queue_capacity 25,000, max_in_flight 4, ...`` for the options that matter to these scenarios."""
    parts = []
    for name in ("queue_capacity", "max_in_flight", "batch_size", "flush_interval", "overflow", "gzip"):
        if name in options:
            value = options[name]
            parts.append(f"{name} {fmt(value) if type(value) is int else value}")
    return ", ".join(parts)


def dropped_queue_full(runs: List[Dict[str, Any]]) -> Optional[int]:
    """Ours' own count of events dropped as queue_full (odp_event_stats() before close), over the runs."""
    return total(runs, lambda r: int(((r.get("final") or {}).get("stats_before_close", {}).get("dropped") or {})
                                     .get("queue_full", 0)))


def fmt(value: Optional[float], digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def ratio(ours: Optional[float], sdk: Optional[float]) -> str:
    if ours is None or sdk is None or sdk == 0:
        return "n/a"
    value = ours / sdk
    return f"{value:.2f}x" if value < 100 else f"{value:,.0f}x"


# ----------------------------------------------------------------------------- the report


def load_average() -> str:
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "unknown"


def machine(load_before: str) -> List[Tuple[str, str]]:
    from importlib import metadata

    import optimizely_odp_ext

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        sdk_version = metadata.version("optimizely-sdk")
    except metadata.PackageNotFoundError:
        sdk_version = "not installed"
    return [
        ("nproc (usable CPUs)", str(usable)),
        ("CPU model", model),
        ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("optimizely-sdk", sdk_version),
        ("optimizely-odp-ext", f"{optimizely_odp_ext.__version__} (commit {commit}; working tree as run)"),
        ("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")),
        ("load average (1, 5, 15 min) before / after the run", f"{load_before} / {load_average()}"),
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def report(run: Dict[str, Any]) -> Tuple[str, List[Tuple[str, bool, str]]]:
    """The results file's text, and the verdict on each target, from a run's raw figures."""
    results: Dict[str, Dict[str, List[Dict[str, Any]]]] = run["results"]
    settings = Settings(run["quick"], run["repeats"], run.get("spool_repeats"))
    ours_options: Dict[str, Any] = run.get("ours_options", {})  # raw files from before it was recorded: {}
    ours_call = install_call(ours_options)
    capacity = int(ours_options.get("queue_capacity", 10_000))
    command, elapsed = run["command"], run["elapsed"]
    out: List[str] = ["# Benchmark results: the SDK's `send_odp_event` vs `optimizely_odp_ext`", "",
                      "Generated by `benchmarks/run.py`; do not edit by hand (run it again instead).", ""]
    out += ["## Machine", ""]
    out += table(["", ""], [(k, v) for k, v in run["machine"]])
    loads = [float(x) for k, v in run["machine"] if k.startswith("load average") for x in v.replace("/", " ").split()
             if x.replace(".", "", 1).isdigit()]
    cpus = next((int(v) for k, v in run["machine"] if k.startswith("nproc") and v.isdigit()), 0)
    if loads and cpus and max(loads) > 0.5 * cpus:
        out += ["", f"**Note:** the machine was busy with other work during this run (load average up to "
                f"{max(loads):.1f} on {cpus} CPUs); absolute figures are then lower and noisier than on an idle "
                "machine. Both targets ran under the same conditions, interleaved run by run."]
    mode = "quick" if settings.quick else "full"
    out += ["", "## Command", "", f"    {command}", "",
            f"Mode: {mode}; each caller-cost and throughput scenario run {settings.repeats} time(s) per target "
            f"(figures are medians over the runs; loss columns are totals over the runs); "
            f"total time {elapsed:.0f} s.", "",
            "Targets: **SDK** = a plain `Optimizely` client (the SDK's own ODP event manager: batch 10, flush "
            "interval 1 s, queue 1,000, a new connection per request)."]
    if ours_options:
        out[-1] += (
            f" **ours** in the caller-cost and throughput scenarios = `{ours_call}`: every other option at its "
            f"default. {', '.join(f'`{k}`' for k in ours_options)} is the one non-default option, and why: issue 3 "
            "fixes the default capacity at 10,000 (it bounds memory during an outage at about 7 MB per client); a "
            "burst larger than the queue is dropped as queue_full by design, counted "
            "(`odp_event_stats()['dropped']['queue_full']`), with a warning — and the burst here is "
            f"{settings.events:,} events. The memory/outage scenario uses `{DEFAULTS_CALL}` with all defaults "
            "(10,000 held); the section 'ours with all default options' shows what the same burst does with the "
            "default queue.")
    else:
        out[-1] += f" **ours** = `{ours_call}` with all default options, in every scenario."
    out[-1] += (" Both targets send to the same `FakeOdpServer` on 127.0.0.1, run by the benchmark's parent "
                "process; each scenario runs in a fresh subprocess. Ratio = ours / SDK.")
    out += [""]
    target_opts = effective_options(results, "tput50") or effective_options(results, "tput0")
    default_opts = effective_options(results, "memory")
    if target_opts or default_opts:
        out += ["Options in effect, as each worker read them back from the installed plugin:", ""]
        if target_opts:
            out += [f"- ours (caller cost, throughput): {describe_options(target_opts)}"]
        if default_opts:
            out += [f"- ours with all defaults (memory/outage, and the defaults section): "
                    f"{describe_options(default_opts)}"]
        out += [""]
    target_label = f"ours = `{ours_call}`"
    defaults_label = f"ours = `{DEFAULTS_CALL}`, all defaults"
    verdicts: List[Tuple[str, bool, str]] = []

    # --- caller cost
    out += ["## Caller cost per `send_odp_event` call (µs, `time.perf_counter_ns` around each call)", "",
            f"{settings.caller_calls:,} timed calls per setting (split evenly across the threads, started together), "
            f"after {settings.caller_warmup:,} untimed warm-up calls; no added latency. Calls are made back to back, "
            "so the SDK's queue of 1,000 fills and part of its calls take its queue-full path; ours' queue "
            f"(queue_capacity {capacity:,}) "
            f"{'holds all' if capacity >= settings.caller_calls + settings.caller_warmup else 'cannot hold all'} "
            f"{settings.caller_calls + settings.caller_warmup:,} ('events lost' is counted from the server's records). "
            "Each call also competes for the GIL with the target's own background threads, as in an application.",
            ""]
    rows = []
    caller: Dict[int, Dict[str, Dict[str, Optional[float]]]] = {}
    for threads in (1, 4):
        key = f"caller{threads}"
        if key not in results:
            continue
        caller[threads] = {}
        for target in TARGETS:
            runs = results[key][target]
            caller[threads][target] = {m: med(runs, lambda r, m=m: r["sent"][m])
                                       for m in ("p50_us", "p99_us", "max_us", "mean_us")}
        for metric, label in (("p50_us", "p50"), ("p99_us", "p99"), ("max_us", "max"), ("mean_us", "mean")):
            sdk_v, ours_v = caller[threads]["sdk"][metric], caller[threads]["ours"][metric]
            rows.append((f"{threads} thread{'s' if threads > 1 else ''}", label, fmt(sdk_v, 2), fmt(ours_v, 2),
                         ratio(ours_v, sdk_v)))
        lost = {t: total(results[key][t], lambda r: r["server"]["lost"]) for t in TARGETS}
        rows.append((f"{threads} thread{'s' if threads > 1 else ''}", "events lost (all runs)",
                     fmt(lost["sdk"]), fmt(lost["ours"]), ""))
    out += table(["setting", "metric", "SDK", "ours", "ours/SDK"], rows)

    # --- throughput
    out += ["", "## End-to-end throughput and loss", "",
            f"{settings.events:,} events sent as fast as one caller thread can; then ours: `flush_odp_events()`; "
            f"SDK: the server's count polled until all arrived or no request for {SDK_QUIET_SECONDS} s "
            f"(bounded by {settings.deliver_deadline:.0f} s), then `close()`. Throughput = unique events delivered / "
            "(time from the first send to the last event recorded by the server).", ""]
    rows = []
    tput: Dict[str, Dict[str, Optional[float]]] = {}
    zero_loss: Dict[str, Dict[str, bool]] = {}
    for key, label in (("tput0", "no added latency"), ("tput50", "50 ms per request")):
        if key not in results:
            continue
        group = results[key]
        tput[key] = {t: med(group[t], events_per_second) for t in TARGETS}
        zero_loss[key] = {t: lossless(group[t]) for t in TARGETS}
        sdk_rate, ours_rate = tput[key]["sdk"], tput[key]["ours"]
        rows.append((label, "events/s delivered", fmt(sdk_rate, 0), fmt(ours_rate, 0), ratio(ours_rate, sdk_rate)))
        sent_total = server_total(group["ours"], "sent")
        for metric in ("delivered", "lost", "duplicated"):
            rows.append((label, f"{metric} (all runs, of {fmt(sent_total)} sent)",
                         fmt(server_total(group["sdk"], metric)), fmt(server_total(group["ours"], metric)), ""))
        send_s = {t: med(group[t], send_seconds) for t in TARGETS}
        span = {t: med(group[t], span_seconds) for t in TARGETS}
        rows.append((label, "caller's send loop (s)", fmt(send_s["sdk"], 3), fmt(send_s["ours"], 3),
                     ratio(send_s["ours"], send_s["sdk"])))
        rows.append((label, "first send to last event recorded (s)", fmt(span["sdk"], 2), fmt(span["ours"], 2),
                     ratio(span["ours"], span["sdk"])))
    out += table(["latency", "metric", "SDK", "ours", "ours/SDK"], rows)

    # --- information: ours with every option at its default, under the same burst
    defaults = [(k, label) for k, label in (("tput0_defaults", "no added latency"),
                                            ("tput50_defaults", "50 ms per request")) if k in results]
    if defaults:
        out += ["", "### For information: ours with all default options (`queue_capacity` 10,000)", "",
                f"Not used for the targets. The same throughput scenario with `{DEFAULTS_CALL}`: "
                + (f"the {settings.events:,}-event burst is larger than the default queue, so whatever the worker "
                   "has not taken from the queue when it is full is dropped as queue_full — by design (issue 3), "
                   "counted in `odp_event_stats()` and logged as a warning. "
                   if settings.events > DEFAULT_CAPACITY else
                   f"this mode's {settings.events:,}-event burst fits the default queue (the full run's 20,000 does "
                   "not). ")
                + "'lost' is from the server's records, 'dropped as queue_full' is ours' own count; they agree when "
                "nothing else was lost.", ""]
        rows = []
        for key, label in defaults:
            runs = results[key]["ours"]
            base = "tput0" if key.startswith("tput0") else "tput50"
            rate = med(runs, events_per_second)
            sdk_rate = med(results[base]["sdk"], events_per_second) if base in results else None
            rows.append((label, fmt(rate, 0), ratio(rate, sdk_rate),
                         f"{fmt(server_total(runs, 'delivered'))} of {fmt(server_total(runs, 'sent'))}",
                         fmt(server_total(runs, "lost")), fmt(dropped_queue_full(runs)), str(len(runs))))
        out += table(["latency", "events/s delivered", "ours/SDK events/s", "delivered (all runs)",
                      "lost (all runs, server)", "dropped as queue_full (all runs, ours' count)", "runs"], rows)

    # --- information: more requests in flight, and the setup's ceiling
    info = [(k, label) for k, label in INFO_VARIANTS if k in results]
    if info:
        out += ["", "### For information: more requests in flight, and the ceiling of this setup", "",
                f"Not used for the targets. The throughput scenario with `{ours_call}` plus `max_in_flight=8`, and "
                "a calibration without any Optimizely client: N threads, each with a keep-alive `requests.Session`, "
                "POSTing pre-encoded batches of 100 of the same events to the same server — about the most a Python "
                "sender using `requests` with N connections can get from this `FakeOdpServer` on this machine.", ""]
        rows = []
        for key, label in info:
            group = results[key]
            runs = next(iter(group.values()))
            rows.append((label, fmt(med(runs, events_per_second), 0),
                         f"{fmt(server_total(runs, 'lost'))} of {fmt(server_total(runs, 'sent'))}",
                         fmt(per_1000(runs, "requests"), 2), fmt(per_1000(runs, "connections"), 2),
                         fmt(cpu_per_10k(runs), 3), str(len(runs))))
        out += table(["variant", "events/s delivered", "lost (all runs)", "requests / 1,000", "connections / 1,000",
                      "CPU s / 10,000", "runs"], rows)

    # --- requests and connections
    out += ["", "## Requests and new TCP connections per 1,000 delivered events", "",
            "From the throughput runs (`server.requests`, `server.connection_count`).", ""]
    rows = []
    for key, label in (("tput0", "no added latency"), ("tput50", "50 ms per request")):
        if key not in results:
            continue
        group = results[key]
        for metric, name in (("requests", "requests / 1,000 events"),
                             ("connections", "new connections / 1,000 events")):
            sdk_v, ours_v = per_1000(group["sdk"], metric), per_1000(group["ours"], metric)
            rows.append((label, name, fmt(sdk_v, 2), fmt(ours_v, 2), ratio(ours_v, sdk_v)))
    out += table(["latency", "metric", "SDK", "ours", "ours/SDK"], rows)

    # --- memory
    mem_rows = []
    per_event: Dict[str, Optional[float]] = {}
    held_ok = True
    if "memory" in results:
        out += ["", "## Memory while events are held during an outage", "",
                f"After {settings.memory_warmup} delivered warm-up events, the server answers every request with "
                f"503 (`fail_for`); {settings.memory_events:,} events are sent (built on the fly, so everything they "
                "keep alive counts), then after 1 s the subprocess reads its peak RSS (`VmHWM` from "
                "/proc/self/status, reset before sending via /proc/self/clear_refs) against its RSS before sending. "
                "'Held' is what the sender actually keeps: ours `pending` from `odp_event_stats()`; the SDK its queue "
                "(capped at 1,000) plus its current batch — the rest of its events are dropped at once. Per 10,000 "
                "held is extrapolated from per held event for the SDK. Then the outage ends and each target drains "
                "and closes.", ""]
        data: Dict[str, Dict[str, Optional[float]]] = {}
        for t in TARGETS:
            runs = ok_runs(results["memory"][t])
            if not runs:
                data[t] = {}
                continue
            r = runs[0]
            s = r["sent"]
            growth = (s["hwm_kib"] if s.get("peak_reset") else s["rss1_kib"]) - s["rss0_kib"]
            held = s["held"]
            per = growth * 1024 / held if held else None
            per_event[t] = per
            data[t] = {"outage_sent": s["outage_sent"], "held": held, "growth": growth, "per": per,
                       "per10k": per * 10_000 / 1024 / 1024 if per is not None else None,
                       "delivered": r["server"]["delivered"], "lost": r["server"]["lost"],
                       "dup": r["server"]["duplicated"]}
            if t == "ours":
                from optimizely_odp_ext import Options

                bound = (r["sent"].get("effective_options") or {}).get("queue_capacity", Options().queue_capacity)
                held_ok = held <= bound
        for metric, name, digits in (("outage_sent", "events sent during the outage", 0),
                                     ("held", "events held (what each actually keeps)", 0),
                                     ("growth", "peak RSS growth (KiB)", 0),
                                     ("per", "bytes per held event", 0),
                                     ("per10k", "RSS growth per 10,000 held events (MiB)", 2),
                                     ("delivered", "delivered after the outage (incl. warm-up)", 0),
                                     ("lost", "lost (incl. warm-up)", 0),
                                     ("dup", "duplicated", 0)):
            sdk_v, ours_v = data["sdk"].get(metric), data["ours"].get(metric)
            is_int = metric in ("outage_sent", "held", "growth", "delivered", "lost", "dup")
            mem_rows.append((name, fmt(int(sdk_v) if is_int and sdk_v is not None else sdk_v, digits),
                             fmt(int(ours_v) if is_int and ours_v is not None else ours_v, digits),
                             ratio(ours_v, sdk_v) if metric in ("growth", "per", "per10k", "held") else ""))
        out += table(["metric", "SDK", "ours", "ours/SDK"], mem_rows)

    # --- CPU
    out += ["", "## CPU seconds (process user + sys) per 10,000 events", "",
            "From the throughput runs: `time.process_time()` in the subprocess from the first send until "
            "`close()` returned, per 10,000 events delivered (the metric of issue 5) and per 10,000 calls made "
            "(the SDK drops most of its events, which inflates its per-delivered figure); and the CPU of the "
            "target's own background threads only (from /proc/self/task, before `close()`), per 10,000 delivered.",
            ""]
    rows = []
    for key, label in (("tput0", "no added latency"), ("tput50", "50 ms per request")):
        if key not in results:
            continue
        group = results[key]
        for name, fn in (("process CPU s / 10,000 delivered", cpu_per_10k),
                         ("process CPU s / 10,000 calls made", lambda rs: cpu_per_10k(rs, "sent")),
                         ("background threads CPU s / 10,000 delivered", background_cpu_per_10k)):
            sdk_v, ours_v = fn(group["sdk"]), fn(group["ours"])
            rows.append((label, name, fmt(sdk_v, 3), fmt(ours_v, 3), ratio(ours_v, sdk_v)))
    out += table(["latency", "metric", "SDK", "ours", "ours/SDK"], rows)

    # --- the spool (issue 4)
    if all(key in results for key in SPOOL_KEYS):
        out += spool_section(results, settings, ours_call)

    # --- targets
    def v(cond: bool, text: str, name: str) -> None:
        verdicts.append((name, cond, text))

    if 1 in caller and 4 in caller:
        p50 = {th: (caller[th]["ours"]["p50_us"], caller[th]["sdk"]["p50_us"]) for th in (1, 4)}
        cond = all(o is not None and s is not None and o <= s / 2 for o, s in p50.values())
        v(cond, "; ".join(f"{th} thread(s): ours {fmt(o, 2)} µs vs SDK {fmt(s, 2)} µs (ratio {ratio(o, s)})"
                          for th, (o, s) in p50.items()),
          f"Caller p50 at most half the SDK's (1 and 4 threads) [{target_label}]")
        p99 = caller[4]["ours"]["p99_us"]
        v(p99 is not None and p99 < 50, f"ours p99 with 4 threads: {fmt(p99, 2)} µs",
          f"Caller p99 under 50 µs with 4 threads [{target_label}]")
    if "tput50" in tput:
        rate = tput["tput50"].get("ours")
        no_loss = zero_loss["tput50"].get("ours", False)
        v(rate is not None and rate >= 5000 and no_loss,
          f"ours: {fmt(rate, 0)} events/s, zero loss: {'yes' if no_loss else 'NO'} "
          f"(lost {server_total(results['tput50']['ours'], 'lost')}, duplicated "
          f"{server_total(results['tput50']['ours'], 'duplicated')} over all runs)",
          f">= 5,000 events/s delivered with zero loss at 50 ms latency [{target_label}]")
    if "tput0" in tput:
        o, s = tput["tput0"].get("ours"), tput["tput0"].get("sdk")
        v(o is not None and s is not None and s > 0 and o >= 10 * s,
          f"ours {fmt(o, 0)} events/s vs SDK {fmt(s, 0)} events/s (ratio {ratio(o, s)})",
          f">= 10x the SDK's throughput with no added latency [{target_label}]")
    if "memory" in results:
        per = per_event.get("ours")
        v(per is not None and per < 1024 and held_ok,
          f"ours: {fmt(per, 0)} bytes per held event; held within queue_capacity: {'yes' if held_ok else 'NO'}",
          f"Memory per held event under 1 KB (and within the configured bound) [{defaults_label}]")
    out += ["", "## Targets (issue 5)", ""]
    out += [f"- **{'MET' if ok else 'NOT MET'}** — {name}: {text}." for name, ok, text in verdicts]
    for key, label in (("tput50_defaults", "50 ms latency"), ("tput0_defaults", "no added latency")):
        if key in results:
            runs = results[key]["ours"]
            base = "tput0" if key.startswith("tput0") else "tput50"
            sdk_rate = med(results[base]["sdk"], events_per_second) if base in results else None
            rate = med(runs, events_per_second)
            out += [f"- *For information, not judged* — {label} [{defaults_label}]: {fmt(rate, 0)} events/s "
                    f"(ratio to the SDK {ratio(rate, sdk_rate)}), lost {fmt(server_total(runs, 'lost'))} of "
                    f"{fmt(server_total(runs, 'sent'))}, of which ours counted {fmt(dropped_queue_full(runs))} as "
                    "queue_full" + (" — the burst is larger than the default queue, dropped by design."
                                    if settings.events > DEFAULT_CAPACITY else ".")]

    # --- raw
    out += ["", "## Raw per-run figures", "", "```"]
    out += [line.strip() for line in run["log"]]
    out += ["```", ""]
    return "\n".join(out), verdicts


def spool_section(results: Dict[str, Dict[str, List[Dict[str, Any]]]], settings: Settings,
                  ours_call: str) -> List[str]:
    """The table of the spool section: memory only vs spool_dir vs spool_dir + spool_fsync, and a summary."""
    names = [v for v, _, _ in SPOOL_VARIANTS]
    disks = [r["spool_disk"] for key in SPOOL_KEYS for v in names for r in ok_runs(results[key][v])
             if r.get("spool_disk")]
    where = disks[0]["filesystem"] if disks else "unknown"
    fewer = settings.spool_repeats < settings.repeats
    out = ["", "## Spool: cost on the caller and on throughput (issue 4)", "",
           f"ours = `{ours_call}` (memory only), against the same call plus `spool_dir=<dir>` and plus "
           "`spool_dir=<dir>, spool_fsync=True`, where `<dir>` is a fresh temporary directory for every run, removed "
           f"after it (filesystem: {where}). The three variants run interleaved, each run in a fresh subprocess, "
           f"{settings.spool_repeats} run(s) per variant and scenario"
           + (f" (fewer than the {settings.repeats} of the other sections, to keep the full run short)" if fewer
              else "")
           + "; figures are medians over the runs, loss columns totals. Caller cost: as above, 1 thread, "
           f"{settings.caller_calls:,} timed calls after {settings.caller_warmup:,} untimed ones. Throughput: as "
           f"above, {settings.events:,} events from one caller thread, then `flush_odp_events()`. 'Bytes written "
           "per event' is the worker process's `wchar` from `/proc/self/io` (bytes passed to `write()` on files "
           "and pipes — the spool's records and acknowledgement indexes; socket sends are not counted) from the "
           "first send until `flush_odp_events()` returned, per event sent. 'Peak spool size' is the directory's "
           f"size sampled every {SPOOL_SAMPLE_SECONDS * 1000:.0f} ms by the benchmark's parent process (segments "
           "are deleted once every record in them is delivered). Ratio = variant / memory only. "
           "Loss and duplicates are counted from the server's records.", ""]

    def per_run(runs: List[Dict[str, Any]], fn: Callable[[Dict[str, Any]], Optional[float]]) -> Optional[float]:
        return med(runs, fn)

    def io_per_event(field: str, scale: float = 1.0) -> Callable[[Dict[str, Any]], Optional[float]]:
        def one(r: Dict[str, Any]) -> Optional[float]:
            io = r["sent"].get("io") or {}
            sent = r["sent"].get("sent")
            return io[field] * scale / sent if field in io and sent else None
        return one

    def disk(field: str, scale: float = 1.0) -> Callable[[Dict[str, Any]], Optional[float]]:
        def one(r: Dict[str, Any]) -> Optional[float]:
            found = r.get("spool_disk")
            return found[field] * scale if found else None
        return one

    rows: List[Tuple[str, ...]] = []
    medians: Dict[Tuple[str, str], Dict[str, Optional[float]]] = {}

    def add(setting: str, metric: str, key: str, fn: Callable[[List[Dict[str, Any]]], Optional[float]],
            digits: int, *, with_ratio: bool = True, memory_na: bool = False) -> None:
        values = {v: fn(results[key][v]) for v in names}
        if memory_na:
            values["memory"] = None
        medians[(key, metric)] = values
        row = [setting, metric]
        for v in names:
            value = values[v]
            row.append(fmt(int(value) if digits == 0 and isinstance(value, float) and value.is_integer() else value,
                           digits))
            if v != "memory":
                row.append(ratio(value, values["memory"]) if with_ratio else "")
        rows.append(tuple(row))

    caller_label = "caller cost, 1 thread (µs)"
    for metric, label in (("p50_us", "p50"), ("p99_us", "p99"), ("max_us", "max"), ("mean_us", "mean")):
        add(caller_label, label, "spool_caller1", lambda runs, m=metric: per_run(runs, lambda r: r["sent"][m]), 2)
    for metric in ("lost", "duplicated"):
        add(caller_label, f"events {metric} (all runs)", "spool_caller1",
            lambda runs, m=metric: server_total(runs, m), 0, with_ratio=False)
    for key, label in (("spool_tput0", "throughput, no added latency"),
                       ("spool_tput50", f"throughput, {settings.latency * 1000:.0f} ms per request")):
        sent_total = server_total(results[key]["memory"], "sent")
        add(label, "events/s delivered", key, lambda runs: med(runs, events_per_second), 0)
        add(label, "caller's send loop (s)", key, lambda runs: med(runs, send_seconds), 3)
        add(label, "first send to last event recorded (s)", key, lambda runs: med(runs, span_seconds), 2)
        for metric in ("delivered", "lost", "duplicated"):
            add(label, f"{metric} (all runs, of {fmt(sent_total)} sent)", key,
                lambda runs, m=metric: server_total(runs, m), 0, with_ratio=False)
        add(label, "process CPU s / 10,000 delivered", key, cpu_per_10k, 3)
        add(label, "bytes written per event (wchar)", key, lambda runs: per_run(runs, io_per_event("wchar")), 0,
            with_ratio=False)
        add(label, "write() calls per 1,000 events", key,
            lambda runs: per_run(runs, io_per_event("syscw", 1000.0)), 1, with_ratio=False)
        add(label, "peak spool size (KiB)", key, lambda runs: per_run(runs, disk("peak_bytes", 1 / 1024)), 0,
            with_ratio=False, memory_na=True)
        add(label, "left in the spool after close (bytes, all runs)", key,
            lambda runs: total(runs, lambda r: int((r.get("spool_disk") or {}).get("left_bytes", 0))), 0,
            with_ratio=False, memory_na=True)
    header = ["setting", "metric"]
    for v, label, _ in SPOOL_VARIANTS:
        header.append(f"ours {label}")
        if v != "memory":
            header.append(f"{v} / memory")
    out += table(header, rows)

    # A one-paragraph reading of the table (the same numbers).
    def value(key: str, metric: str, variant: str) -> Optional[float]:
        return medians.get((key, metric), {}).get(variant)

    losses = {v: sum(int(server_total(results[k][v], "lost") or 0) + int(server_total(results[k][v], "duplicated")
                                                                         or 0) for k in SPOOL_KEYS) for v in names}
    parts = []
    for v, label, _ in SPOOL_VARIANTS[1:]:
        p50 = (value("spool_caller1", "p50", "memory"), value("spool_caller1", "p50", v))
        p99 = (value("spool_caller1", "p99", "memory"), value("spool_caller1", "p99", v))
        t0 = (value("spool_tput0", "events/s delivered", "memory"), value("spool_tput0", "events/s delivered", v))
        t50 = (value("spool_tput50", "events/s delivered", "memory"), value("spool_tput50", "events/s delivered", v))
        parts.append(f"`{label.lstrip('+ ')}`: caller p50 {fmt(p50[1], 2)} µs vs {fmt(p50[0], 2)} µs "
                     f"({ratio(p50[1], p50[0])}), p99 {fmt(p99[1], 1)} vs {fmt(p99[0], 1)} µs "
                     f"({ratio(p99[1], p99[0])}); "
                     f"throughput {fmt(t0[1], 0)} vs {fmt(t0[0], 0)} events/s with no added latency "
                     f"({ratio(t0[1], t0[0])}) and {fmt(t50[1], 0)} vs {fmt(t50[0], 0)} at "
                     f"{settings.latency * 1000:.0f} ms ({ratio(t50[1], t50[0])}); lost + duplicated over all its "
                     f"runs: {fmt(losses[v])}")
    out += ["", "Reading (medians, with the spool vs memory only): " + "; ".join(parts) + "."]
    return out


INFO_VARIANTS = (
    ("tput0_mif8", "ours, queue_capacity=25,000 + max_in_flight=8 — no added latency"),
    ("ceil0_4", "ceiling: bare requests, 4 connections — no added latency"),
    ("ceil0_8", "ceiling: bare requests, 8 connections — no added latency"),
    ("tput50_mif8", "ours, queue_capacity=25,000 + max_in_flight=8 — 50 ms"),
    ("ceil50_4", "ceiling: bare requests, 4 connections — 50 ms"),
    ("ceil50_8", "ceiling: bare requests, 8 connections — 50 ms"),
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer events and one run per scenario (~1 minute)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per caller-cost and throughput scenario (default 3, quick 1)")
    parser.add_argument("--no-info", action="store_true",
                        help="skip the informational runs (all defaults, max_in_flight=8, calibration ceiling)")
    parser.add_argument("--spool-repeats", type=int, default=None,
                        help="runs per scenario and variant in the spool section (default: as --repeats)")
    parser.add_argument("--no-spool", action="store_true",
                        help="skip the spool section (memory only vs spool_dir vs spool_dir + spool_fsync)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target of issue 5 is not met")
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"),
                        help="the results file to write (its raw figures go beside it, .json)")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the results file from saved raw figures")
    args = parser.parse_args(argv)
    raw_path = os.path.splitext(args.output)[0] + ".json"
    if args.render:
        with open(args.render, encoding="utf-8") as handle:
            return write_report(json.load(handle), args.output, None, args.strict)
    settings = Settings(args.quick, args.repeats, args.spool_repeats)
    command = " ".join([os.path.relpath(sys.executable, os.getcwd()) if sys.executable.startswith(os.getcwd())
                        else sys.executable, *([os.path.relpath(sys.argv[0])] if sys.argv else []),
                        *(argv if argv is not None else sys.argv[1:])])
    started = time.monotonic()
    load_before = load_average()
    results: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    server = FakeOdpServer(api_key=API_KEY).start()
    bench = Bench(server, settings)
    try:
        bench.say(f"FakeOdpServer at {server.url}; mode {'quick' if settings.quick else 'full'}, "
                  f"{settings.repeats} run(s) per scenario; ours = {OURS_CALL} unless options= says otherwise "
                  f"(memory: {DEFAULTS_CALL})")
        results["caller1"] = bench.caller(1)
        results["caller4"] = bench.caller(4)
        results["tput0"] = bench.throughput(0.0)
        results["tput50"] = bench.throughput(settings.latency)
        if not args.no_info:
            results["tput0_defaults"] = bench.throughput(0.0, {}, targets=("ours",))
            results["tput50_defaults"] = bench.throughput(settings.latency, {}, targets=("ours",))
            results["tput0_mif8"] = bench.throughput(0.0, MORE_IN_FLIGHT, targets=("ours",))
            results["tput50_mif8"] = bench.throughput(settings.latency, MORE_IN_FLIGHT, targets=("ours",))
            results["ceil0_4"] = bench.ceiling(0.0, 4)
            results["ceil0_8"] = bench.ceiling(0.0, 8)
            results["ceil50_4"] = bench.ceiling(settings.latency, 4)
            results["ceil50_8"] = bench.ceiling(settings.latency, 8)
        results["memory"] = bench.memory()
        if not args.no_spool:
            results.update(bench.spool())
    finally:
        server.stop()
    run = {"quick": settings.quick, "repeats": settings.repeats, "spool_repeats": settings.spool_repeats,
           "command": command, "ours_options": OURS_OPTIONS,
           "elapsed": time.monotonic() - started, "machine": machine(load_before), "log": bench.log, "results": results}
    return write_report(run, args.output, raw_path, args.strict)


def write_report(run: Dict[str, Any], output: str, raw_path: Optional[str], strict: bool) -> int:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if raw_path is not None:
        with open(raw_path, "w", encoding="utf-8") as handle:
            json.dump(run, handle, indent=1)
    text, verdicts = report(run)
    with open(output, "w", encoding="utf-8") as handle:
        handle.write(text)
    print()
    print(text.split("## Raw per-run figures")[0])
    print(f"Wrote {os.path.relpath(output)}" + (f" and {os.path.relpath(raw_path)}" if raw_path else "") + ".")
    results = run["results"]
    errors = [r for group in results.values() for runs in group.values() for r in runs if not r.get("ok")]
    if errors:
        print(f"{len(errors)} scenario run(s) failed; see the raw figures in the results file.")
        return 2
    return 1 if strict and not all(ok for _, ok, _ in verdicts) else 0

if __name__ == "__main__":
    sys.exit(main())
