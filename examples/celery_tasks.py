"""The Celery application of example 04 (``celery -A celery_tasks worker``): a client made at
import, a class-level ``install()``, tasks that send ODP events — and nothing else.

No ``flush`` in the tasks, no ``worker_process_shutdown`` handler of your own: a prefork child that
is recycled (``--max-tasks-per-child``) or stopped by a warm shutdown delivers what it has queued
before it exits (bounded by ``close_timeout``); the ``solo`` and ``threads`` pools deliver at
interpreter exit.

Example 04 points it at an embedded fake ODP server and a broker in a temporary folder (kombu's
filesystem transport, no server) through the environment; in your project the client comes from
your SDK key and the broker is your Redis or RabbitMQ.
"""

from __future__ import annotations

import logging
import os

from celery import Celery
from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile

folder = os.environ["EXAMPLE_CELERY_DIR"]
app = Celery("celery_tasks", broker="filesystem://", backend=f"file://{folder}/results")
app.conf.broker_transport_options = {"data_folder_in": f"{folder}/broker", "data_folder_out": f"{folder}/broker",
                                     "control_folder": f"{folder}/control", "polling_interval": 0.1}

# Once per process, at import: the worker's parent imports this module before it forks its pool.
optimizely_odp_ext.install()  # every Optimizely client gets send_odp_event
# Yours: optimizely.Optimizely(sdk_key="...") (or your config manager); here a datafile whose
# ODP integration points at the example's fake server.
client = optimizely.Optimizely(datafile(os.environ["EXAMPLE_ODP_URL"], "demo-public-key"),
                               logger=logging.getLogger("celery_tasks"))


@app.task
def checkout(order: int, items: int) -> int:
    """One ODP event per item bought; returns the worker process's id (to show the recycling)."""
    for item in range(items):
        client.send_odp_event("purchased", {"fs_user_id": f"user-{order}"},
                              data={"order": order, "item": item, "idempotence_id": f"order-{order}-{item}"})
    return os.getpid()
