"""The spool's file-level guarantees that need an exact interleaving or a fault no real run gives on
demand: two starts at the same instant, a torn ack file, a short write. End-to-end behaviour (kill
-9, adoption by another process, corruption, a full spool) is in tests/integration/test_spool.py."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, List

import pytest

from optimizely_odp_ext import spool as spool_module
from optimizely_odp_ext.event import Encoded
from optimizely_odp_ext.spool import Spool
from tests.integration import _spool_disk as disk

HOST, KEY = "https://odp.example", "key-1"


def _events(prefix: str, count: int) -> List[Encoded]:
    return [Encoded(json.dumps({"data": {"idempotence_id": f"{prefix}-{i}"}}).encode(), f"{prefix}-{i}")
            for i in range(count)]


def _append(spool: Spool, events: List[Encoded]) -> None:
    assert spool.append([(HOST, KEY, e) for e in events]) == len(events)


def _recover(spool: Spool) -> List[Encoded]:
    return [encoded for _host, _key, encoded in spool.recover()]


def test_a_start_at_the_instant_another_makes_its_folder_neither_adopts_nor_deletes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """B starts right after A created its folder and before A locked it: B must not take A's
    folder for abandoned (it used to delete it, and A then spooled into nothing)."""
    real_mkdir = os.mkdir
    others: List[Spool] = []
    started = []

    def mkdir_then_another_start(path: Any, mode: int = 0o777, **kwargs: Any) -> None:
        real_mkdir(path, mode, **kwargs)
        if not started and os.path.dirname(os.fspath(path)) == str(tmp_path):
            started.append(path)
            others.append(Spool(str(tmp_path)))  # a second process starting at this very moment

    monkeypatch.setattr(os, "mkdir", mkdir_then_another_start)
    first = Spool(str(tmp_path))
    monkeypatch.setattr(os, "mkdir", real_mkdir)
    [second] = others
    try:
        assert not second.has_backlog()
        assert first._own is not None
        assert second._own is not None
        assert os.path.isdir(first._own)
        assert os.path.isdir(second._own)
        assert sorted(disk.folders(str(tmp_path))) == sorted([first._own, second._own])
        _append(first, _events("a", 3))
        assert disk.unacked(str(tmp_path), os.getpid())[os.path.basename(first._own)] == ["a-0", "a-1", "a-2"]
    finally:
        second.close()
        first.close()
    third = Spool(str(tmp_path))  # A's events outlive A: the next start gets them
    try:
        assert [e.idempotence_id for e in _recover(third)] == ["a-0", "a-1", "a-2"]
    finally:
        third.close()


def test_a_torn_ack_file_is_realigned_before_new_acks_are_appended(tmp_path: Path) -> None:
    first = Spool(str(tmp_path))
    events = _events("e", 300)
    _append(first, events)
    first.ack(events[:260])
    first.close()
    [folder] = disk.folders(str(tmp_path))
    [segment] = disk.segments(folder)
    with open(segment[:-4] + ".ack", "ab") as acks:
        acks.write(b"\x00\x00")  # a crash in the middle of writing index 260

    second = Spool(str(tmp_path))
    recovered = _recover(second)
    assert [e.idempotence_id for e in recovered] == [f"e-{i}" for i in range(260, 300)]  # the torn one resent
    second.ack(recovered[:20])
    second.close()  # e-280..e-299 still owed

    third = Spool(str(tmp_path))
    try:
        assert [e.idempotence_id for e in _recover(third)] == [f"e-{i}" for i in range(280, 300)]
    finally:
        third.close()


def test_a_short_write_is_taken_back_so_the_records_before_it_stay_readable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    first = Spool(str(tmp_path))
    _append(first, _events("ok", 5))
    real_write = os.write

    def half_write(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])  # e.g. the disk filled up mid-way

    monkeypatch.setattr(spool_module.os, "write", half_write)
    with pytest.raises(OSError, match="short write"):
        first.append([(HOST, KEY, e) for e in _events("torn", 5)])
    monkeypatch.setattr(spool_module.os, "write", real_write)
    first.close()

    caplog.set_level(logging.WARNING)
    second = Spool(str(tmp_path))
    try:
        assert [e.idempotence_id for e in _recover(second)] == [f"ok-{i}" for i in range(5)]
        assert [r for r in caplog.records if "spool" in r.getMessage()] == [], "no torn record left behind"
    finally:
        second.close()


def test_a_short_ack_write_is_taken_back_so_later_acks_stay_aligned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = Spool(str(tmp_path))
    events = _events("e", 300)
    _append(first, events)
    first.ack(events[:256])
    real_write = os.write

    def half_write(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2 + 1])  # a torn index at the end

    monkeypatch.setattr(spool_module.os, "write", half_write)
    with pytest.raises(OSError, match="short write"):
        first.ack(events[256:258])
    monkeypatch.setattr(spool_module.os, "write", real_write)
    first.ack(events[260:270])
    first.close()

    second = Spool(str(tmp_path))
    try:
        owed = [e.idempotence_id for e in _recover(second)]
        # The failed ack is not recorded (those two are sent again); every other ack still counts.
        assert owed == [f"e-{i}" for i in [256, 257, 258, 259, *range(270, 300)]]
    finally:
        second.close()
