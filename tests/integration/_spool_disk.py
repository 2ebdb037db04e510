"""Reads a spool directory from the outside (the format of ``optimizely_odp_ext/spool.py``), so the
tests check what is really on disk, not what the spool believes. Standard library only: the child
processes of ``test_spool.py`` import it too."""

from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Dict, List, Optional, Tuple

_HEADER = struct.Struct(">II")
_INDEX = struct.Struct(">I")


def segment_records(path: str) -> List[Tuple[int, int, str]]:
    """The readable records of one segment file: ``(offset, length, idempotence_id)`` each, up to
    the first torn or corrupted one."""
    with open(path, "rb") as file:
        data = file.read()
    records = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start, end = offset + _HEADER.size, offset + _HEADER.size + length
        if end > len(data) or zlib.crc32(data[start:end]) != crc:
            break
        body = data[start:end].split(b"\n", 2)[2]
        records.append((offset, end - offset, str(json.loads(body)["data"]["idempotence_id"])))
        offset = end
    return records


def acked_indexes(segment_path: str) -> List[int]:
    ack_path = segment_path[:-4] + ".ack"
    try:
        with open(ack_path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return []
    usable = len(data) - len(data) % _INDEX.size
    return [_INDEX.unpack_from(data, offset)[0] for offset in range(0, usable, _INDEX.size)]


def segments(folder: str) -> List[str]:
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.startswith("seg-") and name.endswith(".log"))


def folders(spool_dir: str, pid: Optional[int] = None) -> List[str]:
    """The process folders (``p-<pid>-<random>``) under ``spool_dir``, of one pid if given."""
    prefix = "p-" if pid is None else f"p-{pid}-"
    try:
        names = os.listdir(spool_dir)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(spool_dir, name) for name in names if name.startswith(prefix))


def unacked(spool_dir: str, pid: Optional[int] = None) -> Dict[str, List[str]]:
    """The idempotence ids of records not acknowledged yet, per folder name, in spool order."""
    held: Dict[str, List[str]] = {}
    for folder in folders(spool_dir, pid):
        ids: List[str] = []
        try:
            for segment in segments(folder):
                acked = set(acked_indexes(segment))
                ids.extend(r[2] for index, r in enumerate(segment_records(segment)) if index not in acked)
        except FileNotFoundError:  # deleted while we read (its events reached an outcome)
            continue
        held[os.path.basename(folder)] = ids
    return held


def count_unacked(spool_dir: str, pid: Optional[int] = None) -> int:
    return sum(len(ids) for ids in unacked(spool_dir, pid).values())


def tree(path: str) -> List[str]:
    """Every file and directory under ``path``, relative to it (for 'the spool is empty' checks)."""
    found = []
    for root, dirs, files in os.walk(path):
        found.extend(os.path.relpath(os.path.join(root, name), path) for name in dirs + files)
    return sorted(found)
