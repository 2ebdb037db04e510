"""The Celery application the recipe tests run in a real worker (``-A celery_app``).

Written as a user writes one: the Optimizely client is created at import, after a class-level
``install()``, and tasks call ``send_odp_event`` with no flush of their own. The test passes the
fake ODP server's address and the broker's folder through the environment.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from celery import Celery
from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile

EVENTS_PER_TASK = 50

BROKER_DIR = Path(os.environ["ODP_TEST_BROKER_DIR"])
DONE_DIR = Path(os.environ["ODP_TEST_DONE_DIR"])

app = Celery("celery_app", broker="filesystem://")
app.conf.update(
    broker_transport_options={"data_folder_in": str(BROKER_DIR), "data_folder_out": str(BROKER_DIR),
                              "processed_folder": str(BROKER_DIR / "processed"), "store_processed": False,
                              "control_folder": str(BROKER_DIR / "control"),
                              # The worker looks for new messages every 0.1 s, not every second.
                              "polling_interval": 0.1},
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)

# Options the test sets through the environment: a flush interval longer than the test and a batch
# no process fills mean no event leaves on the timer or on size, so what arrives was delivered by
# the exit paths under test.
optimizely_odp_ext.install(flush_interval=float(os.environ.get("ODP_TEST_FLUSH_INTERVAL", "1")),
                           batch_size=int(os.environ.get("ODP_TEST_BATCH_SIZE", "100")),
                           close_timeout=float(os.environ.get("ODP_TEST_CLOSE_TIMEOUT", "15")))
client = optimizely.Optimizely(datafile(os.environ["ODP_TEST_URL"], os.environ["ODP_TEST_KEY"]),
                               logger=logging.getLogger("celery_app"))


def event_id(task_index: int, n: int) -> str:
    """The idempotence id of a task's n-th event: the test counts each one at the server."""
    return f"celery-{task_index}-{n}"


@app.task(name="celery_app.send_events")
def send_events(task_index: int) -> None:
    """Sends this task's events, then leaves a marker so the test knows the task ran."""
    for n in range(EVENTS_PER_TASK):
        client.send_odp_event("celery_test", {"fs_user_id": f"user-{task_index}-{n}"},
                              data={"idempotence_id": event_id(task_index, n)})
    (DONE_DIR / f"{task_index}.{os.getpid()}").touch()


def publish(count: int, **_: Any) -> None:
    """Queues ``count`` tasks on the filesystem broker (run by the test before the worker starts)."""
    for index in range(count):
        send_events.delay(index)
