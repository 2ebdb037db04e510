"""The user's tests: the odp_client fixture comes with the installed package (no conftest needed)."""

from __future__ import annotations

import pytest
from app import checkout
from optimizely.optimizely import Optimizely

from optimizely_odp_ext import OdpClient, odp
from optimizely_odp_ext.testing import FakeOdpServer, make_client


def test_checkout_sends_purchase(odp_client: Optimizely, fake_odp_server: FakeOdpServer) -> None:
    assert checkout(odp_client, "user123", 50.0)
    assert fake_odp_server.events[0]["data"]["price"] == 50.0
    assert odp(odp_client).odp_event_stats()["delivered"] == 1


@pytest.mark.odp_allow_undelivered
def test_refused_events_are_allowed_here(odp_client: OdpClient, fake_odp_server: FakeOdpServer) -> None:
    fake_odp_server.reject_events(lambda event: True)
    odp_client.send_odp_event("refused", {"fs_user_id": "user123"})
    assert odp_client.flush_odp_events(timeout=5)


def test_make_client_with_options() -> None:
    with FakeOdpServer() as server:
        client = make_client(server, batch_size=10)
        try:
            assert checkout(client, "user9", 1.0)
        finally:
            client.close()
    assert len(server.events) == 1
