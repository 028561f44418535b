"""Start-up and shutdown: start the batcher, warm the engine up, and drain on the way out.

/healthz answers from the start (503 once the engine or the scheduler failed); /readyz and
/generate only once warm-up is done. On SIGTERM (`cli.py`) the server stops being ready at once
and refuses new work (503 Draining); on shutdown it finishes queued and running batches for
what is left of `drain_s` (0: no wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from .batcher import Batcher
from .state import ServerState

log = logging.getLogger("halfstep.server")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Serve `app.state.halfstep` from start-up to shutdown."""
    state: ServerState = app.state.halfstep
    settings = state.settings
    state.batcher = Batcher(state.engine, state.max_batch, settings.max_wait_ms / 1000,
                            settings.max_queue, state.metrics, settings.max_wait_fraction,
                            watchdog_factor=settings.watchdog_factor,
                            timeout_s=settings.timeout_s)
    state.batcher.start()
    warm = asyncio.create_task(warm_up(state))  # /healthz answers while this runs
    try:
        yield
    finally:
        warm.cancel()  # a warm-up still in the engine thread is left there: it is a daemon
        with contextlib.suppress(asyncio.CancelledError):
            await warm
        state.begin_drain()
        try:
            await drain(state)
        except asyncio.CancelledError:  # shutdown cut short (a second signal): stop quietly
            log.info("stopped (drain cut short)")


async def drain(state: ServerState) -> None:
    """Finish queued and running batches for what is left of drain_s."""
    started, left = time.monotonic(), state.drain_left_s()
    log.info("draining %d requests (at most %g s)", state.batcher.depth, left)
    failed = await state.batcher.close(left)
    if failed:
        log.warning("drain timed out: %d queued requests were failed", failed)
    log.info("stopped (drain took %.1f s)", time.monotonic() - started)


async def warm_up(state: ServerState) -> None:
    """Run the engine's warm-up in the engine thread; ready when it succeeds."""
    try:
        state.warmup = await state.batcher.call_in_engine_thread(state.engine.warmup)
        state.batcher.seed_run_times(state.engine.warm_run_s)
        state.ready = True
        state.metrics.ready.set(1)
        log.info("warm-up done: %s", state.warmup)
    except asyncio.CancelledError:  # shutdown began first; the engine thread may still be in it
        state.warmup = "cancelled: shutting down"
        log.info("warm-up cut short: shutting down")
        raise
    except Exception as exc:  # readiness reports it; liveness too if the engine says it failed
        state.warmup = f"{type(exc).__name__}: {exc}"
        log.error("warm-up failed: %s", state.warmup)
