"""The mixin and install/uninstall: attaching our methods to the Optimizely class or one client.

What install replaces is remembered (``_odp_ext_replaced``) and tagged (``_odp_ext_applied``), and
uninstall restores exactly that, at class level and at instance level. Both are idempotent and
guarded by one lock. Installing changes nothing else the SDK's client can do: a copy or a pickle
of an installed client carries none of this plugin's state (``__getstate__``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import types
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from typing_extensions import Unpack

from . import _compat, _config_follow, _door, _lifecycle, _sdk_bridge
from .event import DEFAULT_TYPE, OdpData, Pending, validate
from .manager import UNDETERMINED, EventManager, OdpEventStats, no_stats
from .settings import (
    ConfigurationError,
    InstallOptions,
    Options,
    client_logger,
    from_client,
    make_options,
    visible,
)

_log = logging.getLogger(__name__)

_STATE_ATTR = "_odp_ext_state"
# The client's own send, holding its manager's door (see _door.sender). Set with the state, removed
# with it; not set when ODP is disabled or the SDK calls the client invalid (it decides that once, in its
# constructor): every send then takes the full path, which refuses it.
_SEND_ATTR = "_odp_ext_send"
_TAG = "_odp_ext_applied"
_REPLACED = "_odp_ext_replaced"  # on our functions: what they replaced (None: nothing)
_IMPORT_PID = os.getpid()  # where a dead SDK thread can mean a closed client (see _closed_by_sdk)
_CLOSED_ATTR = "_odp_ext_closed"  # set by close(): the client accepts no more events
_MISSING = object()

# Pickles of a client made by earlier releases name its datafile listener here (it lived in this module).
_ConfigListener = _config_follow._ConfigListener

_lock = threading.RLock()
# Class level: the attributes we replaced on the class (or _MISSING), and the install options.
_class_originals: Dict[str, Any] = {}
_class_options: Optional[Options] = None
_class_explicit: frozenset = frozenset()  # type: ignore[type-arg]
_class_states: weakref.WeakSet[_ClientState] = weakref.WeakSet()
# Clients whose stale send_odp_event (kept across uninstall) has said why it sends nothing.
_stale_told: weakref.WeakSet[Any] = weakref.WeakSet()


class _ClientState:
    """One client's plugin state: its manager, its logger, its datafile listener."""

    __slots__ = ("__weakref__", "bridge", "client", "disabled", "finalizer", "instance_attrs", "listener",
                 "logger", "manager", "options", "static_config")

    def __init__(self, client: Any, options: Options, logger: Any, manager: EventManager) -> None:
        self.client = weakref.ref(client)
        self.options = options
        self.logger = logger
        self.manager = manager
        self.disabled = bool(options.odp_disabled)
        # A config manager that never fetches (StaticConfigManager) will not bring a datafile later.
        manager_of_config = getattr(client, "config_manager", None)
        self.static_config = manager_of_config is not None and not hasattr(manager_of_config, "fetch_datafile")
        self.listener: Optional[Callable[[], None]] = None
        self.bridge: Optional[_sdk_bridge.SdkEventManagerBridge] = None
        # Instance level: the attributes we set on the instance and what was there before.
        self.instance_attrs: Dict[str, Any] = {}
        # A client dropped without close(): its manager delivers what it queued (bounded by
        # close_timeout), then ends its threads and connections. Not at exit: the exit hook does it.
        self.finalizer = weakref.finalize(client, _lifecycle.close_client_in_background, manager)
        self.finalizer.atexit = False


# ----------------------------------------------------------------- the mixin


class OdpExtensionMixin:
    """The methods attached to Optimizely clients."""

    def send_odp_event(
        self,
        action: str,
        identifiers: Dict[str, str],
        type: str = DEFAULT_TYPE,
        data: Optional[OdpData] = None,
    ) -> None:
        """Sends an event to ODP: validated now, delivered in the background.

        Same contract as optimizely-sdk's ``send_odp_event``: never raises, logs one error line on
        the client's logger and discards the event when the input (or the client) is not valid.

        Args:
            action: The event action; a non-empty str.
            identifiers: At least one identifier; str keys and values.
            type: The event type; empty or None means "fullstack".
            data: Extra data: str keys; str, int, float (finite), bool or None values.
        """
        try:
            send = self.__dict__.get(_SEND_ATTR)  # this client's own (see _door.sender)
            if send is not None:
                send(self, action, identifiers, type, data)
            else:
                _full_path(self, action, identifiers, type, data)
        except Exception as exc:  # the application never sees our failures
            _failed(self, exc)

    def flush_odp_events(self, timeout: Optional[float] = None) -> bool:
        """Waits until every ODP event sent so far is delivered or given up.

        Args:
            timeout: Seconds to wait at most; None waits until done.

        Returns:
            True when all of them reached an outcome in time, False otherwise.
        """
        state = self.__dict__.get(_STATE_ATTR)
        return True if state is None else state.manager.flush(timeout)

    def odp_event_stats(self) -> OdpEventStats:
        """Delivery counts of this client's ODP events; every key is described in ``OdpEventStats``.

        Returns:
            The counts so far, in this process (all zero before the client's first event).
        """
        state = self.__dict__.get(_STATE_ATTR)
        return no_stats() if state is None else state.manager.stats()

    def close(self) -> None:
        """Delivers queued ODP events (bounded by ``close_timeout``), then the SDK's own close."""
        _close_manager(self)
        original = _class_originals.get("close", _MISSING)
        if callable(original):
            original(self)

    def _identify_user(self, identifiers: Dict[str, str]) -> None:
        """optimizely-sdk 5.x: the identify event of ``create_user_context`` goes through our manager.

        Creating the client's state attaches the bridge (``_sdk_bridge``) before the SDK's own
        ``_identify_user`` hands the event to ``odp_manager.event_manager``.
        """
        try:
            if self.__dict__.get(_STATE_ATTR) is None and getattr(self, "is_valid", True) is not False:
                _state_for(self)
        except Exception:
            _log.exception("attaching the ODP event manager failed")
        original = _class_originals.get("_identify_user", _MISSING)
        if callable(original):
            original(self, identifiers)


def _failed(client: Any, exc: Exception) -> None:
    _log.exception("send_odp_event failed")
    with contextlib.suppress(Exception):
        _logger_of(client).error(_compat.ODP_EVENT_FAILED.format(f"internal error: {exc!r}"))


def _full_path(client: Any, action: Any, identifiers: Any, type: Any, data: Any) -> None:
    """A send the common path did not take (see _door.sender): validated, then :func:`_send`."""
    _send(client, validate(action, identifiers, type, data))


def _send(client: Any, event: Union[Pending, str]) -> None:
    """Every other send: each check in turn, each refusal logged and counted (``event`` is what
    :func:`~.event.validate` returned: the event, or the line saying why it is not valid)."""
    state = client.__dict__.get(_STATE_ATTR)
    if state is None:
        state = _state_for(client)
        if state is None:
            _stale(client)
            return
    if getattr(client, "is_valid", True) is False:
        state.logger.error(_compat.INVALID_OPTIMIZELY.format("send_odp_event"))
        state.manager.count_refused("invalid_client")
        return
    if isinstance(event, str):
        state.logger.error(event)
        state.manager.count_invalid()
        return
    if state.disabled:
        state.logger.error(_compat.ODP_NOT_ENABLED)
        state.manager.count_refused("odp_disabled")
        return
    manager = state.manager
    if manager.state is UNDETERMINED and state.static_config and _config_follow.read_config(client) is None:
        # A datafile given at construction that did not parse: none will ever come.
        state.logger.error(_compat.INVALID_PROJECT_CONFIG.format("send_odp_event"))
        manager.count_refused("invalid_client")
        return
    manager.enqueue(event)


def _instance_close(self: Any) -> None:
    """``close`` for an instance-level install: ours, then whatever the class has."""
    _close_manager(self)
    original = getattr(type(self), "close", None)
    if callable(original):
        original(self)


def _close_manager(client: Any) -> None:
    # Remembered on the client: a client closed before its first event (or installed on after
    # close()) must not start a manager later. Under the lock that _state_for() holds, so a first
    # send racing with close() either made its manager before (closed here) or sees the mark.
    with _lock:
        client.__dict__[_CLOSED_ATTR] = True
        state = client.__dict__.get(_STATE_ATTR)
    if state is not None:
        try:
            state.manager.close()
        except Exception:
            _log.exception("closing the ODP event manager failed")


def _getstate(self: Any) -> Dict[str, Any]:
    """What copy and pickle see of a client: its attributes as the SDK made them.

    The plugin's state (its manager, threads, locks) and the methods bound to this very client
    are left out, and what an instance-level install replaced is put back, so a copy is a plain
    SDK client (with a class-level install, it gets a manager of its own on first use) and a client
    that pickled before install still pickles. The SDK's ``Optimizely`` defines no ``__getstate__``
    of its own, so the default (the instance ``__dict__``) is the starting point.
    """
    attributes = dict(self.__dict__)
    attributes.pop("__getstate__", None)
    attributes.pop(_SEND_ATTR, None)
    state = attributes.pop(_STATE_ATTR, None)
    if state is not None:
        for name, original in state.instance_attrs.items():
            if original is _MISSING:
                attributes.pop(name, None)
            else:
                attributes[name] = original
    return attributes


_PATCHED = ("send_odp_event", "flush_odp_events", "odp_event_stats", "close", "__getstate__")
# What is not a method of the mixin: __getstate__ (object's own would shadow it there), and an
# instance's close (ours, then the class's).
_CLASS_FUNCTIONS: Dict[str, Callable[..., Any]] = {"__getstate__": _getstate}
_INSTANCE_FUNCTIONS: Dict[str, Callable[..., Any]] = {**_CLASS_FUNCTIONS, "close": _instance_close}
# Patched at class level only, and only where the SDK has it (5.x).
_CLASS_ONLY = ("_identify_user",)


def _logger_of(client: Any) -> Any:
    return visible(getattr(client, "logger", None) or logging.getLogger("optimizely_odp_ext"))


def _stale(client: Any) -> None:
    """A ``send_odp_event`` kept from before ``uninstall()`` was called: say why, once per client."""
    with _lock:
        if client in _stale_told:
            return
        _stale_told.add(client)
    _logger_of(client).error(
        "ODP event not sent: optimizely_odp_ext was uninstalled from this client; this send_odp_event "
        "was kept from before uninstall() (further events through it are discarded without a line).")


# ----------------------------------------------------------------- per-client state


def _state_for(client: Any, options: Optional[Options] = None, explicit: frozenset = frozenset()  # type: ignore[type-arg]
               ) -> Optional[_ClientState]:
    """Returns the client's state, creating it on first use (class-level install)."""
    with _lock:
        state: Optional[_ClientState] = client.__dict__.get(_STATE_ATTR)
        if state is not None:
            return state
        class_level = options is None
        if options is None:
            if _class_options is None:
                return None
            options, explicit = _class_options, _class_explicit
        resolved = from_client(client, options, explicit)
        closed = client.__dict__.get(_CLOSED_ATTR, False) or _closed_by_sdk(client)
        if closed:
            client.__dict__[_CLOSED_ATTR] = True
            # It will send nothing: it must neither read nor deliver a spool left by another process.
            resolved = resolved.replace(spool_dir=None)
        logger = visible(client_logger(client, resolved))
        manager = EventManager(resolved, logger, _compat.sdk_version())
        state = _ClientState(client, resolved, logger, manager)
        client.__dict__[_STATE_ATTR] = state
        if not state.disabled and getattr(client, "is_valid", True) is not False:
            client.__dict__[_SEND_ATTR] = _door.sender(manager.door, _full_path, _failed)
        if class_level:
            _class_states.add(state)
        if closed:
            manager.close()  # no thread was started: this returns at once, and refuses every event
        elif not state.disabled:
            if resolved.api_host is None:
                state.listener = _config_follow.follow(client, manager)
            state.bridge = _sdk_bridge.attach(client, manager.enqueue, logger)
        _sdk_bridge.loosen_registry_hold(client)
        return state


def _closed_by_sdk(client: Any) -> bool:
    """Whether the SDK's own ``close()`` ran before we were installed: its batch event processor's
    thread was started and has stopped (only ``stop()`` ends it). A closed client stays closed.

    Only in the process that imported the plugin: in a forked child (a Celery prefork child, a
    gunicorn worker) every thread of the parent is dead, so a client first used there is taken as open.
    A client without a batch event processor (optimizely-sdk 4.x's default forwards events) shows
    no trace of its close: it cannot be told from an open one.
    """
    if os.getpid() != _IMPORT_PID:
        return False  # a forked child: the parent's threads are all dead here, its client's closed or not
    executor = getattr(getattr(client, "event_processor", None), "executor", None)
    return isinstance(executor, threading.Thread) and executor.ident is not None and not executor.is_alive()


def _close_all(managers: List[EventManager]) -> None:
    """Closes managers detached under ``_lock``, after releasing it: a close waits for the network
    (up to ``close_timeout``), and no other client's install or first send may wait for that."""
    if len(managers) == 1:
        try:
            managers[0].close()
        except Exception:
            _log.exception("closing the ODP event manager failed")
    elif managers:
        _lifecycle.close_managers(managers, why="uninstall")


def _detach_state(client: Any, state: _ClientState) -> None:
    """Under ``_lock``: the client lets go of its state. Its manager is closed by the caller, once
    the lock is released (:func:`_close_all`)."""
    state.finalizer.detach()
    _sdk_bridge.restore_registry_hold(client)
    if state.bridge is not None:
        _sdk_bridge.detach(client, state.bridge)
        state.bridge = None
    if state.listener is not None:
        _config_follow.unfollow(client, state.listener)
        state.listener = None
    client.__dict__.pop(_SEND_ATTR, None)
    client.__dict__.pop(_STATE_ATTR, None)


# ----------------------------------------------------------------- install / uninstall


def _optimizely_class() -> type:
    from optimizely.optimizely import Optimizely

    cls: type = Optimizely
    return cls


def _check_sdk() -> bool:
    version = _compat.sdk_version_tuple()
    if _compat.is_supported_sdk(version):
        return True
    _log.error("optimizely-odp-ext supports optimizely-sdk %s; found %s. Not installed.",
               _compat.SUPPORTED_SDK, _compat.sdk_version())
    return False


def install(client: Any = None, **options: Unpack[InstallOptions]) -> bool:
    """Gives Optimizely clients our ``send_odp_event`` (and ``flush_odp_events``, ``close``).

    Every option is checked here, before anything changes.

    Args:
        client: One client to install on; None installs on the ``Optimizely`` class, so every
            client (made before or after) gets it.
        **options: Keyword options, typed by :class:`~optimizely_odp_ext.settings.InstallOptions`
            (each described in :class:`~optimizely_odp_ext.settings.Options`).

    Returns:
        True when installed now, False when it already was (or the SDK is unsupported).

    Raises:
        ConfigurationError: An unknown or impossible option, or ``client`` is not an Optimizely client.
    """
    given: Mapping[str, Any] = options
    resolved = make_options(**given)
    explicit = frozenset(given)
    if not _check_sdk():
        return False
    if resolved.flush_on_sigterm:
        _lifecycle.enable_sigterm_flush(resolved.logger or _logger_of(client))
    cls = _optimizely_class()
    if client is not None and not isinstance(client, cls):
        raise ConfigurationError(f"install() needs an Optimizely client, got {type(client).__name__}.")
    detached: List[EventManager] = []
    try:
        with _lock:
            if client is None:
                return _install_class(cls, resolved, explicit)
            return _install_instance(client, resolved, explicit, detached)
    finally:
        _close_all(detached)


def _install_class(cls: type, options: Options, explicit: frozenset) -> bool:  # type: ignore[type-arg]
    global _class_options, _class_explicit
    if _class_originals:
        _log.warning("optimizely_odp_ext.install() was already called; nothing changed.")
        return False
    for name in _PATCHED + tuple(n for n in _CLASS_ONLY if n in cls.__dict__):
        original = cls.__dict__.get(name, _MISSING)
        _class_originals[name] = original
        setattr(cls, name, _tagged(_CLASS_FUNCTIONS.get(name) or getattr(OdpExtensionMixin, name), original))
    _class_options, _class_explicit = options, explicit
    _log.debug("installed on %s", cls.__name__)
    return True


def _install_instance(client: Any, options: Options, explicit: frozenset,  # type: ignore[type-arg]
                      detached: List[EventManager]) -> bool:
    state: Optional[_ClientState] = client.__dict__.get(_STATE_ATTR)
    if state is not None and state.instance_attrs:
        state.logger.warning("optimizely_odp_ext.install(client) was already called for this client; "
                             "nothing changed.")
        return False
    if state is not None:
        # A class-level state already serves this client: replace it with one of its own options.
        _detach_state(client, state)
        _class_states.discard(state)
        detached.append(state.manager)
    if getattr(client, "is_valid", True) is False:
        _logger_of(client).error(_compat.INVALID_OPTIMIZELY.format("install"))
    state = _state_for(client, options, explicit)
    assert state is not None
    own_send = client.__dict__.get(_SEND_ATTR)
    for name in _PATCHED:
        state.instance_attrs[name] = client.__dict__.get(name, _MISSING)
        function = _INSTANCE_FUNCTIONS.get(name) or getattr(OdpExtensionMixin, name)
        if name == "send_odp_event" and own_send is not None:
            function = _as_method_of(own_send, function)  # one function, one frame: see _door.sender
        client.__dict__[name] = types.MethodType(_tagged(function, state.instance_attrs[name]), client)
    return True


def _as_method_of(function: Callable[..., Any], method: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` under the name and documentation of the mixin's ``method`` (its stand-in)."""
    function.__doc__ = method.__doc__
    function.__qualname__ = method.__qualname__
    return function


def _tagged(function: Callable[..., Any], original: Any) -> Callable[..., Any]:
    """A copy of ``function`` marked as ours, remembering what it replaced."""
    replacement = types.FunctionType(
        function.__code__, function.__globals__, function.__name__, function.__defaults__, function.__closure__)
    replacement.__doc__ = function.__doc__
    replacement.__qualname__ = function.__qualname__
    replacement.__kwdefaults__ = function.__kwdefaults__
    # FunctionType() copies no annotations: without them typing.get_type_hints() finds nothing.
    replacement.__annotations__ = dict(function.__annotations__)
    setattr(replacement, _TAG, True)
    # Not __wrapped__: inspect.signature() would follow it to what we replaced (or fail on None).
    setattr(replacement, _REPLACED, None if original is _MISSING else original)
    return replacement


def uninstall(client: Any = None) -> bool:
    """Undoes :func:`install`: restores exactly what it replaced.

    Queued events of the affected clients are delivered first (bounded by ``close_timeout``).

    Args:
        client: The client given to ``install(client)``; None undoes the class-level install.

    Returns:
        True when something was uninstalled.
    """
    detached: List[EventManager] = []
    sigterm = False
    try:
        with _lock:
            if client is None:
                done, sigterm = _uninstall_class(detached)
                return done
            return _uninstall_instance(client, detached)
    finally:
        _close_all(detached)
        if sigterm:
            _lifecycle.disable_sigterm_flush()


def _uninstall_class(detached: List[EventManager]) -> Tuple[bool, bool]:
    """Returns (uninstalled, whether the SIGTERM flush it enabled is to be disabled)."""
    global _class_options, _class_explicit
    if not _class_originals:
        return False, False
    sigterm = _class_options is not None and _class_options.flush_on_sigterm
    cls = _optimizely_class()
    for name, original in _class_originals.items():
        current = cls.__dict__.get(name)
        if current is None or not getattr(current, _TAG, False):
            continue  # someone else replaced it since; leave theirs alone
        if original is _MISSING:
            delattr(cls, name)
        else:
            setattr(cls, name, original)
    _class_originals.clear()
    _class_options, _class_explicit = None, frozenset()
    # Clients served by the class-level install: deliver what they queued (all at once, one
    # close_timeout for all of them), then let them go.
    for state in list(_class_states):
        client = state.client()
        if client is not None and client.__dict__.get(_STATE_ATTR) is state:
            _detach_state(client, state)
            detached.append(state.manager)
    _class_states.clear()
    return True, sigterm


def _uninstall_instance(client: Any, detached: List[EventManager]) -> bool:
    state: Optional[_ClientState] = client.__dict__.get(_STATE_ATTR)
    if state is None or not state.instance_attrs:
        return False
    for name, original in state.instance_attrs.items():
        current = client.__dict__.get(name)
        if current is None or not getattr(current, _TAG, False):
            continue
        if original is _MISSING:
            del client.__dict__[name]
        else:
            client.__dict__[name] = original
    _detach_state(client, state)
    detached.append(state.manager)
    return True


def manager_of(client: Any) -> Optional[EventManager]:
    """The client's event manager, if it has one yet."""
    state = client.__dict__.get(_STATE_ATTR)
    return None if state is None else state.manager
