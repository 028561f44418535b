"""Start-up and shutdown: start the batcher, warm every bundle's engine up, and drain on the
way out.

/healthz answers from the start (503 once an engine or the scheduler failed); /readyz once every
bundle has warmed up, /generate for a bundle once that one has. SIGHUP reloads the bundles
(`reload.py`) where the process can take signals. On SIGTERM (`cli.py`) the server stops being
ready at once and refuses new work (503 Draining); on shutdown it finishes queued and running
batches for what is left of `drain_s` (0: no wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from .batcher import Batcher
from .deployments import Deployment
from .reload import reload_all
from .state import ServerState

log = logging.getLogger("halfstep.server")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Serve `app.state.halfstep` from start-up to shutdown."""
    state: ServerState = app.state.halfstep
    settings = state.settings
    engines = {name: d.engine for name, d in state.deployments.items()}
    state.batcher = Batcher(engines, state.max_batch, settings.max_wait_ms / 1000,
                            settings.max_queue, state.metrics, settings.max_wait_fraction,
                            watchdog_factor=settings.watchdog_factor,
                            timeout_s=settings.timeout_s)
    state.batcher.start()
    warm = asyncio.create_task(warm_up(state))  # /healthz answers while this runs
    hangup = on_sighup(state)
    try:
        yield
    finally:
        hangup()
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
    """Warm each bundle's engine up in the engine thread, in order; each bundle serves as soon
    as its own warm-up succeeded. The server is ready once all have."""
    for d in list(state.deployments.values()):
        async with state.reload_lock:  # a reload swapping d meanwhile warms its own engine
            if state.deployments.get(d.name) is d:
                await warm_deployment(state, d)
    if state.ready:
        state.metrics.ready.set(1)


async def warm_deployment(state: ServerState, d: Deployment) -> None:
    try:
        d.warmup = await state.batcher.call_in_engine_thread(d.engine.warmup)
        state.batcher.seed_run_times(d.name, d.engine.warm_run_s)
        d.ready = True
        log.info("warm-up done%s: %s", _of(state, d), d.warmup)
    except asyncio.CancelledError:  # shutdown began first; the engine thread may still be in it
        d.warmup = "cancelled: shutting down"
        log.info("warm-up cut short: shutting down")
        raise
    except Exception as exc:  # readiness reports it; liveness too if the engine says it failed
        d.warmup = f"{type(exc).__name__}: {exc}"
        log.error("warm-up failed%s: %s", _of(state, d), d.warmup)


def _of(state: ServerState, d: Deployment) -> str:
    return f" (bundle {d.name})" if len(state.deployments) > 1 else ""


def on_sighup(state: ServerState):
    """SIGHUP -> reload the bundles (logged), where this loop can take signals (the main
    thread of a Unix process); returns the function that removes the handler."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    async def reload_logged() -> None:
        try:
            await reload_all(state, reason="SIGHUP")
        except Exception as exc:  # e.g. Draining: a line in the log, not a stray traceback
            log.warning("reload (SIGHUP) not done: %s", exc)

    def hangup() -> None:
        task = loop.create_task(reload_logged())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, hangup)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        return lambda: None  # not the main thread (e.g. a test client), or no SIGHUP here
    return lambda: loop.remove_signal_handler(signal.SIGHUP)
