"""The pytest plugin: the ``fake_odp_server`` and ``odp_client`` fixtures and the ``odp_allow_undelivered`` marker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterator

if TYPE_CHECKING:
    from optimizely.optimizely import Optimizely

from ._helpers import make_client
from ._server import FakeOdpServer

ALLOW_UNDELIVERED = "odp_allow_undelivered"
"""The pytest marker that keeps ``odp_client`` from failing a test whose events were not all delivered."""


def _undelivered(stats: Dict[str, Any]) -> str:
    """What went wrong with the accepted events, or "" when every one was delivered."""
    missing = int(stats["accepted"]) - int(stats["delivered"])
    if missing <= 0:
        return ""
    dropped = {reason: n for reason, n in stats["dropped"].items() if n}
    return (f"{missing} of {stats['accepted']} ODP event(s) accepted by odp_client were not delivered "
            f"(dropped: {dropped}, pending: {stats['pending']}); if the test means it, mark it "
            f"@pytest.mark.{ALLOW_UNDELIVERED}")


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixtures
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    def pytest_configure(config: pytest.Config) -> None:
        """Registers the ``odp_allow_undelivered`` marker (so ``--strict-markers`` accepts it)."""
        config.addinivalue_line(
            "markers", f"{ALLOW_UNDELIVERED}: the odp_client fixture does not fail the test when some "
                       "of its events were not delivered")

    @pytest.fixture
    def fake_odp_server() -> Iterator[FakeOdpServer]:
        """A started :class:`FakeOdpServer` (key ``"test-odp-key"``), stopped after the test."""
        server = FakeOdpServer().start()
        try:
            yield server
        finally:
            server.stop()

    @pytest.fixture
    def odp_client(request: pytest.FixtureRequest, fake_odp_server: FakeOdpServer) -> Iterator[Optimizely]:
        """A :func:`make_client` client sending to ``fake_odp_server``; closed after the test.

        The test fails at teardown if an event the client accepted was not delivered, unless it is
        marked ``@pytest.mark.odp_allow_undelivered``.
        """
        client = make_client(fake_odp_server)
        try:
            yield client
        finally:
            client.close()
        if request.node.get_closest_marker(ALLOW_UNDELIVERED) is None:
            problem = _undelivered(client.odp_event_stats())
            assert not problem, problem
