"""bulk.send_partition in a real local Spark job: executors POST to FakeOdpServer in this process (127.0.0.1).

What is checked is what the fake server received (its ``events``), against ids computed here with the
standard library from the data itself, never the summaries' own counters.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from typing import Any, Dict, List

import pytest

from optimizely_odp_ext.bulk import PartitionSender
from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import TEST_KEY
from tests.spark.conftest import LOG, MEASURED

pytestmark = pytest.mark.spark

N = 200_000
PARTITIONS = 8
JOB_SECONDS = 900.0  # a bound for a job on a loaded 2-core machine; normally 10-30 s


def frame(spark: Any) -> Any:
    """N distinct events in PARTITIONS partitions, as a warehouse table would give them: struct columns."""
    from pyspark.sql import functions as F

    return spark.range(0, N, numPartitions=PARTITIONS).select(
        F.lit("backfilled").alias("action"),
        F.struct(F.concat(F.lit("u"), F.col("id").cast("string")).alias("fs_user_id")).alias("identifiers"),
        F.struct(F.col("id").alias("n")).alias("data"))


def expected_ids(dataset: str) -> Dict[str, str]:
    """fs_user_id -> the documented idempotence_id, computed independently of the package."""
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "odp-bulk:" + dataset)
    return {f"u{i}": str(uuid.uuid5(namespace, json.dumps(
        {"action": "backfilled", "data": {"n": i}, "identifiers": {"fs_user_id": f"u{i}"}, "type": "fullstack"},
        sort_keys=True, separators=(",", ":")))) for i in range(N)}


def summaries(df: Any, sender: PartitionSender) -> List[Dict[str, Any]]:
    """Runs the job with mapPartitions: one summary per partition, with the attempt that returned it."""

    def send(rows: Any) -> List[Dict[str, Any]]:
        from pyspark import TaskContext

        summary = dict(sender(rows))
        summary["attempt"] = TaskContext.get().attemptNumber()
        return [summary]

    return df.rdd.mapPartitions(send).collect()  # type: ignore[no-any-return]


def received(server: FakeOdpServer) -> List[tuple]:  # type: ignore[type-arg]
    return [(e["identifiers"]["fs_user_id"], e["data"]["idempotence_id"], e["data"]["n"]) for e in server.events]


def test_a_dataframe_is_delivered_exactly_once_and_a_rerun_sends_the_same_ids(spark: Any,
                                                                              odp_server: FakeOdpServer) -> None:
    df = frame(spark)
    sender = PartitionSender(host=odp_server.url, api_key=TEST_KEY, dataset="spark-test")
    started = time.monotonic()
    done = summaries(df, sender)
    seconds = time.monotonic() - started
    got = received(odp_server)
    expected = expected_ids("spark-test")
    per_user = Counter(user for user, _, _ in got)
    assert len(got) == N
    assert set(per_user) == set(expected)
    assert max(per_user.values()) == 1
    assert all(expected[user] == event_id and user == f"u{n}" for user, event_id, n in got)
    assert len(done) == PARTITIONS
    assert sum(s["delivered"] for s in done) == N

    rates = [s["read"] / s["seconds"] for s in done]
    MEASURED.append(f"{N:,} events, {PARTITIONS} partitions, local[2]: {seconds:.1f} s for the job, "
                    f"{N / seconds:,.0f} events/s overall; per partition {min(rates):,.0f}-{max(rates):,.0f} "
                    f"events/s; peak RSS of an executor's Python worker "
                    f"{max(s['peak_rss_bytes'] for s in done) / 2**20:,.0f} MiB")

    # A re-run (foreachPartition, the other way to call it) sends exactly the same ids.
    first = sorted(event_id for _, event_id, _ in got)
    odp_server.reset()
    df.foreachPartition(sender)
    assert sorted(event_id for _, event_id, _ in received(odp_server)) == first


def test_an_outage_mid_job_ends_with_every_event_delivered(spark: Any, odp_server: FakeOdpServer) -> None:
    """ODP answers 503 for a few seconds mid-job; retry_window is shorter, so partitions raise
    PartitionNotDelivered and Spark retries them (spark.task.maxFailures=4) with the same ids."""
    df = frame(spark)
    sender = PartitionSender(host=odp_server.url, api_key=TEST_KEY, dataset="spark-outage", retry_window=1.5,
                             request_timeout=2.0)
    outcome: Dict[str, Any] = {}

    def job() -> None:
        try:
            outcome["summaries"] = summaries(df, sender)
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    runner = threading.Thread(target=job, name="spark-job", daemon=True)
    runner.start()
    assert odp_server.wait_for_events(N // 5, timeout=JOB_SECONDS), "the job never got going"
    odp_server.fail_for(4.0)
    runner.join(JOB_SECONDS)
    assert not runner.is_alive(), "the Spark job did not end"
    assert "error" not in outcome, outcome.get("error")

    got = received(odp_server)
    expected = expected_ids("spark-outage")
    per_user = Counter(user for user, _, _ in got)
    assert set(per_user) == set(expected)  # every id delivered at least once, none that was not in the data
    assert all(expected[user] == event_id and user == f"u{n}" for user, event_id, n in got)
    # The outage did happen mid-job and did make Spark retry partitions.
    statuses = [r.status for r in odp_server.requests]
    assert 503 in statuses
    assert statuses[-1] == 202
    attempts = [s["attempt"] for s in outcome["summaries"]]
    assert max(attempts) >= 1, attempts
    MEASURED.append(f"outage of 4 s mid-job: {sum(1 for a in attempts if a)} partition(s) succeeded on a retry, "
                    f"{len(got) - N:,} duplicate deliveries (same ids: ODP de-duplicates them)")

    # The key never reached Spark's log (the failed attempts' tracebacks are in it) nor its conf.
    log = LOG[0].read_text(errors="replace")
    assert "PartitionNotDelivered" in log
    assert TEST_KEY not in log
    assert not any(TEST_KEY in value for _, value in spark.sparkContext.getConf().getAll())
