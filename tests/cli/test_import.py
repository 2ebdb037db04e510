"""``optimizely-odp-ext import`` end to end: a subprocess against a FakeOdpServer."""

from __future__ import annotations

import collections
import csv
import gzip
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from optimizely_odp_ext._import import file_identity, line_ids
from optimizely_odp_ext.testing import FakeOdpServer

from .conftest import cli_command, cli_env, event_ids, run_cli, summary, target, write_jsonl


def expected_ids(path: Path, lines: range) -> list:  # type: ignore[type-arg]
    id_for = line_ids(file_identity(str(path)))
    return [id_for(n) for n in lines]


def by_line(server: FakeOdpServer) -> dict:  # type: ignore[type-arg]
    """{line: idempotence_id} of what the server received (senders run concurrently: any order)."""
    return {e["data"]["line"]: e["data"]["idempotence_id"] for e in server.events}


def test_line_ids_are_uuid5_of_the_file_identity_and_line() -> None:
    id_for = line_ids("abc")
    assert id_for(7) == str(uuid.uuid5(uuid.NAMESPACE_URL, "odp-import:abc:7"))
    assert id_for(7) != id_for(8)
    assert line_ids("abd")(7) != id_for(7)


def test_import_10000_jsonl_lines_then_a_rerun_sends_nothing(server: FakeOdpServer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", 10_000)
    result = run_cli("import", *target(server), str(path))
    assert result.code == 0, result.err
    assert summary(result) == {"lines": 10_000, "invalid": 0, "sent": 10_000, "delivered": 10_000, "dropped": 0}
    assert result.err_lines == []  # not a terminal, and faster than the first progress line
    ids = by_line(server)
    assert ids == dict(zip(range(1, 10_001), expected_ids(path, range(1, 10_001))))
    assert len(server.events) == 10_000  # one each
    first = next(e for e in server.events if e["data"]["line"] == 1)
    assert first["identifiers"] == {"fs_user_id": "user-1"}
    assert first["data"]["data_source"] == "python-sdk"
    checkpoint = json.loads((tmp_path / "events.jsonl.odp-checkpoint").read_text())
    assert (checkpoint["line"], checkpoint["complete"]) == (10_000, True)

    again = run_cli("import", *target(server), str(path))
    assert again.code == 0
    assert "was imported before" in again.err
    assert len(server.events) == 10_000

    resent = run_cli("import", "--no-resume", "--quiet", *target(server), str(path))
    assert resent.code == 0
    assert len(server.events) == 20_000
    assert by_line(server) == ids  # the same ids again: ODP de-duplicates them


def test_csv_with_column_mapping(server: FakeOdpServer, tmp_path: Path) -> None:
    path = tmp_path / "orders.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Email", "UserId", "Price", "Qty", "Gift", "Note", "OrderId"])
        writer.writerow(["a@b.com", "u1", "50.5", "2", "yes", "first, with comma", "order-1"])
        writer.writerow(["", "u2", "3", "1", "no", "", ""])  # empty cells are left out
        writer.writerow(["c@d.com", "u3", "cheap", "1", "no", "", ""])  # not a float: invalid
        writer.writerow(["", "", "1", "1", "no", "", ""])  # no identifier at all: invalid
    rejects = tmp_path / "rejects.csv"
    result = run_cli("import", *target(server), "--action", "purchased", "-i", "email=Email",
                     "-i", "fs_user_id=UserId", "-d", "price:float=Price", "-d", "qty:int=Qty",
                     "-d", "gift:bool=Gift", "-d", "note=Note", "--id-column", "OrderId",
                     "--rejects", str(rejects), str(path))
    assert result.code == 1  # some lines invalid
    assert summary(result) == {"lines": 4, "invalid": 2, "sent": 2, "delivered": 2, "dropped": 0}
    assert result.err_lines == [
        f"{path}:4: invalid: column \"Price\": 'cheap' is not a float",
        f"{path}:5: invalid: ODP events must have at least one key-value pair in identifiers.",
    ]
    first, second = server.events
    assert first["action"] == "purchased"
    assert first["identifiers"] == {"email": "a@b.com", "fs_user_id": "u1"}
    assert {k: first["data"][k] for k in ("price", "qty", "gift", "note", "idempotence_id")} == {
        "price": 50.5, "qty": 2, "gift": True, "note": "first, with comma", "idempotence_id": "order-1"}
    assert second["identifiers"] == {"fs_user_id": "u2"}
    assert "note" not in second["data"]
    assert second["data"]["idempotence_id"] == expected_ids(path, range(3, 4))[0]
    assert rejects.read_text().splitlines() == [
        "Email,UserId,Price,Qty,Gift,Note,OrderId", "c@d.com,u3,cheap,1,no,,", ",,1,1,no,,"]


def test_gzip_and_standard_input(server: FakeOdpServer, tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "events.jsonl", 300)
    packed = tmp_path / "events.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert run_cli("import", *target(server), str(packed)).code == 0
    assert by_line(server) == dict(zip(range(1, 301), expected_ids(packed, range(1, 301))))
    server.reset()

    piped = run_cli("import", *target(server), "--source-id", "nightly-2026-11-30", "-",
                    stdin=plain.read_bytes())
    assert piped.code == 0, piped.err
    assert by_line(server) == {n: line_ids("nightly-2026-11-30")(n) for n in range(1, 301)}


def test_dry_run_reports_by_line_and_sends_nothing(server: FakeOdpServer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", 50, bad=(7, 20))
    with open(path, "a", encoding="utf-8") as f:
        f.write("{not json\n")
        f.write('["an", "array"]\n')
        f.write('{"action": "x", "identifiers": {"fs_user_id": "u"}, "colour": "red"}\n')
        f.write('{"action": "x", "identifiers": {"fs_user_id": 5}}\n')
    result = run_cli("import", "--dry-run", str(path))  # no credentials needed
    assert result.code == 1
    assert result.out.strip() == "dry run: read 54 lines, 48 valid, 6 invalid; nothing sent"
    lines = result.err_lines
    assert [line.split(": invalid: ")[0] for line in lines] == [f"{path}:{n}" for n in (7, 20, 51, 52, 53, 54)]
    assert lines[0].endswith("ODP action is not valid (cannot be empty).")
    assert "not valid JSON" in lines[2]
    assert lines[3].endswith("expected a JSON object, got an array")
    assert lines[4].endswith('unknown field(s) "colour" (expected action, identifiers, type, data)')
    assert lines[5].endswith('ODP identifiers are not valid (value of "fs_user_id" must be a string, got int).')
    assert server.requests == []
    assert not (tmp_path / "events.jsonl.odp-checkpoint").exists()
    clean = run_cli("import", "--dry-run", str(write_jsonl(tmp_path / "clean.jsonl", 10)))
    assert (clean.code, clean.err_lines) == (0, [])


def test_rejects_file_holds_the_invalid_lines_verbatim(server: FakeOdpServer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", 100, bad=(3, 50, 99))
    raw = path.read_text().splitlines()
    rejects = tmp_path / "rejects.jsonl"
    result = run_cli("import", *target(server), "--rejects", str(rejects), "--quiet", str(path))
    assert result.code == 1
    assert summary(result) == {"lines": 100, "invalid": 3, "sent": 97, "delivered": 97, "dropped": 0}
    assert result.err_lines == []  # --quiet: the summary only
    assert rejects.read_text().splitlines() == [raw[2], raw[49], raw[98]]
    assert len(server.events) == 97


def test_max_errors_stops_the_import(server: FakeOdpServer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", 1_000, bad=(10, 20, 30))
    result = run_cli("import", *target(server), "--max-errors", "2", str(path))
    assert result.code == 1
    assert "stopped after 2 invalid line(s) (--max-errors 2)" in result.out
    assert summary(result)["lines"] == 20
    assert len(server.events) == 18  # what was read before the stop is delivered


def test_kill_9_mid_import_then_resume(server: FakeOdpServer, tmp_path: Path) -> None:
    """SIGKILL at an arbitrary moment; the re-run delivers every line at least once and re-sends
    at most the in-flight window: the read-ahead queue plus the requests in flight."""
    total, queue, batch, concurrency = 10_000, 500, 50, 2
    path = write_jsonl(tmp_path / "events.jsonl", total)
    flags = [*target(server), "--queue-size", str(queue), "--batch-size", str(batch),
             "--concurrency", str(concurrency), str(path)]
    server.set_latency(0.01)  # slow enough that the kill lands mid-import
    proc = subprocess.Popen(cli_command("import", *flags), env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert server.wait_for_events(3_000, timeout=30)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    first_run = collections.Counter(event_ids(server))
    assert len(first_run) < total  # really killed mid-import
    checkpoint = json.loads((tmp_path / "events.jsonl.odp-checkpoint").read_text())
    assert checkpoint["complete"] is False
    assert checkpoint["line"] > 0

    server.set_latency(0)
    result = run_cli("import", *flags)
    assert result.code == 0, result.err
    assert summary(result)["sent"] == total - checkpoint["line"]

    counts = collections.Counter(event_ids(server))
    assert set(counts) == set(expected_ids(path, range(1, total + 1)))  # every line at least once
    resent = sum(n - 1 for n in counts.values())
    window = queue + (concurrency + 1) * batch
    assert resent <= window, f"re-sent {resent} ids, in-flight window {window}"
    assert max(counts.values()) <= 2


def test_progress_lines_when_not_a_terminal(server: FakeOdpServer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", 2_000)
    server.set_latency(0.02)
    result = run_cli("import", *target(server), "--batch-size", "50", "--concurrency", "1",
                     "--progress-interval", "0.1", str(path))
    assert result.code == 0
    progress = [line for line in result.err_lines if line.startswith("optimizely-odp-ext import:")]
    assert progress, result.err
    assert "events/s" in progress[-1]
    assert "delivered" in progress[-1]
    assert f"{path}" in progress[0]


def test_outage_is_waited_out_not_dropped(server: FakeOdpServer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", 3_000)
    server.fail_for(1.0)
    started = time.monotonic()
    result = run_cli("import", *target(server), "--queue-size", "500", "--quiet", str(path))
    assert result.code == 0, result.out + result.err
    assert time.monotonic() - started >= 1.0
    assert summary(result)["delivered"] == 3_000
    assert len(set(event_ids(server))) == 3_000


def test_progress_bar_on_a_terminal(server: FakeOdpServer, tmp_path: Path) -> None:
    """With the ``cli`` extra (tqdm) and standard error on a terminal, progress is a bar."""
    pytest.importorskip("tqdm")
    import pty
    import threading

    path = write_jsonl(tmp_path / "events.jsonl", 2_000)
    server.set_latency(0.02)
    main, secondary = pty.openpty()
    chunks: list = []  # type: ignore[type-arg]

    def read_terminal() -> None:  # drained while the CLI runs: a full terminal buffer would block it
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the CLI closed its end
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        proc = subprocess.Popen(cli_command("import", *target(server), "--batch-size", "50", "--concurrency", "1",
                                            str(path)),
                                env=cli_env(), stdout=subprocess.PIPE, stderr=secondary)
        os.close(secondary)
        out, _ = proc.communicate(timeout=60)
        reader.join(10)
    finally:
        os.close(main)
    assert proc.returncode == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "\r" in screen  # redrawn in place, not printed line by line
    assert "delivered" in screen
    assert "events/s" in screen
    assert "optimizely-odp-ext import:" not in screen  # no plain progress lines on a terminal
    assert "delivered" in out.decode()


def test_a_dropped_event_holds_the_checkpoint_back_so_a_rerun_retries_it(server: FakeOdpServer,
                                                                          tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", 1_000)
    server.reject_events(lambda event: event["data"]["line"] == 500)  # ODP refuses this one event (400)
    result = run_cli("import", *target(server), "--quiet", str(path))
    assert result.code == 1
    assert summary(result) == {"lines": 1_000, "invalid": 0, "sent": 1_000, "delivered": 999, "dropped": 1}
    assert "(1 rejected)" in result.out
    checkpoint = json.loads((tmp_path / "events.jsonl.odp-checkpoint").read_text())
    assert checkpoint["complete"] is False
    assert checkpoint["line"] < 500

    server.reject_events(None)  # fixed on ODP's side: the re-run sends from the checkpoint on
    again = run_cli("import", *target(server), "--quiet", str(path))
    assert again.code == 0, again.out
    assert summary(again)["sent"] == 1_000 - checkpoint["line"]
    assert set(by_line(server)) == set(range(1, 1_001))
