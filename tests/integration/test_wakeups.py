"""No lost wake-ups (issue 12): callers wake the worker only when it waits for them or a batch is
full, so every other event relies on the worker's own timer. Here events come at random paces —
bursts, short gaps, gaps around ``flush_interval`` and idle periods long enough for the worker to
go to its long idle sleep — and each must reach the server (real HTTP) within ``flush_interval``
plus a margin. A lost wake-up shows up as an event waiting for the worker's 5 s idle wake.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Callable, Dict, List, Tuple

from optimizely_odp_ext.testing import FakeOdpServer

from ._helpers import FLUSH_TIMEOUT

FLUSH_INTERVAL = 0.2
# One request on loopback plus the scheduling delays of a loaded CI machine; a lost wake-up costs
# up to the worker's idle wake (5 s), far beyond this.
MARGIN = 0.6
SEND_SECONDS = 3.0  # the sending loop stops after this long, or after MAX_EVENTS
MAX_EVENTS = 300
BATCH_SIZE = 20  # larger than most runs of events, so a full batch rarely hides a missed wake-up


def _pace(rng: random.Random) -> Tuple[float, int]:
    """A gap, then how many events back to back: mostly single events after short gaps, sometimes a
    burst (full batches: those wake-ups too), a gap around flush_interval, or an idle period."""
    kind = rng.random()
    if kind < 0.15:
        return rng.uniform(0.0, 0.01), rng.randint(2, 3 * BATCH_SIZE)
    if kind < 0.6:
        return rng.uniform(0.0005, 0.01), 1
    if kind < 0.85:
        return rng.uniform(0.5, 1.5) * FLUSH_INTERVAL, 1  # lands before, on or after the worker's timer
    return rng.uniform(1.5, 2.5) * FLUSH_INTERVAL, 1  # long enough for the worker to wait for callers


def _arrivals(server: FakeOdpServer) -> Dict[str, float]:
    """When the server had read the first accepted request carrying each idempotence id."""
    arrived: Dict[str, float] = {}
    for request in server.requests:
        if request.status == 202:
            for event in json.loads(request.body):
                arrived.setdefault(str(event["data"]["idempotence_id"]), request.received_at)
    return arrived


def test_no_event_waits_longer_than_the_flush_interval(odp_server: FakeOdpServer,
                                                      installed: Callable[..., Any]) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    client = installed(odp_server, flush_interval=FLUSH_INTERVAL, batch_size=BATCH_SIZE, gzip=False)
    client.send_odp_event("warm-up", {"fs_user_id": "u"}, data={"idempotence_id": "warm-up"})
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True  # threads started, connection open

    sent_at: Dict[str, float] = {}
    deadline = time.monotonic() + SEND_SECONDS
    while len(sent_at) < MAX_EVENTS and time.monotonic() < deadline:
        pause, count = _pace(rng)
        time.sleep(pause)  # the pace itself is under test: nothing to wait for here
        for _ in range(count):
            event_id = f"e{len(sent_at)}"
            sent_at[event_id] = time.monotonic()
            client.send_odp_event("paced", {"fs_user_id": event_id}, data={"idempotence_id": event_id})
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True

    arrived = _arrivals(odp_server)
    assert set(sent_at) <= set(arrived), f"seed {seed}: not delivered: {sorted(set(sent_at) - set(arrived))}"
    waits: List[float] = sorted(arrived[e] - at for e, at in sent_at.items())
    late = {e: round(arrived[e] - at, 3) for e, at in sent_at.items() if arrived[e] - at > FLUSH_INTERVAL + MARGIN}
    assert not late, (f"seed {seed}: {len(late)} of {len(sent_at)} event(s) waited longer than flush_interval "
                      f"({FLUSH_INTERVAL} s) + {MARGIN} s: {late}; max wait {waits[-1]:.3f} s")
