"""One benchmark scenario for one target, in a fresh process (started by ``benchmarks/run.py``).

Usage (by run.py only): ``python benchmarks/bench_worker.py '<json config>'``.

It builds an Optimizely client from a datafile whose ODP integration points at the parent's
``FakeOdpServer``; target ``sdk`` uses the SDK's own ``send_odp_event``, target ``ours`` calls
``optimizely_odp_ext.install(client, **options)`` first. It then runs one scenario and talks to the
parent over stdout (one ``@@{json}`` line per phase) and stdin (one command line per phase), so the
parent can change the server's faults and check its records between phases.

Every wait here is bounded; if the parent goes away, stdin reads EOF and the worker closes and exits.
Only the standard library and what the package's venv has are used (RSS from /proc/self/status).
"""

from __future__ import annotations

import collections
import gc
import json
import math
import os
import sys
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

Args = Tuple[str, Dict[str, str], str, Dict[str, Any]]


def emit(phase: str, **payload: Any) -> None:
    payload["phase"] = phase
    sys.stdout.write("@@" + json.dumps(payload) + "\n")
    sys.stdout.flush()


def wait_command() -> str:
    """Blocks until the parent sends a command line ("" on EOF: the parent is gone)."""
    line = sys.stdin.readline()
    return line.strip()


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def proc_io() -> Dict[str, int]:
    """The process's I/O counters (/proc/self/io, every thread): ``wchar`` counts the bytes passed to
    write()-family calls on files and pipes (socket send() is not included), ``syscw`` those calls."""
    out: Dict[str, int] = {}
    try:
        with open("/proc/self/io") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if value.strip().isdigit():
                    out[name.strip()] = int(value)
    except OSError:
        pass
    return out


def io_delta(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    return {name: after[name] - before[name] for name in after if name in before}


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def event_id(tag: str, index: int) -> str:
    return f"{tag}-{index:08d}"


def make_args(tag: str, index: int) -> Args:
    """The arguments of one send_odp_event call (the seed page's example, plus a unique id)."""
    user = index % 1000
    return (
        "purchased",
        {"fs_user_id": f"user-{user}", "email": f"user{user}@example.com"},
        "fullstack",
        {"idempotence_id": event_id(tag, index), "item": "shirt", "price": 50.0},
    )


def percentile(sorted_values: List[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0
    rank = min(max(1, math.ceil(fraction * len(sorted_values))), len(sorted_values))
    return sorted_values[rank - 1]


def timing_figures(merged: List[int]) -> Dict[str, Any]:
    """Count, p50, p99, max and mean in µs of ascending call timings in ns."""
    return {"timed": len(merged), "p50_us": percentile(merged, 0.50) / 1000,
            "p99_us": percentile(merged, 0.99) / 1000, "max_us": merged[-1] / 1000 if merged else 0.0,
            "mean_us": sum(merged) / len(merged) / 1000 if merged else 0.0}


class Target:
    """One client under test and the target-specific ways to wait for it."""

    def __init__(self, name: str, url: str, key: str, options: Dict[str, Any]) -> None:
        from optimizely import optimizely

        from optimizely_odp_ext._datafile import datafile

        self.name = name
        self.client = optimizely.Optimizely(datafile=datafile(url, key))
        if name == "ours":
            import optimizely_odp_ext

            optimizely_odp_ext.install(self.client, **options)
        self.send: Callable[..., None] = self.client.send_odp_event

    def sdk_held(self) -> int:
        """Events the SDK's manager holds: its queue plus its current batch."""
        manager = self.client.odp_manager.event_manager
        return int(manager.event_queue.qsize() + len(manager._current_batch))

    def drain(self, timeout: float) -> bool:
        """Waits (bounded) until the client has nothing left to send."""
        if self.name == "ours":
            return bool(self.client.flush_odp_events(timeout))
        manager = self.client.odp_manager.event_manager
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if manager.event_queue.unfinished_tasks == 0 and not manager._current_batch:
                return True
            time.sleep(0.01)
        return False

    def effective_options(self) -> Dict[str, Any]:
        """The options ours actually runs with (install()'s keywords over the defaults and the client's
        settings), so the results file states the configuration measured, not the one assumed."""
        if self.name != "ours":
            return {}
        from optimizely_odp_ext import extension

        state = self.client.__dict__.get(getattr(extension, "_STATE_ATTR", "_odp_ext_state"))
        options = getattr(state, "options", None)
        names = ("queue_capacity", "max_in_flight", "batch_size", "max_batch_bytes", "flush_interval", "overflow",
                 "gzip", "spool_dir", "spool_fsync", "spool_max_bytes")
        return {name: getattr(options, name) for name in names if hasattr(options, name)}

    def stats(self) -> Dict[str, Any]:
        if self.name == "ours":
            return dict(self.client.odp_event_stats())
        return {"held": self.sdk_held()}

    def close(self) -> None:
        self.client.close()


class FloorTarget:
    """The floor of the paced scenario: the same argument checks as a send, then a ``deque.append``."""

    name = "floor"

    def __init__(self) -> None:
        self.queue: Deque[Args] = collections.deque()

    def send(self, action: Any, identifiers: Any, type_: Any = "fullstack", data: Any = None) -> None:
        if not isinstance(action, str) or not action:
            return
        if not isinstance(identifiers, dict) or not identifiers:
            return
        for key, value in identifiers.items():
            if not isinstance(key, str) or not isinstance(value, str):
                return
        if type_ is not None and not isinstance(type_, str):
            return
        if data is not None:
            if not isinstance(data, dict):
                return
            for key, value in data.items():
                if not isinstance(key, str) or not (value is None or isinstance(value, (str, int, bool)) or (
                        isinstance(value, float) and math.isfinite(value))):
                    return
        self.queue.append((action, identifiers, type_ or "fullstack", data or {}))

    def drain(self, timeout: float) -> bool:
        self.queue.clear()
        return True

    def effective_options(self) -> Dict[str, Any]:
        return {}

    def stats(self) -> Dict[str, Any]:
        return {}

    def close(self) -> None:
        self.queue.clear()


def thread_cpu() -> Dict[str, float]:
    """CPU seconds (user + sys) so far of each live thread, by name, from /proc/self/task/<tid>/stat."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: Dict[str, float] = {}
    for thread in threading.enumerate():
        tid = getattr(thread, "native_id", None)
        try:
            with open(f"/proc/self/task/{tid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        name = "main" if thread is threading.main_thread() else thread.name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


def cpu_seconds() -> float:
    return time.process_time()  # user + sys of the whole process, every thread


def send_all(send: Callable[..., None], calls: List[Args]) -> None:
    for action, identifiers, type_, data in calls:
        send(action, identifiers, type_, data)


def timed_calls(send: Callable[..., None], calls: List[Args], out: List[int], barrier: threading.Barrier) -> None:
    clock = time.perf_counter_ns
    barrier.wait(30)
    for index, (action, identifiers, type_, data) in enumerate(calls):
        start = clock()
        send(action, identifiers, type_, data)
        out[index] = clock() - start


def scenario_caller(target: Target, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Caller cost: ``calls`` timed calls from ``threads`` threads after ``warmup`` untimed ones."""
    tag, threads, calls, warmup = cfg["tag"], cfg["threads"], cfg["calls"], cfg["warmup"]
    send_all(target.send, [make_args(tag, i) for i in range(warmup)])
    warm_drained = target.drain(15.0)
    per_thread = calls // threads
    slices = [[make_args(tag, warmup + t * per_thread + i) for i in range(per_thread)] for t in range(threads)]
    timings = [[0] * per_thread for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    workers = [threading.Thread(target=timed_calls, args=(target.send, slices[t], timings[t], barrier),
                                name=f"bench-caller-{t}") for t in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait(30)
    started = time.perf_counter()
    for worker in workers:
        worker.join(120)
    elapsed = time.perf_counter() - started
    merged = sorted(value for per in timings for value in per)
    return {
        "sent": warmup + per_thread * threads,
        "warm_drained": warm_drained,
        **timing_figures(merged),
        "send_seconds": elapsed,
    }


def paced_ticks(sends: List[Tuple[Callable[..., None], Args]], seconds: float) -> Tuple[List[int], List[float], float]:
    """Makes the calls one by one, evenly spread over ``seconds`` (sleeping in between, as a request
    handler does). Returns each call's duration (ns), when each started (``time.monotonic()``), and the
    seconds the whole took."""
    timings = [0] * len(sends)
    send_at = [0.0] * len(sends)
    interval = seconds / len(sends)
    clock, now, sleep = time.perf_counter_ns, time.monotonic, time.sleep
    started = now()
    for index, (send, (action, identifiers, type_, data)) in enumerate(sends):
        pause = started + index * interval - now()
        if pause > 0:
            sleep(pause)
        send_at[index] = now()
        begin = clock()
        send(action, identifiers, type_, data)
        timings[index] = clock() - begin
    return timings, send_at, now() - started


def scenario_paced(target: Any, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """A web app's pace: ``calls`` timed calls from 1 thread, spread evenly over ``seconds`` (sleeping in
    between, as a request handler does), after ``warmup`` untimed ones."""
    tag, calls, seconds, warmup = cfg["tag"], cfg["calls"], cfg["seconds"], cfg["warmup"]
    send_all(target.send, [make_args(tag, i) for i in range(warmup)])
    warm_drained = target.drain(15.0)
    timings, send_at, elapsed = paced_ticks([(target.send, make_args(tag, warmup + i)) for i in range(calls)],
                                            seconds)
    floor = target.name == "floor"
    return {
        "sent": 0 if floor else warmup + calls,  # the floor sends nothing to the server
        "calls": calls,
        "warmup": warmup,
        "warm_drained": warm_drained,
        **timing_figures(sorted(timings)),
        "send_seconds": elapsed,
        "send_at": [] if floor else send_at,
    }


def scenario_paced_paired(target: Any, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The paced scenario with the floor in the same process (target ``paired``): the ticks alternate
    ours and the floor (``calls`` ticks, one every ``seconds / calls``), so both meet the same caches, the
    same CPU and the same background threads; ``calls // 2`` timed calls each."""
    tag, calls, seconds, warmup = cfg["tag"], cfg["calls"], cfg["seconds"], cfg["warmup"]
    send_all(target.send, [make_args(tag, i) for i in range(warmup)])
    warm_drained = target.drain(15.0)
    floor = FloorTarget()
    half = calls // 2
    sends = [call for i in range(half)
             for call in ((target.send, make_args(tag, warmup + i)), (floor.send, make_args(tag + "floor", i)))]
    timings, send_at, elapsed = paced_ticks(sends, seconds)
    return {
        "sent": warmup + half,
        "calls": half,
        "warmup": warmup,
        "warm_drained": warm_drained,
        **timing_figures(sorted(timings[0::2])),
        "floor": timing_figures(sorted(timings[1::2])),
        "send_seconds": elapsed,
        "send_at": send_at[0::2],
    }


def scenario_throughput(target: Target, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``events`` sends as fast as one caller can; ours then flushes (the parent polls for the SDK)."""
    tag, count = cfg["tag"], cfg["events"]
    calls = [make_args(tag, i) for i in range(count)]
    gc.collect()
    io0 = proc_io()
    cpu0 = cpu_seconds()
    t_first = time.monotonic()
    send_all(target.send, calls)
    t_sent = time.monotonic()
    result: Dict[str, Any] = {"sent": count, "t_first": t_first, "send_seconds": t_sent - t_first,
                              "cpu0": cpu0, "threads": threading.active_count()}
    if target.name == "ours":
        result["flush_ok"] = target.drain(cfg["deadline"])
        result["flush_seconds"] = time.monotonic() - t_sent
    result["cpu_after_send_and_flush"] = cpu_seconds() - cpu0
    result["io"] = io_delta(io0, proc_io())  # from the first send until flushed (ours) / sent (SDK)
    result["thread_cpu"] = thread_cpu()
    return result


def scenario_memory(target: Target, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """RSS growth while ``events`` sends are held during an outage (the parent makes the server fail)."""
    tag, warmup, count = cfg["tag"], cfg["warmup"], cfg["events"]
    send_all(target.send, [make_args(tag, i) for i in range(warmup)])  # threads, sockets, caches
    emit("ready", warm_drained=target.drain(15.0))
    if wait_command() != "go":
        return {"aborted": True}
    gc.collect()
    time.sleep(0.2)
    rss0 = proc_status_kib("VmRSS")
    peak_reset = reset_peak_rss()
    for i in range(warmup, warmup + count):  # built on the fly: what is held is all the growth
        action, identifiers, type_, data = make_args(tag, i)
        target.send(action, identifiers, type_, data)
    time.sleep(cfg["settle"])  # let the worker take its batches and hit the outage
    rss1 = proc_status_kib("VmRSS")
    hwm = proc_status_kib("VmHWM")
    stats = target.stats()
    held = stats["held"] if target.name == "sdk" else int(stats.get("pending", 0))
    return {"sent": warmup + count, "outage_sent": count, "rss0_kib": rss0, "rss1_kib": rss1,
            "hwm_kib": hwm, "peak_reset": peak_reset, "held": held, "held_stats": stats}


def run_ceiling(cfg: Dict[str, Any]) -> int:
    """Calibration, no Optimizely client: ``connections`` threads, each with its own keep-alive
    ``requests.Session``, POST pre-encoded batches of 100 events as fast as the server answers.
    This is the most any sender in Python with ``requests`` can get from this server on this machine."""
    import requests

    tag, count, connections = cfg["tag"], cfg["events"], cfg["connections"]
    defaults = {"data_source_type": "sdk", "data_source": "python-sdk", "data_source_version": "5.7.0"}
    events = [{"type": t, "action": a, "identifiers": i, "data": {**defaults, **d}}
              for a, i, t, d in (make_args(tag, n) for n in range(count))]
    bodies = [json.dumps(events[n:n + 100], separators=(",", ":")).encode() for n in range(0, count, 100)]
    url = cfg["url"].rstrip("/") + "/v3/events"
    headers = {"content-type": "application/json", "x-api-key": cfg["key"]}
    lock = threading.Lock()
    statuses: List[int] = []

    def post_loop() -> None:
        session = requests.Session()
        while True:
            with lock:
                if not bodies:
                    break
                body = bodies.pop(0)
            try:
                statuses.append(session.post(url, data=body, headers=headers, timeout=(3, 10)).status_code)
            except requests.RequestException:
                statuses.append(0)
        session.close()

    threads = [threading.Thread(target=post_loop, name=f"bench-post-{n}") for n in range(connections)]
    cpu0 = cpu_seconds()
    t_first = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(cfg["deadline"])
    emit("sent", sent=count, t_first=t_first, send_seconds=time.monotonic() - t_first, cpu0=cpu0,
         failed=sum(1 for status in statuses if status != 202))
    wait_command()
    emit("final", cpu_seconds=cpu_seconds() - cpu0, close_seconds=0.0, drained=None, stats_before_close={},
         peak_rss_kib=proc_status_kib("VmHWM"), threads_at_exit=threading.active_count())
    return 0


def main() -> int:
    cfg = json.loads(sys.argv[1])
    if cfg["target"] == "bare":
        return run_ceiling(cfg)
    if cfg["target"] in ("floor_http", "stack") or cfg.get("transport"):
        import lean_worker  # the lean-path benchmark (lean_bench.py): the floor, raw stacks, a transport

        if cfg["target"] in ("floor_http", "stack"):
            run = lean_worker.run_floor if cfg["target"] == "floor_http" else lean_worker.run_stack
            return run(cfg, emit, wait_command, make_args)
        lean_worker.use_transport(cfg["transport"])
    paired = cfg["target"] == "paired"  # ours and the floor in one process (see scenario_paced_paired)
    target: Any = (FloorTarget() if cfg["target"] == "floor" else
                   Target("ours" if paired else cfg["target"], cfg["url"], cfg["key"], cfg.get("options") or {}))
    scenario = cfg["scenario"]
    runner = {"caller": scenario_caller, "paced": scenario_paced_paired if paired else scenario_paced,
              "throughput": scenario_throughput, "memory": scenario_memory}[scenario]
    cpu_start: Optional[float] = None
    try:
        result = runner(target, cfg)
        cpu_start = result.get("cpu0")
        result["threads_now"] = threading.active_count()
        result["effective_options"] = target.effective_options()
        emit("sent", **result)
        command = wait_command()  # the parent checks the server (and clears faults) first
        result_drain = target.drain(cfg.get("deadline", 30.0)) if command == "drain" else None
    finally:
        before_close = target.stats()
        threads_before_close = thread_cpu()
        close_started = time.monotonic()
        target.close()
        close_seconds = time.monotonic() - close_started
    cpu_total = None if cpu_start is None else cpu_seconds() - cpu_start
    emit("final", cpu_seconds=cpu_total, close_seconds=close_seconds, drained=result_drain,
         thread_cpu_before_close=threads_before_close,
         stats_before_close=before_close, peak_rss_kib=proc_status_kib("VmHWM"),
         threads_at_exit=threading.active_count())
    return 0


if __name__ == "__main__":
    sys.exit(main())
