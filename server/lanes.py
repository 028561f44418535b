"""Lanes: one queue per (bundle, model, steps), with what the scheduler knows of its cost.

A lane's cost model is one number, `image_step_s`: seconds of engine time per image per
sampler step, a moving average over its batches (`run_s / (rows x steps)`), started from the
engine's warm-up timing of a lone image. A request of n images costs `n x steps x image_step_s`
seconds of engine time; a batch of `rows` images is predicted to take `rows x steps x
image_step_s`. `batch_s` is the moving average of the lane's whole batch times (what the
batching window is a fraction of).

Labels for metrics are bounded: a student lane is its step count ("1", "2", "4", ...), every
teacher step count is the one label "teacher" (clients choose teacher steps freely); the bundle
name is a label of its own (configuration, not client input).

A job holds the engine it was admitted for: a reload that swaps a bundle's engine leaves queued
and running jobs on the old one, and a batch only ever joins jobs of one engine.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

EMA_KEEP = 0.8  # weight of the old average per new batch: about the last 5 batches count


LaneKey = tuple[str, str, int]  # (bundle, model, steps)


def lane_label(model: str, steps: int) -> str:
    """The bounded metric label of a lane's (model, steps)."""
    return "teacher" if model == "teacher" else str(steps)


@dataclass(eq=False)
class Job:
    key: LaneKey
    engine: Any  # the Engine it runs on (the bundle's engine when it was admitted)
    noise: torch.Tensor
    labels: torch.Tensor
    enqueued: float
    deadline: float  # queued past this: dropped, answered DeadlineExceeded
    due: float  # earliest-deadline-first order across lanes (Lane.due_for)
    cost_s: float  # predicted engine seconds of this request (admission, backlog)
    future: asyncio.Future
    state: str = "queued"  # queued -> running -> done, or queued -> dropped; or abandoned
    started: float = field(default=0.0)
    chunked: bool = False  # a teacher job run in chunks of steps (TeacherRun)
    firm: bool = False  # its due is its own deadline (deadline_ms): the window respects it

    @property
    def n(self) -> int:
        return int(self.noise.shape[0])


class Lane:
    """Queued jobs of one (model, steps), in arrival order, and the lane's timing estimates."""

    def __init__(self, key: LaneKey) -> None:
        self.key = key
        self.bundle, self.model = key[0], key[1]
        self.label = lane_label(key[1], key[2])
        self.queue: deque[Job] = deque()
        self.image_step_s: float | None = None  # None: neither warmed up nor run yet
        self.batch_s: float | None = None

    @property
    def steps(self) -> int:
        return self.key[2]

    @property
    def rows(self) -> int:
        return sum(job.n for job in self.queue)

    @property
    def backlog_s(self) -> float:
        return sum(job.cost_s for job in self.queue)

    def cost_s(self, n: int, default_image_step_s: float = 0.0) -> float:
        """Predicted engine seconds of n images in this lane."""
        per = self.image_step_s if self.image_step_s is not None else default_image_step_s
        return n * self.steps * per

    def seed(self, lone_batch_s: float) -> None:
        """Start the estimates from a warm single-image batch, unless a batch measured them."""
        if self.image_step_s is None:
            self.image_step_s = lone_batch_s / self.steps
        if self.batch_s is None:
            self.batch_s = lone_batch_s

    def observe(self, rows: int, run_s: float, steps: int | None = None) -> None:
        """Fold one executed batch of `rows` images into the moving averages (`steps`: of a
        teacher chunk, the steps it ran; batch_s then stays the whole batch's estimate)."""
        per = run_s / max(rows * (steps or self.steps), 1)
        if steps is not None and steps != self.steps:
            run_s = per * rows * self.steps
        self.image_step_s = per if self.image_step_s is None else \
            EMA_KEEP * self.image_step_s + (1 - EMA_KEEP) * per
        self.batch_s = run_s if self.batch_s is None else \
            EMA_KEEP * self.batch_s + (1 - EMA_KEEP) * run_s

    def take(self, max_rows: int) -> tuple[list[Job], int]:
        """The oldest queued job (even one over max_rows: the engine thread runs it in
        max_rows chunks) and the later ones of the same engine that still fit, in arrival
        order."""
        batch, rows = [], 0
        for job in self.queue:
            if not batch or (rows + job.n <= max_rows and job.engine is batch[0].engine):
                batch.append(job)
                rows += job.n
        return batch, rows

    def info(self, default_image_step_s: float = 0.0) -> dict:
        """This lane's state for /v1/models: queued work and its latency estimate."""
        lone = self.cost_s(1, default_image_step_s)
        return {
            "model": self.model, "steps": self.steps, "queued": len(self.queue),
            "backlog_ms": round(self.backlog_s * 1e3, 3),
            "image_step_ms": round((self.image_step_s or 0.0) * 1e3, 4),
            "batch_ms": round((self.batch_s or 0.0) * 1e3, 3),
            "predicted_lone_ms": round(lone * 1e3, 3),
        }
