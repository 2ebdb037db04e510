"""Bulk import for the command line: read events from JSON Lines or CSV, send them, resume safely.

The pieces, in the order an event meets them:

* :func:`open_source` opens a file (gzip by its ``.gz`` suffix) or standard input as bytes;
* :class:`JsonLines` / :class:`CsvRows` turn lines into ``(line number, action, identifiers, type,
  data)`` or an error, reading one line at a time (memory stays bounded whatever the file's size);
* each event's ``idempotence_id`` is derived from the file's identity and its line number
  (:func:`line_ids`), unless the line carries one, so a re-run sends the same ids and ODP
  de-duplicates them;
* :class:`Importer` validates each event as ``send_odp_event`` does and hands it to an
  :class:`~optimizely_odp_ext.manager.EventManager` with ``overflow="block"`` (backpressure, never a
  drop), whose transport (:class:`AckingTransport`) tells :class:`Acks` which lines ODP accepted; a
  checkpoint thread records, atomically, the last line before which ODP accepted everything
  (:class:`Checkpoint`), and reading never runs more than a window of lines past it, which bounds
  what a crash can make a re-run send twice.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import os
import sys
import threading
import time
import zlib
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from ._sending import NAMESPACE_URL, AckingTransport, Acks, uuid5_namer
from ._threads import start_quiet
from .event import validate
from .manager import EventManager

__all__ = ["CONVERTERS", "AckingTransport", "Acks", "BadInput", "Checkpoint", "CsvMapping", "CsvRows", "Importer",
           "JsonLines", "Source", "file_identity", "line_ids", "open_source", "rejects_writer"]

# (line number, action, identifiers, type, data), or (line number, error) for an invalid line.
Row = Tuple[int, Any, Any, Any, Optional[Dict[str, Any]]]
Bad = Tuple[int, str]
Converter = Callable[[str], Any]

_JSON_FIELDS = frozenset(("action", "identifiers", "type", "data"))


class BadInput(Exception):
    """A bad file, flag or checkpoint: the command line prints the message and exits 2."""


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
    """One input: a path or ``-`` (standard input), opened as bytes.

    Attributes:
        name: As given on the command line.
        raw: The underlying byte stream (its position tells the progress, compressed or not).
        stream: What to read lines from (a gzip reader over ``raw`` for ``.gz``).
        size: The file's size in bytes, or None for standard input.
    """

    name: str
    raw: IO[bytes]
    stream: IO[bytes]
    size: Optional[int]

    def position(self) -> int:
        try:
            return self.raw.tell()
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        if self.name != "-":
            self.stream.close()
            self.raw.close()


def open_source(name: str) -> Source:
    """Opens ``name`` for reading (``-`` is standard input; ``.gz`` is decompressed).

    Raises:
        BadInput: When the file cannot be opened, with the reason in one line.
    """
    if name == "-":
        raw: IO[bytes] = sys.stdin.buffer
        return Source(name, raw, raw, None)
    try:
        raw = open(name, "rb")  # noqa: SIM115 (closed by Source.close)
        size = os.fstat(raw.fileno()).st_size
    except OSError as exc:
        raise BadInput(f"cannot read {name}: {exc.strerror or exc}") from None
    stream: IO[bytes] = raw
    if name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        try:
            stream.peek(1)  # type: ignore[attr-defined]
        except (OSError, EOFError) as exc:
            raw.close()
            raise BadInput(f"cannot read {name}: not a gzip file ({exc})") from None
    return Source(name, raw, stream, size)


def file_identity(name: str) -> str:
    """The SHA-256 of the file's bytes (as stored): same content, same ids; any change, new ids."""
    digest = hashlib.sha256()
    try:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise BadInput(f"cannot read {name}: {exc.strerror or exc}") from None
    return digest.hexdigest()[:32]


def line_ids(identity: str) -> Callable[[int], str]:
    """Returns ``id_for(line)``: ``str(uuid.uuid5(uuid.NAMESPACE_URL, f"odp-import:{identity}:{line}"))``."""
    name_to_id = uuid5_namer(NAMESPACE_URL, f"odp-import:{identity}:")
    return lambda line: name_to_id(str(line))


# --------------------------------------------------------------------------- readers


class JsonLines:
    """JSON Lines: one object per line with ``action``, ``identifiers``, optional ``type``, ``data``."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.last = b""  # the line being looked at, for the rejects file
        self.number = 0  # its number

    def header_problem(self) -> Optional[str]:
        return None

    def rows(self, skip_to: int = 0) -> Iterator[Union[Row, Bad]]:
        try:
            yield from self._rows(skip_to)
        except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt gzip stream, a read error
            raise BadInput(f"cannot read {self.source.name} after line {self.number}: {exc}") from None

    def _rows(self, skip_to: int) -> Iterator[Union[Row, Bad]]:
        loads = json.loads
        for number, raw in enumerate(self.source.stream, 1):
            self.number = number
            if number <= skip_to or not raw.strip():
                continue
            self.last = raw
            try:
                obj = loads(raw)
            except ValueError as exc:
                yield number, f"not valid JSON ({exc})"
                continue
            if not isinstance(obj, dict):
                yield number, f"expected a JSON object, got {_json_type(obj)}"
                continue
            if len(obj) > 4 or not _JSON_FIELDS.issuperset(obj):
                extra = sorted(set(obj) - _JSON_FIELDS)
                yield number, (f"unknown field(s) {', '.join(map(json.dumps, extra))} "
                               "(expected action, identifiers, type, data)")
                continue
            data = obj.get("data")
            if data is not None and not isinstance(data, dict):
                yield number, f'"data" must be an object, got {_json_type(data)}'
                continue
            yield number, obj.get("action"), obj.get("identifiers"), obj.get("type"), data

    def write_reject(self, out: IO[str]) -> None:
        """Copies the current line, byte for byte, so it can be fixed and imported again."""
        line = self.last.decode("utf-8", "surrogateescape")
        out.write(line if line.endswith("\n") else line + "\n")


def _json_type(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _to_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "y", "t"):
        return True
    if lowered in ("false", "0", "no", "n", "f"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false, 1/0, yes/no)")


CONVERTERS: Dict[str, Converter] = {"str": str, "int": int, "float": float, "bool": _to_bool}


@dataclasses.dataclass
class CsvMapping:
    """How CSV columns become an event (flags ``--action-column``, ``--identifier``, ``--data``...).

    Attributes:
        action_column: The column holding the action (used when ``action`` is None).
        action: One action for every row.
        type_column: The column holding the type, if any.
        type: The type for every row (when ``type_column`` is None).
        identifiers: ``(ODP identifier, column)`` pairs.
        data: ``(data key, type name, column)`` triples.
        id_column: A column holding each row's ``idempotence_id``.
        delimiter: The field separator.
    """

    action_column: str = "action"
    action: Optional[str] = None
    type_column: Optional[str] = None
    type: Optional[str] = None
    identifiers: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    data: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    id_column: Optional[str] = None
    delimiter: str = ","


class CsvRows:
    """CSV with a header row, mapped to events by a :class:`CsvMapping`. Line numbers are physical."""

    def __init__(self, source: Source, mapping: CsvMapping) -> None:
        self.source = source
        self.mapping = mapping
        self._text = io.TextIOWrapper(source.stream, encoding="utf-8-sig", newline="")
        self._reader = csv.reader(self._text, delimiter=mapping.delimiter)
        self.last: List[str] = []  # the row being looked at, for the rejects file
        self._header_written = False
        try:
            self.header: List[str] = next(self._reader)
        except StopIteration:
            self.header = []
        except (csv.Error, UnicodeDecodeError) as exc:
            raise BadInput(f"cannot read {source.name}: bad CSV header ({exc})") from None

    def header_problem(self) -> Optional[str]:
        if not self.header:
            return f"{self.source.name}: empty file, expected a CSV header row"
        m = self.mapping
        wanted = [c for _, c in m.identifiers] + [c for _, _, c in m.data]
        wanted += [c for c in (None if m.action else m.action_column, m.type_column, m.id_column) if c]
        missing = [c for c in wanted if c not in self.header]
        if missing:
            return (f"{self.source.name}: column(s) {', '.join(map(json.dumps, missing))} not in the header "
                    f"({', '.join(map(json.dumps, self.header))})")
        return None

    def rows(self, skip_to: int = 0) -> Iterator[Union[Row, Bad]]:
        m = self.mapping
        index = {name: i for i, name in enumerate(self.header)}
        ids = [(key, index[col]) for key, col in m.identifiers]
        data = [(key, CONVERTERS[kind], kind, index[col], col) for key, kind, col in m.data]
        action_at = None if m.action else index[m.action_column]
        type_at = index[m.type_column] if m.type_column else None
        id_at = index[m.id_column] if m.id_column else None
        width = len(self.header)
        reader = self._reader
        try:
            for row in reader:
                number = reader.line_num
                if number <= skip_to or not row:
                    continue
                self.last = row
                if len(row) != width:
                    yield number, f"expected {width} fields, got {len(row)}"
                    continue
                values: Dict[str, Any] = {}
                problem = None
                for key, convert, kind, at, col in data:
                    cell = row[at]
                    if cell == "":
                        continue
                    try:
                        values[key] = convert(cell)
                    except ValueError:
                        problem = f'column "{col}": {cell!r} is not {"an" if kind == "int" else "a"} {kind}'
                        break
                if problem:
                    yield number, problem
                    continue
                if id_at is not None and row[id_at]:
                    values["idempotence_id"] = row[id_at]
                yield (number, m.action if action_at is None else row[action_at],
                       {key: row[at] for key, at in ids if row[at]},
                       m.type if type_at is None else row[type_at], values)
        except (csv.Error, UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:
            raise BadInput(f"cannot read {self.source.name} after line {reader.line_num}: {exc}") from None

    def write_reject(self, out: IO[str]) -> None:
        """Copies the current row (the header first, once), so it can be fixed and imported again."""
        writer = csv.writer(out, delimiter=self.mapping.delimiter, lineterminator="\n")
        if not self._header_written:
            self._header_written = True
            writer.writerow(self.header)
        writer.writerow(self.last)


# --------------------------------------------------------------------------- checkpoint


@dataclasses.dataclass
class Checkpoint:
    """The last line before which everything was delivered, for one input, in a small JSON file.

    Written atomically (a temporary file in the same directory, fsync, ``os.replace``): a crash
    at any moment leaves the previous checkpoint or the new one, never a torn one.
    """

    path: str
    identity: str
    line: int = 0
    complete: bool = False

    @classmethod
    def load(cls, path: str, identity: str) -> Optional[Checkpoint]:
        """Reads ``path``; None when there is none. Raises BadInput when it is for another file."""
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise BadInput(f"cannot read checkpoint {path}: {exc}; remove it or pass --no-resume") from None
        if not isinstance(saved, dict) or saved.get("source") != identity:
            raise BadInput(f"checkpoint {path} belongs to another file or an earlier version of it; "
                               f"remove it or pass --no-resume to send everything again")
        line = saved.get("line")
        return cls(path, identity, line if isinstance(line, int) and line >= 0 else 0, saved.get("complete") is True)

    def save(self, line: int, complete: bool = False) -> None:
        self.line, self.complete = line, complete
        tmp = f"{self.path}.tmp"  # a fixed name: one left by a killed run is simply overwritten
        payload = {"version": 1, "source": self.identity, "line": line, "complete": complete,
                   "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- the import


@dataclasses.dataclass
class Counts:
    """What one import did, for the progress lines and the summary."""

    read: int = 0  # lines read and parsed (skipped lines excluded)
    skipped: int = 0  # lines a checkpoint said were delivered before
    invalid: int = 0
    sent: int = 0  # handed to the event manager
    stopped: str = ""  # why the import stopped early, if it did


class Importer:
    """Reads inputs and sends their events through ``manager``, checkpointing as delivery goes.

    Args:
        manager: The event manager (``overflow="block"``), or None for a dry run.
        acks: Told of each line handed over; its transport acknowledges them (see :class:`Acks`).
        report_invalid: Called with ``(source name, line number, reason)`` for each invalid line.
        rejects: Where invalid lines are copied (raw JSON line, or CSV row with a header first).
        max_errors: Stop reading after this many invalid lines (0: never).
    """

    def __init__(self, manager: Optional[EventManager], report_invalid: Callable[[str, int, str], None],
                 rejects: Optional[IO[str]] = None, max_errors: int = 0, acks: Optional[Acks] = None) -> None:
        self.manager = manager
        self.acks = acks
        self.report_invalid = report_invalid
        self.rejects = rejects
        self.max_errors = max_errors
        self.counts = Counts()
        self.current: Optional[Source] = None
        self._enqueued_line = 0  # the last line handed to the manager (read by the checkpoint thread)

    @property
    def last_line(self) -> int:
        """The last line handed to the manager (or skipped by the checkpoint) in the current input."""
        return self._enqueued_line

    def run(self, reader: Union[JsonLines, CsvRows], id_for: Optional[Callable[[int], str]],
            checkpoint: Optional[Checkpoint], window: int = 0) -> None:
        """Imports one input, from after the checkpoint's line; returns when every line is read.

        Args:
            reader: The input.
            id_for: Makes a line's ``idempotence_id`` (None: the manager draws random ones).
            checkpoint: Where delivery progress is recorded (None: nowhere).
            window: Lines read at most past the checkpoint (0: no limit), so that a crash re-sends
                at most this many lines whatever the timing of replies.
        """
        self.current = reader.source
        skip_to = checkpoint.line if checkpoint is not None else 0
        self.counts.skipped += skip_to
        self._enqueued_line = skip_to
        saver = None
        if checkpoint is not None and self.manager is not None and self.acks is not None and id_for is not None:
            self.acks.start(skip_to)
            saver = _CheckpointSaver(self.manager, self.acks, checkpoint)
            saver.start()
        try:
            self._loop(reader, id_for, skip_to, saver, window)
        finally:
            if saver is not None:
                saver.stop()

    def _loop(self, reader: Union[JsonLines, CsvRows], id_for: Optional[Callable[[int], str]],
              skip_to: int, saver: Optional[_CheckpointSaver], window: int) -> None:
        counts = self.counts
        manager = self.manager
        enqueue = manager.enqueue if manager is not None else None
        acks = self.acks if saver is not None else None
        saved = saver.checkpoint if saver is not None and window > 0 else None
        for row in reader.rows(skip_to):
            counts.read += 1
            if len(row) == 2:
                self._invalid(reader, row[0], row[1])
            else:
                number, action, identifiers, type_, data = row
                if id_for is not None:
                    if data is None:
                        data = {"idempotence_id": id_for(number)}
                    elif "idempotence_id" not in data:
                        data["idempotence_id"] = id_for(number)
                event = validate(action, identifiers, type_, data)
                if isinstance(event, str):
                    self._invalid(reader, number, event)
                elif event[3] is not None and not isinstance(event[3].get("idempotence_id", ""), str):
                    self._invalid(reader, number, "idempotence_id must be a string")
                elif enqueue is not None:
                    if saved is not None and number - saved.line > window:
                        saver.wait_for(number - window)  # type: ignore[union-attr]
                    if acks is not None and event[3] is not None:
                        acks.add(str(event[3]["idempotence_id"]), number)
                    enqueue(event)
                    counts.sent += 1
                    self._enqueued_line = number
            if self.max_errors and counts.invalid >= self.max_errors:
                counts.stopped = f"stopped after {counts.invalid} invalid line(s) (--max-errors {self.max_errors})"
                return

    def _invalid(self, reader: Union[JsonLines, CsvRows], number: int, reason: str) -> None:
        self.counts.invalid += 1
        self.report_invalid(reader.source.name, number, reason)
        if self.rejects is not None:
            reader.write_reject(self.rejects)



class _CheckpointSaver:
    """Records :meth:`Acks.mark` in the checkpoint as it advances, on its own thread.

    The mark only covers lines ODP acknowledged, so the checkpoint never runs ahead of delivery;
    after the first drop it stops advancing, so a re-run re-sends from there.
    """

    _INTERVAL = 0.02  # seconds between looks at the mark: what a crash re-sends is what ODP acknowledged in it

    def __init__(self, manager: EventManager, acks: Acks, checkpoint: Checkpoint) -> None:
        self._manager = manager
        self._acks = acks
        self.checkpoint = checkpoint
        self._saved = threading.Condition(threading.Lock())
        self._dropped_before = _dropped(manager)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="odp-import-checkpoint", daemon=True)
        self.error: Optional[BaseException] = None

    def start(self) -> None:
        start_quiet(self._thread)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30.0)
        if not self._thread.is_alive() and self.error is None:
            self._look()  # the last word: what was acknowledged until now

    def _run(self) -> None:
        while not self._stop.wait(self._INTERVAL) and self.error is None:
            self._look()
        with self._saved:
            self._saved.notify_all()

    def _look(self) -> None:
        if _dropped(self._manager) > self._dropped_before:
            self._acks.freeze()  # the mark cannot pass a dropped line anyway; stop keeping the rest
        mark = self._acks.mark()
        if mark > self.checkpoint.line:
            try:
                self.checkpoint.save(mark)
            except OSError as exc:
                self.error = exc
            with self._saved:
                self._saved.notify_all()

    def wait_for(self, line: int) -> None:
        """Waits until the checkpoint reaches ``line``, or can no longer advance (a drop, an error)."""
        with self._saved:
            while (self.checkpoint.line < line and not self._acks.frozen and self.error is None
                   and not self._stop.is_set()):
                self._saved.wait(0.1)


def _dropped(manager: EventManager) -> int:
    return sum(manager.stats()["dropped"].values())


def rejects_writer(path: str, append: bool) -> IO[str]:
    """Opens the rejects file (line-buffered, so a crash keeps what was written)."""
    try:
        # surrogateescape: a line that is not UTF-8 is copied byte for byte.
        return open(path, "a" if append else "w", encoding="utf-8", errors="surrogateescape",
                    buffering=1)
    except OSError as exc:
        raise BadInput(f"cannot write rejects file {path}: {exc.strerror or exc}") from None

