"""What one app instance serves: settings, bundle, engine, metrics, batcher and readiness.

Stored on `app.state.halfstep`; the routes, the lifespan and the error handlers read it there.
"""

from __future__ import annotations

import time

from halfstep.distill.bundle import Bundle
from halfstep.engines.base import Engine

from .batcher import Batcher
from .metrics import Metrics
from .request import MAX_N
from .settings import Settings


class ServerState:
    """Everything one app instance serves. The batcher exists while the app runs (lifespan)."""

    def __init__(self, settings: Settings, bundle: Bundle, engine: Engine) -> None:
        self.settings, self.bundle, self.engine = settings, bundle, engine
        self.metrics = Metrics()
        self.max_batch = min(settings.max_batch, engine.max_batch or settings.max_batch)
        self.batcher: Batcher | None = None
        self.ready = False
        self.warmup: dict | str | None = None  # info dict when done, error text when it failed
        self.drain_deadline: float | None = None  # monotonic end of the drain, once draining

    def begin_drain(self) -> None:
        """SIGTERM: not ready from now on; new work gets 503 Draining, accepted work runs."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.settings.drain_s
        self.ready = False
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.begin_drain()

    def drain_left_s(self) -> float:
        """Seconds left of the drain (all of drain_s before it began)."""
        if self.drain_deadline is None:
            return self.settings.drain_s
        return max(0.0, self.drain_deadline - time.monotonic())

    def unhealthy_reason(self) -> str | None:
        """Why /healthz answers 503 (restart this process), or None while it can serve."""
        if self.engine.failure:
            return f"engine failed: {self.engine.failure}"
        if self.batcher is not None and self.batcher.failure:
            return self.batcher.failure
        return None

    def not_ready_reason(self) -> str | None:
        """Why /readyz answers 503 now, or None when ready: warming up, warm-up failed, the
        engine unhealthy, or draining. A full queue is not a reason (it is shed with 503)."""
        b = self.batcher
        unhealthy = self.unhealthy_reason()
        if unhealthy:
            return unhealthy
        if self.drain_deadline is not None or (b is not None and b.closing):
            return "draining"
        if self.warmup is None:
            return "warming up"
        if not self.ready:
            return "warm-up failed (see the server log)"  # the engine's text is logged there
        return "not started" if b is None else None

    def models_info(self) -> dict:
        """What /v1/models answers: the bundle's shape and steps, and how it is served."""
        b = self.bundle
        return {
            "name": b.name, "image_shape": list(b.image_shape), "num_labels": b.num_labels,
            "student_steps": b.student_steps, "teacher_default_steps": b.teacher_default_steps,
            "teacher_max_steps": b.teacher_max_steps, "backend": self.engine.name,
            "batch_buckets": self._buckets(), "max_batch": self.max_batch, "max_n": MAX_N,
            "lanes": self.lanes_info(),
        }

    def _buckets(self) -> list[int]:
        """Batch sizes the engine pads to; [] when it runs any size (no buckets, or
        batch-invariant rows: exactly n, at least min_rows)."""
        e = self.engine
        return e.used_buckets() if e.buckets and not e.batch_invariant else []

    def lanes_info(self) -> dict[str, dict]:
        """Each student lane (and every teacher lane seen) with its queued work and latency
        estimate; empty before the batcher starts."""
        b = self.batcher
        if b is None:
            return {}
        for steps in self.bundle.student_steps:
            b.lane(("student", steps))
        default = b._default_image_step_s()
        return {f"{m}:{s}": lane.info(default) for (m, s), lane in sorted(b.lanes.items())}
