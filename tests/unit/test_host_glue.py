"""Host glue (gunicorn, Celery, uWSGI) reaches the lifecycle by registering itself when the package is
imported; the lifecycle imports none of it. A fresh interpreter with stand-ins for the hosts' modules
checks that registering a manager still connects each host, as it did when the lifecycle imported them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    import types

    class Arbiter:
        def stop(self):
            pass

    class Signal:
        receivers = []

        def connect(self, receiver, **kwargs):
            self.receivers.append(receiver)

    sys.modules["gunicorn"] = types.ModuleType("gunicorn")
    sys.modules["gunicorn.arbiter"] = types.SimpleNamespace(Arbiter=Arbiter)
    sys.modules["celery"] = types.ModuleType("celery")
    sys.modules["celery.signals"] = types.SimpleNamespace(worker_process_shutdown=Signal())
    sys.modules["celery"].signals = sys.modules["celery.signals"]

    from optimizely_odp_ext import _lifecycle   # the package's __init__ runs first, as for any user

    class Manager:
        closed = False

    manager = Manager()
    _lifecycle.register(manager)
    print(getattr(Arbiter.stop, "_optimizely_odp_ext_applied", False), len(Signal.receivers))
    sys.modules["uwsgi"] = types.ModuleType("uwsgi")
    print(any(forks_in_c() for forks_in_c in _lifecycle._FORKS_IN_C))
    del manager  # leaves the registry: nothing for the exit hook to close
""")


def test_registering_a_manager_connects_every_loaded_host() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.split() == ["True", "1", "True"], done.stdout + done.stderr
