"""TensorRT: build each student's engine from its ONNX export and check it against float32.

One optimization profile spans batch 1..max_batch (opt at a typical size); fp16 is optional
and accepted only if the images stay within 2/255 of float32 (max abs 8-bit pixel error); a
timing cache makes rebuilds fast. Engine files are named by TensorRT version and GPU compute
capability, and an engine only loads entries built for the running version and GPU, so an
upgrade means a rebuild, never a stale engine. `PlanRunner` runs one plan: the parity check
here and the serving engine (`halfstep.engines.tensorrt`) share it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from halfstep.distill.bundle import Bundle
from halfstep.distill.images import to_uint8
from halfstep.distill.io import atomic_write_bytes
from halfstep.distill.sample import reference_images

from .manifest import export_entries, requested_students, verified_path, write_export
from .onnx import ExportError

FP16_MAX_PIXEL_ERROR = 2  # out of 255, against the float32 eager reference sampler
FP32_ATOL = 1e-3  # TF32 is switched off; kernels still differ from torch's in summation order


def require_tensorrt():
    """The tensorrt module, or a one-line ExportError saying what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise ExportError("TensorRT is not installed: pip install 'halfstep[tensorrt]' "
                          "(needs an NVIDIA GPU)") from None
    if not torch.cuda.is_available():
        raise ExportError("TensorRT needs a CUDA GPU and none is available here; "
                          "use --backend onnxruntime or torch")
    return tensorrt


def profile_shapes(image_shape: tuple[int, ...], max_batch: int, opt_batch: int | None = None,
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape per input for one profile over batch 1..max_batch."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    opt = min(8, max_batch) if opt_batch is None else opt_batch  # a typical serving batch
    if not 1 <= opt <= max_batch:
        raise ValueError(f"opt_batch must be in 1..{max_batch}, got {opt_batch}")
    shape = tuple(image_shape)
    return {"noise": ((1, *shape), (opt, *shape), (max_batch, *shape)),
            "labels": ((1,), (opt,), (max_batch,))}


def gpu_tag(capability: tuple[int, int]) -> str:
    return f"sm{capability[0]}{capability[1]}"


def engine_filename(steps: int, trt_version: str, capability: tuple[int, int], fp16: bool,
                    sha256: str) -> str:
    """e.g. student-4.trt10.7.0.sm90.fp16.3f2a9c1b04de.plan (content-tagged like the ONNX)."""
    precision = "fp16" if fp16 else "fp32"
    return f"student-{steps}.trt{trt_version}.{gpu_tag(capability)}.{precision}.{sha256[:12]}.plan"


def matches_runtime(entry: dict, trt_version: str, capability: tuple[int, int]) -> bool:
    return (entry.get("tensorrt_version") == trt_version
            and entry.get("compute_capability") == gpu_tag(capability))


def max_pixel_error(images: torch.Tensor, reference: torch.Tensor) -> int:
    """Max abs difference of the 8-bit images (the fp16 acceptance test compares pixels)."""
    a, b = to_uint8(images).astype("int16"), to_uint8(reference).astype("int16")
    return int(abs(a - b).max()) if a.size else 0


class PlanRunner:
    """One deserialized plan and its execution context, run with torch CUDA tensors."""

    def __init__(self, trt, plan: bytes, device: torch.device) -> None:
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ExportError("TensorRT could not deserialize the engine (built by another "
                              "version or GPU?); rebuild with halfstep export --format tensorrt")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def run(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tensors = {"noise": noise.to(self.device, torch.float32).contiguous(),
                   "labels": labels.to(self.device, torch.int64).contiguous()}
        out = torch.empty_like(tensors["noise"])
        for name in self.inputs:  # labels is absent from unconditional models
            self.context.set_input_shape(name, tuple(tensors[name].shape))
            self.context.set_tensor_address(name, tensors[name].data_ptr())
        self.context.set_tensor_address("images", out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs are copied
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ExportError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return out.float().cpu()


def build_plan(trt, onnx_bytes: bytes, shapes: dict, fp16: bool, cache_path: Path) -> bytes:
    """Parse the ONNX graph and build a serialized engine, reusing and updating the cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse the ONNX export: {errors}")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)  # float32 engines must stay float32-accurate
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError("TensorRT failed to build the engine (see the messages above)")
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def export_tensorrt(root: str | os.PathLike, steps: list[int] | None = None,
                    max_batch: int = 64, opt_batch: int | None = None, fp16: bool = False,
                    log=print) -> list[dict]:
    """Build, check and record a TensorRT engine per student (ONNX-exporting any missing)."""
    trt = require_tensorrt()
    from .onnx import export_onnx

    bundle = Bundle(root)
    steps = requested_students(bundle, steps)
    shapes = profile_shapes(bundle.image_shape, max_batch, opt_batch)
    onnx = export_entries(bundle, "onnx")
    if [n for n in steps if n not in onnx]:
        export_onnx(root, [n for n in steps if n not in onnx], log=log)
        bundle = Bundle(root)
        onnx = export_entries(bundle, "onnx")
    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability(device)
    cache = bundle.root / f"timing-cache.trt{trt.__version__}.{gpu_tag(capability)}.bin"
    entries = []
    for n in steps:
        plan = build_plan(trt, verified_path(bundle, onnx[n]).read_bytes(), shapes, fp16, cache)
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(min(5, max_batch), *bundle.image_shape, generator=gen)
        labels = torch.randint(0, bundle.num_labels + 1, (noise.shape[0],), generator=gen)
        got = PlanRunner(trt, plan, device).run(noise, labels)
        want = reference_images(bundle, "student", n, noise, labels, device)
        err, pixels = float((got - want).abs().max()), max_pixel_error(got, want)
        if (pixels > FP16_MAX_PIXEL_ERROR) if fp16 else not err <= FP32_ATOL:
            raise ExportError(f"student-{n} TensorRT {'fp16' if fp16 else 'fp32'} engine does "
                              f"not match torch: max abs {err:.3g}, {pixels}/255 pixels; "
                              f"not written")
        fields = {"onnx_sha256": onnx[n]["sha256"], "fp16": fp16,
                  "tensorrt_version": trt.__version__, "compute_capability": gpu_tag(capability),
                  "max_batch": max_batch,
                  "profile": {k: list(map(list, v)) for k, v in shapes.items()},
                  "parity_max_abs": err, "parity_max_pixel_error": pixels}
        entry = write_export(  # replaces only the engine for this precision, version and GPU
            bundle.root, plan, "tensorrt", n,
            lambda sha, n=n: engine_filename(n, trt.__version__, capability, fp16, sha), fields,
            lambda e: bool(e.get("fp16")) == fp16 and matches_runtime(e, trt.__version__,
                                                                      capability))
        log(f"student-{n}: {entry['file']} (parity {err:.2e}, {pixels}/255 pixels)")
        entries.append(entry)
    return entries
