"""TensorRT engine: the students' plans built by `halfstep export --format tensorrt`.

Only plans built for the running TensorRT version and GPU are loaded (fp16 preferred when
present); every plan file is checked against its sha256 before it is deserialized.
"""

from __future__ import annotations

import torch

from halfstep.distill.bundle import Bundle
from halfstep.export.manifest import export_entries, missing_students, verified_path
from halfstep.export.onnx import ExportError
from halfstep.export.tensorrt import PlanRunner, gpu_tag, matches_runtime, require_tensorrt

from .base import DEFAULT_BUCKETS, Engine, EngineError
from .eager import TorchEngine
from .fallback import TeacherFallback


def select_engines(bundle: Bundle, trt_version: str, capability: tuple[int, int],
                   fp16: bool | None = None) -> dict[int, dict]:
    """{steps: entry} built for this TensorRT and GPU; fp16=None prefers fp16 when present."""
    chosen: dict[int, dict] = {}
    for want in ([True, False] if fp16 is None else [fp16]):
        found = export_entries(bundle, "tensorrt", lambda e, w=want: bool(e.get("fp16")) == w
                               and matches_runtime(e, trt_version, capability))
        for n, e in found.items():
            chosen.setdefault(n, e)
    missing = missing_students(bundle, chosen)
    if missing:
        raise EngineError(
            f"bundle {bundle.name} has no TensorRT engine for student steps "
            f"{', '.join(map(str, missing))} built with TensorRT {trt_version} on "
            f"{gpu_tag(capability)}; run: halfstep export --bundle {bundle.root} --format tensorrt")
    return chosen


class TensorRTStudentEngine(Engine):
    """The students of a bundle through TensorRT plans (the teacher is not exported)."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, buckets: tuple[int, ...] | None = None,
                 fp16: bool | None = None, device: str = "cuda") -> None:
        try:
            trt = require_tensorrt()
        except ExportError as exc:
            raise EngineError(str(exc)) from None
        self.device = torch.device(device)
        capability = torch.cuda.get_device_capability(self.device)
        entries = select_engines(bundle, trt.__version__, capability, fp16)
        limit = min(int(e["max_batch"]) for e in entries.values())
        buckets = buckets or tuple(b for b in DEFAULT_BUCKETS if b <= limit)
        if max(buckets) > limit:
            raise EngineError(f"bucket {max(buckets)} exceeds the engines' max batch {limit}; "
                              f"rebuild with halfstep export --format tensorrt --max-batch N")
        super().__init__(bundle, buckets)
        paths = {n: verified_path(bundle, e) for n, e in entries.items()}  # before any load
        self._plans = {n: PlanRunner(trt, p.read_bytes(), self.device) for n, p in paths.items()}

    def _run(self, model, steps, noise, labels):
        if model != "student":
            raise EngineError("the tensorrt engine runs students only")
        return self._plans[steps].run(noise, labels)


class TensorRTEngine(TeacherFallback):
    """TensorRT plans for the students, eager torch on the same GPU for the teacher."""

    def __init__(self, bundle: Bundle, buckets: tuple[int, ...] | None = None,
                 fp16: bool | None = None, device: str = "cuda") -> None:
        students = TensorRTStudentEngine(bundle, buckets, fp16, device)
        super().__init__(students, TorchEngine(bundle, device=students.device))
