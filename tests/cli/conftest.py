"""The command line run as a user runs it: a subprocess (``python -m optimizely_odp_ext``) talking
real HTTP to a FakeOdpServer in the test process. Every subprocess has a timeout and is killed
if it outlives its test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence

import pytest

from optimizely_odp_ext.testing import FakeOdpServer

KEY = "cli-test-key-0123456789"
RUN_TIMEOUT = 60.0  # seconds; a run that takes longer is a failure, never a hang


class Result(NamedTuple):
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> List[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def cli_env(**extra: str) -> Dict[str, str]:
    """The environment for the CLI: the key in its variable (as users are told to do), no proxies."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["OPTIMIZELY_ODP_API_KEY"] = KEY
    env.pop("OPTIMIZELY_SDK_KEY", None)
    env.update(extra)
    return env


def cli_command(*args: str) -> List[str]:
    return [sys.executable, "-m", "optimizely_odp_ext", *args]


def run_cli(*args: str, stdin: Optional[bytes] = None, cwd: Optional[Path] = None,
            env: Optional[Dict[str, str]] = None, timeout: float = RUN_TIMEOUT) -> Result:
    """Runs the CLI to the end and returns its exit status and output."""
    proc = subprocess.run(cli_command(*args), check=False, input=stdin, capture_output=True, timeout=timeout,
                          cwd=cwd, env=env or cli_env())
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def write_jsonl(path: Path, count: int, bad: Sequence[int] = (), start: int = 1) -> Path:
    """``count`` event lines (line n is user n); lines listed in ``bad`` get an empty action."""
    with open(path, "w", encoding="utf-8") as f:
        for n in range(start, start + count):
            f.write(json.dumps({"action": "" if n in bad else "purchased",
                                "identifiers": {"fs_user_id": f"user-{n}"},
                                "data": {"line": n, "price": n * 0.5}}) + "\n")
    return path


def event_ids(server: FakeOdpServer) -> List[str]:
    return [e["data"]["idempotence_id"] for e in server.events]


@pytest.fixture
def server() -> Iterator[FakeOdpServer]:
    with FakeOdpServer(KEY) as odp:
        yield odp


def target(server: FakeOdpServer) -> List[str]:
    """The flags that point the CLI at ``server`` (the key comes from the environment)."""
    return ["--host", server.url]


def summary(result: Result) -> Dict[str, Any]:
    """The summary line's figures, e.g. {"read": 10000, "delivered": 10000, ...}."""
    import re

    line = result.out.strip().splitlines()[-1]
    return {name: int(value.replace(",", "")) for value, name in
            re.findall(r"([\d,]+) (lines|invalid|sent|delivered|dropped)", line)}
