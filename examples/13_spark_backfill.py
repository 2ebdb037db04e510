"""Spark backfill: a DataFrame of past orders sent to ODP, one partition per task, safe to re-run."""

# Run it: pip install "optimizely-odp-ext[spark]" && python examples/13_spark_backfill.py   (needs Java 17+)
# Expected output (a local Spark job against the embedded fake ODP server):
#   partitions: 4, read 10001, delivered 10000, invalid 1, dropped {}
#   ODP received 10000 events, 10000 distinct ids
#   re-run: ODP received the same 10000 ids again (ODP keeps one of each)

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List

from optimizely_odp_ext.bulk import PartitionSender
from optimizely_odp_ext.testing import FakeOdpServer, odp_datafile

ORDERS = 10_000


def main() -> int:
    # Spark on this machine only: nothing bound outside loopback, no UI, executors on this Python.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    # local[2,4]: two threads, a failed task tried up to 4 times (plain local[2] never retries).
    spark = (SparkSession.builder.master("local[2,4]").appName("odp-backfill")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    with FakeOdpServer("backfill-demo-key") as odp_server:
        # In production: the datafile your application uses (read on the driver, e.g. from the CDN).
        # The key travels inside the pickled sender only: never put it in Spark's conf.
        datafile = odp_datafile(odp_server.url, odp_server.api_key)
        sender = PartitionSender.from_datafile(datafile, dataset="orders-2026")

        # One row per past order. The order id in `data` keeps two identical-looking purchases apart:
        # without it, two equal rows would get the same id and ODP would keep one.
        # The last row has an empty action: counted and logged as invalid, not raised.
        rows = spark.range(0, ORDERS + 1, numPartitions=4).select(
            F.when(F.col("id") < ORDERS, F.lit("purchased")).otherwise(F.lit("")).alias("action"),
            F.struct(F.concat(F.lit("customer-"), (F.col("id") % 997).cast("string")).alias("fs_user_id"))
            .alias("identifiers"),
            F.struct(F.concat(F.lit("order-"), F.col("id").cast("string")).alias("order_id"),
                     (F.col("id") % 50 + 0.99).alias("price")).alias("data"))

        # mapPartitions to see each partition's summary; df.foreachPartition(sender) when you need none.
        summaries: List[Dict[str, Any]] = rows.rdd.mapPartitions(lambda part: [sender(part)]).collect()
        dropped: Dict[str, int] = {}
        for summary in summaries:
            for reason, count in summary["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + count
        print(f"partitions: {len(summaries)}, read {sum(s['read'] for s in summaries)}, "
              f"delivered {sum(s['delivered'] for s in summaries)}, invalid {sum(s['invalid'] for s in summaries)}, "
              f"dropped {dropped}")
        first = sorted(e["data"]["idempotence_id"] for e in odp_server.events)
        print(f"ODP received {len(first)} events, {len(set(first))} distinct ids")

        # Re-running the job (a retried task, a second run after a failure) sends the very same ids.
        odp_server.reset()
        rows.foreachPartition(sender)
        again = sorted(e["data"]["idempotence_id"] for e in odp_server.events)
        print(f"re-run: ODP received {'the same' if again == first else 'DIFFERENT'} {len(again)} ids again "
              "(ODP keeps one of each)")
    spark.stop()
    return 0 if again == first and len(set(first)) == ORDERS else 1


if __name__ == "__main__":
    sys.exit(main())
