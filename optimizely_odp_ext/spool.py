"""The durable spool (opt-in): accepted events survive a crash, ``kill -9`` or a container restart.

Layout under ``spool_dir``: one folder per process, ``p-<pid>-<random>/``, holding

- ``lock``: held with ``flock(LOCK_EX)`` while the process lives. A folder whose lock can be taken
  belongs to a process that is gone: the next process to start takes the lock, delivers the
  events still owed (with their original ``idempotence_id``) and deletes the folder. Two live
  processes never share a folder, and a folder is adopted by one process at a time. A folder is
  made under a hidden name (``.p-...``), locked, and only then renamed to ``p-...``, so a process
  starting at the same moment never sees it unlocked.
- ``seg-<n>.log``: append-only records ``[length:u32][crc32:u32][host \\n key \\n event-json]``.
- ``seg-<n>.ack``: the indexes (u32) of the segment's records that reached an outcome.

A segment is deleted once every record in it is acknowledged and it is no longer written to.
``max_bytes`` caps the bytes on disk (live segments, acknowledged records included until their
segment goes); when a group would pass it, a segment written to whose records are all
acknowledged is retired first, so delivered events never keep the spool full.
A torn or corrupted record (a crash in the middle of a write) ends the readable part of its
segment: it is skipped with one log line, and the records before it are still delivered.

The worker writes the events it takes from the queue in groups of at most ``batch_size``, as soon
as it runs (the first queued event wakes it, and it looks at least every 50 ms), with one ``write``
call per group (and one ``fsync`` with ``spool_fsync=True``). So a process crash loses the events
accepted since the worker last ran. Measured (2-CPU VM, SIGKILL right after the last send): none
with ``spool_fsync`` off and at most about 1 ms of events with it on, when the sending threads
release the GIL between sends (I/O, sleeps: any real request handler). A thread sending in a tight
loop holds the GIL and starves the worker: then the window is that burst, up to ``queue_capacity``
events (5,000 sends in ~45 ms: 75-100% of them lost if the process is killed at its end). Events sent
before the first datafile (no ODP host known yet) are in memory only until it arrives. With
``spool_fsync`` the same holds for power loss; without it, a power loss can also lose what the OS
had not written back yet.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import struct
import time
import zlib
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from .event import Encoded

try:  # POSIX only; elsewhere the spool is unavailable (install() falls back to memory)
    import fcntl
except ImportError:  # pragma: no cover - not on the supported CI
    fcntl = None  # type: ignore[assignment]

_log = logging.getLogger(__name__)

_HEADER = struct.Struct(">II")
_INDEX = struct.Struct(">I")
SEGMENT_BYTES = 4 * 1024 * 1024
_MIN_SEGMENT_BYTES = 4096
_STAGING_AGE = 3600.0  # seconds after which a hidden folder left by a crash during its setup is removed
_MAX_RECORD = 64 * 1024 * 1024

Record = Tuple[str, str, Encoded]


class _Segment:
    __slots__ = ("ack_fd", "acked", "complete", "directory", "number", "path", "sid", "size", "total", "writing")

    def __init__(self, directory: str, number: int, writing: bool) -> None:
        self.directory = directory
        self.number = number
        self.path = os.path.join(directory, f"seg-{number:08d}.log")
        self.total = 0
        self.acked = 0
        self.size = 0
        self.writing = writing
        self.complete = writing  # an adopted segment's total is known once it was read to the end
        self.ack_fd: Optional[int] = None
        self.sid = 0  # its key in Spool._segments, and the first half of its records' spool_id

    @property
    def ack_path(self) -> str:
        return self.path[:-4] + ".ack"


class Spool:
    """One process's spool under ``directory``.

    Args:
        directory: The spool directory (created if missing).
        fsync: fsync after every group written.
        max_bytes: The size cap of live segments; past it, ``append`` refuses new events.
        logger: Where user-facing lines go.

    Raises:
        OSError: The directory cannot be created, written or locked.
    """

    def __init__(self, directory: str, *, fsync: bool = False, max_bytes: int = 256 * 1024 * 1024,
                 logger: Any = None) -> None:
        if fcntl is None:
            raise OSError(errno.ENOTSUP, "file locking (fcntl) is not available on this platform")
        self.directory = os.path.abspath(directory)
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.logger = logger or _log
        # Segments smaller than the cap, so delivered events free space well before it is reached.
        self.segment_bytes = min(SEGMENT_BYTES, max(max_bytes // 8, _MIN_SEGMENT_BYTES))
        os.makedirs(self.directory, exist_ok=True)
        self._segments: Dict[int, _Segment] = {}
        self._next_id = 0
        self._bytes = 0
        self._own: Optional[str] = None
        self._own_lock: Optional[int] = None
        self._active: Optional[_Segment] = None
        self._active_fd: Optional[int] = None
        self._adopted: Dict[str, int] = {}  # folder -> its lock fd
        self._adopted_segments: List[_Segment] = []
        self._open_own()
        try:
            self._adopt_abandoned()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- folders and locks

    def _open_own(self) -> None:
        # Made and locked under a name adopters skip, then renamed: a process starting at the same
        # moment must never find it unlocked (it would take it for abandoned and delete it).
        name = f"p-{os.getpid()}-{secrets.token_hex(4)}"
        folder = os.path.join(self.directory, name)
        staging = os.path.join(self.directory, "." + name)
        os.mkdir(staging, 0o700)
        lock: Optional[int] = None
        try:
            lock = os.open(os.path.join(staging, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staging, folder)
        except BaseException:
            with contextlib.suppress(OSError):
                self._remove_folder(staging, lock)  # closes the lock too
            raise
        self._own, self._own_lock = folder, lock

    def _adopt_abandoned(self) -> None:
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return
        for name in names:
            folder = os.path.join(self.directory, name)
            if name.startswith(".p-"):
                self._remove_stale_staging(folder)
                continue
            if folder == self._own or not name.startswith("p-") or not os.path.isdir(folder):
                continue
            try:
                self._adopt(folder)
            except OSError as exc:  # removed or changed under us by another process: not ours
                _log.debug("not adopting %s: %s", folder, exc)

    def _adopt(self, folder: str) -> None:
        lock_path = os.path.join(folder, "lock")
        try:
            lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The folder may have been removed by its owner between open and flock.
            if os.fstat(lock).st_ino != os.stat(lock_path).st_ino:
                raise OSError(errno.ESTALE, "lock file replaced")
            segments = self._segments_in(folder)
        except OSError:
            os.close(lock)
            return  # alive (locked), or gone
        if not segments:
            self._remove_folder(folder, lock)
            return
        self._adopted[folder] = lock
        for number in segments:
            segment = _Segment(folder, number, writing=False)
            segment.size = _file_size(segment.path)
            self._bytes += segment.size
            self._register(segment)
            self._adopted_segments.append(segment)

    def _remove_stale_staging(self, folder: str) -> None:
        """A hidden folder is a process's folder being set up; one left by a crash during that
        (empty but for its lock) is removed once it is old and unlocked."""
        try:
            if time.time() - os.stat(folder).st_mtime < _STAGING_AGE:
                return
            lock = os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            return
        with contextlib.suppress(OSError):
            self._remove_folder(folder, lock)

    @staticmethod
    def _segments_in(folder: str) -> List[int]:
        numbers = []
        for entry in os.listdir(folder):
            if entry.startswith("seg-") and entry.endswith(".log"):
                try:
                    numbers.append(int(entry[4:-4]))
                except ValueError:
                    continue
        return sorted(numbers)

    def _register(self, segment: _Segment) -> int:
        self._next_id += 1
        segment.sid = self._next_id
        self._segments[segment.sid] = segment
        return segment.sid

    def _remove_folder(self, folder: str, lock: Optional[int]) -> None:
        """Deletes a folder whose lock we hold (its lock file last, then the lock is released)."""
        try:
            for entry in os.listdir(folder):
                if entry != "lock":
                    _unlink(os.path.join(folder, entry))
            _unlink(os.path.join(folder, "lock"))
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        finally:
            if lock is not None:
                os.close(lock)

    # ----------------------------------------------------------------- recovery

    def has_backlog(self) -> bool:
        """Whether folders of earlier processes were adopted (their events are to be delivered)."""
        return bool(self._adopted_segments)

    def recover(self) -> Iterator[Record]:
        """Yields the events of adopted folders not yet acknowledged, oldest first.

        ``Encoded.spool_id`` is set, so acknowledging them completes (and deletes) their segments.
        """
        for segment in list(self._adopted_segments):
            segment_id = segment.sid
            acked = _read_acks(segment.ack_path)
            index = -1
            for index, record in self._read_segment(segment):
                if index in acked:
                    continue
                host, key, body = record
                encoded = Encoded(body, _idempotence_id(body), spool_id=(segment_id, index))
                yield host, key, encoded
            segment.total = index + 1
            # Acks of this process (events already delivered while the rest was read) are counted
            # in segment.acked already; add the earlier processes' ones.
            segment.acked += len({i for i in acked if i < segment.total})
            segment.complete = True
            self._maybe_delete(segment_id, segment)
        self._adopted_segments.clear()

    def _read_segment(self, segment: _Segment) -> Iterator[Tuple[int, Tuple[str, str, bytes]]]:
        try:
            with open(segment.path, "rb") as file:
                data = file.read()
        except OSError as exc:
            self.logger.error(f"ODP spool: cannot read {segment.path} ({exc}); its events are skipped.")
            return
        offset, index = 0, 0
        while offset < len(data):
            problem = None
            if offset + _HEADER.size > len(data):
                problem = "torn record header"
            else:
                length, crc = _HEADER.unpack_from(data, offset)
                start, end = offset + _HEADER.size, offset + _HEADER.size + length
                if length > _MAX_RECORD or end > len(data):
                    problem = "torn record"
                elif zlib.crc32(data[start:end]) != crc:
                    problem = "corrupted record (checksum mismatch)"
                else:
                    parts = data[start:end].split(b"\n", 2)
                    try:
                        if len(parts) != 3:
                            raise ValueError("not host, key and event")
                        host, key = parts[0].decode("utf-8"), parts[1].decode("utf-8")
                    except ValueError:  # UnicodeDecodeError included
                        problem = "corrupted record (bad layout)"
            if problem is not None:
                self.logger.warning(
                    f"ODP spool: skipped record {index} of {segment.path}, a {problem} at byte {offset} "
                    f"(a crash during a write); the {index} record(s) before it are delivered.")
                return
            yield index, (host, key, parts[2])
            offset, index = end, index + 1

    # ----------------------------------------------------------------- writing

    def append(self, records: List[Record]) -> int:
        """Writes a group of events; sets their ``spool_id``.

        Returns:
            How many of them (from the front) were written; the rest would pass ``max_bytes``.
        """
        if self._own is None:
            self._open_own()  # a forked child writes to a folder of its own
        chunks: List[bytes] = []
        for host, key, encoded in records:
            payload = host.encode("utf-8") + b"\n" + key.encode("utf-8") + b"\n" + encoded.body
            chunks.append(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        total = sum(len(chunk) for chunk in chunks)
        active = self._active
        if self._bytes + total > self.max_bytes and active is not None and active.acked >= active.total:
            self._retire_active()  # everything in it reached an outcome: its bytes are free
        if self._bytes + total > self.max_bytes:
            total, kept = 0, 0
            for chunk in chunks:
                if self._bytes + total + len(chunk) > self.max_bytes:
                    break
                total += len(chunk)
                kept += 1
            del chunks[kept:]
        if not chunks:
            return 0
        segment, fd = self._writable(total)
        segment_id = segment.sid
        data = b"".join(chunks)
        written = os.write(fd, data)
        if written != len(data):
            # A torn group would end the readable part of the segment: take it back.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, segment.size)
            raise OSError(errno.ENOSPC, f"short write to {segment.path} ({written} of {len(data)} bytes)")
        if self.fsync:
            os.fsync(fd)
        for offset, (_host, _key, encoded) in enumerate(records[: len(chunks)]):
            encoded.spool_id = (segment_id, segment.total + offset)
        segment.total += len(chunks)
        segment.size += total
        self._bytes += total
        return len(chunks)

    def _writable(self, incoming: int) -> Tuple[_Segment, int]:
        active, fd = self._active, self._active_fd
        if active is not None and fd is not None and (active.size == 0 or active.size + incoming <= self.segment_bytes):
            return active, fd
        self._retire_active()
        assert self._own is not None
        numbers = self._segments_in(self._own)
        segment = _Segment(self._own, (numbers[-1] + 1) if numbers else 1, writing=True)
        fd = os.open(segment.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._register(segment)
        self._active, self._active_fd = segment, fd
        return segment, fd

    def _retire_active(self) -> None:
        """Stops writing to the active segment (deleted now if every record reached an outcome)."""
        active, fd = self._active, self._active_fd
        self._active = self._active_fd = None
        if fd is not None:
            os.close(fd)
        if active is not None:
            active.writing = False
            self._maybe_delete(active.sid, active)

    # ----------------------------------------------------------------- acknowledging

    def ack(self, events: List[Encoded]) -> None:
        """These events reached an outcome: never deliver them again."""
        by_segment: Dict[int, List[int]] = {}
        for encoded in events:
            if encoded.spool_id is not None:
                segment_id, index = encoded.spool_id
                by_segment.setdefault(segment_id, []).append(index)
                encoded.spool_id = None
        for segment_id, indexes in by_segment.items():
            segment = self._segments.get(segment_id)
            if segment is None:
                continue
            if segment.ack_fd is None:
                segment.ack_fd = _open_acks(segment.ack_path)
            data = b"".join(_INDEX.pack(i) for i in indexes)
            written = os.write(segment.ack_fd, data)
            if written != len(data):
                # Take the part back: a torn index would shift every index appended after it.
                with contextlib.suppress(OSError):
                    os.ftruncate(segment.ack_fd, os.fstat(segment.ack_fd).st_size - written)
                raise OSError(errno.ENOSPC, f"short write to {segment.ack_path} ({written} of {len(data)} bytes)")
            segment.acked += len(indexes)
            self._maybe_delete(segment_id, segment)

    def _maybe_delete(self, segment_id: int, segment: _Segment) -> None:
        if segment.writing or not segment.complete or segment.acked < segment.total:
            return
        if segment.ack_fd is not None:
            os.close(segment.ack_fd)
            segment.ack_fd = None
        _unlink(segment.path)
        _unlink(segment.ack_path)
        self._bytes -= segment.size
        del self._segments[segment_id]
        folder = segment.directory
        lock = self._adopted.get(folder)
        if lock is not None and not any(s.directory == folder for s in self._segments.values()):
            del self._adopted[folder]
            self._remove_folder(folder, lock)

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Closes files and releases locks. Unacknowledged events stay for the next process."""
        if self._active_fd is not None and self.fsync:
            os.fsync(self._active_fd)
        self._retire_active()
        for segment in self._segments.values():
            if segment.ack_fd is not None:
                os.close(segment.ack_fd)
                segment.ack_fd = None
        own_left = any(s.directory == self._own for s in self._segments.values())
        if self._own is not None and not own_left and not self._segments_in(self._own):
            self._remove_folder(self._own, self._own_lock)
        elif self._own_lock is not None:
            os.close(self._own_lock)
        self._own = self._own_lock = None
        for _folder, lock in list(self._adopted.items()):
            os.close(lock)  # not finished: the next process adopts it again
        self._adopted.clear()
        self._segments.clear()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's folders (closing our copies of its descriptors
        leaves the parent's locks in place); a folder of the child's own is made on first write."""
        for fd in [self._active_fd, self._own_lock, *self._adopted.values(),
                   *(s.ack_fd for s in self._segments.values())]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._segments = {}
        self._adopted = {}
        self._adopted_segments = []
        self._active = self._active_fd = None
        self._own = self._own_lock = None
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        """Bytes held in live segments."""
        return self._bytes


def open_spool(directory: str, fsync: bool, max_bytes: int, logger: Any) -> Optional[Spool]:
    """Opens the spool in ``directory``, or says (two lines) why events stay in memory only."""
    try:
        return Spool(directory, fsync=fsync, max_bytes=max_bytes, logger=logger)
    except OSError as exc:
        logger.error(f'ODP spool directory "{directory}" cannot be used ({exc.__class__.__name__}: '
                     f"{exc.strerror or exc}).")
        logger.warning("ODP events are kept in memory only: a crash can lose queued events.")
        return None


def _read_acks(path: str) -> Set[int]:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return set()
    usable = len(data) - len(data) % _INDEX.size  # a torn last index is ignored (re-sent at worst)
    return {_INDEX.unpack_from(data, offset)[0] for offset in range(0, usable, _INDEX.size)}


def _open_acks(path: str) -> int:
    """Opens an ack file for appending; a torn last index (left by a crash) is cut off first, or
    every index appended after it would be read shifted."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size % _INDEX.size:
            os.ftruncate(fd, size - size % _INDEX.size)
    except OSError:
        os.close(fd)
        raise
    return fd


def _idempotence_id(body: bytes) -> str:
    try:
        value = json.loads(body)["data"]["idempotence_id"]
    except (ValueError, KeyError, TypeError):
        return ""
    return str(value)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
