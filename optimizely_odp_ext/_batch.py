"""What the scheduler moves around: a batch, where it goes, and what its refused parts showed so far."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

from . import _compat
from .event import Encoded, Pending
from .retry import NETWORK_ERROR
from .transport import Reply


class Target(NamedTuple):
    """Where a batch goes and with which key. Events keep the target they were queued under."""

    host: str
    key: str
    url: str


class _Family:
    """The parts of one batch refused with a 400 (split, sampled, held): what they showed so far.

    Parts are held only while a verdict can still come: ``outstanding`` counts the parts sent or
    waiting to be sent (not held); when it reaches 0, or a part is delivered, the held parts go on.
    """

    __slots__ = ("base_depth", "failures", "held", "outstanding", "samples_refused", "sampling", "settled", "size",
                 "systemic")

    def __init__(self, size: int, base_depth: int) -> None:
        self.size = size
        self.base_depth = base_depth  # the refused batch's own depth (a part of a 413 split may start one)
        self.failures: Dict[int, int] = {}  # depth -> parts refused with a 400 at that depth
        self.settled = False  # a part was delivered, or no verdict can come: nothing is held any more
        self.sampling = False
        self.samples_refused = 0
        self.systemic = False
        self.outstanding = 0  # parts that may still bring a verdict: sent, retrying or queued, not held
        self.held: List[_Batch] = []  # parts waiting for the verdict


class _Batch:
    __slots__ = ("attempts", "depth", "events", "family", "first_attempt", "min_seq", "probe", "refused",
                 "rekeyed", "sample", "target")

    def __init__(self, events: List[Encoded], target: Target, first_attempt: Optional[float] = None,
                 family: Optional[_Family] = None, depth: int = 0) -> None:
        self.events = events
        self.target = target
        self.first_attempt = first_attempt
        self.attempts = 0
        self.min_seq = min(e.seq for e in events)
        self.probe = False
        self.family = family
        self.depth = depth
        self.rekeyed = False
        self.sample = False  # a single event sent alone to tell a systemic refusal from a few bad events
        self.refused = False  # ODP answered 400 for exactly this part


_Item = Tuple[Pending, Optional[Target]]


def _first_attempt(batch: _Batch) -> float:
    # Set by _submit before any reply can exist; halves of a split batch inherit it.
    assert batch.first_attempt is not None
    return batch.first_attempt


def _describe(reply: Reply) -> str:
    if reply.status == NETWORK_ERROR:
        return reply.detail or "network error"
    return f"HTTP {reply.status}"


def _rejection(reply: Reply, batch: _Batch) -> str:
    ids = ", ".join(e.idempotence_id for e in batch.events[:3]) + (", ..." if len(batch.events) > 3 else "")
    detail = f": {reply.detail.strip()[:200]}" if reply.detail.strip() else ""
    return _compat.ODP_EVENT_FAILED.format(
        f"ODP rejected {len(batch.events)} event(s) with HTTP {reply.status}{detail}; "
        f"dropped idempotence_id {ids}")
