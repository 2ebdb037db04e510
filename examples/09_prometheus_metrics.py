"""Prometheus: odp_event_stats() as metrics through a prometheus_client custom collector."""

# Run it: pip install prometheus_client && python examples/09_prometheus_metrics.py
# Expected output (the metrics after 3 events delivered and 1 refused by the fake ODP server):
#   odp_events_accepted_total 4.0
#   odp_events_delivered_total 3.0
#   odp_events_dropped_total{reason="rejected"} 1.0
#   odp_events_pending 0.0
#   odp_events_requests_total 5.0   (varies with how the batches were split to isolate the bad event)
# Counters at 0 are left out of this printout; the collector exports every number of odp_event_stats().

from __future__ import annotations

import sys
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from optimizely_odp_ext import odp

GAUGES = frozenset({"pending", "queued", "left_in_spool"})  # levels; every other number only grows


class OdpStatsCollector:
    """Reads ``odp_event_stats()`` at each scrape: nothing to update, no thread, no extra cost per event."""

    def __init__(self, client: Any, prefix: str = "odp_events") -> None:
        self._client = odp(client)
        self._prefix = prefix

    def collect(self) -> Iterator[Metric]:
        for name, value in self._client.odp_event_stats().items():
            full = f"{self._prefix}_{name}"
            if isinstance(value, dict):  # dropped: one series per reason
                family = CounterMetricFamily(full, f"ODP events {name}, by reason", labels=["reason"])
                for reason, count in sorted(value.items()):
                    family.add_metric([reason], count)
                yield family
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # the manager's state is text: not a number to plot
            elif name in GAUGES:
                yield GaugeMetricFamily(full, f"ODP events {name} now", value=value)
            else:
                yield CounterMetricFamily(full, f"ODP events {name}", value=value)


def main() -> int:
    from prometheus_client import CollectorRegistry, generate_latest

    from optimizely_odp_ext.testing import FakeOdpServer, make_client

    with FakeOdpServer() as server:
        client = make_client(server)
        registry = CollectorRegistry()  # in an app: prometheus_client.REGISTRY, served by start_http_server
        registry.register(OdpStatsCollector(client))
        server.reject_events(lambda event: event["action"] == "refused")
        for n in range(3):
            client.send_odp_event("purchased", {"fs_user_id": f"user-{n}"})
        client.send_odp_event("refused", {"fs_user_id": "user-x"})
        odp(client).flush_odp_events(timeout=5)
        text = generate_latest(registry).decode()
        client.close()
    shown = [line for line in text.splitlines()
             if line.startswith("odp_events_pending") or not (line.startswith("#") or line.endswith(" 0.0"))]
    print("\n".join(shown))
    return 0 if "odp_events_delivered_total 3.0" in text else 1


if __name__ == "__main__":
    sys.exit(main())
