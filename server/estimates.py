"""The scheduler's estimates: each lane's cost, the batching window, the work ahead of a
request (backlog), its predicted completion, and how long a batch may run (the watchdog).

Mixed into `Batcher`, which holds `lanes`, `runs` (teacher runs in progress), the running
batch's predicted end (`_running_until`) and the settings these read.
"""

from __future__ import annotations

import math
import time
from collections import deque

from .lanes import Lane, LaneKey

DUE_SLACK = 4.0  # a job without its own deadline is due after 4 of its lane's batch times
# deadline_ms calibration: the share of deadline time left to the engine is divided by this
# quantile of actual / predicted time over recent deadline requests (at least 1, at most
# CALIBRATION_MAX; samples older than CALIBRATION_AGE_S are dropped, so a burst of slow
# requests cannot keep refusing deadline requests once it has passed)
CALIBRATION_QUANTILE = 0.99
CALIBRATION_KEEP = 256
CALIBRATION_MIN = 20  # fewer samples: no calibration (1)
CALIBRATION_FULL = 100  # fewer: the 90th percentile (the 99th of so few is their maximum)
CALIBRATION_MAX = 4.0
CALIBRATION_AGE_S = 60.0


class Estimates:
    lanes: dict[LaneKey, Lane]
    runs: list
    max_batch: int
    _ratios: deque  # actual / predicted of recent deadline jobs (new_ratios())
    max_wait_s: float
    wait_fraction: float
    watchdog_factor: float
    watchdog_min_s: float
    timeout_s: float
    _running_until: float

    @staticmethod
    def new_ratios() -> deque:
        return deque(maxlen=CALIBRATION_KEEP)

    # -- estimates ------------------------------------------------------------------------
    def lane(self, key: LaneKey) -> Lane:
        return self.lanes[key] if key in self.lanes else self.lanes.setdefault(key, Lane(key))

    def seed_run_times(self, bundle: str, run_s: dict[tuple[str, int], float]) -> None:
        """Start a bundle's lanes' estimates from its engine's warm-up timings
        (Engine.warm_run_s, keyed by (model, steps))."""
        for (model, steps), seconds in run_s.items():
            self.lane((bundle, model, steps)).seed(float(seconds))

    def reseed(self, bundle: str, run_s: dict[tuple[str, int], float]) -> None:
        """A bundle's engine was swapped: its lanes' estimates start over from the new engine's
        warm-up timings (the old engine's measurements no longer apply)."""
        for (name, _, _), lane in self.lanes.items():
            if name == bundle:
                lane.image_step_s = lane.batch_s = None
        self.seed_run_times(bundle, run_s)

    def _default_image_step_s(self) -> float:
        """For a lane never measured: the slowest known cost per image-step (cautious)."""
        known = [lane.image_step_s for lane in self.lanes.values() if lane.image_step_s]
        return max(known, default=0.0)

    def cost_s(self, key: LaneKey, n: int) -> float:
        """Predicted engine seconds of n images of `key`."""
        return self.lane(key).cost_s(n, self._default_image_step_s())

    def wait_limit(self, key: LaneKey) -> float:
        """How long a batch of `key` may wait for company (after engine-free or arrival)."""
        if self.wait_fraction == 0:
            return 0.0
        recent = self.lane(key).batch_s
        if recent is None:  # neither warmed up nor run yet: the configured bound alone
            return self.max_wait_s
        return min(self.max_wait_s, self.wait_fraction * recent)

    def backlog_s(self, due: float | None = None) -> float:
        """Engine seconds ahead: what is left of the running batch plus queued work (only the
        work due no later than `due`, when given: it runs first)."""
        now = time.monotonic()
        queued = sum(job.cost_s for lane in self.lanes.values() for job in lane.queue
                     if due is None or job.due <= due)
        default = self._default_image_step_s()
        part_run = sum(run.remaining_s(default) for run in self.runs
                       if due is None or run.due <= due)
        return max(0.0, self._running_until - now) + queued + part_run

    def predict_s(self, key: LaneKey, n: int, deadline_s: float | None = None) -> float:
        """Seconds until a request of n images of `key`, submitted now, would be done: the work
        due before it, the jobs already queued in its lane that will share its batch, and its
        own images."""
        due = time.monotonic() + self._relative_due(key, n, deadline_s)
        return self.predicted_at(key, n, due, self.cost_s(key, n))

    def predicted_at(self, key: LaneKey, n: int, due: float, cost: float) -> float:
        return self.backlog_s(due) + self.joining_s(key, n, due) + cost

    def joining_s(self, key: LaneKey, n: int, due: float) -> float:
        """Engine seconds of the jobs queued in `key`'s lane that are due after `due` but will
        run in the same batch as a new job (a lane's batch takes its queue in arrival order, up
        to max_batch rows): backlog_s(due) leaves them out, though the new job waits for them."""
        rows, cost = n, 0.0
        for job in self.lane(key).queue:
            if rows + job.n > self.max_batch:
                break
            rows += job.n
            if job.due > due:
                cost += job.cost_s
        return cost

    def _relative_due(self, key: LaneKey, n: int, deadline_s: float | None,
                      timeout_s: float = math.inf) -> float:
        if deadline_s is not None:
            return deadline_s
        estimate = self.lane(key).batch_s or self.cost_s(key, n)
        return min(DUE_SLACK * estimate, timeout_s / 2)

    def observe_deadline_job(self, actual_s: float, predicted_s: float) -> None:
        """A deadline job was answered actual_s after it arrived; predicted_s was predicted."""
        self._ratios.append((time.monotonic(), actual_s / max(predicted_s, 1e-4)))

    def deadline_slack(self) -> float:
        """The factor deadline predictions are scaled by: a high quantile of actual / predicted
        over recent deadline jobs (the tail the mean estimates miss: batch times vary, the
        machine is shared), between 1 and CALIBRATION_MAX; 1 until CALIBRATION_MIN recent ones
        finished."""
        old = time.monotonic() - CALIBRATION_AGE_S
        while self._ratios and self._ratios[0][0] < old:
            self._ratios.popleft()
        ratios = sorted(ratio for _, ratio in self._ratios)
        if len(ratios) < CALIBRATION_MIN:
            return 1.0
        q = CALIBRATION_QUANTILE if len(ratios) >= CALIBRATION_FULL else 0.9
        return min(CALIBRATION_MAX, max(1.0, ratios[min(len(ratios) - 1, int(q * len(ratios)))]))

    def watchdog_limit_s(self, predicted_s: float) -> float:
        """How long an engine call predicted to take predicted_s may run before it stalled."""
        if predicted_s <= 0:  # nothing measured yet: the request timeout bounds it
            return max(self.watchdog_min_s, self.timeout_s)
        return max(self.watchdog_factor * predicted_s, self.watchdog_min_s)
