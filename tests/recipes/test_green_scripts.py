"""gevent and eventlet: the plugin never freezes the hub and never leaves signals blocked (issue 18).

Each test runs ``green_app.py`` in a real process against a FakeOdpServer over loopback:

- patched before the plugin is imported: the green ``start()`` of our threads switches to other
  greenlets; the signal mask around it (see ``_threads.start_quiet``) used to be left blocked on the
  hub's only OS thread (SIGTERM, SIGINT... ignored for good);
- patched in a forked child after the parent used the client, as gunicorn's gevent worker does
  with ``--preload``: the fork hook used to build the child's locks before the patch, and the worker
  greenlet waiting on a real OS lock froze the process.

gevent and eventlet are test-only dependencies (the `recipes` nox session); without them these are skipped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import TEST_KEY
from tests.integration._helpers import assert_delivered_exactly_once

pytestmark = [pytest.mark.recipes,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; forks")]

APP = Path(__file__).resolve().parent / "green_app.py"
EVENTS, SENDERS = 50, 4  # green_app's
# A frozen hub never ends: the bound turns that into a failure (it is not a speed limit).
RUN_TIMEOUT = 90.0


def _installed(lib: str) -> Any:
    return pytest.mark.skipif(importlib.util.find_spec(lib) is None, reason=f"{lib} is not installed")


LIBS = [pytest.param("gevent", marks=_installed("gevent")), pytest.param("eventlet", marks=_installed("eventlet"))]


def _run(lib: str, when: str, server: FakeOdpServer) -> Dict[str, Any]:
    env = {**os.environ, "ODP_TEST_URL": server.url, "ODP_TEST_KEY": TEST_KEY, "PYTHONWARNINGS": "ignore"}
    # Its own session: a frozen forked child is killed with its parent, not left behind.
    process = subprocess.Popen([sys.executable, str(APP), lib, when], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.communicate(timeout=10)
    assert process.returncode == 0, stdout + stderr[-4000:]
    result: Dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    print(f"{lib} {when}: hub lag {result['lag'] * 1000:.1f} ms")  # for the record (-s), not asserted
    return result


def _sent(when: str) -> List[str]:
    ids = [f"{number}-{n}" for number in range(SENDERS) for n in range(EVENTS)]
    return ids + (["parent-0", "parent-1"] if when == "fork" else [])


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("when", ["before", "fork"])
def test_patched_process_delivers_and_keeps_its_signals(lib: str, when: str) -> None:
    with FakeOdpServer(TEST_KEY) as server:
        result = _run(lib, when, server)
        assert result["flushed"] == [True, True]
        assert not {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT} & set(result["blocked"]), result
        assert_delivered_exactly_once(server, _sent(when))


_SIGTERM_SCRIPT = """
import sys
if sys.argv[1] == "gevent":
    from gevent import monkey
    monkey.patch_all()
else:
    import eventlet
    eventlet.monkey_patch()
import logging, os, signal, threading, time
from optimizely import optimizely
import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
optimizely_odp_ext.install(flush_on_sigterm=True, flush_interval=600, batch_size=1000)
client = optimizely.Optimizely(datafile(os.environ["ODP_TEST_URL"], os.environ["ODP_TEST_KEY"]),
                               logger=logging.getLogger("app"))
for n in range(EVENTS):
    client.send_odp_event("t", {"fs_user_id": "u"}, data={"idempotence_id": f"term-{n}"})
threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM)).start()  # a green thread
time.sleep(30)  # ended by the SIGTERM: our handler delivers, then the default action
sys.exit(3)
"""


@pytest.mark.parametrize("lib", LIBS)
def test_flush_on_sigterm_in_a_patched_process(lib: str) -> None:
    # install() runs on a green thread of the main OS thread: the handler is set there (it used to be
    # refused under eventlet, whose current_thread() is then not main_thread()).
    with FakeOdpServer(TEST_KEY) as server:
        env = {**os.environ, "ODP_TEST_URL": server.url, "ODP_TEST_KEY": TEST_KEY, "PYTHONWARNINGS": "ignore"}
        done = subprocess.run([sys.executable, "-c", _SIGTERM_SCRIPT.replace("EVENTS", str(EVENTS)), lib], env=env,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
        assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr[-4000:]
        assert_delivered_exactly_once(server, [f"term-{n}" for n in range(EVENTS)])
