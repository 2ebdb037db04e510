"""Where a paced ``send_odp_event`` spends its time (issue 12): each piece timed alone, at a web app's pace.

Run from the repository root (about 30 s; not part of the tests)::

    .venv/bin/python benchmarks/paced_pieces.py [--calls 500]

One process, one ``FakeOdpServer`` on 127.0.0.1, one client with ``install(client)``. The pieces take
turns, one call every 3 ms (sleeping in between, as a request handler does), so that every piece meets
the same cold caches and the same load: the floor (the same argument checks and a ``deque.append``),
validation alone, ``EventManager.enqueue`` of an already validated event (the full path), the whole call
(its common path: one function, see ``optimizely_odp_ext._door.sender``), and a few references (an empty
call, ``os.getpid()``). Prints p50 and p99 per piece in µs.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench_worker import Args, FloorTarget, make_args, percentile  # noqa: E402

import optimizely_odp_ext  # noqa: E402
from optimizely_odp_ext import extension  # noqa: E402
from optimizely_odp_ext._datafile import datafile  # noqa: E402
from optimizely_odp_ext.event import validate  # noqa: E402
from optimizely_odp_ext.testing import FakeOdpServer  # noqa: E402

GAP = 0.003  # seconds between two calls: 333 calls/s, the paced scenario's pace


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="timed calls per piece (default 500)")
    args = parser.parse_args(argv)
    from optimizely import optimizely

    server = FakeOdpServer(api_key="bench-key").start()
    try:
        client = optimizely.Optimizely(datafile=datafile(server.url, "bench-key"))
        optimizely_odp_ext.install(client)
        manager = client.__dict__[extension._STATE_ATTR].manager
        for index in range(200):  # threads started, connection open
            client.send_odp_event(*make_args("warm", index))
        client.flush_odp_events(10.0)
        floor = FloorTarget()
        appended: Deque[Any] = collections.deque()
        validated = [validate(*make_args("pre", index)) for index in range(args.calls)]
        pieces: Dict[str, Callable[[Args, int], Any]] = {
            "empty call": lambda a, i: None,
            "os.getpid()": lambda a, i: os.getpid(),
            "floor (checks + deque.append)": lambda a, i: floor.send(*a),
            "validate()": lambda a, i: validate(*a),
            "validate() + deque.append": lambda a, i: appended.append(validate(*a)),
            "EventManager.enqueue(validated)": lambda a, i: manager.enqueue(validated[i]),
            "send_odp_event()": lambda a, i: client.send_odp_event(*a),
        }
        timings: Dict[str, List[int]] = {name: [] for name in pieces}
        clock = time.perf_counter_ns
        for index in range(args.calls):
            for number, (name, piece) in enumerate(pieces.items()):
                time.sleep(GAP)
                call_args = make_args("paced", index * len(pieces) + number)
                started = clock()
                piece(call_args, index)
                timings[name].append(clock() - started)
            floor.queue.clear()
            appended.clear()
        for name, values in timings.items():
            values.sort()
            p50, p99 = percentile(values, 0.5) / 1000, percentile(values, 0.99) / 1000
            print(f"{name:34s} p50 {p50:6.1f} µs   p99 {p99:6.1f} µs")
        client.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
