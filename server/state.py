"""What one app instance serves: settings, its bundles (deployments), metrics, the batcher
and readiness.

Stored on `app.state.halfstep`; the routes, the lifespan and the error handlers read it there.
`bundle` and `engine` are the default (first) deployment's; a request names another with
`bundle=`.
"""

from __future__ import annotations

import asyncio
import time

from halfstep.distill.bundle import Bundle
from halfstep.engines.base import Engine

from .batcher import Batcher
from .deployments import Deployment
from .metrics import RELOAD_RESULTS, Metrics
from .request import MAX_N, InvalidRequest
from .settings import Settings


class ServerState:
    """Everything one app instance serves. The batcher exists while the app runs (lifespan)."""

    def __init__(self, settings: Settings, deployments: list[Deployment],
                 export_cache: bool = False) -> None:
        self.settings = settings
        self.export_cache = export_cache  # a reload serves exported copies as start-up did
        self.deployments: dict[str, Deployment] = {d.name: d for d in deployments}
        self.default = deployments[0].name
        self.metrics = Metrics()
        engine_max = [d.engine.max_batch for d in deployments if d.engine.max_batch]
        self.max_batch = min([settings.max_batch, *engine_max])
        self.batcher: Batcher | None = None
        self.drain_deadline: float | None = None  # monotonic end of the drain, once draining
        self.reload_lock = asyncio.Lock()  # one reload at a time
        # moving average of a request's time outside the queue and the engine (parsing, noise,
        # encoding, the handler): deadline_ms leaves this much of the deadline to it
        self.overhead_s = 0.0
        for d in deployments:
            self.metrics.generation.labels(d.name).set(d.generation)
            for result in RELOAD_RESULTS:  # zeros: rate() from the start
                self.metrics.reloads.labels(d.name, result)

    def teacher_cap(self, d: Deployment | None = None) -> int:
        """Most steps a teacher request of bundle d (default: the default) may ask for here:
        --max-teacher-steps, else the bundle's teacher default (whether or not --teacher off)."""
        bundle = (d or self.deployments[self.default]).bundle
        cap = self.settings.max_teacher_steps or bundle.teacher_default_steps
        return min(cap, bundle.teacher_max_steps)

    def observe_overhead(self, seconds: float) -> None:
        self.overhead_s = 0.8 * self.overhead_s + 0.2 * max(seconds, 0.0)

    @property
    def bundle(self) -> Bundle:
        return self.deployments[self.default].bundle

    @property
    def engine(self) -> Engine:
        return self.deployments[self.default].engine

    def deployment(self, name: str | None) -> Deployment:
        """The deployment serving `name` (None: the default); InvalidRequest naming the
        served bundles otherwise."""
        if name is None:
            return self.deployments[self.default]
        if name not in self.deployments:
            raise InvalidRequest(f"unknown bundle {name!r}; this server serves "
                                 f"{', '.join(self.deployments)}")
        return self.deployments[name]

    @property
    def ready(self) -> bool:
        return all(d.ready for d in self.deployments.values())

    @property
    def warmup(self) -> dict | str | None:
        """None while any bundle warms up; the first failure's text; else the warm-up info
        (one bundle: its own dict; several: a dict by bundle name)."""
        infos = {name: d.warmup for name, d in self.deployments.items()}
        if any(info is None for info in infos.values()):
            return None
        failed = [f"{name}: {info}" if len(infos) > 1 else info
                  for name, info in infos.items() if isinstance(info, str)]
        if failed:
            return failed[0]
        return infos[self.default] if len(infos) == 1 else infos

    def begin_drain(self) -> None:
        """SIGTERM: not ready from now on; new work gets 503 Draining, accepted work runs."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.settings.drain_s
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.begin_drain()

    def end_drain_now(self) -> None:
        """A second SIGTERM/SIGINT: draining as after the first, with no time left."""
        self.begin_drain()
        self.drain_deadline = time.monotonic()

    def drain_left_s(self) -> float:
        """Seconds left of the drain (all of drain_s before it began)."""
        if self.drain_deadline is None:
            return self.settings.drain_s
        return max(0.0, self.drain_deadline - time.monotonic())

    def unhealthy_reason(self) -> str | None:
        """Why /healthz answers 503 (restart this process), or None while it can serve."""
        for d in self.deployments.values():
            if d.engine.failure:
                where = f" (bundle {d.name})" if len(self.deployments) > 1 else ""
                return f"engine failed{where}: {d.engine.failure}"
        if self.batcher is not None and self.batcher.failure:
            return self.batcher.failure
        return None

    def not_ready_reason(self, d: Deployment | None = None) -> str | None:
        """Why /readyz (or, given d, that bundle's model readiness) answers 503 now, or None
        when ready: warming up, warm-up failed, an engine unhealthy, or draining. A full queue
        is not a reason (it is shed with 503)."""
        b = self.batcher
        unhealthy = self.unhealthy_reason()
        if unhealthy:
            return unhealthy
        if self.drain_deadline is not None or (b is not None and b.closing):
            return "draining"
        warmup, ready = (self.warmup, self.ready) if d is None else (d.warmup, d.ready)
        if warmup is None:
            return "warming up"
        if not ready:
            return "warm-up failed (see the server log)"  # the engine's text is logged there
        return "not started" if b is None else None

    def models_info(self) -> dict:
        """What /v1/models answers: the default bundle's fields at the top level (one-bundle
        clients read those), every served bundle under `bundles`, and the default's name."""
        bundles = [self.bundle_info(d) for d in self.deployments.values()]
        return {**bundles[0], "default": self.default, "bundles": bundles}

    def bundle_info(self, d: Deployment) -> dict:
        """One bundle's shape and steps, how it is served, and its lanes."""
        b, e = d.bundle, d.engine
        return {
            "name": d.name, "image_shape": list(b.image_shape), "num_labels": b.num_labels,
            "student_steps": b.student_steps, "teacher_default_steps": b.teacher_default_steps,
            "teacher_max_steps": b.teacher_max_steps, "teacher_limit":
                0 if self.settings.teacher == "off" else self.teacher_cap(d),
            "backend": e.name,
            # batch sizes the engine pads to; [] when it runs any size (batch-invariant rows)
            "batch_buckets": e.used_buckets() if e.buckets and not e.batch_invariant else [],
            "max_batch": self.max_batch, "max_n": MAX_N, "generation": d.generation,
            "sha256": d.digest, "lanes": self.lanes_info(d),
        }

    def lanes_info(self, d: Deployment | None = None) -> dict[str, dict]:
        """Each student lane of a bundle (default: the default one), and every teacher lane
        seen, with its queued work and latency estimate; empty before the batcher starts."""
        b, d = self.batcher, d or self.deployments[self.default]
        if b is None:
            return {}
        for steps in d.bundle.student_steps:
            b.lane((d.name, "student", steps))
        default = b._default_image_step_s()
        return {f"{m}:{s}": lane.info(default)
                for (name, m, s), lane in sorted(b.lanes.items()) if name == d.name}
