"""How a request leaves the scheduler: its Result, or the exception that refuses it.

`errors.py` maps each exception to its HTTP status; an exception with `headers` (Retry-After)
has them added to its answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class QueueFull(Exception):
    """The queue holds max_queue requests already."""


class Overloaded(QueueFull):
    """Queued engine work is over max_backlog_s, or the request's deadline cannot be met."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class DeadlineExceeded(Exception):
    """The request was not done by its deadline (queued: never run; a chunked teacher run:
    stopped at its next chunk boundary)."""


class Draining(Exception):
    """The server is shutting down and accepts no new work."""

    headers = {"Retry-After": "1"}


class NotReady(Draining):
    """The engine is warming up (or its warm-up failed): no work is accepted yet."""


class Unhealthy(Draining):
    """The engine stalled (watchdog) or failed, or the batch loop ended: the pod restarts."""


class BatchFailed(Exception):
    """The engine raised, or returned the wrong number of images, for this request's batch."""


@dataclass
class Result:
    images: torch.Tensor  # [n, C, H, W] float32 in [-1, 1]
    queue_s: float
    run_s: float
    batch_images: int  # images in the executed batch, this request's included
    predicted_s: float = 0.0  # predicted completion at admission (queue + run)
