"""Must NOT pass mypy --strict: proves the plugin's methods are typed, not Any."""

from __future__ import annotations

from optimizely_odp_ext import OdpClient


def wrong(client: OdpClient) -> None:
    client.flush_odp_events("soon")
    client.send_odp_event("purchased", ["user123"])
