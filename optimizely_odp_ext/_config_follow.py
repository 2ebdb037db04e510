"""Following a client's datafile: its current project config, and its update notifications.

A client whose ODP settings are not given as options (``api_host``) takes them from each datafile it
loads: :func:`follow` hands the current one to the manager at once, then every update the SDK announces
(``OPTIMIZELY_CONFIG_UPDATE``); :func:`unfollow` stops that (uninstall).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Optional

from ._sdk_bridge import CONFIG_UPDATE
from .manager import EventManager
from .settings import odp_integration

_log = logging.getLogger(__name__)

def read_config(client: Any) -> Any:
    """The client's current project config, without blocking while the datafile loads."""
    manager = getattr(client, "config_manager", None)
    if manager is None:
        return None
    if "_config" in getattr(manager, "__dict__", {}):
        # PollingConfigManager.get_config() blocks until the first datafile; _config does not.
        return manager.__dict__["_config"]
    try:
        return manager.get_config()
    except Exception:
        return None


class _ConfigListener:
    """Hands each datafile update of one client to its manager.

    An object rather than a closure, because it sits in the SDK's notification center, which a
    pickle or a deep copy of the client carries: it pickles and copies as a listener that does
    nothing (the copy has no manager of ours; its own comes with its own listener).
    """

    __slots__ = ("client", "manager")

    def __init__(self, client: Any = None, manager: Optional[EventManager] = None) -> None:
        self.client = None if client is None else weakref.ref(client)
        self.manager = manager

    def __call__(self, *_args: Any) -> None:
        target = None if self.client is None else self.client()
        if target is not None and self.manager is not None:
            self.manager.update_config(*odp_integration(read_config(target)))

    def __reduce__(self) -> Any:
        return _ConfigListener, ()


def follow(client: Any, manager: EventManager) -> Callable[[], None]:
    """Hands the client's ODP settings to ``manager`` now and on each datafile update.

    Returns:
        The listener, for :func:`unfollow`.
    """
    on_config_update = _ConfigListener(client, manager)
    center = _notification_center(client)
    if center is not None:
        try:
            center.add_notification_listener(CONFIG_UPDATE, on_config_update)
        except Exception:
            _log.debug("could not listen to datafile updates", exc_info=True)
    on_config_update()
    return on_config_update


def unfollow(client: Any, listener: Callable[[], None]) -> None:
    """Removes a listener :func:`follow` added."""
    center = _notification_center(client)
    if center is not None:
        _remove_listener(center, listener)


def _notification_center(client: Any) -> Any:
    """Where datafile updates are announced: the config manager's own center (the client's is
    notified only when it is that same object, as with the SDK's default config managers)."""
    center = getattr(getattr(client, "config_manager", None), "notification_center", None)
    return center if center is not None else getattr(client, "notification_center", None)


def _remove_listener(center: Any, callback: Callable[[], None]) -> None:
    listeners = getattr(center, "notification_listeners", {}).get(CONFIG_UPDATE, [])
    for entry in list(listeners):
        if isinstance(entry, tuple) and len(entry) == 2 and entry[1] is callback:
            try:
                center.remove_notification_listener(entry[0])
            except Exception:
                listeners.remove(entry)
