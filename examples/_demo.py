"""What the recipes' demos share (not a recipe): the client, and booting a server against a fake ODP.

``optimizely_client()`` is how every recipe builds its Optimizely client: from your SDK key in
production (``OPTIMIZELY_SDK_KEY``), or, in the demos and in CI, from a local datafile whose ODP
integration points at the fake ODP server the demo started (``DEMO_ODP_URL``, ``DEMO_ODP_KEY``).

``serve()`` runs a real server process (uvicorn, gunicorn, uWSGI) with a recipe's app and sends it
requests that each make the app send one ODP event with a known ``idempotence_id``: a first half,
waiting until ODP has them (the plugin's thread runs in the server's workers), then the second half,
stopping the server with SIGTERM right after the last answer (while those events are still queued).
It reports what the fake ODP server received: nothing lost, nothing twice.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Set

from optimizely_odp_ext.testing import FakeOdpServer, odp_datafile

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "demo-public-key"
BOOT_SECONDS = 60.0  # a server that does not answer by then has failed to start
STOP_SECONDS = 30.0  # gunicorn's own graceful timeout


def optimizely_client() -> Any:
    """The application's Optimizely client, as usual (the plugin is installed by the caller)."""
    from optimizely import optimizely

    if os.environ.get("DEMO_ODP_URL"):  # the demo: a local datafile, ODP at the fake server
        return optimizely.Optimizely(datafile=odp_datafile(os.environ["DEMO_ODP_URL"], os.environ["DEMO_ODP_KEY"]))
    return optimizely.Optimizely(sdk_key=os.environ["OPTIMIZELY_SDK_KEY"])


def free_port() -> int:
    """A loopback port nobody listens on now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Served:
    """What happened to the events of one :func:`serve` run."""

    sent: List[str]
    received: Dict[str, int]  # idempotence_id -> times the fake ODP accepted it
    actions: Dict[str, int]  # action -> events accepted
    pids: Set[str]  # the server processes that answered requests (all of them were up before the events)
    while_running: bool  # the first half reached ODP before the stop
    returncode: Optional[int]
    output: str

    @property
    def lost(self) -> Set[str]:
        return set(self.sent) - set(self.received)

    @property
    def duplicated(self) -> Dict[str, int]:
        return {event_id: n for event_id, n in self.received.items() if n > 1}

    def summary(self) -> str:
        return (f"sent {len(self.sent)}, ODP received {sum(self.actions.values())} events "
                f"({dict(sorted(self.actions.items()))}), lost {len(self.lost)}, duplicated {len(self.duplicated)}, "
                f"{len(self.pids)} worker process(es), first half delivered while running: {self.while_running}, "
                f"server exit code {self.returncode}")


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return str(reply.read().decode())


def _wait_ready(url: str, process: subprocess.Popen, workers: int) -> Set[str]:  # type: ignore[type-arg]
    """Until ``workers`` distinct processes answered: a SIGTERM while a worker still loads the app
    (uWSGI --lazy-apps) would test start-up, not shutdown."""
    deadline = time.monotonic() + BOOT_SECONDS
    seen: Set[str] = set()
    with concurrent.futures.ThreadPoolExecutor(2 * workers) as pool:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before answering")
            try:
                seen.update(pool.map(lambda _: _get(url, timeout=5.0), range(2 * workers)))
                if len(seen) >= workers:
                    return seen
            except OSError:
                time.sleep(0.1)  # polling a port that is not open yet: nothing to wait on but time
    raise RuntimeError(f"{len(seen)} of {workers} server processes answered {url} within {BOOT_SECONDS:.0f} s")


def serve(command: Sequence[str], port: int, workers: int = 1, requests: int = 40, threads: int = 4) -> Served:
    """Runs ``command`` (a server listening on ``port``) against a fake ODP server; see the module doc.

    The app answers ``GET /`` (ready check) and ``GET /event?id=...`` (sends one event with that
    ``idempotence_id``); both answer the process id, and the requests start once ``workers``
    distinct processes have answered. The server is stopped with SIGTERM to its
    process, then waited for; whatever is left of its process group is killed.
    """
    sent = [f"request-{n}" for n in range(requests)]
    with FakeOdpServer(KEY) as odp, tempfile.TemporaryFile("w+") as log:
        child_env = {**os.environ, "DEMO_ODP_URL": odp.url, "DEMO_ODP_KEY": KEY,
                     "PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))}
        process = subprocess.Popen(list(command), cwd=HERE, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            pids = _wait_ready(base + "/", process, workers)
            half = len(sent) // 2
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                pids.update(pool.map(lambda event_id: _get(f"{base}/event?id={event_id}"), sent[:half]))
                while_running = _wait_requests_at(odp, half)
                pids.update(pool.map(lambda event_id: _get(f"{base}/event?id={event_id}"), sent[half:]))
            process.send_signal(signal.SIGTERM)  # at once: the last events are still queued
            returncode: Optional[int] = process.wait(STOP_SECONDS)
        except BaseException:
            returncode = None
            raise
        finally:
            _kill_group(process)
            log.seek(0)
            output = log.read()
        events = odp.events
    received = collections.Counter(str(e["data"]["idempotence_id"]) for e in events if e["action"] == "request")
    actions = collections.Counter(str(e["action"]) for e in events)
    return Served(sent, dict(received), dict(actions), pids, while_running, returncode, output)


def _wait_requests_at(odp: FakeOdpServer, count: int, timeout: float = 10.0) -> bool:
    """Whether ODP accepted ``count`` events of action "request" within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while sum(1 for e in odp.events if e["action"] == "request") < count:
        if time.monotonic() >= deadline:
            return False
        odp.wait_for_requests(len(odp.requests) + 1, timeout=min(0.5, max(deadline - time.monotonic(), 0.0)))
    return True


def _kill_group(process: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Whatever the server left behind (workers of a master that did not stop) is killed."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(5)


def report(served: Served, expect_actions: Dict[str, int]) -> int:
    """Prints the summary; 0 when every request's event arrived exactly once, as did ``expect_actions``."""
    print(served.summary())
    # uvicorn re-raises the SIGTERM it handled gracefully, so -SIGTERM is a clean stop too.
    ok = (not served.lost and not served.duplicated and served.while_running
          and served.returncode in (0, -signal.SIGTERM)
          and all(served.actions.get(action, 0) == n for action, n in expect_actions.items()))
    if not ok:
        print(served.output[-4000:], file=sys.stderr)
    return 0 if ok else 1
