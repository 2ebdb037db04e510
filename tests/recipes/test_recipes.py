"""The framework recipes in examples/, run as users run them: each in its own process, serving with a
real server (uvicorn, gunicorn, uWSGI) against the embedded fake ODP server, stopped with SIGTERM.

Each test is skipped when its framework is not installed; ``nox -s recipes`` installs them all.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from optimizely_odp_ext import odp
from optimizely_odp_ext.testing import FakeOdpServer

pytestmark = pytest.mark.recipes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RUN_SECONDS = 180.0  # a recipe boots a server, sends 40 requests and stops it: a few seconds normally
SUMMARY = re.compile(r"^sent (\d+), ODP received (\d+) events \((\{.*\})\), lost (\d+), duplicated (\d+), "
                     r"(\d+) worker process\(es\), first half delivered while running: (True|False), "
                     r"server exit code (-?\d+)$", re.MULTILINE)


def _load_demo() -> ModuleType:
    """examples/_demo.py (what the recipes' demos share), to serve a recipe with other numbers."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module("_demo")


def run_example(name: str) -> str:
    """Runs ``examples/<name>`` in its own process group; returns its output, asserting exit 0."""
    process = subprocess.Popen([sys.executable, str(EXAMPLES / name)], cwd=EXAMPLES, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=RUN_SECONDS)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=10)
    assert process.returncode == 0, output
    return output


def served(name: str) -> tuple:  # type: ignore[type-arg]
    """(sent, received, by action, lost, duplicated, workers, delivered while running, exit code) from a
    server recipe's summary line."""
    output = run_example(name)
    match = SUMMARY.search(output)
    assert match is not None, output
    sent, received, actions, lost, duplicated, workers, running, code = match.groups()
    return (int(sent), int(received), ast.literal_eval(actions), int(lost), int(duplicated), int(workers),
            running == "True", int(code))


def test_fastapi_under_uvicorn_sigterm_loses_nothing() -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    # uvicorn re-raises the SIGTERM after its graceful shutdown (lifespan included) completed.
    assert served("04_fastapi_lifespan.py") == (40, 40, {"request": 40}, 0, 0, 1, True, -signal.SIGTERM)


def test_fastapi_lifespan_close_async_delivers_every_event_of_500_requests() -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    # The recipe's lifespan awaits close_async after SIGTERM: the last requests' events are still
    # queued then (the demo signals right after the last answer).
    demo = _load_demo()
    port = demo.free_port()
    result = demo.serve([sys.executable, "-m", "uvicorn", "--port", str(port), "04_fastapi_lifespan:app"], port,
                        requests=500, threads=8)
    assert result.actions == {"request": 500}, result.output[-4000:]
    assert not result.lost
    assert not result.duplicated
    assert result.returncode == -signal.SIGTERM  # uvicorn's clean stop: it re-raises the SIGTERM


def test_flask_under_gunicorn_preload_two_workers_nothing_lost_nothing_twice() -> None:
    pytest.importorskip("flask")
    pytest.importorskip("gunicorn")
    # app_loaded is sent by the master before the fork: exactly once, not once per worker.
    assert served("05_flask_gunicorn.py") == (40, 41, {"app_loaded": 1, "request": 40}, 0, 0, 2, True, 0)


def test_flask_under_gunicorn_gevent_worker_preload_nothing_lost_nothing_twice() -> None:
    pytest.importorskip("flask")
    pytest.importorskip("gunicorn")
    pytest.importorskip("gevent")
    # The workers patch after the fork, long after the master loaded the app: nothing freezes.
    assert served("11_gunicorn_gevent.py") == (40, 41, {"app_loaded": 1, "request": 40}, 0, 0, 2, True, 0)


def test_django_installed_in_appconfig_ready_under_gunicorn() -> None:
    pytest.importorskip("django")
    pytest.importorskip("gunicorn")
    assert served("06_django_appconfig.py") == (40, 40, {"request": 40}, 0, 0, 1, True, 0)


def test_uwsgi_with_the_documented_flags_loses_nothing() -> None:
    if shutil.which("uwsgi", path=os.path.dirname(sys.executable)) is None:  # pip's uwsgi puts it there
        pytest.skip("uWSGI is not installed beside this Python")
    assert served("08_uwsgi.py") == (40, 40, {"request": 40}, 0, 0, 2, True, 0)


def test_lambda_handler_flushes_each_invocation() -> None:
    output = run_example("07_aws_lambda.py")
    assert re.findall(r"^ODP (\d+) ms away: (\d+) of (\d+) events delivered in (\d+) invocations", output,
                      re.MULTILINE) == [("0", "150", "150", "50"), ("50", "150", "150", "50")], output


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"recipe_{name[:2]}", EXAMPLES / name)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheus_collector_exports_every_counter(odp_client: Any, fake_odp_server: FakeOdpServer) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(_load("09_prometheus_metrics.py").OdpStatsCollector(odp_client))
    for n in range(3):
        odp_client.send_odp_event("purchased", {"fs_user_id": f"user-{n}"})
    odp_client.send_odp_event("", {"fs_user_id": "user-x"})  # invalid: refused at the call
    assert odp(odp_client).flush_odp_events(5)
    stats = odp(odp_client).odp_event_stats()
    assert registry.get_sample_value("odp_events_accepted_total") == 3
    assert registry.get_sample_value("odp_events_delivered_total") == 3
    assert registry.get_sample_value("odp_events_pending") == 0
    assert registry.get_sample_value("odp_events_requests_total") == stats["requests"] >= 1
    assert registry.get_sample_value("odp_events_dropped_total", {"reason": "rejected"}) == 0
    # Every number of odp_event_stats() is exported (the text state is not a number).
    numbers = {name for name, value in stats.items() if isinstance(value, (int, dict))}
    exported = {metric.name.replace("odp_events_", "") for metric in registry.collect()}
    assert exported == numbers


def test_prometheus_recipe_runs() -> None:
    pytest.importorskip("prometheus_client")
    output = run_example("09_prometheus_metrics.py")
    assert 'odp_events_dropped_total{reason="rejected"} 1.0' in output
    assert "odp_events_delivered_total 3.0" in output
