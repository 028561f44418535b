"""Export each N-step student as one ONNX graph: the whole DDIM sampler, unrolled.

Inputs `noise` [B, C, H, W] float32 and `labels` [B] int64 (K = unconditional), output
`images` [B, C, H, W] in [-1, 1], with a dynamic batch axis. Unrolling (no If/Loop/Scan) keeps
the graph usable by ORT's CUDA graphs and TensorRT (neither accepts control flow). Every
export is checked against the eager reference sampler before it is written; the file is
written atomically, then recorded in bundle.json with its sha256, opset, exporter and parity.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from halfstep.distill.bundle import Bundle
from halfstep.distill.denoiser import Denoiser
from halfstep.distill.sample import reference_images
from halfstep.distill.sampling import ddim_sample
from halfstep.distill.schedule import time_grid

from .manifest import requested_students, write_export

EXPORTERS = ("torchscript", "dynamo")
# TorchScript tracing exports diffusers' UNet2DModel reliably under torch 2.13 and is several
# times faster to run than torch.export; dynamo stays selectable (--exporter dynamo).
DEFAULT_EXPORTER = "torchscript"
OPSET = 18
PARITY_ATOL = 1e-4  # float32, max abs difference against the eager reference sampler
INPUTS, OUTPUT = ("noise", "labels"), "images"


class ExportError(ValueError):
    """An export that could not be produced or did not match torch."""


class UnrolledSampler(nn.Module):
    """noise, labels -> images: `ddim_sample` of one student, as a module the exporters trace.

    Each step calls Denoiser.forward with alpha_t, sigma_t passed in as float64-derived
    constants: computed in the graph, ORT's float32 Sigmoid returns alpha(t=1) = 0 instead of
    4.5e-5 (its relative precision is poor for large negative inputs), which alone costs
    ~2e-4 of parity. The parity check against the real Denoiser catches any drift.
    """

    def __init__(self, denoiser: Denoiser, steps: int) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.steps = steps
        self.alpha_sigma = [denoiser.schedule.alpha_sigma_float(t) for t in time_grid(steps)[:-1]]

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        constants = iter(self.alpha_sigma)  # ddim_sample calls denoise once per step, in order

        def denoise(z, t, class_labels):
            alpha, sigma = next(constants)
            return self.denoiser(z, t, class_labels, alpha=alpha, sigma=sigma)

        return ddim_sample(denoise, noise, labels, self.steps, self.denoiser.schedule, clip=True)


def export_bytes(denoiser: Denoiser, steps: int, exporter: str = DEFAULT_EXPORTER,
                 opset: int = OPSET, max_batch: int = 64) -> bytes:
    """The serialized ONNX model of the unrolled `steps`-step sampler."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    module = UnrolledSampler(denoiser, steps).eval()
    # batch 2: torch.export specialises sizes 0 and 1, which would pin the batch axis
    example = (torch.zeros(2, *denoiser.config.image_shape), torch.zeros(2, dtype=torch.int64))
    kwargs: dict = dict(input_names=list(INPUTS), output_names=[OUTPUT], opset_version=opset)
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        kwargs.update(dynamo=True, external_data=False, verbose=False,
                      dynamic_shapes={"noise": {0: batch}, "labels": {0: batch}})
    else:
        kwargs.update(dynamo=False, do_constant_folding=True,
                      dynamic_axes={name: {0: "batch"} for name in (*INPUTS, OUTPUT)})
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about the baked-in time grid
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(module, example, str(path), **kwargs)
        except Exception as exc:  # exporters raise many types; report which one failed
            raise ExportError(f"{exporter} export of student-{steps} failed: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        return path.read_bytes()


def parity(model_bytes: bytes, bundle: Bundle, steps: int, batch_sizes=(1, 5),
           seed: int = 0) -> float:
    """Max abs difference between ONNX Runtime (CPU) and the torch engine on random inputs."""
    session = cpu_session(model_bytes)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batch_sizes:  # two sizes: the dynamic batch axis is part of what is checked
        noise = torch.randn(b, *bundle.image_shape, generator=gen)
        labels = torch.randint(0, bundle.num_labels + 1, (b,), generator=gen)
        got = run_session(session, noise, labels)
        want = reference_images(bundle, "student", steps, noise, labels)
        worst = max(worst, float((got - want).abs().max()))
    return worst


def cpu_session(model: bytes | str | os.PathLike, threads: int | None = None):
    """A CPU InferenceSession; threads=None lets ORT use one thread per physical core."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1  # the unrolled graph is a chain: nothing to run in parallel
    if threads is not None:
        opts.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def run_session(session, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """images = session(noise, labels) on CPU tensors."""
    names = {i.name for i in session.get_inputs()}  # labels vanish when num_labels == 0
    feeds = {"noise": noise.contiguous().numpy(), "labels": labels.contiguous().numpy()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    return torch.from_numpy(session.run([OUTPUT], feeds)[0])


def onnx_filename(steps: int, sha256: str) -> str:
    """Content-tagged, so a new export never overwrites the file the manifest names."""
    return f"student-{steps}-{sha256[:12]}.onnx"


def export_onnx(root: str | os.PathLike, steps: list[int] | None = None,
                exporter: str = DEFAULT_EXPORTER, opset: int = OPSET, max_batch: int = 64,
                atol: float = PARITY_ATOL, log=print) -> list[dict]:
    """Export, check and record each student; returns the new manifest entries."""
    import onnxruntime

    bundle = Bundle(root)
    steps = requested_students(bundle, steps)
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if not 1 <= max_batch <= 4096:
        raise ExportError(f"max_batch must be in 1..4096, got {max_batch}")
    entries = []
    for n in steps:
        started = time.perf_counter()
        data = export_bytes(bundle.denoiser("student", n), n, exporter, opset, max_batch)
        err = parity(data, bundle, n)
        if not err <= atol:  # also catches NaN
            raise ExportError(f"student-{n} ONNX export does not match torch: max abs error "
                              f"{err:.3g} > {atol:g} ({exporter}, opset {opset}); not written")
        entry = write_export(bundle.root, data, "onnx", n, lambda sha, n=n: onnx_filename(n, sha),
                             {"opset": opset, "exporter": exporter, "parity_max_abs": err,
                              "parity_atol": atol, "max_batch": max_batch,
                              "torch": torch.__version__,
                              "onnxruntime": onnxruntime.__version__})
        log(f"student-{n}: {entry['file']} ({len(data) / 1e6:.1f} MB, {exporter}, opset {opset}, "
            f"parity {err:.2e}, {time.perf_counter() - started:.1f}s)")
        entries.append(entry)
    return entries
