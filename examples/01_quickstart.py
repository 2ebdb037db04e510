"""Send ODP events through a real Optimizely client to an embedded fake ODP server.

Run: ``make demo`` (or ``python examples/01_quickstart.py`` in the project's venv).

Expected output (ids and timings differ):
    fake ODP server listening on http://127.0.0.1:PORT
    sent 3 events (+1 rejected at the call: see the error line above)
    delivered: True
    ODP received 3 events in 1 request(s):
      purchased  {'fs_user_id': 'user123', 'email': 'a@b.com'}  item=shirt price=50.0
      ...
    stats: accepted=3 delivered=3 dropped=0 refused (invalid_input)=1
"""

from __future__ import annotations

import logging
import sys

from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.testing import FakeOdpServer

logging.basicConfig(level=logging.ERROR, format="  log %(levelname)s: %(message)s", stream=sys.stdout)


def main() -> int:
    with FakeOdpServer("demo-public-key") as odp:
        print(f"fake ODP server listening on {odp.url}")
        # A real client, from a datafile whose ODP integration points at the fake server.
        client = optimizely.Optimizely(datafile(odp.url, "demo-public-key"), logger=logging.getLogger("app"))
        optimizely_odp_ext.install(client)

        client.send_odp_event("purchased", {"fs_user_id": "user123", "email": "a@b.com"}, "fullstack",
                              {"item": "shirt", "price": 50.0})
        client.send_odp_event("viewed", {"FS-USER-ID": "user456"}, data={"page": "/home"})
        client.send_odp_event("signed_up", {"fs_user_id": "user789"})
        client.send_odp_event("", {"fs_user_id": "user123"})  # invalid: logged, discarded, never raised
        print("sent 3 events (+1 rejected at the call: see the error line above)")

        print("delivered:", client.flush_odp_events(timeout=10))
        print(f"ODP received {len(odp.events)} events in {len(odp.requests)} request(s):")
        for event in odp.events:
            extra = " ".join(f"{k}={v}" for k, v in event["data"].items()
                             if k not in ("idempotence_id", "data_source_type", "data_source", "data_source_version"))
            print(f"  {event['action']:<10} {event['identifiers']}  {extra}")
        stats = client.odp_event_stats()
        print(f"stats: accepted={stats['accepted']} delivered={stats['delivered']} "
              f"dropped={sum(stats['dropped'].values())} refused (invalid_input)={stats['refused']['invalid_input']}")
        client.close()
        return 0 if len(odp.events) == 3 and stats["delivered"] == 3 else 1


if __name__ == "__main__":
    sys.exit(main())
