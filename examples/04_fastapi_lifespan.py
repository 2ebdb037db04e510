"""FastAPI under uvicorn: install in the lifespan, await close_async at its end; SIGTERM loses nothing."""

# Run it: pip install fastapi uvicorn && python examples/04_fastapi_lifespan.py
# Serve it: uvicorn --app-dir examples 04_fastapi_lifespan:app
# Expected output (the demo serves it under uvicorn against a fake ODP server, then sends SIGTERM):
#   sent 40, ODP received 40 events ({'request': 40}), lost 0, duplicated 0, 1 worker process(es),
#   first half delivered while running: True, server exit code -15
# (-15: uvicorn re-raises the SIGTERM once its graceful shutdown, lifespan included, is complete)

from __future__ import annotations

import contextlib
import os
import sys
from typing import AsyncIterator

from _demo import optimizely_client
from fastapi import FastAPI, Request

import optimizely_odp_ext
from optimizely_odp_ext import odp


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    client = optimizely_client()
    optimizely_odp_ext.install(client)
    app.state.optimizely = client
    yield
    # close() may wait up to close_timeout for ODP: close_async waits on a thread of its own, and the
    # event loop goes on serving (uvicorn's other lifespans and connections) meanwhile.
    await optimizely_odp_ext.close_async(client)


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def ready() -> int:
    return os.getpid()


@app.get("/event")
async def event(request: Request, id: str) -> int:
    # send_odp_event never blocks and never raises: fine to call from async code.
    odp(request.app.state.optimizely).send_odp_event("request", {"fs_user_id": "u1"}, data={"idempotence_id": id})
    return os.getpid()


if __name__ == "__main__":
    import _demo

    port = _demo.free_port()
    served = _demo.serve([sys.executable, "-m", "uvicorn", "--port", str(port), "04_fastapi_lifespan:app"], port)
    sys.exit(_demo.report(served, {"request": 40}))
