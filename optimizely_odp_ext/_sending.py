"""Sending many events with back-pressure: what the command line's ``import`` and
:func:`optimizely_odp_ext.bulk.send_partition` share.

* :func:`uuid5_namer` makes RFC 4122 version 5 ids fast (one SHA-1 per event, no UUID object), for the
  deterministic ``idempotence_id`` that lets ODP de-duplicate a re-sent event;
* :func:`bulk_manager` builds an :class:`~optimizely_odp_ext.manager.EventManager` for a batch job:
  ``overflow="block"`` (the reader waits for room, never a drop), sized for throughput, and
  :func:`settle_timeout` is how long waiting for it may take;
* :class:`AckingTransport` is the real transport, remembering the last failure and telling
  :class:`Acks` which events ODP acknowledged (the import's checkpoint).
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from .manager import EventManager
from .settings import Options, make_options
from .transport import Reply, Timeout, Transport, default_transport

# uuid.NAMESPACE_URL's bytes (RFC 4122, appendix C).
NAMESPACE_URL = bytes.fromhex("6ba7b8119dad11d180b400c04fd430c8")
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def uuid5_namer(namespace: bytes, prefix: str = "") -> Callable[[str], str]:
    """Returns ``name_to_id(name)``: ``str(uuid.uuid5(uuid.UUID(bytes=namespace), prefix + name))``.

    Written out (one SHA-1, no UUID object) because it runs once per event.
    """
    start = hashlib.sha1(namespace + prefix.encode())

    def name_to_id(name: str) -> str:
        digest = start.copy()
        digest.update(name.encode("utf-8", "surrogatepass"))
        h = digest.hexdigest()
        return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"

    return name_to_id


def settle_timeout(retry_window: float, request_timeout: float) -> float:
    """How long a batch job waits for room in the queue or for delivery at most.

    An outage longer than the retry window drops batches as ``retry_expired``, which frees room, so
    waiting a little longer than that always ends.
    """
    return retry_window + 2 * request_timeout + 5.0


def bulk_manager(host: str, api_key: str, logger: Any, *, acks: Optional[Acks] = None,
                 **options: Any) -> Tuple[EventManager, List[AckingTransport]]:
    """An event manager for a batch job sending to ``host``, and (once it sends) its transport.

    Args:
        host: The ODP host.
        api_key: The ODP public key.
        logger: Where the manager's lines go.
        acks: Told of every batch ODP accepted, if given.
        options: Any :class:`~optimizely_odp_ext.settings.Options`; ``overflow="block"`` with a
            ``block_timeout`` of :func:`settle_timeout` unless given, ``max_batch_size`` equal to
            ``batch_size`` unless given, and no exit hook.

    Raises:
        ConfigurationError: When an option cannot work.
    """
    # A job's queue is sized in batches of batch_size (see bulk.send): requests keep to it, no growth.
    fixed = {"max_batch_size": options.get("batch_size", Options.batch_size)}
    settings = make_options(api_host=host, api_key=api_key,
                            **{"flush_at_exit": False, "overflow": "block", **fixed, **options})
    if "block_timeout" not in options:
        settings = settings.replace(block_timeout=settle_timeout(settings.retry_window, settings.request_timeout))
    transports: List[AckingTransport] = []

    def transport(opts: Options) -> AckingTransport:
        transports.append(AckingTransport(opts, acks))
        return transports[-1]

    return EventManager(settings, logger, transport_factory=transport), transports


# How encode() writes the id into a batch body (compact separators, a JSON string); a string value
# cannot contain this sequence unescaped, so every match is an event's own idempotence_id.
_ID_IN_BODY = re.compile(rb'"idempotence_id":"((?:[^"\\]|\\.)*)"')


class Acks:
    """Which lines ODP has acknowledged (a 2xx for their batch), to place the checkpoint exactly.

    The importer registers each line's id before handing the event over; the transport acknowledges
    the ids of every batch ODP accepted. :meth:`mark` is the last line before which every line was
    acknowledged: what a re-run after a crash may skip. Memory is bounded by the lines in flight;
    once anything is dropped the mark is frozen (:meth:`freeze`) and nothing more is kept.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Dict[str, int] = {}  # id -> line, for lines handed over and not acknowledged
        self._more: Dict[str, Deque[int]] = {}  # the rare id that several pending lines share
        self._order: Deque[int] = collections.deque()  # pending lines, in file order
        self._acked: Set[int] = set()  # acknowledged lines not yet at the front of _order
        self._mark = 0
        self._frozen = False

    def start(self, line: int) -> None:
        """A new input (or a resumed one): the mark starts at ``line``, nothing is pending."""
        with self._lock:
            self._mark = line
            self._frozen = False
            self._pending.clear()
            self._more.clear()
            self._order.clear()
            self._acked.clear()

    def add(self, event_id: str, line: int) -> None:
        if self._frozen:
            return
        with self._lock:
            if event_id in self._pending:
                self._more.setdefault(event_id, collections.deque()).append(line)
            else:
                self._pending[event_id] = line
            self._order.append(line)

    def ack_body(self, body: bytes) -> None:
        """Acknowledges every event of an accepted batch body."""
        if self._frozen:
            return
        ids = [m if b"\\" not in m else json.loads(b'"' + m + b'"').encode() for m in _ID_IN_BODY.findall(body)]
        with self._lock:
            for raw in ids:
                event_id = raw.decode()
                line = self._pending.pop(event_id, None)
                if line is None:
                    continue
                more = self._more.get(event_id)
                if more:
                    self._pending[event_id] = more.popleft()
                    if not more:
                        del self._more[event_id]
                self._acked.add(line)

    def mark(self) -> int:
        with self._lock:
            return self._advance()

    def _advance(self) -> int:
        order, acked = self._order, self._acked
        while order and order[0] in acked:
            acked.discard(order[0])
            self._mark = order.popleft()
        return self._mark

    def freeze(self) -> None:
        """Something was dropped: the mark stays where it is, so a re-run re-sends from there."""
        with self._lock:
            self._advance()  # what was acknowledged in order so far still counts
            self._frozen = True
            self._pending.clear()
            self._more.clear()
            self._order.clear()
            self._acked.clear()

    @property
    def frozen(self) -> bool:
        return self._frozen


class AckingTransport:
    """The real transport, telling :class:`Acks` about every batch ODP accepted.

    Attributes:
        last_failure: The last reply that was not a 2xx, for the command line's error line.
    """

    def __init__(self, options: Options, acks: Optional[Acks]) -> None:
        self._inner: Transport = default_transport(options)
        self._acks = acks
        self.last_failure: Optional[Reply] = None

    def send(self, url: str, api_key: str, body: bytes, timeout: Timeout) -> Reply:
        reply = self._inner.send(url, api_key, body, timeout)
        if not 200 <= reply.status < 300:
            self.last_failure = reply
        elif self._acks is not None:
            try:
                self._acks.ack_body(body)
            except Exception:  # bookkeeping must never fail a delivery; the mark just stays put
                self._acks.freeze()
        return reply

    def close(self) -> None:
        self._inner.close()
