"""Mistakes a user makes: exit status 2, exactly one line on stderr, nothing sent."""

from __future__ import annotations

import gzip
import json
import socket
from pathlib import Path
from typing import Callable, List

import pytest

from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.testing import FakeOdpServer

from .conftest import cli_env, run_cli, target, write_jsonl

Args = Callable[[FakeOdpServer, Path], List[str]]


def _csv(tmp: Path) -> str:
    path = tmp / "orders.csv"
    path.write_text("Email,Price\na@b.com,5\n")
    return str(path)


def _not_gzip(tmp: Path) -> str:
    path = tmp / "events.jsonl.gz"
    path.write_text('{"action": "a"}\n')
    return str(path)


def _truncated_gzip(tmp: Path) -> str:
    path = tmp / "events.jsonl.gz"
    packed = gzip.compress(write_jsonl(tmp / "events.jsonl", 2_000).read_bytes())
    path.write_bytes(packed[: len(packed) // 2])
    return str(path)


def _changed_since_checkpoint(tmp: Path) -> str:
    path = write_jsonl(tmp / "events.jsonl", 5)
    (tmp / "events.jsonl.odp-checkpoint").write_text(json.dumps({"version": 1, "source": "0" * 32, "line": 3}))
    return str(path)


CASES = {
    "missing file": (lambda s, t: ["import", *target(s), str(t / "nope.jsonl")],
                     "cannot read {tmp}/nope.jsonl: No such file or directory"),
    "not gzip": (lambda s, t: ["import", *target(s), _not_gzip(t)], "not a gzip file"),
    "truncated gzip": (lambda s, t: ["import", *target(s), "--quiet", _truncated_gzip(t)],
                       "events.jsonl.gz after line "),
    "csv column missing": (lambda s, t: ["import", *target(s), "-i", "email=Mail", "--action", "a", _csv(t)],
                           'column(s) "Mail" not in the header ("Email", "Price")'),
    "csv without identifier": (lambda s, t: ["import", *target(s), "--action", "a", _csv(t)],
                               "CSV needs at least one --identifier"),
    "bad data type": (lambda s, t: ["import", *target(s), "-i", "email=Email", "-d", "price:money=Price", _csv(t)],
                      "unknown type 'money'"),
    "unknown flag": (lambda s, t: ["import", *target(s), "--colour", "red", _csv(t)],
                     "unrecognized arguments: --colour"),
    "no credentials": (lambda s, t: ["import", str(write_jsonl(t / "e.jsonl", 1))], "where to send"),
    "two credential sources": (lambda s, t: ["import", *target(s), "--datafile", "d.json",
                                             str(write_jsonl(t / "e.jsonl", 1))],
                               "give only one of --host, --datafile"),
    "plain http": (lambda s, t: ["import", "--host", "http://odp.example.com", str(write_jsonl(t / "e.jsonl", 1))],
                   "refusing to send the API key unencrypted (use https, or add --allow-insecure-http)"),
    "not a url": (lambda s, t: ["send", "--host", "odp", "--action", "a", "-i", "fs_user_id=u"],
                  'ODP host "odp" is not a valid URL'),
    "datafile without odp": (lambda s, t: ["import", "--datafile", _datafile(t),
                                           str(write_jsonl(t / "e.jsonl", 1))], "ODP is not integrated in"),
    "checkpoint of another file": (lambda s, t: ["import", *target(s), _changed_since_checkpoint(t)],
                                   "belongs to another file or an earlier version of it"),
    "send: bad typed data": (lambda s, t: ["send", *target(s), "--action", "a", "-i", "fs_user_id=u",
                                           "-d", "price:float=cheap"], "--data price:float='cheap': not a float"),
    "send: invalid event": (lambda s, t: ["send", *target(s), "--action", "", "-i", "fs_user_id=u"],
                            "ODP action is not valid (cannot be empty)."),
    "checkpoint cannot be written": (lambda s, t: ["import", *target(s), "--checkpoint", str(t / "no" / "cp"),
                                                   str(write_jsonl(t / "e.jsonl", 1))],
                                     "cannot write checkpoint {tmp}/no/cp: No such file or directory"),
    "missing command": (lambda s, t: [], "the following arguments are required: COMMAND"),
}


def _datafile(tmp: Path) -> str:
    """A valid datafile without an ODP integration."""
    path = tmp / "datafile.json"
    path.write_text(datafile(None, None))
    return str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_usage_errors_exit_2_with_one_line(case: str, server: FakeOdpServer, tmp_path: Path) -> None:
    make_args, expected = CASES[case]
    result = run_cli(*make_args(server, tmp_path), cwd=tmp_path)
    assert result.code == 2, result
    assert len(result.err_lines) == 1, result.err
    assert expected.format(tmp=tmp_path) in result.err_lines[0]
    if case != "truncated gzip":  # there, what came before the damage was read and sent
        assert result.out == ""
        assert server.requests == []


def test_fake_server_on_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_cli("fake-server", "--port", str(port), timeout=30)
    assert result.code == 2
    assert result.err_lines == [f"optimizely-odp-ext fake-server: error: cannot listen on 127.0.0.1:{port}: the port "
                                "is busy (pick another with --port, or 0 for any free port)"]


def test_help_is_written_for_users() -> None:
    result = run_cli("import", "--help", env=cli_env())
    assert result.code == 0
    text = result.out
    assert "examples:" in text
    assert "exit status: 0 all delivered; 1 some dropped or invalid; 2 usage or configuration error." in text
    assert "(default: 10000)" in text  # --queue-size
    assert "OPTIMIZELY_ODP_API_KEY" in text
    assert "``" not in text  # no raw reST
