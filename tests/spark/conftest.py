"""A real local Spark for tests/spark (``nox -s spark``): a JVM on loopback, its log in a file, stopped by pid.

Needs pyspark and Java 17+. ``nox -s spark`` sets ``ODP_EXT_SPARK=required``: there a missing pyspark or
Java fails the tests; in the other sessions (no pyspark installed) they are skipped, and say why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

REQUIRED = os.environ.get("ODP_EXT_SPARK") == "required"
MEASURED: List[str] = []  # lines for the terminal summary: events/s, memory
LOG: List[Path] = []  # where the JVM (and the executors' Python workers) write their log


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "spark: runs a real local Spark job (nox -s spark)")


def _unavailable() -> Optional[str]:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed (nox -s spark installs it: pip install 'optimizely-odp-ext[spark]')"
    java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else shutil.which("java")
    if java is None or not os.path.exists(java):
        return "no java: Spark needs Java 17+ (Debian: apt-get install openjdk-17-jre-headless)"
    return None


def _descendants(root: int) -> List[int]:
    """Every process below ``root`` (Linux /proc): the JVM's Python daemon and its forked workers."""
    parents: Dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _stop_pids(pids: List[int]) -> None:
    """SIGTERM, up to 10 s to end, then SIGKILL for what is left (not our children: no waitpid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10.0
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not any(_alive(pid) for pid in pids):
            return


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A SparkSession on ``local[2,4]`` (2 threads, a task tried 4 times: plain ``local[2]`` never retries)."""
    reason = _unavailable()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"nox -s spark cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway
    from pyspark.sql import SparkSession

    # Nothing outside loopback; the executors' Python is this one (the venv's, with the package).
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    conf = (SparkConf().setMaster("local[2,4]").setAppName("odp-bulk-tests")
            .set("spark.ui.enabled", "false").set("spark.task.maxFailures", "4")
            .set("spark.driver.host", "127.0.0.1").set("spark.driver.bindAddress", "127.0.0.1")
            .set("spark.sql.shuffle.partitions", "8"))
    log_path = tmp_path_factory.mktemp("spark") / "spark.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - the JVM writes to it until it exits
    gateway = launch_gateway(conf, popen_kwargs={"stdout": log_file, "stderr": subprocess.STDOUT})
    jvm = gateway.proc
    try:
        session = SparkSession(SparkContext(conf=conf, gateway=gateway))
        session.sparkContext.setLogLevel("WARN")
        LOG.append(log_path)
        yield session
    finally:
        workers = _descendants(jvm.pid)
        try:
            SparkSession.getActiveSession() and SparkSession.getActiveSession().stop()  # type: ignore[union-attr]
            SparkContext._active_spark_context and SparkContext._active_spark_context.stop()
            gateway.shutdown()
        finally:
            if jvm.stdin is not None:
                jvm.stdin.close()  # the JVM exits when this pipe closes
            try:
                jvm.wait(60)
            except subprocess.TimeoutExpired:
                jvm.kill()
                jvm.wait(30)
            # pyspark's daemon leaves the JVM's process group: stopped by pid, with its workers.
            _stop_pids(workers)
            log_file.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MEASURED:
        terminalreporter.write_sep("-", "spark measurements")
        for line in MEASURED:
            terminalreporter.write_line(line)

