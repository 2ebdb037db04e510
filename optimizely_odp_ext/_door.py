"""The door of one manager: what a caller's send reads on its common path, in one small object.

A send runs after an idle pause, with cold caches, where each object touched and each function entered
counts (measured with ``benchmarks/paced_pieces.py``: reading the lifetime, the target and the ledger on
each send cost about a fifth of the call, entering an empty function another fifth). So a client's send
is one function holding its manager's door (:func:`sender`), and its common path reads the door's
slots and the queue, nothing else.

The manager writes it: ``open`` and ``target`` under its lifetime's lock (``CallerQueue._sync_door``),
``queue`` and ``ready`` once per process (``ManagerState._reset_runtime``), ``idle`` on the worker
(``Scheduler._loop``). The door is open only while nothing else needs deciding: a worker runs in this
process, the manager is not closing, ODP is integrated, and the host does not fork in C. Everything
else, and a full queue, goes through :meth:`~._caller_queue.CallerQueue.enqueue`.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Optional, Tuple

from ._batch import Target, _Item
from .event import DEFAULT_TYPE, FS_USER_ID, Encoded, OdpData

if TYPE_CHECKING:
    from ._caller_queue import CallerQueue


class Door:
    """One manager's common path for sends (see the module docstring).

    Args:
        manager: The manager whose queue this is (told about the rare appends, see :func:`sender`).
        capacity: ``queue_capacity``: events waiting, queued or ready.
        batch_size: ``batch_size``: a full batch wakes the worker.
    """

    __slots__ = ("batch_size", "capacity", "idle", "manager", "open", "queue", "ready", "target")

    def __init__(self, manager: CallerQueue, capacity: int, batch_size: int) -> None:
        self.manager = manager
        self.capacity = capacity
        self.batch_size = batch_size
        self.open = False
        self.target: Optional[Target] = None
        self.queue: Deque[_Item] = collections.deque()
        self.ready: Deque[Tuple[Encoded, Target]] = collections.deque()
        # The worker waits for callers only (nothing else would wake it): they wake it then. Written by
        # the worker, read on every send.
        self.idle = False

    def full(self) -> bool:
        """Whether ``queue_capacity`` events wait (queued or ready). The common path has this inline."""
        return len(self.queue) + len(self.ready) >= self.capacity


Fallback = Callable[[Any, Any, Any, Any, Any], None]


def sender(door: Door, full_path: Fallback, failed: Callable[[Any, Exception], None]) -> Callable[..., None]:
    """``send_odp_event`` for the one client this door serves: its common path in one function.

    A call after an idle pause pays for every function it enters (each frame and code object is cold:
    ``benchmarks/paced_pieces.py`` measured an empty call at about a fifth of a send), so the common
    case is checked and appended here, in one frame: a non-empty str ``action`` and ``type``, a
    non-empty dict of str to str with ``fs_user_id`` or no key that may need renaming to it (ten characters),
    data None or a dict of str to exactly str, int, bool, None or a finite float, the door open and the
    queue with room. It accepts nothing that :func:`~.event.validate` would refuse or change (a test
    holds it to that); anything else, a subclass included, goes to ``full_path(client, action,
    identifiers, type, data)``, which validates it and decides. ``failed(client, exc)`` reports what
    raises: the application never sees it.
    """

    # ``self`` unannotated, as in a method: get_type_hints() then names the same parameters.
    def send_odp_event(self, action: str, identifiers: Dict[str, str],  # type: ignore[no-untyped-def]
                       type: str = DEFAULT_TYPE, data: Optional[OdpData] = None) -> None:
        try:
            common = (door.open and action.__class__ is str and action != "" and type.__class__ is str
                      and type != "" and identifiers.__class__ is dict and len(identifiers) > 0)
            if common:
                ids: Dict[Any, Any] = dict(identifiers)  # copied, then the copy checked (as validate does)
                renames = FS_USER_ID not in ids  # else validate renames no key (the ten-character check)
                for key, value in ids.items():
                    if key.__class__ is not str or value.__class__ is not str or (renames and len(key) == 10):
                        common = False
                        break
            values: Optional[Dict[Any, Any]] = None
            if common and data is not None:
                if data.__class__ is not dict:
                    common = False
                elif len(data) > 0:
                    values = dict(data)
                    for name, item in values.items():
                        kind = item.__class__
                        if name.__class__ is not str or not (
                                kind is str or kind is int or kind is bool or item is None
                                or (kind is float and item - item == 0.0)):  # inf - inf and NaN are NaN
                            common = False
                            break
            if common:
                queue = door.queue
                if len(queue) + len(door.ready) < door.capacity:  # not door.full(), inline
                    queue.append(((type, action, ids, values), door.target))
                    size = len(queue)
                    # Appended, then looked at: the worker raises ``idle`` before its last look at the
                    # queue (see Scheduler._loop), and a close shuts the door before it can finish.
                    if size == 1 or door.idle or size % door.batch_size == 0 or not door.open:
                        door.manager._appended(size)
                    return
            full_path(self, action, identifiers, type, data)
        except Exception as exc:  # the application never sees our failures
            failed(self, exc)

    return send_odp_event
