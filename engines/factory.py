"""Build an Engine by backend name: the one place that knows every backend.

`auto` picks the fastest available: cudagraph on CUDA, else ONNX Runtime when every student
of the bundle has an ONNX export and onnxruntime is installed, else eager torch.
"""

from __future__ import annotations

import importlib.util

import torch

from halfstep.distill.bundle import Bundle
from halfstep.export.manifest import export_entries, missing_students

from .base import Engine, EngineError
from .eager import TorchEngine
from .names import BACKENDS


def has_onnx_exports(bundle: Bundle) -> bool:
    """Every student has an ONNX entry in bundle.json (files are verified when loaded)."""
    return bool(bundle.student_steps) and not missing_students(bundle,
                                                               export_entries(bundle, "onnx"))


def auto_backend(bundle: Bundle) -> str:
    if torch.cuda.is_available():
        return "cudagraph"
    if has_onnx_exports(bundle) and importlib.util.find_spec("onnxruntime") is not None:
        return "onnxruntime"
    return "torch"


def missing_exports_only(bundle: Bundle) -> bool:
    """auto picks eager torch here (no GPU) only because the bundle has no ONNX exports."""
    return (not torch.cuda.is_available() and importlib.util.find_spec("onnxruntime") is not None
            and not has_onnx_exports(bundle))


def make_engine(bundle: Bundle, backend: str = "auto", buckets: tuple[int, ...] | None = None,
                **options) -> Engine:
    """options: device (torch, onnxruntime), dtype (cudagraph), threads (onnxruntime),
    fp16 (tensorrt: None prefers fp16 engines when built)."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = auto_backend(bundle)
    if backend == "torch":
        device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        return TorchEngine(bundle, device=device, buckets=buckets)
    if backend == "cudagraph":
        from .cudagraph import CudaGraphEngine  # raises EngineError without CUDA

        return CudaGraphEngine(bundle, buckets=buckets, dtype=options.get("dtype", "float32"))
    if backend == "onnxruntime":
        from .onnxruntime import OrtEngine  # raises EngineError without onnxruntime

        return OrtEngine(bundle, buckets=buckets, device=options.get("device") or "cpu",
                         threads=options.get("threads"))
    from .tensorrt import TensorRTEngine  # raises EngineError without tensorrt or a GPU

    return TensorRTEngine(bundle, buckets=buckets, fp16=options.get("fp16"))
