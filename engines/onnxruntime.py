"""ONNX Runtime engine: runs the exported N-step students.

CPU: one session per student with a dynamic batch axis; a batch runs exactly its n rows
(`batch_invariant`), buckets only bound it. CUDA (needs onnxruntime-gpu): one
session per student with `enable_cuda_graph`; each batch bucket has its own IO binding over
static torch CUDA buffers and its own `gpu_graph_id`, so every (steps, bucket) replays one
captured graph. The teacher is not exported: `OrtEngine` serves it with the eager engine.
Every export file is checked against its sha256 in bundle.json before it is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from halfstep.distill.bundle import Bundle
from halfstep.export.manifest import export_entries, missing_students, verified_path
from halfstep.export.onnx import OUTPUT, cpu_session, run_session

from .base import DEFAULT_BUCKETS, Engine, EngineError
from .eager import TorchEngine
from .fallback import TeacherFallback

_NP = {torch.float32: np.float32, torch.int64: np.int64}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise EngineError("backend onnxruntime needs the onnxruntime package "
                          "(pip install 'halfstep[onnx]')") from None
    return onnxruntime


class OrtStudentEngine(Engine):
    """The students of a bundle through ONNX Runtime (the teacher is not exported)."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, buckets: tuple[int, ...] | None = None,
                 device: str = "cpu", threads: int | None = None) -> None:
        device = str(device or "cpu")
        if device.startswith("cuda") and buckets is None:
            buckets = DEFAULT_BUCKETS  # CUDA graphs need fixed shapes: one per bucket
        super().__init__(bundle, buckets)
        self.device = torch.device(device)
        entries = export_entries(bundle, "onnx")
        missing = missing_students(bundle, entries)
        if missing:
            raise EngineError(f"bundle {bundle.name} has no ONNX export for student steps "
                              f"{', '.join(map(str, missing))}; run: halfstep export --bundle "
                              f"{bundle.root} --format onnx")
        paths = {n: verified_path(bundle, e) for n, e in entries.items()}  # before any load
        if threads is not None and threads < 1:
            raise EngineError(f"threads must be >= 1, got {threads}")
        if self.device.type == "cpu":
            # the CPU session has a dynamic batch axis and its rows are bitwise independent of
            # the batch size (tests/test_ort_engine.py checks it): run exactly n rows, no bucket
            self.batch_invariant = True
            _ort()
            self._sessions = {n: cpu_session(p, threads) for n, p in paths.items()}
        elif self.device.type == "cuda":
            self._cuda = {n: _CudaGraphSession(p, self.device, self.buckets, bundle.image_shape)
                          for n, p in paths.items()}
        else:
            raise EngineError(f"onnxruntime device must be cpu or cuda, got {device!r}")

    def _run(self, model, steps, noise, labels):
        if model != "student":
            raise EngineError("the onnxruntime engine runs students only")
        if self.device.type == "cuda":
            return self._cuda[steps].run(noise, labels)
        return run_session(self._sessions[steps], noise, labels)


class OrtEngine(TeacherFallback):
    """ONNX Runtime for the students, eager torch on the same device for the teacher."""

    def __init__(self, bundle: Bundle, buckets: tuple[int, ...] | None = None,
                 device: str = "cpu", threads: int | None = None) -> None:
        students = OrtStudentEngine(bundle, buckets, device, threads)
        super().__init__(students, TorchEngine(bundle, device=students.device))


class _CudaGraphSession:
    """One student on the CUDA EP: a captured CUDA graph per batch bucket, IO-bound buffers."""

    def __init__(self, path: Path, device: torch.device, buckets, image_shape) -> None:
        ort = _ort()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError("onnxruntime device cuda needs onnxruntime-gpu with CUDA "
                              "(pip install 'halfstep[gpu]'); only CPU providers are installed")
        if not torch.cuda.is_available():
            raise EngineError("onnxruntime device cuda requested but no CUDA GPU is available")
        index = device.index or 0
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        provider = ("CUDAExecutionProvider", {"device_id": index, "enable_cuda_graph": "1"})
        self.session = ort.InferenceSession(str(path), opts, providers=[provider])
        names = {i.name for i in self.session.get_inputs()}
        self.slots = {}
        for graph_id, b in enumerate(buckets, start=1):  # ORT reserves id 0; -1 disables
            bufs = {"noise": torch.zeros(b, *image_shape, device=device),
                    "labels": torch.zeros(b, dtype=torch.int64, device=device),
                    OUTPUT: torch.zeros(b, *image_shape, device=device)}
            binding = self.session.io_binding()
            for name, buf in bufs.items():  # fixed addresses: what a captured graph replays
                if name == OUTPUT:
                    binding.bind_output(name, "cuda", index, np.float32, tuple(buf.shape),
                                        buf.data_ptr())
                elif name in names:
                    binding.bind_input(name, "cuda", index, _NP[buf.dtype], tuple(buf.shape),
                                       buf.data_ptr())
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
            self.slots[b] = (bufs, binding, run_options)

    def run(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        bufs, binding, run_options = self.slots[noise.shape[0]]
        bufs["noise"].copy_(noise)
        bufs["labels"].copy_(labels)
        torch.cuda.synchronize(bufs["noise"].device)  # ORT runs on its own stream
        self.session.run_with_iobinding(binding, run_options)  # synchronizes at the end
        return bufs[OUTPUT].float().cpu()
