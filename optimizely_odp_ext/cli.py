"""The command line: ``python -m optimizely_odp_ext`` (or ``optimizely-odp-ext``).

Commands: ``import`` (bulk events from JSON Lines or CSV files), ``send`` (one event), ``fake-server``
(a local ODP stand-in for development), ``demo``, ``smoke`` and ``version``.

Exit status, the same for every command: 0 everything delivered; 1 some events dropped or lines
invalid; 2 a usage or configuration error (bad flag, unreadable file, refused host, bad checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Dict, NoReturn, Optional, Sequence

from . import _compat
from ._cli_common import (
    EXIT_OK,
    EXIT_SOME_LOST,
    EXIT_USAGE,
    KEY_ENV,
    PROG,
    SDK_KEY_ENV,
    UsageError,
    cli_logger,
    credentials,
    event_manager,
    pairs,
    reasons_text,
    typed_pairs,
)
from ._import import (
    CONVERTERS,
    BadInput,
)
from ._import_run import run_import
from ._version import __version__


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ...; see --help``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and shows each flag's default (when it has a telling one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or isinstance(action.default, bool):
            return text
        if action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


# --------------------------------------------------------------------------- send, fake-server, demo


def _send(args: argparse.Namespace) -> int:
    from .event import validate

    host, key = credentials(args)
    data: Dict[str, object] = {}
    if args.data_json:
        try:
            parsed = json.loads(args.data_json)
        except ValueError as exc:
            raise UsageError(f"--data-json is not valid JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise UsageError("--data-json must be a JSON object")
        data.update(parsed)
    for name, kind, value in typed_pairs(args.data, "--data"):
        try:
            data[name] = CONVERTERS[kind](value)
        except ValueError:
            raise UsageError(f"--data {name}:{kind}={value!r}: not a {kind}") from None
    event = validate(args.action, pairs(args.identifier, "--identifier"), args.type, data)
    if isinstance(event, str):
        raise UsageError(event)
    # The library's give-up line is replaced by one line with the root cause, below.
    manager, transports = event_manager(args, host, key, cli_logger(args.quiet, "ODP event send failed"),
                                   flush_interval=0)
    try:
        manager.enqueue(event)
        done = manager.flush(args.retry_window + 2 * args.request_timeout + 5.0)
    finally:
        manager.close(1.0)
    stats = manager.stats()
    if stats["delivered"] == 1:
        print(f"delivered 1 event to {host} (ODP answered 202)")
        return EXIT_OK
    why = reasons_text(stats["dropped"]) or ("delivery did not finish in time" if not done else "unknown")
    last = transports[0].last_failure if transports else None
    cause = ""
    if last is not None:
        cause = f"; last attempt: {last.detail}" if last.status == 0 else f"; ODP answered HTTP {last.status}"
        cause += f": {last.detail.strip()}" if last.status and last.detail.strip() else ""
    print(f"{PROG} send: error: the event was not delivered ({why}){cause}", file=sys.stderr)
    return EXIT_SOME_LOST


def _fake_server(args: argparse.Namespace) -> int:
    from .testing import FakeOdpServer

    server = FakeOdpServer(args.key, port=args.port, max_body_bytes=args.max_body_bytes)
    try:
        server.start()
    except OSError as exc:
        raise UsageError(f"cannot listen on 127.0.0.1:{args.port}: "
                         + ("the port is busy (pick another with --port, or 0 for any free port)"
                            if exc.errno in (98, 48) else (exc.strerror or str(exc)))) from None
    try:
        if args.latency:
            server.set_latency(args.latency)
        if args.fail_next:
            server.fail_next(args.fail_next, status=args.fail_status)
        if args.fail_for:
            server.fail_for(args.fail_for, status=args.fail_status)
        if args.rate_limit:
            server.rate_limit_next(args.rate_limit, retry_after=args.retry_after)
        if args.reset_every:
            server.reset_connection_every(args.reset_every)
        print(f"fake ODP server on {server.url} (x-api-key: {args.key}); Ctrl-C stops it", flush=True)
        seen = 0
        try:
            while True:
                time.sleep(0.2)  # polling the record: the server has no per-request hook
                seen = _print_requests(server, seen, args.quiet)
        except KeyboardInterrupt:
            _print_requests(server, seen, args.quiet)
        print(f"received {len(server.events)} event(s) in {len(server.requests)} request(s)")
    finally:
        server.stop()
    return EXIT_OK


def _print_requests(server: Any, seen: int, quiet: bool) -> int:
    """Prints the requests received since the first ``seen``; returns how many there are now."""
    requests = server.requests
    if not quiet:
        for request in requests[seen:]:
            print(f"{request.path} -> {request.status or 'no answer'} ({len(request.body):,} bytes)", flush=True)
    return len(requests)


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


# --------------------------------------------------------------------------- the parser

_IMPORT_EXAMPLES = f"""\
examples:
  # JSON Lines, one event per line:
  #   {{"action": "purchased", "identifiers": {{"email": "a@b.com"}}, "data": {{"price": 5}}}}
  export {KEY_ENV}=...        # keeps the key out of shell history
  {PROG} import --host https://api.zaius.com purchases.jsonl.gz

  # CSV with a header row; columns mapped to the event
  {PROG} import --datafile datafile.json --action purchased \\
      --identifier email=Email --identifier fs_user_id=UserId --data price:float=Price orders.csv

  # check a file without sending, keeping the bad lines to fix and replay
  {PROG} import --dry-run --rejects bad.jsonl events.jsonl

  # from another program
  zcat events.jsonl.gz | {PROG} import --host https://api.zaius.com -

Each event's idempotence_id derives from the file's content and the line number (unless the line
has one), so a re-run sends the same ids and ODP de-duplicates them. A checkpoint next to the file
(FILE.odp-checkpoint) records how far delivery got; a re-run resumes after it.

exit status: 0 all delivered; 1 some dropped or invalid; 2 usage or configuration error.
"""

_SEND_EXAMPLES = f"""\
examples:
  export {KEY_ENV}=...
  {PROG} send --host https://api.zaius.com --action purchased -i fs_user_id=user123 \\
      -d price:float=50 -d currency=EUR
  {PROG} send --sdk-key YOUR_SDK_KEY --action login -i email=a@b.com --data-json '{{"plan": "pro"}}'

exit status: 0 delivered; 1 dropped; 2 usage or configuration error.
"""

_FAKE_EXAMPLES = f"""\
examples:
  {PROG} fake-server --port 8080 --key local-key
  {PROG} import --host http://127.0.0.1:8080 --key local-key events.jsonl
  {PROG} fake-server --port 8080 --fail-for 10 --latency 0.2    # an outage, then slow answers
"""


_MAIN_EPILOG = f"""\
examples:
  {PROG} import --help
  {PROG} import --host https://api.zaius.com events.jsonl     # key from ${KEY_ENV}
  {PROG} send --host https://api.zaius.com --action login -i fs_user_id=user123
  {PROG} fake-server --port 8765

exit status: 0 all delivered; 1 some dropped or invalid; 2 usage or configuration error.
"""


def _delivery_flags(parser: argparse.ArgumentParser, retry_window: float) -> None:
    group = parser.add_argument_group("where to send (one of)")
    group.add_argument("--host", metavar="URL", help="the ODP host, e.g. https://api.zaius.com (with --key)")
    group.add_argument("--key", metavar="KEY",
                       help=f"the ODP public API key; default: the {KEY_ENV} environment variable")
    group.add_argument("--datafile", metavar="FILE",
                       help="an Optimizely datafile whose ODP integration gives host and key")
    group.add_argument("--sdk-key", metavar="KEY", default=os.environ.get(SDK_KEY_ENV),
                       help=f"fetch the datafile of this SDK key from Optimizely's CDN; default: ${SDK_KEY_ENV}")
    group.add_argument("--allow-insecure-http", action="store_true",
                       help="allow plain http to a host that is not this machine (the key travels unencrypted)")
    tuning = parser.add_argument_group("delivery")
    tuning.add_argument("--retry-window", type=float, default=retry_window, metavar="SECONDS",
                        help="how long a failing batch is retried before it is dropped")
    tuning.add_argument("--request-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long to wait for ODP's answer to one request")
    tuning.add_argument("--quiet", "-q", action="store_true", help="print only errors and the summary")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, formatter_class=_Formatter, epilog=_MAIN_EPILOG,
                     description="Send Optimizely Data Platform (ODP) events from the command line: bulk imports\n"
                                 "from files, single events, and a fake ODP server for local development.")
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {__version__} (optimizely-sdk {_compat.sdk_version()})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    imp = sub.add_parser("import", help="send events from JSON Lines or CSV files", formatter_class=_Formatter,
                         description="Send events from JSON Lines or CSV files (gzip by the .gz suffix, - for\n"
                                     "standard input) through the same reliable event manager as send_odp_event.",
                         epilog=_IMPORT_EXAMPLES)
    imp.add_argument("files", nargs="+", metavar="FILE", help="input files; - reads standard input")
    imp.add_argument("--format", choices=("jsonl", "csv"),
                     help="input format; default: by the file name (.csv or .tsv is CSV, anything else JSON Lines)")
    _delivery_flags(imp, 300.0)
    mapping = imp.add_argument_group("CSV columns")
    mapping.add_argument("--identifier", "-i", action="append", metavar="ODP_KEY=COLUMN",
                         help="an identifier from a column, e.g. email=Email (repeat for more)")
    mapping.add_argument("--data", "-d", action="append", metavar="KEY[:TYPE]=COLUMN",
                         help="a data field from a column, TYPE str, int, float or bool, e.g. price:float=Price")
    mapping.add_argument("--action-column", default="action", metavar="COLUMN", help="the column with the action")
    mapping.add_argument("--action", metavar="ACTION", help="one action for every row (instead of --action-column)")
    mapping.add_argument("--type-column", metavar="COLUMN", help="the column with the event type")
    mapping.add_argument("--type", default="fullstack", help="the event type for every row")
    mapping.add_argument("--id-column", metavar="COLUMN", help="a column with each row's idempotence_id")
    mapping.add_argument("--delimiter", default=",", help="the CSV field separator")
    run = imp.add_argument_group("resume, errors, progress")
    run.add_argument("--checkpoint", metavar="PATH", help="the checkpoint file; default: FILE.odp-checkpoint")
    run.add_argument("--resume", dest="resume", action="store_true", default=True,
                     help="skip what an earlier run had delivered, when a checkpoint exists")
    run.add_argument("--no-resume", dest="resume", action="store_false",
                     help="ignore an existing checkpoint and send everything again")
    run.add_argument("--source-id", metavar="NAME",
                     help="derive the idempotence_ids from NAME instead of the file's content; standard "
                          "input needs it for repeatable ids and a checkpoint (else its ids are random)")
    run.add_argument("--dry-run", action="store_true", help="check every line and report errors; send nothing")
    run.add_argument("--rejects", metavar="FILE", help="copy invalid lines here, to fix and import again")
    run.add_argument("--max-errors", type=int, default=0, metavar="N",
                     help="stop after N invalid lines (0: never stop)")
    run.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS",
                     help="seconds between progress lines when not on a terminal")
    perf = imp.add_argument_group("throughput")
    perf.add_argument("--batch-size", type=int, default=100, metavar="N", help="events per request")
    perf.add_argument("--concurrency", type=int, default=4, metavar="N", help="requests in flight at once")
    perf.add_argument("--queue-size", type=int, default=10_000, metavar="N",
                      help="events read ahead of delivery (memory stays bounded by it)")

    send = sub.add_parser("send", help="send one event and wait for the outcome", formatter_class=_Formatter,
                          description="Send one event and wait until ODP accepts it or it is given up.",
                          epilog=_SEND_EXAMPLES)
    send.add_argument("--action", required=True, help="the event's action, e.g. purchased")
    send.add_argument("--type", default="fullstack", help="the event's type")
    send.add_argument("--identifier", "-i", action="append", required=True, metavar="KEY=VALUE",
                      help="an identifier, e.g. fs_user_id=user123 (repeat for more)")
    send.add_argument("--data", "-d", action="append", metavar="KEY[:TYPE]=VALUE",
                      help="a data field, TYPE str, int, float or bool, e.g. price:float=50")
    send.add_argument("--data-json", metavar="JSON", help='data as a JSON object, e.g. \'{"price": 50}\'')
    _delivery_flags(send, 30.0)

    fake = sub.add_parser("fake-server", help="run a fake ODP server on 127.0.0.1 for local development",
                          formatter_class=_Formatter, epilog=_FAKE_EXAMPLES,
                          description="A local stand-in for ODP's events endpoint that prints each request.")
    fake.add_argument("--port", type=int, default=0, help="the port; 0 picks a free one")
    fake.add_argument("--key", default="test-odp-key", help="the x-api-key it accepts")
    fake.add_argument("--quiet", "-q", action="store_true", help="do not print each request")
    faults = fake.add_argument_group("faults")
    faults.add_argument("--latency", type=float, default=0.0, metavar="SECONDS", help="delay every answer")
    faults.add_argument("--fail-for", type=float, default=0.0, metavar="SECONDS",
                        help="an outage: answer --fail-status for this long after start")
    faults.add_argument("--fail-next", type=int, default=0, metavar="N",
                        help="answer the first N requests with --fail-status (an outage of N requests)")
    faults.add_argument("--fail-status", type=int, default=503, help="the status answered during the outage")
    faults.add_argument("--rate-limit", type=int, default=0, metavar="N",
                        help="answer the first N requests with 429")
    faults.add_argument("--retry-after", default="1", metavar="SECONDS", help="Retry-After of those 429s")
    faults.add_argument("--max-body-bytes", type=int, metavar="N", help="answer 413 to bodies larger than N")
    faults.add_argument("--reset-every", type=int, default=0, metavar="N", help="reset every Nth connection")

    sub.add_parser("demo", help="send events through a real client to an embedded fake ODP server")
    sub.add_parser("smoke", help="like demo; exit 1 unless every event arrived")
    sub.add_parser("version", help="print this package's and optimizely-sdk's versions")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line; returns the exit status."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command == "import":
            return run_import(args)
        if args.command == "send":
            return _send(args)
        if args.command == "fake-server":
            return _fake_server(args)
        if args.command in ("demo", "smoke"):
            return _demo(strict=args.command == "smoke")
    except (UsageError, BadInput) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_SOME_LOST
    print(f"{PROG} {__version__} (optimizely-sdk {_compat.sdk_version()}, supports {_compat.SUPPORTED_SDK})")
    return EXIT_OK
