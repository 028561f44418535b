"""ONNX Runtime engine: runs the exported N-step students (docs/SERVING.md, ONNX Runtime).

CPU: one session per student with a dynamic batch axis. CUDA (needs onnxruntime-gpu): one
session per student with `enable_cuda_graph`; each batch bucket has its own IO binding over
static torch CUDA buffers and its own `gpu_graph_id`, so every (steps, bucket) replays one
captured graph. The teacher is not exported: `model="teacher"` runs on the torch engine.
Every export file is checked against its sha256 in bundle.json before it is loaded.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from halfstep.distill.bundle import Bundle
from halfstep.distill.engines import DEFAULT_BUCKETS, Engine, EngineError, TorchEngine

from .manifest import export_entries, missing_students, verified_path

OUTPUT = "images"
_NP = {torch.float32: np.float32, torch.int64: np.int64}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise EngineError("backend onnxruntime needs the onnxruntime package "
                          "(pip install 'halfstep[onnx]')") from None
    return onnxruntime


def cpu_session(model: bytes | str | os.PathLike, threads: int | None = None):
    """A CPU InferenceSession; threads=None lets ORT use one thread per physical core."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1  # the unrolled graph is a chain: nothing to run in parallel
    if threads is not None:
        if threads < 1:
            raise EngineError(f"threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def run_session(session, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """images = session(noise, labels) on CPU tensors."""
    names = {i.name for i in session.get_inputs()}  # labels vanish when num_labels == 0
    feeds = {"noise": noise.contiguous().numpy(), "labels": labels.contiguous().numpy()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    return torch.from_numpy(session.run([OUTPUT], feeds)[0])


class OrtEngine(Engine):
    """Same interface as TorchEngine; students only through ONNX Runtime."""

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
        if self.device.type == "cpu":
            self._sessions = {n: cpu_session(p, threads) for n, p in paths.items()}
        elif self.device.type == "cuda":
            self._cuda = {n: _CudaGraphSession(p, self.device, self.buckets, bundle.image_shape)
                          for n, p in paths.items()}
        else:
            raise EngineError(f"onnxruntime device must be cpu or cuda, got {device!r}")
        self._teacher = TorchEngine(bundle, device=self.device)

    def _run(self, model, steps, noise, labels):
        if model == "teacher":  # not exported: the torch engine serves it (documented), with
            return self._teacher.run(model, steps, noise, labels)  # its own min_rows padding
        if self.device.type == "cuda":
            return self._cuda[steps].run(noise, labels)
        return run_session(self._sessions[steps], noise, labels)


class _CudaGraphSession:
    """One student on the CUDA EP: a captured CUDA graph per batch bucket, IO-bound buffers.

    Not verified on this project's CPU-only machine (see README): needs onnxruntime-gpu.
    """

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


# -- measurement (used by the benchmark command) -------------------------------------------
def time_engine(engine: Engine, model: str, steps: int, batch: int = 1, repeats: int = 30,
                warmup: int = 3) -> float:
    """Median wall time of engine.run in seconds on fixed random inputs."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch and repeats must be >= 1, warmup >= 0")
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, *engine.bundle.image_shape, generator=gen)
    labels = torch.zeros(batch, dtype=torch.int64)
    for _ in range(warmup):
        engine.run(model, steps, noise, labels)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.run(model, steps, noise, labels)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ort_vs_torch(bundle: Bundle, steps: list[int] | None = None, batch: int = 1,
                 repeats: int = 30, threads: int | None = None) -> list[dict]:
    """Eager torch vs ONNX Runtime on the CPU, per student: median ms and speedup.

    With `threads`, both runtimes get the same intra-op thread count for a fair comparison.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        eager, ort_engine = TorchEngine(bundle), OrtEngine(bundle, threads=threads)
        rows = []
        for n in steps or bundle.student_steps:
            with torch.inference_mode():
                t_torch = time_engine(eager, "student", n, batch, repeats)
            t_ort = time_engine(ort_engine, "student", n, batch, repeats)
            rows.append({"steps": n, "batch": batch, "torch_ms": round(t_torch * 1e3, 3),
                         "onnxruntime_ms": round(t_ort * 1e3, 3),
                         "speedup": round(t_torch / t_ort, 2)})
        return rows
    finally:
        torch.set_num_threads(previous)
