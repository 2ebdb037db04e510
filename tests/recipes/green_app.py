"""A script under gevent or eventlet for test_green_threads (run as ``python green_app.py LIB WHEN``).

LIB is ``gevent`` or ``eventlet``. WHEN is ``before`` (patched before the plugin is imported) or
``fork`` (a client created and used in a parent, which forks; the child patches, as gunicorn's
gevent worker does after its fork, then sends). Four green threads send EVENTS events each over two
clients (so thread starts interleave), a ticker measures how late the hub runs it while they send
and flush. Prints one JSON line: the ticker's worst lag, the flushes' results and the signals
blocked on the process's main (only) OS thread at the end.
"""

from __future__ import annotations

import json
import logging
import os
import sys

LIB, WHEN = sys.argv[1], sys.argv[2]
EVENTS = 50
SENDERS = 4


def patch() -> None:
    if LIB == "gevent":
        from gevent import monkey

        monkey.patch_all()
    else:
        import eventlet

        eventlet.monkey_patch()


if WHEN == "before":
    patch()

from optimizely import optimizely  # noqa: E402

import optimizely_odp_ext  # noqa: E402
from optimizely_odp_ext._datafile import datafile  # noqa: E402

optimizely_odp_ext.install(flush_interval=0.5, max_in_flight=2)
clients = [optimizely.Optimizely(datafile(os.environ["ODP_TEST_URL"], os.environ["ODP_TEST_KEY"]),
                                 logger=logging.getLogger("app")) for _ in range(2)]

if WHEN == "fork":
    for number, client in enumerate(clients):  # the parent's own events, and its threads running
        client.send_odp_event("t", {"fs_user_id": "u"}, data={"idempotence_id": f"parent-{number}"})
        assert client.flush_odp_events(10)
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    patch()

import threading  # noqa: E402
import time  # noqa: E402

lag = 0.0
done = False


def tick() -> None:
    global lag
    last = time.monotonic()
    while not done:
        time.sleep(0.01)
        now = time.monotonic()
        lag = max(lag, now - last - 0.01)
        last = now


def send(number: int) -> None:
    for n in range(EVENTS):
        clients[number % 2].send_odp_event("t", {"fs_user_id": "u"}, data={"idempotence_id": f"{number}-{n}"})


ticker = threading.Thread(target=tick)
ticker.start()
senders = [threading.Thread(target=send, args=(number,)) for number in range(SENDERS)]
for thread in senders:
    thread.start()
for thread in senders:
    thread.join()
flushed = [client.flush_odp_events(10) for client in clients]
time.sleep(1.0)  # idle: the worker waits for its flush interval, the hub must keep running
done = True
ticker.join()
for client in clients:
    client.close()
blocked = []
with open("/proc/self/status") as status:
    for line in status:
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            blocked = [number for number in range(1, 65) if mask & (1 << (number - 1))]
print(json.dumps({"lag": lag, "flushed": flushed, "blocked": blocked}), flush=True)
