"""Nothing is lost through an outage and a rate limit: events wait, are retried, and arrive once.

Run: ``.venv/bin/python examples/02_outage_and_rate_limit.py``

Expected output (timings differ):
    ODP answers 503 for 1.0 s, then 429 (Retry-After: 0.3) twice
    sent 300 events while ODP was failing
    delivered: True after 1.1 s
    ODP received 300 events, 300 distinct ids; requests: 15 (12 refused)
    stats: accepted=300 delivered=300 dropped=0 retries=12
"""

from __future__ import annotations

import sys
import time

from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.testing import FakeOdpServer


def main() -> int:
    with FakeOdpServer("demo-public-key") as odp:
        client = optimizely.Optimizely(datafile(odp.url, "demo-public-key"))
        # Short backoff so the example finishes quickly; the defaults retry for up to 5 minutes.
        optimizely_odp_ext.install(client, flush_interval=0.1, backoff_base=0.1, backoff_max=0.5)

        odp.fail_for(1.0, status=503)
        odp.rate_limit_next(2, retry_after="0.3")  # after the outage window, two 429s
        print("ODP answers 503 for 1.0 s, then 429 (Retry-After: 0.3) twice")
        started = time.monotonic()
        for i in range(300):
            client.send_odp_event("page_view", {"fs_user_id": f"user-{i % 7}"}, data={"page": i})
        print("sent 300 events while ODP was failing")

        delivered = client.flush_odp_events(timeout=30)
        print(f"delivered: {delivered} after {time.monotonic() - started:.1f} s")
        ids = {e["data"]["idempotence_id"] for e in odp.events}
        refused = sum(1 for r in odp.requests if r.status != 202)
        print(f"ODP received {len(odp.events)} events, {len(ids)} distinct ids; "
              f"requests: {len(odp.requests)} ({refused} refused)")
        stats = client.odp_event_stats()
        print(f"stats: accepted={stats['accepted']} delivered={stats['delivered']} "
              f"dropped={sum(stats['dropped'].values())} retries={stats['retries']}")
        client.close()
        return 0 if delivered and len(ids) == len(odp.events) == 300 else 1


if __name__ == "__main__":
    sys.exit(main())
