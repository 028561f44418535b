"""Build an Engine by backend name: the one place that knows every backend.

`auto` picks the fastest available: cudagraph on CUDA, else ONNX Runtime when the bundle has
ONNX exports and onnxruntime is installed, else eager torch.
"""

from __future__ import annotations

import torch

from halfstep.distill.bundle import Bundle
from halfstep.distill.engines import Engine, EngineError, TorchEngine

BACKENDS = ("auto", "torch", "cudagraph", "onnxruntime", "tensorrt")


def make_engine(bundle: Bundle, backend: str = "auto", buckets: tuple[int, ...] | None = None,
                **options) -> Engine:
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "cudagraph" if torch.cuda.is_available() else "torch"
    if backend == "torch":
        return TorchEngine(bundle, device=options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"),
                           buckets=buckets)
    if backend == "cudagraph":
        from halfstep.distill.cudagraph import CudaGraphEngine  # raises EngineError without CUDA

        return CudaGraphEngine(bundle, buckets=buckets, dtype=options.get("dtype", "float32"))
    raise EngineError(f"backend {backend!r} is not available in this build yet")
