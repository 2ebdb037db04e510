"""The counters' vocabulary: what ``odp_event_stats()`` returns, every drop and refusal reason, the states.

Every outcome is counted through :class:`~optimizely_odp_ext._outcomes.Outcomes`; this module only
names them, so the extension, the command line and the manager's pieces share one spelling.
"""

from __future__ import annotations

from typing import Dict

from typing_extensions import TypedDict

UNDETERMINED = "undetermined"
INTEGRATED = "integrated"
NOT_INTEGRATED = "not_integrated"
REFUSED = "refused"

# "unconfirmed": a request was in flight when the close deadline passed; ODP may have accepted it.
# "rejected_systemic": ODP refused every part of a batch alike (a revoked key, a changed schema), so
# the batch was not split down to single events.
# "unencodable": the event could not be encoded as JSON on the worker.
DROP_REASONS = ("rejected", "rejected_systemic", "too_large", "queue_full", "retry_expired", "shutdown",
                "unconfirmed", "not_integrated", "unencodable")
# Why a call was refused before its event was queued (never accepted).
REFUSE_REASONS = ("invalid_input", "closed", "odp_disabled", "odp_not_integrated", "host_refused",
                  "invalid_client")


class OdpEventStats(TypedDict):
    """What ``client.odp_event_stats()`` returns: counts since the client's first event, in this process.

    ``accepted == delivered + sum(dropped.values()) + pending + left_in_spool`` always holds: the
    counts are read under the lock the worker moves events under, and ``pending`` is counted from
    what holds the events (the queue, encoded events waiting for a batch, batches in flight,
    retrying or held by a bisection), never inferred. ``pending`` is 0 once ``flush_odp_events()``
    returns True or ``close()`` returns. Calls refused before queueing are never accepted: see
    ``refused``. ``on_outcome`` is called once for every accepted event, with the name counted here
    (``delivered``, a ``dropped`` reason, or ``left_in_spool``).

    Attributes:
        accepted: Events queued (including ``recovered`` ones, read from the spool).
        delivered: Events ODP accepted (2xx).
        dropped: Accepted events given up, by reason: ``rejected`` (ODP refused them: a 4xx after
            isolating the event), ``rejected_systemic`` (ODP refused every part and every sampled
            single event of a batch alike: a revoked key or a changed schema), ``too_large`` (one
            event over ``max_batch_bytes``), ``queue_full`` (the queue or the spool was full),
            ``retry_expired`` (still failing at the end of ``retry_window``), ``shutdown`` (not
            sent by the close deadline), ``unconfirmed`` (in flight at the close deadline: ODP may
            have it), ``not_integrated`` (held for a datafile that turned out to have no ODP
            integration), ``unencodable`` (could not be encoded as JSON).
        pending: Accepted events without an outcome yet.
        recovered: Events left in the spool by an earlier process and read by this one.
        left_in_spool: Events written to the spool but not delivered at close: the next process
            with the same ``spool_dir`` delivers them.
        refused: Calls refused before queueing, by reason: ``invalid_input`` (failed validation),
            ``closed`` (sent after ``close()``), ``odp_disabled`` (``odp_disabled`` is set),
            ``odp_not_integrated`` (the datafile has no ODP integration), ``host_refused`` (the ODP
            host may not receive the key: not a valid URL, or plain http), ``invalid_client`` (the
            Optimizely client is not valid, e.g. its datafile did not parse).
        requests: HTTP requests made.
        retries: Requests that were retries.
        queued: Events waiting in the caller-side queue right now.
        state: ``"undetermined"`` (no datafile yet), ``"integrated"``, ``"not_integrated"`` or
            ``"refused"`` (the host may not receive the key).
    """

    accepted: int
    delivered: int
    dropped: Dict[str, int]
    pending: int
    recovered: int
    left_in_spool: int
    refused: Dict[str, int]
    requests: int
    retries: int
    queued: int
    state: str


def no_stats() -> OdpEventStats:
    """The stats of a client that has no manager yet (nothing sent, nothing refused)."""
    return OdpEventStats(accepted=0, delivered=0, dropped=dict.fromkeys(DROP_REASONS, 0), pending=0, recovered=0,
                         left_in_spool=0, refused=dict.fromkeys(REFUSE_REASONS, 0), requests=0,
                         retries=0, queued=0, state=UNDETERMINED)
