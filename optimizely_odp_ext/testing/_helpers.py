"""A datafile with ODP at a host, and an Optimizely client built from it with the plugin installed."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Dict

if TYPE_CHECKING:
    from optimizely.optimizely import Optimizely

from ._server import FakeOdpServer

# make_client()'s install options unless given: a test should not wait a second for a batch.
_TEST_OPTIONS: Dict[str, Any] = {"flush_interval": 0.05, "close_timeout": 5.0}

def odp_datafile(host: str, api_key: str, **extra: Any) -> str:
    """A datafile that every supported optimizely-sdk accepts, with ODP integrated at ``host``.

    Args:
        host: The ODP host, e.g. ``server.url`` of a :class:`FakeOdpServer`.
        api_key: The ODP public key, e.g. ``server.api_key``.
        **extra: Top-level datafile fields to add or replace, by their datafile names, e.g.
            ``revision="2"`` or ``featureFlags=[...]``.

    Returns:
        The datafile as a JSON string (give it to ``Optimizely(datafile=...)``).
    """
    from .._datafile import datafile

    data: Dict[str, Any] = json.loads(datafile(host, api_key))
    data.update(extra)
    return json.dumps(data)


class _OfflineEventDispatcher:
    """Optimizely's own decision and conversion events go nowhere: tests stay off the network."""

    @staticmethod
    def dispatch_event(event: Any) -> None:
        """Discards the event."""


def make_client(server: FakeOdpServer, **install_options: Any) -> Optimizely:
    """An Optimizely client whose ODP events go to ``server``, with this plugin installed on it.

    Built from :func:`odp_datafile` (no SDK key: nothing polls the CDN), with an event dispatcher
    that discards Optimizely's own impression/conversion events, so nothing leaves the machine.
    The client and the plugin log to the ``optimizely_odp_ext.testing.client`` logger (so pytest's
    ``caplog`` sees their lines) unless ``logger`` is given. The caller closes it (the
    ``odp_client`` fixture does).

    Args:
        server: A started :class:`FakeOdpServer`.
        **install_options: Options for ``install(client, ...)``; by default ``flush_interval=0.05``
            and ``close_timeout=5.0``. A ``logger`` is used by the client itself too.

    Returns:
        The client (``optimizely.optimizely.Optimizely``); ``optimizely_odp_ext.odp(client)`` types
        the plugin's methods.
    """
    from optimizely import optimizely

    from ..extension import install

    options = {**_TEST_OPTIONS, **install_options}
    if options.get("logger") is None:
        options["logger"] = logging.getLogger("optimizely_odp_ext.testing.client")
    client = optimizely.Optimizely(datafile=odp_datafile(server.url, server.api_key),
                                   logger=options["logger"], event_dispatcher=_OfflineEventDispatcher())
    install(client, **options)
    return client
