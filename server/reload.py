"""Hot reload: re-read each bundle's directory and swap in the ones that changed, without
dropping a request.

For each served bundle (`POST /admin/reload`, or SIGHUP):
1. Load its directory again; `Bundle` verifies every weight file's sha256 and shape. Unchanged
   weights (same digest): nothing to do.
2. Refuse, keeping the old weights serving, a bundle that fails verification, has another image
   shape or label count (clients and the protocol metadata depend on those: restart for that),
   or whose engine fails to build or warm up.
3. Build the new engine and warm it up beside the old one, which keeps serving meanwhile (on
   CUDA in the engine thread instead, between batches: a graph capture must not race other
   work on the device, so requests wait for it there).
4. Swap atomically (one event-loop step): the bundle's entry and the batcher's engine for new
   requests. Requests admitted before the swap hold the old engine and finish on it; it is
   freed when the last of them is done.

One reload runs at a time; a second waits for the first. While draining, reloads are refused.
On CUDA the new engine warms up in the engine thread, so every bundle's requests wait for that
warm-up (seconds) instead of failing; elsewhere serving goes on beside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import torch

from .deployments import BundleSpec, Deployment, open_deployment, weights_digest
from .embedded import load_bundle
from .outcomes import Draining
from .state import ServerState

log = logging.getLogger("halfstep.server")


@dataclasses.dataclass
class Outcome:
    """What a reload did to one bundle: swapped, unchanged or refused (with the reason)."""

    result: str
    generation: int
    sha256: str
    reason: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


async def reload_all(state: ServerState, reason: str = "request") -> dict[str, Outcome]:
    """Reload every served bundle (in order); returns each one's outcome."""
    async with state.reload_lock:
        if state.drain_deadline is not None or state.batcher is None or state.batcher.closing:
            raise Draining("server is shutting down; reload refused")
        outcomes = {}
        for name in list(state.deployments):
            outcome = await reload_one(state, name)
            state.metrics.reloads.labels(name, outcome.result).inc()
            log.log(logging.WARNING if outcome.result == "refused" else logging.INFO,
                    "reload (%s) of bundle %s: %s%s", reason, name, outcome.result,
                    f": {outcome.reason}" if outcome.reason else
                    f" (generation {outcome.generation})")
            outcomes[name] = outcome
        return outcomes


async def reload_one(state: ServerState, name: str) -> Outcome:
    old = state.deployments[name]
    if old.source is None:
        return Outcome("unchanged", old.generation, old.digest,
                       "the embedded bundle is part of the installed package")
    try:
        new = await asyncio.to_thread(_load_changed, state, old)
    except Exception as exc:  # BundleError names the bad file or field
        return _refused(old, f"{type(exc).__name__}: {exc}")
    if new is None:
        return Outcome("unchanged", old.generation, old.digest)
    try:
        if torch.cuda.is_available():
            new.warmup = await state.batcher.call_in_engine_thread(new.engine.warmup)
        else:
            new.warmup = await asyncio.to_thread(new.engine.warmup)
    except Exception as exc:
        return _refused(old, f"warm-up failed: {type(exc).__name__}: {exc}")
    new.ready = True
    # the swap: no await between these lines, so no request sees half of it
    state.deployments[name] = new
    state.batcher.set_engine(name, new.engine)
    state.batcher.reseed(name, new.engine.warm_run_s)  # new weights: estimates start over
    state.metrics.generation.labels(name).set(new.generation)
    state.metrics.ready.set(1 if state.ready and state.drain_deadline is None else 0)
    return Outcome("swapped", new.generation, new.digest)


def _load_changed(state: ServerState, old: Deployment) -> Deployment | None:
    """The new deployment of `old`'s directory, built but not warmed up; None when its
    weights are unchanged. Raises on a bundle that cannot replace the old one."""
    bundle = load_bundle(old.source)  # verifies every sha256
    if weights_digest(bundle) == old.digest:
        return None
    changes = (("image shape", list(old.bundle.image_shape), list(bundle.image_shape)),
               ("label count", old.bundle.num_labels, bundle.num_labels))
    for what, before, after in changes:
        if before != after:
            raise ValueError(f"the {what} changed from {before} to {after}; restart the server "
                             f"to serve a bundle of another {what}")
    return open_deployment(state.settings, BundleSpec(old.name, old.source), state.export_cache,
                           name=old.name, generation=old.generation + 1, bundle=bundle)


def _refused(old: Deployment, reason: str) -> Outcome:
    return Outcome("refused", old.generation, old.digest, reason + "; the old weights keep "
                   "serving")
