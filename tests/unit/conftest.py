"""Fixtures of the unit tests: the real transports, each test run once per transport."""

from __future__ import annotations

from typing import Callable, Iterator, List, Union

import pytest

from optimizely_odp_ext.transport import RequestsTransport, Urllib3Transport

Real = Union[RequestsTransport, Urllib3Transport]


@pytest.fixture(params=[Urllib3Transport, RequestsTransport])
def make(request: pytest.FixtureRequest) -> Iterator[Callable[..., Real]]:
    """Builds the transport under test (when called: after the test set its environment); closes them."""
    built: List[Real] = []

    def build(**options: object) -> Real:
        built.append(request.param(**options))
        return built[-1]

    yield build
    for transport in built:
        transport.close()
