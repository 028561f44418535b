"""The Engine interface: every backend runs a whole N-step sampler on a batch.

`images = engine.run(model, steps, noise, labels)`: noise [B, C, H, W] float32 (draw it with
`noise_for_seeds` so each request's image is independent of its batch), labels [B] int64
(K = no label). Returns float32 images in [-1, 1] on the CPU. The server and the benchmark
only ever talk to an Engine. `engine.launch(...)` is the asynchronous form of `run`: it returns a
PendingBatch whose `.result()` gives the same images (engines/pipeline.py).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod

import torch

from halfstep.distill.bundle import Bundle

from .pipeline import PendingBatch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class EngineError(ValueError):
    """A backend that cannot run here, or a request it cannot serve."""


class Engine(ABC):
    """Runs the deterministic DDIM sampler of one bundle's teacher or students."""

    name: str = "engine"
    # Batches smaller than this are padded up to it. A backend sets it where small batches run
    # through kernels whose floats depend on the batch size (TorchEngine on CPU); padding keeps
    # a request's image independent of what it was batched with.
    min_rows: int = 1
    # True where a row's output does not depend on how many rows share the batch (a dynamic
    # batch axis whose kernels are batch-invariant, e.g. ONNX Runtime on CPU): such an engine
    # runs exactly max(n, min_rows) rows; its buckets only bound the batch and name the sizes
    # to warm up. False: a batch is padded up to its bucket (fixed shapes, per-shape kernels).
    batch_invariant: bool = False

    def __init__(self, bundle: Bundle, buckets: tuple[int, ...] | None = None) -> None:
        self.bundle = bundle
        self.buckets = tuple(sorted(buckets)) if buckets else None
        self.lock = threading.Lock()  # one batch at a time per engine
        # (model, steps) -> seconds of one warm single-image batch, measured by warmup(): the
        # server's first estimate of a key's batch time, before any request has run.
        self.warm_run_s: dict[tuple[str, int], float] = {}
        # Set (to the reason) when the engine can no longer serve, e.g. a CUDA graph capture
        # failed: the server then answers /healthz and /readyz with 503 so the pod restarts.
        self.failure: str | None = None

    @property
    def max_batch(self) -> int | None:
        return self.buckets[-1] if self.buckets else None

    def bucket_for(self, n: int) -> int:
        """The smallest bucket that holds n images, and at least min_rows (n itself, or
        min_rows, when the engine has no buckets)."""
        if n < 1:
            return n  # nothing to run: no padding rows either
        if self.buckets is None or self.batch_invariant:
            bucket = n
            if self.buckets and n > self.buckets[-1]:
                raise EngineError(f"batch of {n} exceeds the largest bucket {self.buckets[-1]}")
        else:
            bucket = next((b for b in self.buckets if b >= n), None)
            if bucket is None:
                raise EngineError(f"batch of {n} exceeds the largest bucket {self.buckets[-1]}")
        # min_rows pads a small batch up to min_rows itself (never to a far larger bucket)
        return max(bucket, min(self.min_rows, self.max_batch or self.min_rows))

    def rows_for(self, model: str, n: int) -> int:
        """Rows a batch of n images of `model` really runs (n plus any padding)."""
        return self.bucket_for(n)

    def used_buckets(self) -> list[int]:
        """The batch sizes this engine actually runs (buckets below min_rows never run)."""
        return sorted({self.bucket_for(b) for b in self.buckets or (1,)})

    def check_inputs(self, model: str, steps: int, noise: torch.Tensor, labels: torch.Tensor):
        self.bundle.check_steps(model, steps)
        shape = tuple(self.bundle.image_shape)
        if noise.ndim != 4 or tuple(noise.shape[1:]) != shape:
            raise EngineError(
                f"noise must be [B, {', '.join(map(str, shape))}], got {tuple(noise.shape)}"
            )
        if labels.shape != (noise.shape[0],):
            raise EngineError(f"labels must be [B={noise.shape[0]}], got {tuple(labels.shape)}")
        k = self.bundle.num_labels
        if labels.numel() and (labels.min() < 0 or labels.max() > k):
            raise EngineError(f"labels must be in 0..{k} ({k} = unconditional)")

    def run(
        self, model: str, steps: int, noise: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Pad to a bucket, sample, and return exactly B images."""
        self.check_inputs(model, steps, noise, labels)
        return self._padded(self._run, noise, labels, model, steps)

    def launch(
        self, model: str, steps: int, noise: torch.Tensor, labels: torch.Tensor
    ) -> PendingBatch:
        """Start a batch; `.result()` later gives exactly `run`'s images. This default runs it
        now (synchronously, under the lock as run()); CudaGraphEngine only enqueues it."""
        return PendingBatch.finished(self.run(model, steps, noise, labels))

    def chunkable(self, model: str) -> bool:
        """True when `run_chunk` can run `model` a slice of its steps at a time."""
        return False

    def run_chunk(self, model: str, steps: int, z: torch.Tensor, labels: torch.Tensor,
                  start: int, stop: int) -> torch.Tensor:
        """Steps start..stop-1 of the N-step sampler from z (the noise when start == 0):
        z after them ([B, C, H, W] float32 on the CPU), or the images when stop == steps.
        Chunks 0..k, k..m, ..., ..steps give run()'s images bit for bit; padding and the lock
        as run(), so other batches can run between chunks."""
        self.check_inputs(model, steps, z, labels)
        if not self.chunkable(model):
            raise EngineError(f"{self.name} cannot run {model} in chunks of steps")
        if not 0 <= start < stop <= steps:
            raise EngineError(f"chunk {start}..{stop} is outside 0..{steps}")
        return self._padded(self._run_chunk, z, labels, model, steps, start, stop)

    def _run_chunk(self, model, steps, z, labels, start, stop) -> torch.Tensor:
        raise NotImplementedError

    def _padded(self, fn, noise: torch.Tensor, labels: torch.Tensor, *args) -> torch.Tensor:
        """fn(*args, noise, labels, ...) on the batch padded to its bucket, under the lock."""
        n = noise.shape[0]
        padded = self.bucket_for(n)
        if padded > n:  # padding rows never influence real rows: the network is per-example
            noise = torch.cat([noise, noise[:1].expand(padded - n, *noise.shape[1:])])
            labels = torch.cat([labels, labels[:1].expand(padded - n)])
        model, steps, *rest = args
        with self.lock:
            images = fn(model, steps, noise, labels.to(torch.int64), *rest)
        if images.shape[0] != padded:
            raise EngineError(f"{self.name} returned {images.shape[0]} images for {padded} inputs")
        return images[:n]

    @abstractmethod
    def _run(
        self, model: str, steps: int, noise: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Sample a bucket-sized batch; float32 CPU images in [-1, 1]."""

    def warmup(self, keys: list[tuple[str, int]] | None = None) -> dict:
        """Run every (model, steps) once per bucket; returns the time it took."""
        keys = keys if keys is not None else self.default_keys()
        started = time.perf_counter()
        shape = self.bundle.image_shape
        for model, steps in keys:
            for b in self.used_buckets():
                self.run(model, steps, torch.zeros(b, *shape), torch.zeros(b, dtype=torch.int64))
        self.time_lone_batches(keys)
        return {"warmup_s": round(time.perf_counter() - started, 3), "keys": len(keys)}

    def time_lone_batches(self, keys: list[tuple[str, int]]) -> None:
        """Fill warm_run_s: one more (already warm) single-image batch per key, timed."""
        shape = self.bundle.image_shape
        for model, steps in keys:
            started = time.perf_counter()
            self.run(model, steps, torch.zeros(1, *shape), torch.zeros(1, dtype=torch.int64))
            self.warm_run_s[(model, steps)] = time.perf_counter() - started

    def default_keys(self) -> list[tuple[str, int]]:
        return [("student", s) for s in self.bundle.student_steps]
