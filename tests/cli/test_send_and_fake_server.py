"""``send`` and ``fake-server`` end to end, as subprocesses."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.testing import FakeOdpServer

from .conftest import KEY, cli_command, cli_env, run_cli, summary, target, write_jsonl


def test_send_typed_data_and_json(server: FakeOdpServer) -> None:
    result = run_cli("send", *target(server), "--action", "purchased", "-i", "FS-USER-ID=user123",
                     "-d", "price:float=50", "-d", "qty:int=2", "-d", "gift:bool=no", "-d", "currency=EUR",
                     "--data-json", '{"coupon": null, "qty": 1}')
    assert result.code == 0, result.err
    assert result.out.strip() == f"delivered 1 event to {server.url} (ODP answered 202)"
    (event,) = server.events
    assert event["identifiers"] == {"fs_user_id": "user123"}
    data = event["data"]
    assert {k: data[k] for k in ("price", "qty", "gift", "currency", "coupon")} == {
        "price": 50.0, "qty": 2, "gift": False, "currency": "EUR", "coupon": None}


def test_send_with_the_odp_settings_of_a_datafile(server: FakeOdpServer, tmp_path: Path) -> None:
    path = tmp_path / "datafile.json"
    path.write_text(datafile(server.url, KEY))
    env = cli_env()
    del env["OPTIMIZELY_ODP_API_KEY"]  # the key comes from the datafile
    result = run_cli("send", "--datafile", str(path), "--action", "a", "-i", "fs_user_id=u", env=env)
    assert result.code == 0, result.err
    assert len(server.events) == 1


def test_send_that_cannot_be_delivered_says_why_in_one_error_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there any more: every attempt is refused.
    result = run_cli("send", "--host", f"http://127.0.0.1:{port}", "--action", "a", "-i", "fs_user_id=u",
                     "--retry-window", "0.5")
    assert result.code == 1
    errors = [line for line in result.err_lines if line.startswith("optimizely-odp-ext send: error:")]
    assert len(errors) == 1
    # The root cause in full (urllib3 2.x names host and port where 1.x shows the connection object).
    assert errors[0].startswith("optimizely-odp-ext send: error: the event was not delivered (1 retry_expired); "
                                "last attempt: network error: NewConnectionError: ")
    assert errors[0].endswith("Failed to establish a new connection: [Errno 111] Connection refused")
    assert any("retrying" in line for line in result.err_lines)  # progress while retrying


def test_send_rejected_by_odp(server: FakeOdpServer) -> None:
    server.reject_events(lambda event: True)
    result = run_cli("send", *target(server), "--action", "a", "-i", "fs_user_id=u")
    assert result.code == 1
    errors = [line for line in result.err_lines if line.startswith("optimizely-odp-ext send: error:")]
    assert len(errors) == 1
    assert errors[0].startswith("optimizely-odp-ext send: error: the event was not delivered (1 rejected); "
                                "ODP answered HTTP 400: ")


_WITH_CTRL_C = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv[0] = 'optimizely_odp_ext'; runpy.run_module('optimizely_odp_ext', run_name='__main__')")


def _start_fake_server(*flags: str) -> tuple[subprocess.Popen[bytes], str]:
    # SIGINT as a terminal leaves it (Ctrl-C): a job started in the background by a non-interactive
    # shell (CI's, often) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    command = [sys.executable, "-c", _WITH_CTRL_C, *cli_command("fake-server", "--key", KEY, *flags)[3:]]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    assert proc.stdout is not None
    first = proc.stdout.readline().decode()
    assert first.startswith("fake ODP server on http://127.0.0.1:"), first
    return proc, first.split()[4]


def _stop(proc: subprocess.Popen[bytes]) -> List[str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        # Bounds a hang, not a speed: stopping takes a fraction of a second, more on a loaded machine.
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"fake-server did not stop within 60 s of SIGINT; stdout:\n{out.decode()}\n"
                    f"stderr:\n{err.decode()}")
    return out.decode().splitlines()


def test_fake_server_prints_requests_and_injects_an_outage(tmp_path: Path) -> None:
    # An outage of 2 requests (counted, not timed: a loaded machine may start the import late).
    proc, url = _start_fake_server("--fail-next", "2", "--latency", "0.01")
    try:
        result = run_cli("import", "--host", url, "--quiet", str(write_jsonl(tmp_path / "e.jsonl", 250)))
        assert result.code == 0, result.err
        assert summary(result)["delivered"] == 250  # waited the outage out
    finally:
        lines = _stop(proc)
    assert lines[-1].startswith("received 250 event(s) in ")
    statuses = [line.split(" -> ")[1].split()[0] for line in lines if line.startswith("/v3/events -> ")]
    assert statuses[:2] == ["503", "503"]
    assert statuses.count("202") == 3  # 250 events in batches of 100


def test_fake_server_rate_limit_and_quiet(tmp_path: Path) -> None:
    proc, url = _start_fake_server("--rate-limit", "2", "--retry-after", "0", "--quiet")
    try:
        result = run_cli("send", "--host", url, "--action", "a", "-i", "fs_user_id=u")
        assert result.code == 0, result.err
    finally:
        lines = _stop(proc)
    assert lines == ["received 1 event(s) in 3 request(s)"]  # two 429s, then the 202; nothing printed


def test_fake_server_body_limit_and_resets() -> None:
    proc, url = _start_fake_server("--max-body-bytes", "64", "--reset-every", "1")
    try:
        result = run_cli("send", "--host", url, "--action", "a", "-i", "fs_user_id=u", "--retry-window", "0.5")
        assert result.code == 1
    finally:
        lines = _stop(proc)
    assert lines[-1].startswith("received 0 event(s) in ")
    assert all(line.endswith("bytes)") for line in lines[:-1])
    assert {line.split(" -> ")[1].split(" (")[0] for line in lines[:-1]} == {"no answer"}  # every one reset
    proc, url = _start_fake_server("--max-body-bytes", "64")
    try:
        result = run_cli("send", "--host", url, "--action", "a", "-i", "fs_user_id=u")
        assert result.code == 1
        assert "(1 too_large); ODP answered HTTP 413" in result.err
    finally:
        lines = _stop(proc)
    assert lines[0].startswith("/v3/events -> 413 (")
