"""The run-and-split stage of the scheduler: one chosen batch through the engine thread.

Concatenate the jobs' noise and labels, run them in the engine thread, split the images back
per job, and fold the measured batch time into the lane's estimates and the metrics
(predicted vs. actual batch time, padding rows, engine busy time).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .lanes import Job, Lane

if TYPE_CHECKING:
    from .batcher import Batcher

BUSY_WINDOW_S = 5.0  # halfstep_engine_busy_fraction is busy time over about this window


def padded_rows(engine, model: str, rows: int, max_batch: int) -> int:
    """Rows the engine adds to a batch of `rows` images (split into max_batch chunks)."""
    rows_for = getattr(engine, "rows_for", None)
    if rows_for is None:
        return 0
    added = 0
    for i in range(0, rows, max_batch):
        chunk = min(max_batch, rows - i)
        try:
            added += rows_for(model, chunk) - chunk
        except Exception:  # the engine's own run reports a bad batch size
            return 0
    return added


async def execute(b: Batcher, lane: Lane, batch: list[Job], images: int) -> None:
    """Run `batch` (images in all) of `lane` and answer each of its jobs."""
    from .batcher import BatchFailed, Result

    m = b.metrics
    started = time.monotonic()
    model, steps = lane.key
    predicted = lane.cost_s(images, b._default_image_step_s())
    b._running_until = started + predicted
    for job in batch:
        m.queue_wait.observe(started - job.enqueued)
    m.batch_size.observe(images)
    m.padded_rows.labels(lane.label).inc(padded_rows(b.engine, model, images, b.max_batch))
    noise = torch.cat([job.noise for job in batch])
    labels = torch.cat([job.labels for job in batch])
    try:
        out = await b.call_in_engine_thread(b._run, model, steps, noise, labels)
    except Exception as exc:  # the engine's failure is this batch's, not the server's
        for job in batch:
            b._fail(job, BatchFailed(f"{type(exc).__name__}: {exc}"))
        return
    finally:
        b._running_until = 0.0
        _busy(b, time.monotonic() - started)
    run_s = time.monotonic() - started
    m.batch_duration.observe(run_s)
    m.batch_predicted.labels(lane.label).set(predicted)
    m.batch_actual.labels(lane.label).set(run_s)
    lane.observe(images, run_s)
    offset = 0
    for job in batch:
        part = out[offset: offset + job.n]
        offset += job.n
        if job.state == "abandoned" or job.future.done():
            continue
        job.state = "done"
        job.future.set_result(Result(part, started - job.enqueued, run_s, images))


def _busy(b: Batcher, seconds: float) -> None:
    """Count engine busy time; every BUSY_WINDOW_S, set the busy fraction over that window."""
    b.metrics.engine_busy.inc(seconds)
    b._busy_s += seconds
    now = time.monotonic()
    if now - b._busy_since >= BUSY_WINDOW_S:
        b.metrics.engine_busy_fraction.set(min(1.0, b._busy_s / (now - b._busy_since)))
        b._busy_s, b._busy_since = 0.0, now
