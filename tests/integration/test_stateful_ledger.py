"""Randomized stateful test of the ledger: every accepted event ends in exactly one outcome.

A hypothesis ``RuleBasedStateMachine`` drives one client against a :class:`FakeOdpServer` over real
HTTP: sends from several threads at once (left running while later steps fault the server or close
the client), a server cycling through 503s, 429s with ``Retry-After``, connection resets, hangs shorter
than the request timeout, latency (some of it longer than the request timeout), per-event 400s (poison
events) and a body-size limit (413), with the spool on or off, ``overflow`` dropping or blocking, and an
``on_outcome`` callback that is sometimes slow at close, raises, or calls back into the client.

Checked after every step: ``accepted == delivered + dropped + pending + left_in_spool`` from
``odp_event_stats()``. Checked at the end, against independent records (the ids the server accepted,
the ids the test sent, the outcome per id reported to ``on_outcome``):

- every accepted event is reported to ``on_outcome`` exactly once, and the reports per outcome equal the
  stats' counters; every event whose send returned before ``close()`` was accepted;
- the server holds no id that was never sent; a good event reported delivered is on the server; a good
  event is never dropped as ``rejected`` (only poison is); a poison event is never delivered; an id
  reaches the server twice only if some request took longer than the request timeout;
- once the faults clear, ``flush_odp_events`` returns True within ``retry_window`` plus one request's
  timeouts (plus a margin for a loaded machine); a close after such a flush drops nothing;
- events left in the spool at close are delivered by the next client on the same ``spool_dir``.

Randomness is real: the seed is drawn per run and printed (``ODP_EXT_STATEFUL_SEED=<n>`` replays the
schedules; thread timing is not replayed). ``ODP_EXT_STATEFUL_EXAMPLES`` sets how many schedules one run
tries (a few by default; ``benchmarks/soak.py`` runs thousands).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import random
import shutil
import tempfile
import threading
import uuid
from typing import Any, Callable, Counter, Dict, List, Optional, Set

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from optimizely_odp_ext.testing import FakeOdpServer, make_client
from tests.conftest import TEST_KEY

EXAMPLES = int(os.environ.get("ODP_EXT_STATEFUL_EXAMPLES", "4"))
STEPS = int(os.environ.get("ODP_EXT_STATEFUL_STEPS", "12"))
SEED = int(os.environ.get("ODP_EXT_STATEFUL_SEED") or random.SystemRandom().getrandbits(32))
SHRINK = os.environ.get("ODP_EXT_STATEFUL_SHRINK", "1") == "1"
# The soak command counts schedules through this file: one line per finished schedule.
COUNT_FILE = os.environ.get("ODP_EXT_STATEFUL_COUNT_FILE")
# ... and reads each failed check here (hypothesis may report a timing-dependent failure only as flaky).
FAILURE_FILE = os.environ.get("ODP_EXT_STATEFUL_FAILURE_FILE")

REQUEST_TIMEOUT = 0.5
CONNECT_TIMEOUT = 0.5
SLOW = 0.8  # a latency longer than REQUEST_TIMEOUT: the client gives up, the server accepts later
# What a loaded 2-core machine may add to the documented flush bound (scheduling, not waiting on ODP).
MARGIN = 3.0
SEND_JOIN = 60.0  # bound on a sending thread (overflow="block" waits block_timeout per event at most)
POISON = "poison-"
GOOD_ONLY_NEVER = {"rejected", "too_large", "not_integrated", "unencodable"}
CLOSE_ONLY = {"shutdown", "unconfirmed"}


def _is_poison(event_id: str) -> bool:
    return event_id.startswith(POISON)


class LedgerMachine(RuleBasedStateMachine):
    """One client, one fake server, random sends, faults and a close (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.server: Optional[FakeOdpServer] = None
        self.client: Any = None
        self.spool_dir: Optional[str] = None
        self.options: Dict[str, Any] = {}
        self.callback_mode = "plain"
        self.lock = threading.Lock()
        self.outcomes: Dict[str, List[str]] = collections.defaultdict(list)  # id -> outcomes reported
        self.reports: Counter[str] = collections.Counter()  # outcome -> events reported
        self.sent: List[str] = []  # ids given to send_odp_event (accepted or not)
        self.returned: Set[str] = set()  # ids whose send_odp_event call has returned
        self.before_close: Set[str] = set()  # ids whose send returned before close() was called
        self.senders: List[threading.Thread] = []
        self.next_id = 0
        self.closing = threading.Event()
        self.slow_close_done = False
        self.reentered = False
        self.closed_by_rule = False
        self.slow_used = False  # some request outlived the request timeout: duplicates are allowed
        self.recovered: Set[str] = set()  # ids the next client delivered from the spool
        self.poison_sent = False
        self.log_lines: List[str] = []
        self.logger = logging.getLogger(f"tests.stateful.{uuid.uuid4().hex}")
        self.logger.propagate = False
        self.logger.setLevel(logging.WARNING)
        self.logger.addHandler(_ListHandler(self.log_lines))

    # ------------------------------------------------------------------ set-up

    @initialize(
        spool=st.booleans(),
        overflow=st.sampled_from(["drop_newest", "drop_oldest", "block"]),
        capacity=st.sampled_from([20, 10_000]),
        batch_size=st.sampled_from([1, 7, 50]),
        max_in_flight=st.sampled_from([1, 4]),
        retry_window=st.sampled_from([1.5, 3.0]),
        close_timeout=st.sampled_from([0.3, 3.0]),
        max_body_bytes=st.sampled_from([None, 3000]),
        callback=st.sampled_from(["plain", "plain", "slow_at_close", "raises", "reentrant"]),
    )
    def start(self, *, spool: bool, overflow: str, capacity: int, batch_size: int, max_in_flight: int,
              retry_window: float, close_timeout: float, max_body_bytes: Optional[int], callback: str) -> None:
        self.server = FakeOdpServer(TEST_KEY, max_body_bytes=max_body_bytes).start()
        self.server.reject_events(lambda event: str(event["data"].get("idempotence_id", "")).startswith(POISON))
        if spool:
            self.spool_dir = tempfile.mkdtemp(prefix="odp-stateful-")
        self.callback_mode = callback
        self.options = {
            "request_timeout": REQUEST_TIMEOUT, "connect_timeout": CONNECT_TIMEOUT, "backoff_base": 0.02,
            "backoff_max": 0.2, "retry_after_max": 0.5, "flush_interval": 0.02, "retry_window": retry_window,
            "close_timeout": close_timeout, "batch_size": batch_size, "max_in_flight": max_in_flight,
            "queue_capacity": capacity, "overflow": overflow, "block_timeout": 0.3, "spool_dir": self.spool_dir,
            "flush_at_exit": False, "logger": self.logger,
        }
        self.client = make_client(self.server, on_outcome=self._on_outcome, **self.options)

    def _on_outcome(self, outcome: str, events: List[Dict[str, Any]], detail: str) -> None:
        with self.lock:
            for event in events:
                self.outcomes[str(event["idempotence_id"])].append(outcome)
            self.reports[outcome] += len(events)
        if self.callback_mode == "slow_at_close" and self.closing.is_set() and not self.slow_close_done:
            self.slow_close_done = True
            threading.Event().wait(1.5)  # longer than close_timeout plus close's own margin
        elif self.callback_mode == "raises":
            raise RuntimeError("on_outcome failed (on purpose)")
        elif self.callback_mode == "reentrant":
            self.client.odp_event_stats()
            if not self.reentered:
                self.reentered = True
                self.client.flush_odp_events()  # on the worker: must not wait on itself

    # ------------------------------------------------------------------ sends

    def _ids(self, count: int, poison: bool) -> List[str]:
        with self.lock:
            first, self.next_id = self.next_id, self.next_id + count
        return [f"{POISON if poison else 'good-'}{n}" for n in range(first, first + count)]

    def _send_all(self, event_ids: List[str]) -> None:
        for event_id in event_ids:
            self.client.send_odp_event("stateful", {"fs_user_id": f"user-{event_id}"},
                                       data={"idempotence_id": event_id})
            with self.lock:
                self.returned.add(event_id)

    @rule(threads=st.integers(1, 3), count=st.integers(1, 30), wait=st.booleans())
    def send(self, threads: int, count: int, wait: bool) -> None:
        """``threads`` threads send ``count`` events each at once; left running unless ``wait``."""
        batches = [self._ids(count, poison=False) for _ in range(threads)]
        started = []
        for event_ids in batches:
            with self.lock:
                self.sent.extend(event_ids)
            thread = threading.Thread(target=self._send_all, args=(event_ids,), name="stateful-sender", daemon=True)
            thread.start()
            started.append(thread)
        self.senders.extend(started)
        if wait:
            self._join(started)

    @rule(count=st.integers(1, 60))
    def send_from_here(self, count: int) -> None:
        """A burst from the test's own thread (sends are the commonest step)."""
        event_ids = self._ids(count, poison=False)
        with self.lock:
            self.sent.extend(event_ids)
        self._send_all(event_ids)

    @rule()
    def send_poison(self) -> None:
        """One event the server refuses (a per-event 400), among whatever else is queued."""
        event_ids = self._ids(1, poison=True)
        self.poison_sent = True
        with self.lock:
            self.sent.extend(event_ids)
        self._send_all(event_ids)

    def _join(self, threads: List[threading.Thread]) -> None:
        for thread in threads:
            thread.join(SEND_JOIN)
            assert not thread.is_alive(), "a send_odp_event call did not return"

    # ------------------------------------------------------------------ faults

    @rule(count=st.integers(1, 3))
    def fail_503(self, count: int) -> None:
        assert self.server is not None
        self.server.fail_next(count, 503)

    @rule(seconds=st.sampled_from([0.2, 0.5, 1.0]))
    def outage(self, seconds: float) -> None:
        assert self.server is not None
        self.server.fail_for(seconds, 503)

    @rule(count=st.integers(1, 3), retry_after=st.sampled_from(["0", "0.1", "0.3"]))
    def rate_limit(self, count: int, retry_after: str) -> None:
        assert self.server is not None
        self.server.rate_limit_next(count, retry_after)

    @rule(every=st.one_of(st.none(), st.integers(2, 5)))
    def resets(self, every: Optional[int]) -> None:
        assert self.server is not None
        self.server.reset_connection_every(every)

    @rule(count=st.integers(1, 2))
    def hang(self, count: int) -> None:
        assert self.server is not None
        self.server.hang_next(count, REQUEST_TIMEOUT * 0.6)

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.1, SLOW]))
    def latency(self, seconds: float) -> None:
        assert self.server is not None
        self.slow_used = self.slow_used or seconds >= REQUEST_TIMEOUT
        self.server.set_latency(seconds)

    # ------------------------------------------------------------------ flush and close

    def _heal(self) -> None:
        """Clears the faults that last (queued fail_next/hang_next run out by themselves)."""
        assert self.server is not None
        self.server.fail_for(0)
        self.server.reset_connection_every(None)
        self.server.set_latency(0)

    def _flush_bound(self) -> float:
        options = self.options
        # retry_window + one request's timeouts, as documented; plus the longest backoff and
        # Retry-After a retry may wait; plus a margin for a loaded machine.
        return (options["retry_window"] + options["connect_timeout"] + options["request_timeout"]
                + options["backoff_max"] + options["retry_after_max"] + MARGIN)

    def _recorded(self, check: Callable[[], None]) -> None:
        """Runs ``check``; a failure is also written to FAILURE_FILE with the options, for the soak."""
        try:
            check()
        except AssertionError as exc:
            if FAILURE_FILE:
                with open(FAILURE_FILE, "a") as failures:
                    failures.write(f"seed {SEED} options {_shown(self.options)} callback {self.callback_mode}: "
                                   f"{str(exc).splitlines()[0]}\n")
            raise

    @rule()
    def heal_and_flush(self) -> None:
        """Once the faults clear, a flush succeeds within the bound (unless the client is closed)."""
        self._recorded(self._heal_and_flush)

    def _heal_and_flush(self) -> None:
        self._heal()
        if self.closed_by_rule:
            return
        bound = self._flush_bound()
        assert self.client.flush_odp_events(bound) is True, (
            f"flush_odp_events({bound:.1f}) returned False after the faults cleared: "
            f"{self.client.odp_event_stats()}; log: {self.log_lines[-5:]}")

    @rule(timeout=st.sampled_from([0.0, 0.1]))
    def flush_briefly(self, timeout: float) -> None:
        self.client.flush_odp_events(timeout)  # may be False while faults last; only must not break counts

    @precondition(lambda self: len(self.sent) > 0)
    @rule()
    def close(self) -> None:
        """Closes the client at a random moment: senders may be running, faults active."""
        if self.closed_by_rule:
            return
        with self.lock:
            self.before_close = set(self.returned)
        self.closed_by_rule = True
        self.closing.set()
        self.client.close()

    # ------------------------------------------------------------------ checks

    @invariant()
    def counts_add_up(self) -> None:
        if self.client is not None:
            self._recorded(lambda: _check_invariant(self.client.odp_event_stats()))

    def teardown(self) -> None:
        try:
            if self.client is not None:
                self._recorded(self._finish_and_check)
        finally:
            self._cleanup()
            if COUNT_FILE:
                with open(COUNT_FILE, "a") as counts:
                    counts.write(f"{SEED}\n")

    def _finish_and_check(self) -> None:
        assert self.server is not None
        self._join(self.senders)
        quiet_close = False
        if not self.closed_by_rule:
            self._heal()
            bound = self._flush_bound()
            assert self.client.flush_odp_events(bound) is True, (
                f"flush_odp_events({bound:.1f}) returned False after the faults cleared: "
                f"{self.client.odp_event_stats()}; log: {self.log_lines[-5:]}")
            before = self.client.odp_event_stats()
            with self.lock:
                self.before_close = set(self.returned)
            self.closing.set()
            self.client.close()
            quiet_close = True
        stats = self.client.odp_event_stats()
        _check_invariant(stats)
        assert stats["pending"] == 0, stats
        # A worker still inside a slow on_outcome when close() gave up waiting may report after close()
        # returned: the reports are compared once the plugin's threads are gone.
        for thread in threading.enumerate():
            if thread.name.startswith("odp-ext-"):
                thread.join(SEND_JOIN)
        after = self.client.odp_event_stats()
        assert _shown_counts(after) == _shown_counts(stats), (
            f"the counts changed after close() returned: {_shown_counts(stats)} -> {_shown_counts(after)}")
        if quiet_close:
            # Everything had an outcome before close(): the close itself drops nothing.
            assert (stats["delivered"], stats["dropped"], stats["left_in_spool"]) == \
                (before["delivered"], before["dropped"], before["left_in_spool"]), (before, stats)

        with self.lock:
            reports = collections.Counter(self.reports)
            reported = {event_id: list(outcomes) for event_id, outcomes in self.outcomes.items()}
        # The reports per outcome are the stats' counters. Events left in the spool at close are this
        # process's to report or not (as "left_in_spool"); the next process reports their outcome.
        expected = _outcome_counts(stats)
        if reports["left_in_spool"]:
            expected["left_in_spool"] = stats["left_in_spool"]
        assert _nonzero(reports) == _nonzero(expected), (reports, stats)
        assert sum(reports.values()) == sum(expected.values()), (reports, stats)

        totals = _outcome_counts(stats)
        if stats["left_in_spool"]:
            totals = self._recover(stats["left_in_spool"], reported, totals)
        self._check_ids(reported, totals, stats)

    def _recover(self, left: int, reported: Dict[str, List[str]], totals: Counter[str]) -> Counter[str]:
        """The next client on the same spool_dir delivers what the first one left there."""
        assert self.server is not None
        self._heal()
        recovered_outcomes: Dict[str, List[str]] = collections.defaultdict(list)

        def on_outcome(outcome: str, events: List[Dict[str, Any]], detail: str) -> None:
            with self.lock:
                for event in events:
                    recovered_outcomes[str(event["idempotence_id"])].append(outcome)

        options = {**self.options, "close_timeout": 5.0}
        client = make_client(self.server, on_outcome=on_outcome, **options)
        try:
            bound = self._flush_bound()
            # Recovery starts at install: flush waits for it (a send is not needed to start it).
            assert client.flush_odp_events(bound) is True, client.odp_event_stats()
        finally:
            client.close()
        stats = client.odp_event_stats()
        assert (stats["recovered"], stats["accepted"]) == (left, left), stats
        _check_invariant(stats)
        assert stats["left_in_spool"] == stats["pending"] == 0, stats
        with self.lock:
            for event_id, outcomes in recovered_outcomes.items():
                reported.setdefault(event_id, []).extend(outcomes)
            self.recovered = set(recovered_outcomes)
        return totals + _outcome_counts(stats)

    def _check_ids(self, reported: Dict[str, List[str]], totals: Counter[str], stats: Dict[str, Any]) -> None:
        assert self.server is not None
        sent = set(self.sent)
        on_server = collections.Counter(str(e["data"].get("idempotence_id")) for e in self.server.events)

        reported = {event_id: [outcome for outcome in outcomes if outcome != "left_in_spool"]
                    for event_id, outcomes in reported.items()}
        twice = {event_id: outcomes for event_id, outcomes in reported.items() if len(outcomes) != 1}
        assert not twice, f"events not reported exactly once to on_outcome: {dict(list(twice.items())[:10])}"
        assert set(reported) <= sent, f"outcomes for ids never sent: {sorted(set(reported) - sent)[:10]}"
        never = self.before_close - set(reported)
        assert not never, (f"{len(never)} event(s) sent before close() have no outcome (first: "
                           f"{sorted(never)[:10]}); stats {stats}")
        assert sum(totals.values()) == len(reported), (totals, len(reported))

        unexpected = set(on_server) - sent
        assert not unexpected, f"the server holds ids never sent: {sorted(unexpected)[:10]}"
        if not self.slow_used:
            # In flight at the close deadline ("unconfirmed", or left in the spool and sent again by the
            # next client): ODP may have them already, as after a timed-out request.
            abandoned = self.recovered | {event_id for event_id, (outcome, *_) in reported.items()
                                          if outcome == "unconfirmed"}
            duplicates = {event_id: n for event_id, n in on_server.items() if n > 1 and event_id not in abandoned}
            assert not duplicates, f"duplicates without a timed-out request: {dict(list(duplicates.items())[:10])}"
        for event_id, (outcome,) in reported.items():
            if _is_poison(event_id):
                assert outcome != "delivered", f"poison event {event_id} reported delivered"
                assert event_id not in on_server, f"the server accepted poison event {event_id}"
                continue
            assert outcome not in GOOD_ONLY_NEVER, f"good event {event_id} dropped as {outcome}"
            if outcome == "rejected_systemic":
                assert self.poison_sent, f"good event {event_id} dropped as rejected_systemic with no poison sent"
            if outcome in CLOSE_ONLY:
                assert self.closed_by_rule, f"good event {event_id} dropped as {outcome} by a close after a flush"
            if outcome == "delivered":
                assert event_id in on_server, f"{event_id} reported delivered, but the server never accepted it"
            elif event_id in on_server and not self.slow_used:
                assert outcome == "unconfirmed", f"{event_id} is on the server but was reported {outcome}"

    def _cleanup(self) -> None:
        self.closing.set()
        try:
            if self.client is not None:
                self.client.close()
            for thread in self.senders:
                thread.join(SEND_JOIN)
        finally:
            if self.server is not None:
                self.server.stop()
            if self.spool_dir is not None:
                shutil.rmtree(self.spool_dir, ignore_errors=True)
            for handler in list(self.logger.handlers):
                self.logger.removeHandler(handler)


class _ListHandler(logging.Handler):
    def __init__(self, lines: List[str]) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _shown(options: Dict[str, Any]) -> Dict[str, Any]:
    return {name: value for name, value in options.items() if name not in ("logger", "spool_dir")}


def _shown_counts(stats: Dict[str, Any]) -> str:
    return (f"accepted={stats['accepted']} delivered={stats['delivered']} dropped={_nonzero(stats['dropped'])} "
            f"pending={stats['pending']} left_in_spool={stats['left_in_spool']}")


def _outcome_counts(stats: Dict[str, Any]) -> Counter[str]:
    counts: Counter[str] = collections.Counter(stats["dropped"])
    counts["delivered"] = stats["delivered"]
    return counts


def _nonzero(counts: Dict[str, int]) -> Dict[str, int]:
    return {outcome: n for outcome, n in counts.items() if n}


def _check_invariant(stats: Dict[str, Any]) -> None:
    dropped = _nonzero(stats["dropped"])
    counts = _shown_counts(stats)
    assert stats["pending"] >= 0, f"negative pending: {counts}"
    total = stats["delivered"] + sum(dropped.values()) + stats["pending"] + stats["left_in_spool"]
    assert stats["accepted"] == total, f"accepted != delivered + dropped + pending + left_in_spool: {counts}"


@pytest.mark.slow
# On today's code about 1 schedule in 70 fails (issue 17's defects 1-4, 6 and a flush racing the first
# send; see benchmarks/soak.py), so a short run fails now and then: not strict, and not under the soak,
# which counts every failure. Drop this mark when the ledger fix merges.
def test_every_accepted_event_has_exactly_one_outcome_under_random_schedules() -> None:
    # Printed with the failure (pytest shows captured output), so the schedules can be replayed.
    print(f"stateful ledger test: ODP_EXT_STATEFUL_SEED={SEED} ODP_EXT_STATEFUL_EXAMPLES={EXAMPLES}")
    factory = hypothesis_seed(SEED)(functools.partial(LedgerMachine))
    phases = [Phase.generate, Phase.shrink] if SHRINK else [Phase.generate]
    run_state_machine_as_test(factory, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None, phases=phases,
        suppress_health_check=list(HealthCheck), print_blob=True))

