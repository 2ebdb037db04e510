"""The command line: ``python -m optimizely_odp_ext`` (or ``optimizely-odp-ext``).

Commands: ``import`` (bulk events from JSON Lines or CSV files), ``send`` (one event), ``fake-server``
(a local ODP stand-in for development), ``demo``, ``smoke`` and ``version``.

Exit status, the same for every command: 0 everything delivered; 1 some events dropped or lines
invalid; 2 a usage or configuration error (bad flag, unreadable file, refused host, bad checkpoint).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import threading
import time
from typing import IO, Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from . import _compat
from ._import import (
    CONVERTERS,
    AckingTransport,
    Acks,
    BadInput,
    Checkpoint,
    CsvMapping,
    CsvRows,
    Importer,
    JsonLines,
    Source,
    file_identity,
    line_ids,
    open_source,
    rejects_writer,
)
from ._threads import start_quiet
from ._version import __version__

PROG = "optimizely-odp-ext"
KEY_ENV = "OPTIMIZELY_ODP_API_KEY"
SDK_KEY_ENV = "OPTIMIZELY_SDK_KEY"
DATAFILE_URL = "https://cdn.optimizely.com/datafiles/{sdk_key}.json"
_EXIT_OK, _EXIT_SOME_LOST, _EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ...; see --help``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(_EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and shows each flag's default (when it has a telling one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or isinstance(action.default, bool):
            return text
        if action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


# --------------------------------------------------------------------------- small helpers


def _typed_pairs(values: Optional[List[str]], what: str) -> List[Tuple[str, str, str]]:
    """``KEY[:TYPE]=VALUE`` items as ``(key, type, value)``; TYPE is str, int, float or bool."""
    result = []
    for item in values or []:
        left, sep, value = item.partition("=")
        key, _, kind = left.partition(":")
        kind = kind or "str"
        if not sep or not key:
            raise UsageError(f"{what} must look like KEY=VALUE or KEY:TYPE=VALUE, got {item!r}")
        if kind not in CONVERTERS:
            raise UsageError(f"{what} {item!r}: unknown type {kind!r} (use str, int, float or bool)")
        result.append((key, kind, value))
    return result


def _pairs(values: Optional[List[str]], what: str) -> Dict[str, str]:
    pairs = {}
    for key, kind, value in _typed_pairs(values, what):
        if kind != "str":
            raise UsageError(f"{what} takes KEY=VALUE (no type), got {key}:{kind}")
        pairs[key] = value
    return pairs


def _check_host(host: str, allow_insecure_http: bool) -> None:
    from .transport import check_host

    refusal = check_host(host, allow_insecure_http)
    if refusal:
        # The library's line names install()'s keyword; here the flag is what the user can change.
        raise UsageError(refusal.replace("pass allow_insecure_http=True to install()", "add --allow-insecure-http"))


def _credentials(args: argparse.Namespace) -> Tuple[str, str]:
    """The ODP host and public key from --host/--key, --datafile or --sdk-key (exactly one)."""
    given = [name for name, value in (("--host", args.host), ("--datafile", args.datafile),
                                      ("--sdk-key", args.sdk_key)) if value]
    if len(given) > 1:
        raise UsageError(f"give only one of {', '.join(given)}")
    if args.datafile or args.sdk_key:
        host, key = _from_datafile(args.datafile, args.sdk_key)
    elif args.host:
        host, key = args.host, args.key or os.environ.get(KEY_ENV) or ""
        if not key:
            raise UsageError(f"--host needs the ODP public key: --key KEY or the {KEY_ENV} environment variable")
    else:
        raise UsageError(f"where to send: --host URL with --key KEY (or {KEY_ENV}), --datafile FILE, "
                         f"or --sdk-key KEY (or {SDK_KEY_ENV})")
    _check_host(host, args.allow_insecure_http)
    return host, key


def _from_datafile(path: Optional[str], sdk_key: Optional[str]) -> Tuple[str, str]:
    from types import SimpleNamespace

    from .settings import odp_integration

    where = path or f"the datafile of SDK key {sdk_key[:4] if sdk_key else ''}..."
    try:
        if path:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        else:
            import requests

            response = requests.get(DATAFILE_URL.format(sdk_key=sdk_key), timeout=10)
            if response.status_code != 200:
                raise UsageError(f"cannot fetch {where}: HTTP {response.status_code}")
            text = response.text
        integrations = json.loads(text).get("integrations", [])
    except UsageError:
        raise
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"cannot read {where}: {getattr(exc, 'strerror', None) or exc}") from None
    # The plugin's own reading of a datafile (optimizely-sdk 4.x path): the same entry, the same rules.
    host, key, _ = odp_integration(SimpleNamespace(integrations=integrations))
    if not host or not key:
        raise UsageError(f"ODP is not integrated in {where} (no 'odp' entry with host and publicKey)")
    return host, key


def _cli_logger(quiet: bool, *left_out: str) -> logging.Logger:
    """The event manager's logger: its warnings (delivery failing, retrying) go to stderr.

    Lines starting with one of ``left_out`` are not printed (the command prints its own).
    """
    logger = logging.getLogger("optimizely_odp_ext.cli")
    logger.propagate = False
    logger.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    # The closing line repeats what the summary says: left out.
    prefixes = ("ODP event manager closed", *left_out)
    handler.addFilter(lambda record: not record.getMessage().startswith(prefixes))
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    return logger


def _manager(args: argparse.Namespace, host: str, key: str, logger: logging.Logger,
             acks: Optional[Acks] = None, **extra: Any) -> Tuple[Any, List[AckingTransport]]:
    """An event manager sending to ``host``, and (once it sends) its transport, for the last failure."""
    from .manager import EventManager
    from .settings import ConfigurationError, Options, make_options

    try:
        options = make_options(api_host=host, api_key=key, allow_insecure_http=args.allow_insecure_http,
                               retry_window=args.retry_window, request_timeout=args.request_timeout,
                               flush_at_exit=False, **extra)
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    transports: List[AckingTransport] = []

    def transport(opts: Options) -> AckingTransport:
        transports.append(AckingTransport(opts, acks))
        return transports[-1]

    return EventManager(options, logger, transport_factory=transport), transports


def _reasons(dropped: Dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in dropped.items() if count)


# --------------------------------------------------------------------------- import


def _csv_mapping(args: argparse.Namespace) -> CsvMapping:
    identifiers = [(key, column) for key, _, column in _typed_pairs(args.identifier, "--identifier")]
    data = _typed_pairs(args.data, "--data")
    if len(args.delimiter) != 1:
        raise UsageError(f"--delimiter must be one character, got {args.delimiter!r}")
    return CsvMapping(action_column=args.action_column, action=args.action, type_column=args.type_column,
                      type=args.type, identifiers=identifiers, data=data, id_column=args.id_column,
                      delimiter=args.delimiter)


def _format_of(name: str, forced: Optional[str]) -> str:
    if forced:
        return forced
    base = name[:-3] if name.endswith(".gz") else name
    return "csv" if base.lower().endswith((".csv", ".tsv")) else "jsonl"


class _Input:
    """One FILE argument, checked before anything is sent."""

    def __init__(self, name: str, fmt: str, checkpoint: Optional[Checkpoint],
                 ids: Optional[Callable[[int], str]]) -> None:
        self.name = name
        self.format = fmt
        self.checkpoint = checkpoint
        self.ids = ids


def _plan(args: argparse.Namespace, mapping: CsvMapping) -> List[_Input]:
    names: List[str] = args.files
    if names.count("-") > 1:
        raise UsageError("standard input (-) can be given once")
    if args.checkpoint and len(names) > 1:
        raise UsageError("--checkpoint takes one input file; without it each file gets FILE.odp-checkpoint")
    csv_given = bool(args.identifier or args.data or args.action or args.id_column or args.type_column)
    plan = []
    for name in names:
        fmt = _format_of(name, args.format)
        if fmt == "jsonl" and csv_given and not args.format:
            raise UsageError(f"{name}: --identifier/--data/--action map CSV columns; this input is JSON Lines "
                             "(name it .csv or pass --format csv)")
        if fmt == "csv" and not mapping.identifiers:
            raise UsageError(f"{name}: CSV needs at least one --identifier ODP_KEY=COLUMN")
        source = open_source(name) if name != "-" else None
        if source is not None:  # opened now only to report a bad file or header before sending anything
            try:
                problem = (CsvRows(source, mapping) if fmt == "csv" else JsonLines(source)).header_problem()
            finally:
                source.close()
            if problem:
                raise UsageError(problem)
        checkpoint = ids = None
        if not args.dry_run:
            identity = args.source_id or (file_identity(name) if name != "-" else None)
            if identity is not None:
                ids = line_ids(identity)
            path = args.checkpoint or (f"{name}.odp-checkpoint" if name != "-" else None)
            if path and identity is None:
                raise UsageError("a checkpoint for standard input needs --source-id NAME (the ids derive from it)")
            if path and identity:
                checkpoint = (Checkpoint.load(path, identity) if args.resume else None) or Checkpoint(path, identity)
                if checkpoint.line == 0 and not checkpoint.complete:
                    _save(checkpoint, 0)  # now, so a checkpoint that cannot be written stops us before sending
        plan.append(_Input(name, fmt, checkpoint, ids))
    return plan


class _Progress:
    """Prints progress to stderr: a tqdm bar on a terminal when tqdm is installed, else plain lines."""

    def __init__(self, importer: Importer, manager: Any, interval: float, quiet: bool) -> None:
        self._importer = importer
        self._manager = manager
        self._interval = interval
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._bar: Any = None
        self._thread: Optional[threading.Thread] = None
        if quiet:
            return
        if sys.stderr.isatty():
            try:
                tqdm = importlib.import_module("tqdm")
                try:
                    size = os.get_terminal_size(sys.stderr.fileno())
                    known = size.columns > 0 and size.lines > 0
                except OSError:
                    known = False
                # A terminal that does not tell its size (0 x 0) would get no bar at all from tqdm.
                self._bar = tqdm.tqdm(total=None, unit="B", unit_scale=True, file=sys.stderr, leave=False,
                                      dynamic_ncols=known, ncols=None if known else 120, nrows=None if known else 24)
                self._interval = min(interval, 0.5)
            except ImportError:
                pass
        self._thread = threading.Thread(target=self._run, name="odp-import-progress", daemon=True)
        start_quiet(self._thread)

    def _figures(self) -> Tuple[str, Optional[Source]]:
        counts = self._importer.counts
        delivered = dropped = 0
        if self._manager is not None:
            stats = self._manager.stats()
            delivered, dropped = stats["delivered"], sum(stats["dropped"].values())
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = (delivered if self._manager is not None else counts.read) / elapsed
        text = (f"read {counts.read:,}, delivered {delivered:,}, dropped {dropped:,}, invalid {counts.invalid:,}, "
                f"{rate:,.0f} events/s")
        return text, self._importer.current

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            text, source = self._figures()
            if self._bar is not None:
                if source is not None and source.size:
                    self._bar.total = source.size
                    self._bar.n = source.position()
                self._bar.set_postfix_str(text, refresh=True)
                continue
            share = ""
            if source is not None and source.size:
                done = source.position() / source.size
                elapsed = time.monotonic() - self._started
                eta = f", ETA {elapsed * (1 - done) / done:.0f} s" if done > 0.01 else ""
                share = f" {source.name} {done:.0%}{eta}:"
            print(f"{PROG} import:{share} {text}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._bar is not None:
            self._bar.close()


def _report_invalid(quiet: bool, limit: int = 100) -> Any:
    shown = [0]

    def report(name: str, line: int, reason: str) -> None:
        shown[0] += 1
        if quiet:
            return
        if shown[0] <= limit:
            print(f"{name}:{line}: invalid: {reason}", file=sys.stderr)
        elif shown[0] == limit + 1:
            print(f"{PROG} import: more invalid lines are not printed (see --rejects and the summary)",
                  file=sys.stderr)

    return report


def _import(args: argparse.Namespace) -> int:
    mapping = _csv_mapping(args)
    if args.max_errors < 0 or args.progress_interval <= 0:
        raise UsageError("--max-errors must be >= 0 and --progress-interval > 0")
    plan = _plan(args, mapping)
    manager = None
    acks = Acks()
    if not args.dry_run:
        host, key = _credentials(args)
        manager, _ = _manager(
            args, host, key, _cli_logger(args.quiet), acks, overflow="block", queue_capacity=args.queue_size,
            batch_size=args.batch_size, max_in_flight=args.concurrency, flush_interval=0.2,
            # Backpressure, not drops: an outage longer than the retry window drops batches as
            # retry_expired, which frees room, so waiting a little longer than that always ends.
            block_timeout=args.retry_window + 2 * args.request_timeout + 5.0)
    resuming = any(i.checkpoint is not None and i.checkpoint.line > 0 for i in plan)
    rejects: Optional[IO[str]] = rejects_writer(args.rejects, resuming) if args.rejects else None
    # What a crash may re-send at most: the lines read ahead plus the requests in flight.
    window = args.queue_size + (args.concurrency + 1) * args.batch_size
    importer = Importer(manager, _report_invalid(args.quiet), rejects, args.max_errors, acks)
    progress = _Progress(importer, manager, args.progress_interval, args.quiet)
    started = time.monotonic()
    finished = True
    try:
        for item in plan:
            if item.checkpoint is not None and item.checkpoint.complete:
                print(f"{PROG} import: {item.name} was imported before (checkpoint {item.checkpoint.path}); "
                      "skipped (--no-resume sends it again)", file=sys.stderr)
                continue
            source = open_source(item.name)
            try:
                reader = CsvRows(source, mapping) if item.format == "csv" else JsonLines(source)
                importer.run(reader, item.ids, item.checkpoint, window)
            finally:
                source.close()
            if manager is not None:
                finished = _settle(manager, item, importer.last_line, args) and finished
            if importer.counts.stopped:
                break
    finally:
        progress.stop()
        if rejects is not None:
            rejects.close()
        if manager is not None:
            manager.close(args.request_timeout + 5.0)
    return _summary(importer, manager, time.monotonic() - started, finished, args.dry_run)


def _settle(manager: Any, item: _Input, last_line: int, args: argparse.Namespace) -> bool:
    """Waits for one file's events; marks its checkpoint complete when all of them were delivered."""
    done: bool = manager.flush(args.retry_window + 2 * args.request_timeout + 5.0)
    if done and item.checkpoint is not None and not sum(manager.stats()["dropped"].values()):
        _save(item.checkpoint, last_line, complete=True)
    return done


def _save(checkpoint: Checkpoint, line: int, complete: bool = False) -> None:
    try:
        checkpoint.save(line, complete)
    except OSError as exc:
        raise UsageError(f"cannot write checkpoint {checkpoint.path}: {exc.strerror or exc} "
                         "(choose another place with --checkpoint PATH)") from None


def _summary(importer: Importer, manager: Any, seconds: float, finished: bool, dry_run: bool) -> int:
    counts = importer.counts
    skipped = f" ({counts.skipped:,} skipped: delivered by an earlier run)" if counts.skipped else ""
    if manager is None:
        print(f"dry run: read {counts.read:,} lines{skipped}, {counts.read - counts.invalid:,} valid, "
              f"{counts.invalid:,} invalid; nothing sent")
        return _EXIT_SOME_LOST if counts.invalid else _EXIT_OK
    stats = manager.stats()
    dropped = sum(stats["dropped"].values())
    reasons = f" ({_reasons(stats['dropped'])})" if dropped else ""
    rate = stats["delivered"] / seconds if seconds > 0 else 0.0
    print(f"import: read {counts.read:,} lines{skipped}, {counts.invalid:,} invalid, {counts.sent:,} sent: "
          f"{stats['delivered']:,} delivered, {dropped:,} dropped{reasons}; {seconds:.1f} s, {rate:,.0f} events/s"
          + ("" if finished else "; delivery did not finish in time")
          + (f"; {counts.stopped}" if counts.stopped else ""))
    ok = finished and not dropped and not counts.invalid and not counts.stopped and stats["delivered"] == counts.sent
    return _EXIT_OK if ok else _EXIT_SOME_LOST


# --------------------------------------------------------------------------- send, fake-server, demo


def _send(args: argparse.Namespace) -> int:
    from .event import validate

    host, key = _credentials(args)
    data: Dict[str, object] = {}
    if args.data_json:
        try:
            parsed = json.loads(args.data_json)
        except ValueError as exc:
            raise UsageError(f"--data-json is not valid JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise UsageError("--data-json must be a JSON object")
        data.update(parsed)
    for name, kind, value in _typed_pairs(args.data, "--data"):
        try:
            data[name] = CONVERTERS[kind](value)
        except ValueError:
            raise UsageError(f"--data {name}:{kind}={value!r}: not a {kind}") from None
    event = validate(args.action, _pairs(args.identifier, "--identifier"), args.type, data)
    if isinstance(event, str):
        raise UsageError(event)
    # The library's give-up line is replaced by one line with the root cause, below.
    manager, transports = _manager(args, host, key, _cli_logger(args.quiet, "ODP event send failed"),
                                   flush_interval=0)
    try:
        manager.enqueue(event)
        done = manager.flush(args.retry_window + 2 * args.request_timeout + 5.0)
    finally:
        manager.close(1.0)
    stats = manager.stats()
    if stats["delivered"] == 1:
        print(f"delivered 1 event to {host} (ODP answered 202)")
        return _EXIT_OK
    why = _reasons(stats["dropped"]) or ("delivery did not finish in time" if not done else "unknown")
    last = transports[0].last_failure if transports else None
    cause = ""
    if last is not None:
        cause = f"; last attempt: {last.detail}" if last.status == 0 else f"; ODP answered HTTP {last.status}"
        cause += f": {last.detail.strip()}" if last.status and last.detail.strip() else ""
    print(f"{PROG} send: error: the event was not delivered ({why}){cause}", file=sys.stderr)
    return _EXIT_SOME_LOST


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
    return _EXIT_OK


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
            return _import(args)
        if args.command == "send":
            return _send(args)
        if args.command == "fake-server":
            return _fake_server(args)
        if args.command in ("demo", "smoke"):
            return _demo(strict=args.command == "smoke")
    except (UsageError, BadInput) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return _EXIT_SOME_LOST
    print(f"{PROG} {__version__} (optimizely-sdk {_compat.sdk_version()}, supports {_compat.SUPPORTED_SDK})")
    return _EXIT_OK
