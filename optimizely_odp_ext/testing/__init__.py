"""A fake Optimizely Data Platform (ODP) server and helpers for testing your application.

:class:`FakeOdpServer` is a real HTTP/1.1 server on a local port that speaks the
subset of the ODP REST API this package uses (``POST /v3/events``). It checks
every request as strictly as the real service does, records what it accepted,
and can be told to misbehave (slow answers, 5xx, 429, hung requests, reset
connections, rejected events). The package itself imports only the standard
library (optimizely-sdk only inside :func:`make_client`, pytest only for the fixtures).

Helpers:

- :func:`odp_datafile` builds a datafile (valid for every supported optimizely-sdk)
  whose ODP integration points at a host with a key;
- :func:`make_client` builds an Optimizely client from that datafile (no network: no
  CDN polling, Optimizely's own decision events go nowhere) with the plugin installed,
  sending to a :class:`FakeOdpServer`.

Basic use::

    from optimizely_odp_ext import odp
    from optimizely_odp_ext.testing import FakeOdpServer, make_client

    with FakeOdpServer() as server:
        client = make_client(server)
        client.send_odp_event("purchased", {"fs_user_id": "user123"})
        assert odp(client).flush_odp_events(timeout=5)
        assert server.events[0]["action"] == "purchased"
        client.close()

As pytest fixtures (the package registers this module as a pytest plugin, so no
import is needed once it is installed): ``fake_odp_server``, a started server, and
``odp_client``, a :func:`make_client` client sending to it. At teardown
``odp_client`` is closed, and the test fails if any event the client accepted was
not delivered (``@pytest.mark.odp_allow_undelivered`` turns that check off, for
tests that make delivery fail on purpose)::

    def test_checkout_sends_purchase(odp_client, fake_odp_server):
        checkout(odp_client)                    # your code calls send_odp_event
        assert odp(odp_client).flush_odp_events(timeout=5)
        assert fake_odp_server.events[0]["action"] == "purchased"

Fault injection (thread-safe; may be changed while clients are sending)::

    server.set_latency(0.2)               # every answer is 200 ms late
    server.fail_next(2, status=500)       # the next two requests get 500
    server.rate_limit_next(1, "3")        # then one 429 with Retry-After: 3
    server.fail_for(1.5)                  # every request for 1.5 s gets 503
    server.hang_next(1)                   # next request never answered (until stop())
    server.reset_connection_every(3)      # every 3rd request: TCP RST, no answer
    server.reject_events(lambda e: e["action"] == "bad")   # batch refused with 400
    server.reset()                        # forget records and clear every fault

What the server checks, in this order, for each request: reset-connection fault,
hang fault, latency, path (``/v3/events``, else 404), ``fail_next``/``fail_for``
faults, ``x-api-key`` (else 401), body size (else 413), ``content-type:
application/json`` (else 415), ``content-encoding`` (``gzip`` or none, else 415),
then the JSON body: an array of events (or one event object), each exactly
``{"type": str, "action": str, "identifiers": {str: str, ...}, "data": {str:
str | int | float | bool | null}}`` with non-empty ``type``, ``action`` and
``identifiers`` and finite numbers only. One bad event refuses the whole batch
with 400 and ``detail.invalids`` listing the bad indexes; nothing from that batch
is recorded. A good batch is recorded and answered 202.

Observation: :attr:`FakeOdpServer.events`, :meth:`FakeOdpServer.events_by_key`,
:attr:`FakeOdpServer.requests` (every request, including refused ones, as
:class:`RecordedRequest`), :attr:`FakeOdpServer.connection_count`, and the
blocking :meth:`FakeOdpServer.wait_for_events` /
:meth:`FakeOdpServer.wait_for_requests`. Every request is recorded before its
answer is sent, so a client that got an answer can inspect it at once.
"""
from __future__ import annotations

import contextlib

from ._helpers import make_client, odp_datafile
from ._plugin import ALLOW_UNDELIVERED as ALLOW_UNDELIVERED
from ._records import EVENTS_PATH, NO_RESPONSE, RecordedRequest
from ._server import FakeOdpServer

# The package is the pytest plugin (the ``pytest11`` entry point names it): pytest finds the hooks
# and fixtures among its names.
with contextlib.suppress(ImportError):  # pytest is only needed for the fixtures
    from ._plugin import fake_odp_server, odp_client, pytest_configure  # noqa: F401

__all__ = ["EVENTS_PATH", "NO_RESPONSE", "FakeOdpServer", "RecordedRequest", "make_client", "odp_datafile"]
