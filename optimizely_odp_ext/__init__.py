"""optimizely-odp-ext: reliable, fast Optimizely Data Platform (ODP) events for optimizely-sdk.

One line gives Optimizely clients a ``send_odp_event`` that keeps the SDK's documented contract
and does not lose events::

    import optimizely_odp_ext
    optimizely_odp_ext.install()            # every Optimizely client, made before or after
    optimizely_odp_ext.install(client)      # or one client, with its own keyword options

    client.send_odp_event("purchased", {"fs_user_id": "user123"}, "fullstack", {"price": 50.0})
    client.flush_odp_events(timeout=5)      # optional: wait for delivery
    client.close()                          # delivers what is queued, bounded by close_timeout

In asyncio code, ``await flush_async(client, 2)`` and ``await close_async(client)`` wait the same way
without blocking the event loop.

For type checkers, ``odp(client)`` is the same client typed as :class:`OdpClient`
(``odp(client).flush_odp_events(5)`` passes ``mypy --strict``). Test helpers (a fake ODP server,
``make_client``, the ``odp_client`` pytest fixture) are in :mod:`optimizely_odp_ext.testing`.

See docs/options.md for the options and docs/guarantees.md for the delivery guarantees.
"""

from __future__ import annotations

# Host glue registers itself with the process lifecycle when imported (which never imports it).
from . import _celery, _gunicorn, _uwsgi  # noqa: F401
from ._async import close_async, flush_async
from ._types import OdpClient, odp
from ._version import __version__
from .extension import install, uninstall
from .manager import OdpEventStats
from .settings import ConfigurationError, Options

__all__ = ["ConfigurationError", "OdpClient", "OdpEventStats", "Options", "__version__", "close_async", "flush_async",
           "install", "odp", "uninstall"]
