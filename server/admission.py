"""What one request may ask of this server, checked before it is queued.

- Not before warm-up has succeeded: 503 NotReady with Retry-After (also after a failed one).
- The teacher: refused when `--teacher off`, and above `--max-teacher-steps` (default: the
  bundle's teacher default) steps: 422 saying the limit.
- Cost: a request whose predicted engine time (n x steps x its lane's seconds per image-step)
  is over `--max-request-s` is refused with 422 saying what to lower, so one anonymous request
  cannot hold the engine for minutes.
"""

from __future__ import annotations

import math

from .deployments import Deployment
from .outcomes import NotReady
from .request import GenerateJob, InvalidRequest
from .state import ServerState


def check_ready(state: ServerState, d: Deployment | None = None) -> None:
    """NotReady (503 + Retry-After) until the bundle's (default: the default bundle's) warm-up
    has succeeded."""
    d = d or state.deployment(None)
    if d.warmup is None:
        raise NotReady("the server is warming up; retry in a few seconds")
    if not d.ready:
        raise NotReady("warm-up failed (see the server log); this server cannot serve, retry "
                       "on another replica")


def teacher_limit(state: ServerState, d: Deployment | None = None) -> int:
    """Most steps a teacher request may ask for here (of bundle d; default: the default)."""
    return state.teacher_cap(d)


def check_request(state: ServerState, job: GenerateJob, d: Deployment | None = None) -> None:
    """InvalidRequest (422) for a disabled teacher, too many teacher steps, or a request whose
    predicted engine time is over max_request_s (job of bundle d; default: the default)."""
    settings, d = state.settings, d or state.deployment(None)
    if job.model == "teacher":
        if settings.teacher == "off":
            raise InvalidRequest("model=teacher is turned off on this server (--teacher off); "
                                 "use model=student")
        cap = teacher_limit(state, d)
        if job.steps > cap:
            raise InvalidRequest(f"teacher steps={job.steps} is over this server's limit of "
                                 f"{cap} (--max-teacher-steps); ask for steps <= {cap}")
    limit = settings.max_request_s
    cost = state.batcher.cost_s((d.name, job.model, job.steps), job.n)
    if cost <= limit:
        return
    per_image_step = cost / (job.n * job.steps)
    most_n = math.floor(limit / (job.steps * per_image_step))
    if job.model == "teacher":
        most_steps = math.floor(limit / (job.n * per_image_step))
        fixes = [f"steps <= {most_steps}" if most_steps >= 1 else None, "model=student"]
    else:
        fitting = [s for s in d.bundle.student_steps
                   if state.batcher.cost_s((d.name, "student", s), job.n) <= limit]
        fixes = [f"steps <= {max(fitting)} (a smaller student)" if fitting else None]
    fixes.insert(0, f"n <= {most_n}" if most_n >= 1 else None)
    raise InvalidRequest(
        f"this request would take about {cost:.1f} s of engine time, over this server's limit "
        f"of {limit:g} s per request (--max-request-s); ask for "
        f"{' or '.join(x for x in fixes if x) or 'fewer images or steps'}")
