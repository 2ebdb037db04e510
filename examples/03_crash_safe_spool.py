"""With ``spool_dir``, events survive ``kill -9``: the next process delivers them.

Run: ``.venv/bin/python examples/03_crash_safe_spool.py``

Expected output:
    process 1 sent 500 events while ODP was down, wrote them to the spool, and was killed (SIGKILL)
    process 2 started with the same spool_dir: recovered 500, delivered 500
    ODP received 500 distinct events; spool directory empty again: True
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.testing import FakeOdpServer

# Process 1: sends while ODP fails, waits until the spool holds every event, then waits to be killed.
CHILD = """
import sys, time
from optimizely import optimizely
import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
url, spool = sys.argv[1], sys.argv[2]
client = optimizely.Optimizely(datafile(url, "demo-public-key"))
optimizely_odp_ext.install(client, spool_dir=spool, flush_interval=0.1, backoff_base=0.2)
for i in range(500):
    client.send_odp_event("purchase", {"fs_user_id": f"user-{i}"}, data={"order": i})
deadline = time.monotonic() + 30
# Bounded wait until the worker has taken all 500 from the queue: with a spool, taken means written.
# Seen empty on two polls 50 ms apart, so the group being written at the first one is on disk too.
empty_polls = 0
while empty_polls < 2 and time.monotonic() < deadline:
    empty_polls = empty_polls + 1 if client.odp_event_stats()["queued"] == 0 else 0
    time.sleep(0.05)
print("spooled", flush=True)
time.sleep(60)
"""


def main() -> int:
    spool = tempfile.mkdtemp(prefix="odp-spool-")
    with FakeOdpServer("demo-public-key") as odp:
        odp.fail_for(3600, status=503)  # ODP is down for process 1
        child = subprocess.Popen([sys.executable, "-c", CHILD, odp.url, spool], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            ready = child.stdout.readline().strip() == "spooled"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        print("process 1 sent 500 events while ODP was down, wrote them to the spool, and was killed (SIGKILL)")

        odp.fail_for(0)  # ODP is back
        client = optimizely.Optimizely(datafile(odp.url, "demo-public-key"))
        optimizely_odp_ext.install(client, spool_dir=spool, flush_interval=0.1)
        client.flush_odp_events(timeout=30)
        stats = client.odp_event_stats()
        print(f"process 2 started with the same spool_dir: recovered {stats['recovered']}, "
              f"delivered {stats['delivered']}")
        client.close()
        distinct = {e["data"]["idempotence_id"] for e in odp.events}
        empty = not any(files for _, _, files in os.walk(spool))
        print(f"ODP received {len(distinct)} distinct events; spool directory empty again: {empty}")
        shutil.rmtree(spool, ignore_errors=True)
        return 0 if ready and len(distinct) == len(odp.events) == 500 and empty else 1


if __name__ == "__main__":
    sys.exit(main())
