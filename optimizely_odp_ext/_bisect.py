"""A batch refused with a 400, on the worker thread: bisect it to find the bad events, unless ODP
refuses everything alike (then sample a few single events and refuse the batch as a whole).
"""

from __future__ import annotations

from typing import Optional

from . import _compat
from ._batch import _Batch, _Family, _rejection
from ._outcomes import Outcomes
from .transport import Reply

# Bisecting a batch refused with a 400 finds its few bad events in O(bad x log n) requests. When ODP
# refuses everything alike (a revoked key answering 400, a changed schema), it would cost two requests
# and one error line per event. So: once every part at _SUSPECT_DEPTH (the 4 quarters) was refused and
# no part delivered, _SAMPLES single events spread over the batch are sent alone, the rest held; if
# every sample is refused too, the batch is refused as a whole ("rejected_systemic"), else bisecting
# goes on. While ODP keeps refusing alike, later batches go straight to the samples.
_SUSPECT_DEPTH = 2
_SAMPLES = 3


class Bisector(Outcomes):
    """Splitting, sampling, holding and releasing the parts of a refused batch (see ``_SAMPLES``)."""

    __slots__ = ()

    def _part_ended(self, batch: _Batch) -> Optional[_Family]:
        """A part of a refused batch got its answer (or gave up): it brings no verdict any more."""
        family = batch.family
        if family is not None:
            family.outstanding -= 1
        return family

    def _settle(self, family: _Family) -> None:
        """Held parts go on once a part was delivered, or once no part that could bring a verdict is
        left (a part expired, was too large, refused with 401/403, re-keyed): never held for nothing."""
        if family.held and not family.systemic and (family.settled or family.outstanding <= 0):
            family.settled = True
            self._release_held(family)

    def _split(self, batch: _Batch, family: Optional[_Family]) -> None:
        """Sends both halves of ``batch`` next, first half first."""
        if family is not None:
            family.outstanding += 2
        middle = len(batch.events) // 2
        first = _Batch(batch.events[:middle], batch.target, batch.first_attempt, family, batch.depth + 1)
        second = _Batch(batch.events[middle:], batch.target, batch.first_attempt, family, batch.depth + 1)
        for half in (first, second):
            self._ledger.own(half)
        self._ledger.priority.appendleft(second)
        self._ledger.priority.appendleft(first)

    def _on_refused(self, batch: _Batch, reply: Reply) -> None:
        """A 400: bisect to isolate the bad events, unless ODP refuses everything alike (see _SAMPLES)."""
        batch.refused = True
        family = batch.family
        if family is None:
            family = batch.family = _Family(len(batch.events), batch.depth)
            if self._ledger.refusing_alike == reply.status and len(batch.events) > _SAMPLES:
                self._sample(family, batch)
                return
        if family.systemic:
            self._drop(batch.events, "rejected_systemic", None)
            return
        if family.sampling and not family.settled:
            self._hold(family, batch)
            if batch.sample:
                family.samples_refused += 1
                if family.samples_refused >= _SAMPLES:
                    self._refused_systemically(family, reply)
            return
        depth = batch.depth - family.base_depth
        if not family.settled and depth == _SUSPECT_DEPTH and family.size > _SAMPLES * 2 ** _SUSPECT_DEPTH:
            # Nothing of the batch delivered yet: hold each refused quarter until all four are known;
            # when all four are refused, sample the last one.
            failures = family.failures[depth] = family.failures.get(depth, 0) + 1
            if failures < 2 ** _SUSPECT_DEPTH:
                self._hold(family, batch)
            else:
                self._sample(family, batch)
            return
        if len(batch.events) > 1:
            self._split(batch, family)
        else:
            self._drop(batch.events, "rejected", _rejection(reply, batch))

    def _sample(self, family: _Family, batch: _Batch) -> None:
        """Sends _SAMPLES single events of ``batch`` alone (spread over it); holds the rest."""
        family.sampling = True
        events = batch.events
        picks = sorted({round(i * (len(events) - 1) / (_SAMPLES - 1)) for i in range(_SAMPLES)})
        family.outstanding += len(picks)
        for index in reversed(picks):
            sample = _Batch([events[index]], batch.target, batch.first_attempt, family, batch.depth + 1)
            sample.sample = True
            self._ledger.own(sample)
            self._ledger.priority.appendleft(sample)
        rest = [e for i, e in enumerate(events) if i not in picks]
        if rest:
            self._hold(family, _Batch(rest, batch.target, batch.first_attempt, family, batch.depth + 1))

    def _hold(self, family: _Family, batch: _Batch) -> None:
        self._ledger.own(batch)  # still pending: flush() and close() wait for it
        family.held.append(batch)

    def _release_held(self, family: _Family) -> None:
        """The family is settled (see :meth:`_settle`). Held parts go on: bisected or sent."""
        held, family.held = family.held, []
        for batch in held:
            self._ledger.finish(batch)
            if not batch.refused:
                family.outstanding += 1
                self._ledger.own(batch)
                self._ledger.priority.append(batch)
            elif len(batch.events) > 1:
                self._split(batch, family)
            else:
                self._drop(batch.events, "rejected", _compat.ODP_EVENT_FAILED.format(
                    f"ODP rejected 1 event(s) with HTTP 400; dropped idempotence_id {batch.events[0].idempotence_id}"))

    def _refused_systemically(self, family: _Family, reply: Reply) -> None:
        family.systemic = True
        self._ledger.refusing_alike = reply.status
        held, family.held = family.held, []
        events = [e for batch in held for e in batch.events]
        for batch in held:
            self._ledger.finish(batch)
        detail = f": {reply.detail.strip()[:200]}" if reply.detail.strip() else ""
        self._drop(events, "rejected_systemic", _compat.ODP_EVENT_FAILED.format(
            f"ODP refused a batch of {family.size} event(s) and every part and sample of it alike with HTTP "
            f"{reply.status}{detail}; not splitting it further (a revoked key or a changed event schema?): "
            f"{len(events)} event(s) dropped as rejected_systemic"))
