"""Profile one thread sending events, then a flush, against a FakeOdpServer in this process (issue 19).

    .venv/bin/python benchmarks/profile_send.py                       # 50,000 events, cProfile, top 30 lines
    .venv/bin/python benchmarks/profile_send.py --transport urllib3   # the same through Urllib3Transport
    .venv/bin/python benchmarks/profile_send.py --no-profile          # CPU per event only (no profiler overhead)

The server runs in this process (its threads' CPU is counted in process CPU time), so the CPU per event
printed here is higher than the benchmark's, where the server is another process; compare rows of one run.
cProfile sees only the thread it is enabled in: the caller (main) thread has one profiler, and each
``odp-ext-*`` thread (the manager's worker and senders, started by the warm-up event) its own, enabled by a
wrapper around ``threading.Thread.run``; their statistics are merged. Each profiler's clock is its
thread's own CPU time (``time.thread_time``), so a blocking call (a lock, a socket read, a ``stat`` that
lets another thread take the GIL) costs what it costs in CPU, not the wall time spent waiting.

Each line also gives the CPU per event of the worker thread and of the sender threads, read from their
own CPU clocks (``time.pthread_getcpuclockid``, where the platform has it) around the burst and flush:
the worker's is what batching and encoding cost, apart from the caller, the HTTP stack and the server.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lean_worker import use_transport  # noqa: E402

from optimizely_odp_ext.testing import FakeOdpServer  # noqa: E402

API_KEY = "bench-odp-key"


def profile_threads() -> List[Tuple[str, cProfile.Profile]]:
    """From now on, every ``odp-ext-*`` thread runs under a profiler of its own (listed in the result)."""
    profilers: List[Tuple[str, cProfile.Profile]] = []
    original = threading.Thread.run

    def run(thread: threading.Thread) -> None:
        if not thread.name.startswith("odp-ext-"):
            return original(thread)
        profiler = cProfile.Profile(time.thread_time)
        profilers.append((thread.name, profiler))
        profiler.enable()
        try:
            return original(thread)
        finally:
            profiler.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    return profilers


def our_threads_cpu() -> Dict[str, float]:
    """CPU seconds so far of each live ``odp-ext-*`` thread (empty where threads' CPU clocks cannot be read)."""
    clock_id = getattr(time, "pthread_getcpuclockid", None)
    if clock_id is None:
        return {}
    seconds: Dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.name.startswith("odp-ext-") and thread.ident is not None:
            with contextlib.suppress(OSError, ValueError):  # the thread ended in between
                seconds[thread.name] = time.clock_gettime(clock_id(thread.ident))
    return seconds


def per_thread_line(before: Dict[str, float], after: Dict[str, float], events: int) -> str:
    """The worker's and the senders' CPU per event between two readings of :func:`our_threads_cpu`."""
    spent = {name: after[name] - before[name] for name in after if name in before}
    worker = sum(v for name, v in spent.items() if name.startswith("odp-ext-worker"))
    senders = sum(v for name, v in spent.items() if name.startswith("odp-ext-sender"))
    return f"thread cpu/event: worker {worker / events * 1e6:.2f} us, senders {senders / events * 1e6:.2f} us"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--transport", choices=("default", "requests", "urllib3"), default="default")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--save", metavar="FILE", help="also write the merged statistics here (pstats format)")
    args = parser.parse_args(argv)
    use_transport(args.transport)
    thread_profilers = [] if args.no_profile else profile_threads()
    from optimizely import optimizely

    import optimizely_odp_ext
    from optimizely_odp_ext._datafile import datafile

    with FakeOdpServer(api_key=API_KEY) as server:
        client = optimizely.Optimizely(datafile=datafile(server.url, API_KEY))
        optimizely_odp_ext.install(client, queue_capacity=args.events + 10_000)
        calls = [("purchased", {"fs_user_id": f"user-{i % 1000}", "email": f"user{i % 1000}@example.com"},
                  "fullstack", {"idempotence_id": f"p-{i:08d}", "item": "shirt", "price": 50.0})
                 for i in range(args.events)]
        client.send_odp_event("warm", {"fs_user_id": "w"})
        client.flush_odp_events(10.0)
        send = client.send_odp_event
        for _name, thread_profiler in thread_profilers:  # the warm-up is not counted
            thread_profiler.clear()
        profiler = None if args.no_profile else cProfile.Profile(time.thread_time)
        if profiler is not None:
            profiler.enable()
        threads0 = our_threads_cpu()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for action, identifiers, type_, data in calls:
            send(action, identifiers, type_, data)
        cpu_sent = time.process_time() - cpu0
        flushed = client.flush_odp_events(120.0)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        threads1 = our_threads_cpu()
        if profiler is not None:
            profiler.disable()
        delivered = len({e["data"].get("idempotence_id") for e in server.events}) - 1
        client.close()
    print(f"transport={args.transport} events={args.events} delivered={delivered} flushed={flushed} "
          f"cpu/event (send only) {cpu_sent / args.events * 1e6:.1f} us, (send+flush, incl. in-process server) "
          f"{cpu / args.events * 1e6:.1f} us, {args.events / wall:,.0f} events/s wall; "
          f"{per_thread_line(threads0, threads1, args.events)}")
    if profiler is not None:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        names = []
        for name, thread_profiler in thread_profilers:  # each thread's run ended with close()
            thread_profiler.create_stats()
            if thread_profiler.stats:  # type: ignore[attr-defined]
                stats.add(thread_profiler)
                names.append(name)
        print(f"profiled threads: main + {', '.join(sorted(names))}")
        stats.sort_stats(args.sort).print_stats(args.top)
        if args.save:
            stats.dump_stats(args.save)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
