"""The one engine thread: runs engine calls in order, as a daemon (never blocks exit).

A `ThreadPoolExecutor` worker is joined when the interpreter exits, so an engine call that
hangs would keep a SIGTERM-ed server from exiting; this thread is a daemon instead. The
scheduler's collector (`scheduler_pipeline.py`: waits for launched batches' images) is one too.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

QUEUED_POLL_S = 0.25  # how often a watchdog looks whether a call queued behind another began


class EngineThread:
    """submit(fn, *args) -> Future; the calls run one at a time, in submission order."""

    def __init__(self, name: str = "halfstep-engine") -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Stop after the calls already submitted (returns at once)."""
        self._calls.put(None)

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if not future.set_running_or_notify_cancel():
                continue
            future.began = time.monotonic()  # the watchdog counts from here (run_limited)
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the awaiting coroutine, which decides
                future.set_exception(exc)


async def run_limited(future: Future, limit_s: float):
    """The result of an engine-thread call; asyncio.TimeoutError once it has RUN longer than
    limit_s. Time spent queued behind another call (a warm-up, another bundle's batch) does not
    count: the call ahead has its own limit, or none (a warm-up)."""
    waiting = asyncio.wrap_future(future)
    while True:
        began = getattr(future, "began", None)
        left = QUEUED_POLL_S if began is None else began + limit_s - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), left)
        except asyncio.TimeoutError:
            continue
