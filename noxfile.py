"""The support matrix and the checks, one command: ``nox`` (``make test`` runs it).

Every SDK line on one Python, and every Python on the latest SDK; see the support matrix in docs/development.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

import nox

nox.options.reuse_existing_virtualenvs = True
# The interpreter's own venv module: current virtualenv releases cannot seed Python 3.8.
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "typecheck", "tests", "tests_python", "examples", "recipes", "spark", "dist"]

MAIN_PYTHON = "3.11"
OTHER_PYTHONS = ["3.8", "3.9", "3.10", "3.12", "3.13"]
SDKS = {
    "4.1.1": "optimizely-sdk==4.1.1",  # the last line without any ODP code
    "5.0": "optimizely-sdk~=5.0.0",  # the first line with ODP
    "5.7": "optimizely-sdk==5.7.0",  # the latest
}
# Ranges, not pins: the newest pytest and hypothesis have dropped the oldest Pythons of the matrix,
# and pip picks the newest release each interpreter supports.
TEST_TOOLS = ["pytest>=7.4,<10", "hypothesis>=6.80,<7"]
# The frameworks the recipes in examples/ run under (the `recipes` session only; never a dependency).
# uwsgi has no wheels: pip compiles it (needs gcc and the Python headers).
RECIPE_FRAMEWORKS = [
    "fastapi>=0.110,<1", "uvicorn>=0.29,<1", "flask>=3,<4", "gunicorn>=22,<24", "django>=4.2,<6",
    "uwsgi>=2.0.24,<2.1", "prometheus_client>=0.20,<1", "celery>=5.3,<6",
    # gunicorn -k gevent, Celery -P gevent / -P eventlet, and the plain patched scripts (issue 18).
    "gevent>=24.10.1", "eventlet>=0.36",
]


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """Sessions run in parallel (tools/run_matrix.py); building the editable install writes into
    the source tree, so one session at a time does it."""
    os.makedirs(".nox", exist_ok=True)
    with open(".nox/install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _install(session: nox.Session, sdk: str, *extra: str) -> None:
    with _install_lock():
        session.install("-e", ".", SDKS[sdk], *extra)


@nox.session(python=MAIN_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")


@nox.session(python=MAIN_PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package (configured in pyproject.toml), and users' view of its types."""
    _install(session, "5.7", "mypy==2.4.1", "types-requests", "pytest>=7.4,<10")
    session.run("mypy")
    # Skipped in the test sessions (no mypy there): install()'s typed options as a user's mypy sees them.
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "tests/unit/test_options_validation.py::test_mypy_rejects_a_wrong_option_type")


@nox.session(python=MAIN_PYTHON)
@nox.parametrize("sdk", list(SDKS))
def tests(session: nox.Session, sdk: str) -> None:
    """The whole suite on each SDK line."""
    _install(session, sdk, *TEST_TOOLS)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=OTHER_PYTHONS)
def tests_python(session: nox.Session) -> None:
    """The whole suite on every other Python, on the latest SDK."""
    _install(session, "5.7", *TEST_TOOLS)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=MAIN_PYTHON)
def examples(session: nox.Session) -> None:
    """Every script in examples/ runs against the embedded fake server and exits 0; the framework
    recipes (a ``# Run it: pip install ...`` line) run in the `recipes` session instead."""
    _install(session, "5.7")
    import pathlib

    for script in sorted(pathlib.Path("examples").glob("[0-9]*.py")):
        if "# Run it: pip install" not in script.read_text():
            session.run("python", str(script))


@nox.session(python=MAIN_PYTHON)
def recipes(session: nox.Session) -> None:
    """The framework recipes in examples/ under real uvicorn, gunicorn (sync and gevent), uWSGI, Django,
    Prometheus, Celery (prefork, threads, gevent, eventlet)."""
    _install(session, "5.7", *TEST_TOOLS, *RECIPE_FRAMEWORKS)
    session.run("python", "-m", "pytest", "-q", "-m", "recipes", "tests/recipes", *session.posargs)


@nox.session(python=MAIN_PYTHON)
def spark(session: nox.Session) -> None:
    """bulk.send_partition in a real local Spark job (tests/spark) and the Spark recipe in examples/.

    Needs Java 17+: installed here when missing (Debian, as root), else the session stops and says how.
    """
    _require_java(session)
    with _install_lock():
        session.install("-e", ".[spark]", SDKS["5.7"], *TEST_TOOLS)
    env = {"ODP_EXT_SPARK": "required"}  # tests/spark fail, never skip, without pyspark or Java
    session.run("python", "-m", "pytest", "-q", "tests/spark", *session.posargs, env=env)
    session.run("python", "examples/13_spark_backfill.py", env=env)


def _java_major() -> int:
    """The major version of the java Spark would run (JAVA_HOME's, else the PATH's); 0 when none."""
    import re
    import shutil
    import subprocess

    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not java or not os.path.exists(java):
        return 0
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if match is None:
        return 0
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def _require_java(session: nox.Session) -> None:
    import shutil

    if _java_major() >= 17:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        session.log("Spark needs Java 17+: installing openjdk-17-jre-headless")
        session.run("apt-get", "update", "-q", external=True)
        session.run("apt-get", "install", "-y", "-q", "--no-install-recommends", "openjdk-17-jre-headless",
                    external=True, env={"DEBIAN_FRONTEND": "noninteractive"})
        if _java_major() >= 17:
            return
    session.error("Spark needs Java 17 or newer and none was found (JAVA_HOME, or java on the PATH). "
                  "Install one (Debian/Ubuntu, as root: apt-get install openjdk-17-jre-headless; "
                  "elsewhere: https://adoptium.net) and run `make test` again.")


@nox.session(python=MAIN_PYTHON)
def dist(session: nox.Session) -> None:
    """Builds the wheel and sdist, installs the wheel in this clean venv, smoke-tests it, and runs a
    user's project on it (tools/user_project: pytest with odp_client, mypy --strict)."""
    import glob
    import shutil

    shutil.rmtree("dist", ignore_errors=True)
    session.install("build==1.6.1")
    with _install_lock():
        session.run("python", "-m", "build", "--outdir", "dist", ".")
    wheel = os.path.abspath(glob.glob("dist/*.whl")[0])
    session.install(wheel, SDKS["5.7"], "pytest>=7.4,<10", "mypy==2.4.1")
    session.install("--force-reinstall", "--no-deps", wheel)  # a reused venv may hold an older build
    # A user's project outside the repository: pytest with the odp_client fixture, mypy --strict
    # with odp(client), on the latest SDK and on 4.1.1 (which ships no types of its own).
    project = os.path.join(session.create_tmp(), "user_project")
    shutil.rmtree(project, ignore_errors=True)
    shutil.copytree("tools/user_project", project)
    session.chdir(project)
    session.run("python", "-m", "optimizely_odp_ext", "smoke")
    for sdk in ("5.7", "4.1.1"):
        session.install(SDKS[sdk])
        session.run("python", "-m", "pytest", "-q")
        session.run("python", "-m", "mypy")
        # bad_types.py misuses the plugin's methods: mypy must refuse it (exit 1), or they are Any.
        session.run("python", "-m", "mypy", "bad_types.py", success_codes=[1])
