"""Unit tests of the import's bookkeeping: which lines ODP acknowledged, and the checkpoint file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optimizely_odp_ext._import import Acks, BadInput, Checkpoint
from optimizely_odp_ext.event import default_data, encode, join


def body(*ids: str) -> bytes:
    """A batch body exactly as the manager encodes it."""
    events = [encode(("fullstack", "a", {"fs_user_id": "u"}, {"idempotence_id": i, "note": '"idempotence_id":"x"'}),
                     default_data("5.7.0")) for i in ids]
    return join(events)


def test_the_mark_is_the_last_line_before_the_first_unacknowledged_one() -> None:
    acks = Acks()
    acks.start(10)
    for line, event_id in ((11, "a"), (12, "b"), (14, "c"), (15, "d")):  # 13 was invalid: never handed over
        acks.add(event_id, line)
    assert acks.mark() == 10
    acks.ack_body(body("b", "d"))  # out of order: nothing before b is acknowledged yet
    assert acks.mark() == 10
    acks.ack_body(body("a"))
    assert acks.mark() == 12
    acks.ack_body(body("c"))
    assert acks.mark() == 15


def test_ids_with_escapes_and_ids_shared_by_several_lines() -> None:
    acks = Acks()
    acks.start(0)
    odd = 'order "7" \\ é'
    acks.add(odd, 1)
    acks.add("same", 2)
    acks.add("same", 3)
    acks.ack_body(body("same"))
    assert acks.mark() == 0
    acks.ack_body(body(odd))
    assert acks.mark() == 2
    acks.ack_body(body("same"))
    assert acks.mark() == 3


def test_a_string_value_that_looks_like_an_id_is_not_acknowledged() -> None:
    acks = Acks()
    acks.start(0)
    acks.add("x", 1)  # body() puts the text "idempotence_id":"x" inside every event's note
    acks.ack_body(body("other"))
    assert acks.mark() == 0


def test_freeze_keeps_the_mark_and_forgets_the_rest() -> None:
    acks = Acks()
    acks.start(0)
    acks.add("a", 1)
    acks.add("b", 2)
    acks.ack_body(body("a"))
    acks.freeze()
    acks.add("c", 3)
    acks.ack_body(body("b", "c"))
    assert acks.mark() == 1
    assert acks.frozen


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    path = str(tmp_path / "f.odp-checkpoint")
    assert Checkpoint.load(path, "id-1") is None
    Checkpoint(path, "id-1").save(42)
    loaded = Checkpoint.load(path, "id-1")
    assert loaded is not None
    assert (loaded.line, loaded.complete) == (42, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.odp-checkpoint"]  # no temporary file left
    with pytest.raises(BadInput, match="belongs to another file"):
        Checkpoint.load(path, "id-2")
    (tmp_path / "f.odp-checkpoint").write_text('{"source": "id-1", "li')
    with pytest.raises(BadInput, match="cannot read checkpoint"):
        Checkpoint.load(path, "id-1")
    loaded.save(50, complete=True)
    assert json.loads((tmp_path / "f.odp-checkpoint").read_text())["complete"] is True
