"""Issue 3 over real HTTP: faults injected by FakeOdpServer, exact delivered / lost / duplicated ids.

Every event carries a unique idempotence_id, so the server's records say exactly which events
arrived and how often. Duplicates are expected to be zero in every test here: each fault
(5xx, 429, reset, hang, 400, 401, 413) happens before the server records any event of the
request, so a retried batch was never recorded the first time.
"""

from __future__ import annotations

import json
import math
import socket
import threading
from typing import Any, Callable, Dict, List, Optional, TypeVar

import pytest

from optimizely_odp_ext.testing import NO_RESPONSE, FakeOdpServer
from tests.conftest import TEST_KEY

from ._helpers import (
    FAULT_SECONDS,
    FLUSH_TIMEOUT,
    assert_delivered_exactly_once,
    delivered,
    ids,
    lines_with,
    no_drops,
    send,
)


def _ids_of(body: bytes) -> List[str]:
    return [e["data"]["idempotence_id"] for e in json.loads(body)]


def _key_not_logged(log: Any, key: str = TEST_KEY) -> None:
    leaked = [line for line in log[1].lines() if key in line]
    assert leaked == [], leaked


F = TypeVar("F", bound=Callable[..., Any])


def _slow_when_stretched(test: F) -> F:
    """Marks ``test`` slow when ODP_EXT_FAULT_SECONDS stretches the outage past a few seconds."""
    return pytest.mark.slow(test) if FAULT_SECONDS > 2 else test


@_slow_when_stretched
def test_window_of_503s_loses_nothing(odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    client = installed(odp_server)
    sent = ids("outage", 500)

    odp_server.fail_for(FAULT_SECONDS)
    send(client, sent)
    assert client.flush_odp_events(FAULT_SECONDS + FLUSH_TIMEOUT) is True

    assert_delivered_exactly_once(odp_server, sent)
    statuses = [r.status for r in odp_server.requests]
    assert statuses.count(503) >= 1
    assert set(statuses) == {503, 202}
    # Nothing was accepted during the window and nothing failed after it.
    failed = [r.received_at for r in odp_server.requests if r.status == 503]
    accepted = [r.received_at for r in odp_server.requests if r.status == 202]
    assert max(failed) <= min(accepted)
    stats = client.odp_event_stats()
    assert (stats["accepted"], stats["delivered"], stats["pending"], no_drops(stats)) == (500, 500, 0, {})
    assert stats["retries"] == statuses.count(503)
    warnings = [line for line in log[1].lines() if line.startswith("ODP event delivery failing (HTTP 503)")]
    assert 1 <= len(warnings) <= 1 + int(FAULT_SECONDS // 10), warnings  # rate-limited: one per 10 s
    assert len(lines_with(log[1].lines(), "ODP event delivery recovered after")) == 1
    assert log[1].errors() == []


def test_429_with_retry_after_is_honoured(odp_server: FakeOdpServer, installed: Callable[..., Any],
                                          log: Any) -> None:
    client = installed(odp_server)
    sent = ids("limited", 50)

    odp_server.rate_limit_next(3, "0.2")
    send(client, sent)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True

    assert_delivered_exactly_once(odp_server, sent)
    requests = odp_server.requests
    limited = [r for r in requests if r.status == 429]
    assert len(limited) == 3
    for reply in limited:
        # The same batch (same bytes: same events, same idempotence ids) came back no sooner
        # than Retry-After (0.2 s, a little clock slack allowed).
        retry = next(r for r in requests if r.received_at > reply.received_at and r.body == reply.body)
        assert retry.received_at - reply.received_at >= 0.15, retry.received_at - reply.received_at
    stats = client.odp_event_stats()
    assert (stats["delivered"], stats["retries"], no_drops(stats)) == (50, 3, {})
    assert log[1].errors() == []


def test_connection_reset_on_every_third_request(odp_server: FakeOdpServer, installed: Callable[..., Any],
                                                 log: Any) -> None:
    client = installed(odp_server, batch_size=10, max_batch_size=10)
    sent = ids("reset", 300)

    odp_server.reset_connection_every(3)
    send(client, sent)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True

    # A reset comes after the body is read but before anything is recorded, so a retried batch
    # was never accepted before: zero duplicates is exact, not hoped for.
    assert_delivered_exactly_once(odp_server, sent)
    requests = odp_server.requests
    resets = [r for r in requests if r.status == NO_RESPONSE]
    assert len(resets) == len(requests) // 3
    assert len(resets) >= 10
    # Each reset batch was sent again and accepted.
    accepted_bodies = {r.body for r in requests if r.status == 202}
    assert all(r.body in accepted_bodies for r in resets)
    stats = client.odp_event_stats()
    assert (stats["delivered"], stats["retries"], no_drops(stats)) == (300, len(resets), {})
    assert log[1].errors() == []


def test_hung_request_is_abandoned_and_retried_on_a_fresh_connection(
        odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server, request_timeout=0.5)
    sent = ids("hang", 20)

    odp_server.hang_next(1)
    send(client, sent)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True

    assert_delivered_exactly_once(odp_server, sent)
    hung, retry = odp_server.requests
    assert (hung.status, retry.status) == (NO_RESPONSE, 202)
    assert hung.body == retry.body
    assert retry.connection_id != hung.connection_id
    assert retry.received_at - hung.received_at >= 0.45  # abandoned at the request timeout, not before


def test_one_rejected_event_among_99_good_ones(odp_server: FakeOdpServer, installed: Callable[..., Any],
                                               log: Any) -> None:
    client = installed(odp_server, batch_size=100, flush_interval=60)
    good = ids("good", 99)
    sent = [*good[:49], "poison", *good[49:]]

    odp_server.reject_events(lambda e: e["data"].get("idempotence_id") == "poison")
    send(client, sent)  # 100 events: one full batch
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True

    assert_delivered_exactly_once(odp_server, sent, lost=["poison"])
    stats = client.odp_event_stats()
    assert (stats["delivered"], no_drops(stats)) == (99, {"rejected": 1})
    errors = log[1].errors()
    assert len(errors) == 1, errors
    assert errors[0].startswith("ODP event send failed (ODP rejected 1 event(s) with HTTP 400")
    assert errors[0].endswith("dropped idempotence_id poison).")
    _key_not_logged(log)
    # Bisection, not one request per event: at most 2 * ceil(log2(100)) + 1 requests.
    assert len(odp_server.requests) <= 2 * math.ceil(math.log2(100)) + 1


def test_413_splits_the_batch_and_drops_only_an_event_too_large_alone(installed: Callable[..., Any],
                                                                      log: Any) -> None:
    limit = 2_000
    with FakeOdpServer(TEST_KEY, max_body_bytes=limit) as server:
        client = installed(server, batch_size=100, flush_interval=60)
        good = ids("big", 99)
        sent = [*good[:30], "huge", *good[30:]]
        send(client, sent[:30])
        send(client, ["huge"], blob="x" * limit)
        send(client, sent[31:])
        assert client.flush_odp_events(FLUSH_TIMEOUT) is True

        assert_delivered_exactly_once(server, sent, lost=["huge"])
        requests = server.requests
        assert [r for r in requests if r.status == 413]
        assert all(len(r.body) <= limit for r in requests if r.status == 202)
        stats = client.odp_event_stats()
        assert (stats["delivered"], no_drops(stats)) == (99, {"too_large": 1})
        errors = log[1].errors()
        assert len(errors) == 1, errors
        assert errors[0].startswith("ODP event send failed (ODP rejected 1 event(s) with HTTP 413")
        assert "huge" in errors[0]
        _key_not_logged(log)


def _refusal(host: str) -> str:
    return (f'ODP host "{host}" uses plain http; refusing to send the API key unencrypted '
            f"(use https, or pass allow_insecure_http=True to install()).")


def test_plain_http_to_a_remote_host_is_refused(installed: Callable[..., Any], log: Any) -> None:
    host = "http://odp.example.com"
    client = installed(host=host)
    assert log[1].errors() == [_refusal(host)]  # once, when the datafile is applied

    send(client, ids("insecure", 2))
    assert client.flush_odp_events(1) is True
    # Each discarded send gets the same one line, like the SDK's "ODP is not integrated.".
    assert log[1].errors() == [_refusal(host)] * 3
    stats = client.odp_event_stats()
    assert (stats["state"], stats["accepted"], stats["requests"]) == ("refused", 0, 0)
    _key_not_logged(log)


def _non_loopback_ipv4() -> Optional[str]:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # UDP: picks a route, sends nothing
        address = str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.mark.parametrize("allow", [False, True])
def test_plain_http_to_a_reachable_remote_address(installed: Callable[..., Any], log: Any, allow: bool) -> None:
    # The same refusal, observable: the server is really there, on a non-loopback address.
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    with FakeOdpServer(TEST_KEY, host=address) as server:
        options: Dict[str, Any] = {"allow_insecure_http": True} if allow else {}
        client = installed(server, **options)
        send(client, ids("remote", 3))
        assert client.flush_odp_events(FLUSH_TIMEOUT) is True
        client.close()
        if allow:
            assert_delivered_exactly_once(server, ids("remote", 3))
            assert log[1].errors() == []
        else:
            assert server.requests == []
            assert log[1].errors() == [_refusal(server.url)] * 4


def test_401_wrong_key_is_dropped_as_rejected_without_retry(odp_server: FakeOdpServer,
                                                            installed: Callable[..., Any], log: Any) -> None:
    wrong_key = "wrong-odp-key-9876543210"
    client = installed(odp_server, key=wrong_key, flush_interval=60)
    sent = ids("unauthorized", 5)

    send(client, sent)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True

    assert_delivered_exactly_once(odp_server, sent, lost=sent)
    assert [r.status for r in odp_server.requests] == [401]  # one batch, never retried
    assert odp_server.requests[0].headers["x-api-key"] == wrong_key
    stats = client.odp_event_stats()
    assert (stats["delivered"], stats["retries"], no_drops(stats)) == (0, 0, {"rejected": 5})
    errors = log[1].errors()
    assert len(errors) == 1, errors
    assert errors[0].startswith("ODP event send failed (ODP rejected 5 event(s) with HTTP 401")
    _key_not_logged(log, wrong_key)


@_slow_when_stretched
@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
def test_an_outage_buffers_up_to_the_queue_capacity(odp_server: FakeOdpServer, installed: Callable[..., Any],
                                                    log: Any, overflow: str) -> None:
    capacity = 100
    # Requests of 10 and 4 in flight, pinned: the bound below is the queue plus what is on the wire.
    client = installed(odp_server, queue_capacity=capacity, overflow=overflow, batch_size=10, max_batch_size=10,
                       max_in_flight=4, flush_interval=60)
    sent = ids("buffered", 300)

    odp_server.fail_for(FAULT_SECONDS)
    send(client, sent)
    assert client.flush_odp_events(FAULT_SECONDS + FLUSH_TIMEOUT) is True

    stats = client.odp_event_stats()
    dropped = stats["dropped"]["queue_full"]
    arrived = delivered(odp_server)
    outcome = assert_delivered_exactly_once(odp_server, sent, lost=[i for i in sent if i not in arrived])
    assert (stats["accepted"], stats["pending"]) == (300, 0)
    assert (stats["delivered"], no_drops(stats)) == (len(outcome.delivered), {"queue_full": len(outcome.lost)})
    # Memory stays bounded: at most the queue plus the batches already in flight (4 x 10) survive.
    assert capacity <= stats["delivered"] <= capacity + 4 * 10
    assert dropped == 300 - stats["delivered"]
    if overflow == "drop_newest":
        assert set(sent[:capacity]) <= outcome.delivered  # the oldest are kept
    else:
        assert set(sent[-capacity + 10:]) <= outcome.delivered  # the newest are kept
    word = "new" if overflow == "drop_newest" else "oldest"
    full = [line for line in log[1].lines() if line.startswith(f"ODP event queue is full ({capacity} events)")]
    assert full == [f"ODP event queue is full ({capacity} events); dropped 1 {word} event(s) since the last warning."]


@_slow_when_stretched
def test_an_expired_retry_window_is_counted_per_event(odp_server: FakeOdpServer, installed: Callable[..., Any],
                                                      log: Any) -> None:
    client = installed(odp_server, retry_window=0.3, batch_size=50)
    sent = ids("expiring", 1000)

    odp_server.fail_for(FAULT_SECONDS)
    send(client, sent)
    assert client.flush_odp_events(FAULT_SECONDS + FLUSH_TIMEOUT) is True

    arrived = delivered(odp_server)
    outcome = assert_delivered_exactly_once(odp_server, sent, lost=[i for i in sent if i not in arrived])
    stats = client.odp_event_stats()
    assert (stats["accepted"], stats["pending"]) == (1000, 0)
    assert stats["delivered"] == len(outcome.delivered)
    assert no_drops(stats) == {"retry_expired": len(outcome.lost)}
    assert len(outcome.lost) >= 50  # the first batch cannot outlive a 0.3 s window in the outage
    # Each batch given up is one error line naming its size; together they name every lost event.
    gave_up = [line for line in log[1].errors() if line.startswith("ODP event send failed (gave up on ")]
    assert gave_up == log[1].errors()
    assert sum(int(line.split("gave up on ")[1].split(" ")[0]) for line in gave_up) == len(outcome.lost)


def test_four_threads_of_2500_events_each_arrive_exactly_once(
        odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server)
    per_thread = [ids(f"thread{t}", 2500) for t in range(4)]
    start = threading.Barrier(4)

    def sender(event_ids: List[str]) -> None:
        start.wait(10)
        send(client, event_ids)

    threads = [threading.Thread(target=sender, args=(event_ids,), name=f"test-sender-{n}")
               for n, event_ids in enumerate(per_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True

    assert_delivered_exactly_once(odp_server, [i for event_ids in per_thread for i in event_ids])
    stats = client.odp_event_stats()
    assert (stats["accepted"], stats["delivered"], no_drops(stats)) == (10_000, 10_000, {})
