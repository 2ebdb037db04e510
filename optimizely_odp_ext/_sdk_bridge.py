"""optimizely-sdk 5.x only: the SDK's own ODP traffic (``identified`` events) goes through our manager.

5.x sends an ``identified`` event from ``create_user_context`` through its own ``OdpEventManager``
(its own queue, thread and connections). While installed, the client's ``odp_manager.event_manager``
is this bridge, so a client has one queue, one worker and one HTTP session; ``uninstall`` hands the
SDK a fresh manager of its own again. optimizely-sdk 4.x has no ODP code, so nothing is bridged there.
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional

from . import _uwsgi
from ._threads import start_quiet
from .event import validate

_log = logging.getLogger(__name__)
_quiet = logging.getLogger(__name__ + ".handover")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


class SdkEventManagerBridge:
    """Stands in for the SDK's ``OdpEventManager``; forwards its events to our manager.

    Args:
        original: The SDK's event manager being replaced.
        enqueue: Queues one validated event on our manager.
        logger: The client's logger.
    """

    def __init__(self, original: Any, enqueue: Callable[[Any], bool], logger: Any) -> None:
        self.original = original
        self.logger = logger
        self._enqueue = enqueue
        self.odp_config = getattr(original, "odp_config", None)
        self.handover: Optional[threading.Thread] = None  # stopping the SDK's own manager

    @property
    def is_running(self) -> bool:
        """Always "running": the SDK must not try to start anything of its own."""
        return True

    def start(self, odp_config: Any) -> None:
        """The SDK starts its manager when ODP becomes integrated; ours follows the datafile itself."""
        self.odp_config = odp_config

    def update_config(self) -> None:
        """Ours follows the datafile itself."""

    def stop(self) -> None:
        """The client's close() closes our manager."""

    def flush(self) -> None:
        """Nothing to do: our manager flushes on its own schedule."""

    def identify_user(self, identifiers: Dict[str, str]) -> None:
        """Runs the installed SDK's own identify logic (it differs between 5.x releases)."""
        type(self.original).identify_user(self, identifiers)

    def send_event(self, type: str, action: str, identifiers: Dict[str, str], data: Any) -> None:
        """Validates and queues one event on our manager."""
        event = validate(action, identifiers, type, data)
        if isinstance(event, str):
            self.logger.error(event)
            return
        self._enqueue(event)

    def dispatch(self, event: Any) -> None:
        """An ``OdpEvent`` built by the SDK (older 5.x releases call this directly)."""
        self.send_event(event.type, event.action, event.identifiers, event.data)


def attach(client: Any, enqueue: Callable[[Any], bool], logger: Any) -> Optional[SdkEventManagerBridge]:
    """Replaces the client's SDK event manager with a bridge, when the SDK has its own one.

    Returns:
        The bridge, or None when there is nothing to bridge (4.x, ODP disabled, a custom manager).
    """
    odp_manager = getattr(client, "odp_manager", None)
    original = getattr(odp_manager, "event_manager", None)
    if odp_manager is None or original is None or not getattr(odp_manager, "enabled", False):
        return None
    try:
        from optimizely.odp.odp_event_manager import OdpEventManager
    except ImportError:
        return None
    if type(original) is not OdpEventManager:
        return None  # the user's own event manager: theirs to keep
    bridge = SdkEventManagerBridge(original, enqueue, logger)
    odp_manager.event_manager = bridge
    if original.is_running:
        # Its queue holds at most the identify events of contexts created before install: let it
        # deliver them and stop, so that from now on one sender serves this client.
        if _uwsgi.forks_later():
            # A uWSGI master forks its workers in C: no thread of ours may run then (see _uwsgi),
            # so its thread is stopped here, bounded by the SDK's own request timeout.
            _stop_quietly(original)
            return bridge
        # Its stop() joins its thread, which may be in a request: never on the caller's thread.
        bridge.handover = threading.Thread(target=_stop_quietly, args=(original,), name="odp-ext-handover",
                                           daemon=True)
        start_quiet(bridge.handover)
    return bridge


def _stop_quietly(original: Any) -> None:
    # Its "Stopping ODP event queue." warning would alarm users about an intended hand-over.
    logger_before, original.logger = original.logger, _quiet
    try:
        original.stop()
    except Exception:
        _log.debug("stopping the SDK's ODP event manager failed", exc_info=True)
    finally:
        original.logger = logger_before


def detach(client: Any, bridge: SdkEventManagerBridge) -> None:
    """Gives the SDK an event manager of its own again (a fresh one: a stopped thread cannot restart)."""
    odp_manager = getattr(client, "odp_manager", None)
    if odp_manager is None or getattr(odp_manager, "event_manager", None) is not bridge:
        return
    original = bridge.original
    if bridge.handover is None and not original.thread.ident:
        odp_manager.event_manager = original  # never started: still usable as it is
    else:
        fresh = type(original)(original.logger, original.api_manager, flush_interval=original.flush_interval)
        odp_manager.event_manager = fresh
        original = fresh
    config = getattr(odp_manager, "odp_config", None)
    try:
        from optimizely.odp.odp_config import OdpConfigState

        if config is not None and config.odp_state() == OdpConfigState.INTEGRATED and not original.is_running:
            original.start(config)
    except Exception:
        _log.debug("restarting the SDK's ODP event manager failed", exc_info=True)


# ----------------------------------------------------------------- the SDK's registry hold (5.x)

CONFIG_UPDATE = "OPTIMIZELY_CONFIG_UPDATE"  # the SDK's notification of a new datafile
_HELD_METHOD = "_update_odp_config_on_datafile_update"
# client -> the weak listener standing in for the SDK's strong one
_loosened: weakref.WeakKeyDictionary[Any, _WeakListener] = weakref.WeakKeyDictionary()


class _WeakListener:
    """Forwards datafile updates to one client's method while that client lives.

    optimizely-sdk 5.x registers every client made with an SDK key in a process-wide registry
    (``_NotificationCenterRegistry``) through a bound method, and only ``close()`` removes it: a
    client dropped without ``close()`` is never garbage-collected, so nothing it holds (its ODP
    threads and connections, and ours) is ever released. While the plugin is installed the
    registry holds this stand-in instead: the same calls while the client lives, and it leaves
    the registry when the client is collected.
    """

    __slots__ = ("__weakref__", "_method")

    def __init__(self, method: Any) -> None:
        self._method = weakref.WeakMethod(method)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        method = self._method()
        if method is not None:
            method(*args, **kwargs)


def _registry_listeners(client: Any) -> Optional[List[Any]]:
    registry_module = sys.modules.get("optimizely.notification_center_registry")
    registry = getattr(registry_module, "_NotificationCenterRegistry", None)
    get_sdk_key = getattr(getattr(client, "config_manager", None), "get_sdk_key", None)
    if registry is None or not callable(get_sdk_key):
        return None
    try:
        center = getattr(registry, "_notification_centers", {}).get(get_sdk_key())
    except Exception:
        return None
    listeners = getattr(center, "notification_listeners", {}).get(CONFIG_UPDATE)
    return listeners if isinstance(listeners, list) else None


def _callback(entry: Any) -> Any:
    """The callback of one registry entry ``(listener_id, callback)``, or None for anything else."""
    return entry[1] if isinstance(entry, tuple) and len(entry) == 2 else None


def _is_held(callback: Any, client: Any) -> bool:
    return getattr(callback, "__self__", None) is client and getattr(callback, "__name__", None) == _HELD_METHOD


def _replace(listeners: List[Any], match: Callable[[Any], bool], new: Callable[[Any], Any]) -> Optional[Any]:
    """Replaces the callback of the first entry whose callback matches; returns the new callback.
    Safe by index: finalizers never change the list (see _forget)."""
    for index, entry in enumerate(listeners):
        if match(_callback(entry)):
            callback = new(entry[1])
            listeners[index] = (entry[0], callback)
            return callback
    return None


def loosen_registry_hold(client: Any) -> None:
    """Replaces the SDK registry's strong hold on ``client`` by a :class:`_WeakListener` (5.x)."""
    listeners = _registry_listeners(client)
    if listeners is None or client in _loosened:
        return
    with _registry_lock:
        _purge(listeners)
        weak = _replace(listeners, lambda callback: _is_held(callback, client), _WeakListener)
        if weak is not None:
            _loosened[client] = weak
            weakref.finalize(client, _forget, weak).atexit = False


def restore_registry_hold(client: Any) -> None:
    """Puts the SDK's own listener back (uninstall restores exactly what install changed)."""
    weak = _loosened.pop(client, None)
    listeners = _registry_listeners(client)
    if weak is None or listeners is None:
        return
    with _registry_lock:
        _replace(listeners, lambda callback: callback is weak, lambda _: getattr(client, _HELD_METHOD))


# Stand-ins of collected clients, removed from the registry's list at the next install. A finalizer
# only records them: it may run in the middle of any code, even the loop above, so it must not
# change the list itself.
_dead: List[_WeakListener] = []
_registry_lock = threading.Lock()


def _forget(weak: _WeakListener) -> None:
    _dead.append(weak)


def _purge(listeners: List[Any]) -> None:
    if not _dead:
        return
    dead = {id(weak) for weak in list(_dead)}
    removed = {id(_callback(e)) for e in listeners if id(_callback(e)) in dead}
    listeners[:] = [e for e in listeners if id(_callback(e)) not in removed]
    _dead[:] = [weak for weak in _dead if id(weak) not in removed]
