"""The adaptive concurrency controller against real round trips (issue 19).

    .venv/bin/python benchmarks/adaptive_bench.py                     # 0, 20, 50, 150 ms; 30,000 events
    .venv/bin/python benchmarks/adaptive_bench.py --events 10000 --latencies 50

This drives ``optimizely_odp_ext._concurrency.AdaptiveConcurrency`` alone, from a slow start at 4 (the
senders start it at ``max_in_flight``, without slow start, so they never exceed today's concurrency):
``ceiling`` sender threads (one per possible request in flight) take pre-encoded batches of 100 from a
shared list; each waits for a slot from the controller, POSTs through
``Urllib3Transport`` to a ``FakeOdpServer`` (in this process) adding the given latency, and reports the
attempt's round trip and status. A failed batch goes back to the list. Halfway through (by events
delivered), the server answers 429 for ``--push-back`` seconds, so the run shows both halves of AIMD:
growth while round trips stay flat, and the cut on push-back, then regrowth.

Rows per latency, same run: ``fixed 4`` (today's default), ``fixed 16`` (a higher fixed ceiling) and
``adaptive`` (start 4, ceiling 16). Figures: events/s (delivered over the wall time, push-back
included), requests sent, 429 answers taken, the limit's peak, the lowest limit after the push-back, and
the limit at the end. Not part of the test suite; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench_tables import load_average  # noqa: E402
from lean_bench import write_section  # noqa: E402

from optimizely_odp_ext._concurrency import AdaptiveConcurrency  # noqa: E402
from optimizely_odp_ext.testing import FakeOdpServer  # noqa: E402
from optimizely_odp_ext.transport import Urllib3Transport, events_url  # noqa: E402

API_KEY = "bench-odp-key"
BEGIN, END = "<!-- adaptive-benchmark:begin -->", "<!-- adaptive-benchmark:end -->"
ROWS = (("fixed 4", 4, 4, False), ("fixed 16", 16, 16, False), ("adaptive (4 to 16)", 4, 16, True))


def bodies(count: int, tag: str) -> Deque[bytes]:
    events = [{"type": "fullstack", "action": "purchased", "identifiers": {"fs_user_id": f"u{i % 1000}"},
               "data": {"idempotence_id": f"{tag}-{i:08d}", "item": "shirt", "price": 50.0}} for i in range(count)]
    return collections.deque(json.dumps(events[n:n + 100], separators=(",", ":")).encode()
                              for n in range(0, count, 100))


def run(server: FakeOdpServer, latency: float, events: int, *, start: int, ceiling: int, adaptive: bool,
        push_back: float, tag: str) -> Dict[str, Any]:
    server.reset()
    server.set_latency(latency)
    control = AdaptiveConcurrency(ceiling=ceiling, initial=start) if adaptive else None
    slots = threading.BoundedSemaphore(ceiling)
    transport = Urllib3Transport(pool_size=ceiling)
    todo = bodies(events, tag)
    batches = len(todo)
    lock, free = threading.Lock(), threading.Condition()
    done = [0]
    statuses: Dict[int, int] = collections.Counter()
    limits: List[int] = []
    pushed: List[float] = []
    url = events_url(server.url)
    deadline = time.monotonic() + 300

    def acquire() -> None:
        if control is None:
            slots.acquire()
            return
        with free:
            while not control.try_acquire():
                free.wait(0.05)

    def sender() -> None:
        while time.monotonic() < deadline:
            with lock:
                if done[0] >= batches:
                    return
                body = todo.popleft() if todo else None
            if body is None:
                time.sleep(0.001)  # every batch is out; one may still come back on a failure
                continue
            acquire()
            began = time.monotonic()
            reply = transport.send(url, API_KEY, body, (5.0, 10.0))
            if control is None:
                slots.release()
            else:
                control.release(time.monotonic() - began, reply.status)
                with free:
                    free.notify_all()
                limits.append(control.limit)
            with lock:
                statuses[reply.status] += 1
                if reply.status == 202:
                    done[0] += 1
                    if done[0] == batches // 2 and push_back > 0 and not pushed:
                        pushed.append(time.monotonic())
                        server.fail_for(push_back, 429)
                else:
                    todo.append(body)

    threads = [threading.Thread(target=sender, name=f"adaptive-bench-{n}", daemon=True) for n in range(ceiling)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.1))
    elapsed = time.monotonic() - started
    transport.close()
    delivered = len({e["data"]["idempotence_id"] for e in server.events})
    cut = limits[len(limits) // 2:] if limits else []
    return {"events_s": delivered / elapsed, "delivered": delivered, "requests": sum(statuses.values()),
            "429": statuses.get(429, 0), "peak": max(limits, default=ceiling),
            "low_after_push_back": min(cut, default=ceiling), "end": limits[-1] if limits else ceiling}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--latencies", default="0,20,50,150", help="milliseconds, comma-separated")
    parser.add_argument("--push-back", type=float, default=0.5, help="seconds of 429 halfway (0: none)")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    args = parser.parse_args(argv)
    before, started = load_average(), time.monotonic()
    lines = ["| latency | row | events/s | delivered | requests | 429 taken | limit peak | lowest after push-back "
             "| limit at end |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines))
    with FakeOdpServer(api_key=API_KEY) as server:
        for index, ms in enumerate(float(x) for x in args.latencies.split(",")):
            for label, start, ceiling, adaptive in ROWS:
                r = run(server, ms / 1000, args.events, start=start, ceiling=ceiling, adaptive=adaptive,
                        push_back=args.push_back, tag=f"a{index}{start}{int(adaptive)}")
                lines.append(f"| {ms:g} ms | {label} | {r['events_s']:,.0f} | {r['delivered']:,} | {r['requests']:,} "
                             f"| {r['429']} | {r['peak']} | {r['low_after_push_back']} | {r['end']} |")
                print(lines[-1], flush=True)
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python", "benchmarks/adaptive_bench.py", *given])
    write_section("\n".join([
        BEGIN, "## Adaptive concurrency against real round trips (issue 19)", "",
        f"Generated by `benchmarks/adaptive_bench.py` ({time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, "
        f"{time.monotonic() - started:.0f} s; load average before / after {before} / {load_average()}). Command:", "",
        f"    {command}", "", f"{args.events:,} events as batches of 100, {args.push_back:g} s of 429 halfway; "
        "the server runs in the same process. See the script's docstring for the rows.", "", *lines, "", END]) + "\n",
        args.output, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
