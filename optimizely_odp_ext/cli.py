"""The command line: ``python -m optimizely_odp_ext`` (or ``optimizely-odp-ext``).

Commands:
    demo          send a few events through a real client to an embedded fake ODP server
    smoke         the same, exiting non-zero unless every event arrived (used by CI on the wheel)
    fake-server   run a FakeOdpServer on 127.0.0.1 until Ctrl-C (for local development)
    send          send one event to an ODP host and wait for the outcome
    version       this package's and optimizely-sdk's versions
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Dict, List, Optional, Sequence

from . import _compat
from ._version import __version__


def _pairs(values: Optional[List[str]], what: str) -> Dict[str, str]:
    pairs: Dict[str, str] = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: {what} must look like key=value, got {value!r}")
        pairs[key] = val
    return pairs


def _demo(strict: bool) -> int:
    from optimizely import optimizely

    from . import install
    from ._datafile import datafile
    from .testing import FakeOdpServer

    with FakeOdpServer("demo-public-key") as odp:
        client = optimizely.Optimizely(datafile(odp.url, "demo-public-key"), logger=logging.getLogger("demo"))
        install(client, flush_interval=0.05)
        for i in range(5):
            client.send_odp_event("demo_event", {"fs_user_id": f"user-{i}"}, data={"n": i})
        delivered = client.flush_odp_events(timeout=10)
        stats = client.odp_event_stats()
        client_close = getattr(client, "close", None)
        if callable(client_close):
            client_close()
        print(f"fake ODP at {odp.url} received {len(odp.events)} of 5 events in {len(odp.requests)} request(s); "
              f"flushed={delivered} delivered={stats['delivered']}")
        ok = delivered and len(odp.events) == 5 and stats["delivered"] == 5
    return 0 if ok or not strict else 1


def _fake_server(port: int, key: str) -> int:
    from .testing import FakeOdpServer

    stop = threading.Event()
    with FakeOdpServer(key, port=port) as odp:
        print(f"fake ODP server on {odp.url} (x-api-key: {key}); Ctrl-C stops it", flush=True)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        print(f"received {len(odp.events)} event(s) in {len(odp.requests)} request(s)")
    return 0


def _send(args: argparse.Namespace) -> int:
    from .event import validate
    from .manager import EventManager
    from .settings import make_options

    logger = logging.getLogger("optimizely_odp_ext.cli")
    options = make_options(api_host=args.host, api_key=args.key, flush_interval=0,
                           allow_insecure_http=args.allow_insecure_http, retry_window=args.timeout)
    data: Dict[str, object] = dict(_pairs(args.data, "--data"))
    event = validate(args.action, _pairs(args.identifier, "--identifier"), args.type, data)
    if isinstance(event, str):
        print(f"error: {event}", file=sys.stderr)
        return 2
    manager = EventManager(options, logger)
    if not manager.enqueue(event):
        manager.close(0)
        return 1
    done = manager.flush(args.timeout)
    manager.close(1.0)
    stats = manager.stats()
    print(f"delivered={stats['delivered']} dropped={sum(stats['dropped'].values())} finished={done}")
    return 0 if stats["delivered"] == 1 else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="optimizely-odp-ext", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="send events to an embedded fake ODP server")
    sub.add_parser("smoke", help="like demo, exit 1 unless every event arrived")
    fake = sub.add_parser("fake-server", help="run a fake ODP server on 127.0.0.1")
    fake.add_argument("--port", type=int, default=0)
    fake.add_argument("--key", default="test-odp-key")
    send = sub.add_parser("send", help="send one event and wait for the outcome")
    send.add_argument("--host", required=True, help="ODP host, e.g. https://api.zaius.com")
    send.add_argument("--key", required=True, help="ODP public API key")
    send.add_argument("--action", required=True)
    send.add_argument("--type", default="fullstack")
    send.add_argument("--identifier", "-i", action="append", required=True, metavar="KEY=VALUE")
    send.add_argument("--data", "-d", action="append", metavar="KEY=VALUE")
    send.add_argument("--timeout", type=float, default=30.0)
    send.add_argument("--allow-insecure-http", action="store_true")
    sub.add_parser("version", help="print versions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.command in ("demo", "smoke"):
        return _demo(strict=args.command == "smoke")
    if args.command == "fake-server":
        return _fake_server(args.port, args.key)
    if args.command == "send":
        return _send(args)
    print(f"optimizely-odp-ext {__version__} "
          f"(optimizely-sdk {_compat.sdk_version()}, supports {_compat.SUPPORTED_SDK})")
    return 0
