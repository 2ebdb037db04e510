"""The ``import`` command's run: checking the inputs, reading them through the :class:`Importer`, the
progress reporter, the checkpoints once ODP has everything, and the summary."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import time
from typing import IO, Any, Callable, List, Optional, Tuple

from ._cli_common import (
    EXIT_OK,
    EXIT_SOME_LOST,
    PROG,
    UsageError,
    cli_logger,
    credentials,
    event_manager,
    reasons_text,
    typed_pairs,
)
from ._import import (
    Acks,
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


def _csv_mapping(args: argparse.Namespace) -> CsvMapping:
    identifiers = [(key, column) for key, _, column in typed_pairs(args.identifier, "--identifier")]
    data = typed_pairs(args.data, "--data")
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


def run_import(args: argparse.Namespace) -> int:
    mapping = _csv_mapping(args)
    if args.max_errors < 0 or args.progress_interval <= 0:
        raise UsageError("--max-errors must be >= 0 and --progress-interval > 0")
    plan = _plan(args, mapping)
    manager = None
    acks = Acks()
    if not args.dry_run:
        host, key = credentials(args)
        manager, _ = event_manager(
            args, host, key, cli_logger(args.quiet), acks, overflow="block", queue_capacity=args.queue_size,
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
        return EXIT_SOME_LOST if counts.invalid else EXIT_OK
    stats = manager.stats()
    dropped = sum(stats["dropped"].values())
    reasons = f" ({reasons_text(stats['dropped'])})" if dropped else ""
    rate = stats["delivered"] / seconds if seconds > 0 else 0.0
    print(f"import: read {counts.read:,} lines{skipped}, {counts.invalid:,} invalid, {counts.sent:,} sent: "
          f"{stats['delivered']:,} delivered, {dropped:,} dropped{reasons}; {seconds:.1f} s, {rate:,.0f} events/s"
          + ("" if finished else "; delivery did not finish in time")
          + (f"; {counts.stopped}" if counts.stopped else ""))
    ok = finished and not dropped and not counts.invalid and not counts.stopped and stats["delivered"] == counts.sent
    return EXIT_OK if ok else EXIT_SOME_LOST
