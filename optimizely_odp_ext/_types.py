"""Static types for users' code: :class:`OdpClient` and :func:`odp`.

``install()`` attaches ``send_odp_event``, ``flush_odp_events`` and ``odp_event_stats`` at run time,
so a type checker reading optimizely-sdk's ``Optimizely`` class does not know them (and on 4.1.1 it
knows nothing at all)::

    from optimizely_odp_ext import odp

    odp(client).send_odp_event("purchased", {"fs_user_id": "user123"})
    assert odp(client).flush_odp_events(5)          # passes mypy --strict

``odp(client)`` returns ``client`` itself, typed as :class:`OdpClient`; it costs one attribute lookup.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, cast

from typing_extensions import Protocol, runtime_checkable

from .event import OdpData
from .manager import OdpEventStats

__all__ = ["OdpClient", "odp"]

_TAG = "_odp_ext_applied"  # the tag install() puts on what it attaches (extension._TAG)
_NOT_INSTALLED = ("optimizely_odp_ext is not installed on this client: call optimizely_odp_ext.install() "
                  "or install(client) first.")


@runtime_checkable
class OdpClient(Protocol):
    """An Optimizely client with this plugin installed: the methods ``install()`` gives it."""

    def send_odp_event(
        self,
        action: str,
        identifiers: Dict[str, str],
        type: Optional[str] = ...,
        data: Optional[OdpData] = ...,
    ) -> None:
        """Sends an ODP event; validated now, delivered in the background; never raises."""

    def flush_odp_events(self, timeout: Optional[float] = ...) -> bool:
        """Waits (at most ``timeout`` seconds) until every event sent so far has an outcome."""

    def odp_event_stats(self) -> OdpEventStats:
        """Delivery counts: accepted, delivered, dropped and refused by reason, pending, ..."""

    def close(self) -> None:
        """Delivers what is queued (bounded by ``close_timeout``), then the SDK's own close."""


def odp(client: Any) -> OdpClient:
    """Returns ``client`` typed as :class:`OdpClient`, so ``odp(client).flush_odp_events(5)`` type-checks.

    Never raises. When the plugin is not installed on ``client`` it logs one error on the client's
    logger (the methods would be missing, or the SDK's own) and still returns ``client``.

    Args:
        client: An Optimizely client given to ``install(client)``, or made while ``install()`` is active.

    Returns:
        The same object.
    """
    if not getattr(getattr(client, "flush_odp_events", None), _TAG, False):
        logger = getattr(client, "logger", None) or logging.getLogger("optimizely_odp_ext")
        try:
            logger.error(_NOT_INSTALLED)
        except Exception:  # a broken custom logger must not break the caller
            logging.getLogger(__name__).debug("could not log to the client's logger", exc_info=True)
    return cast(OdpClient, client)
