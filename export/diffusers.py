"""Export each N-step student as a diffusers folder: `halfstep export --format diffusers`.

OUT/student-N/ holds `unet/` (the student's UNet2DModel, `save_pretrained`, safetensors),
`pipeline.py` (a copy of `diffusers_pipeline.py`: HalfstepPipeline, halfstep's exact N-step
DDIM), `model_index.json` (the pipeline's config: steps, parameterization, time scale, label
count and schedule constants) and `halfstep.json` (where it came from and its parity). The
folder loads with diffusers alone:

    DiffusionPipeline.from_pretrained(OUT / "student-N", trust_remote_code=True)

Each folder is checked before it replaces an older one: the pipeline rebuilt from the written
files must give the reference sampler's images (float32, max abs error <= 1e-4).

The export is not recorded in bundle.json: it is a standalone artifact for another runtime,
written where --out says, that nothing in halfstep loads; its `halfstep.json` names the
bundle and the student's sha256 instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel

from halfstep.distill.bundle import Bundle
from halfstep.distill.sample import reference_images
from halfstep.distill.sampling import noise_for_seeds
from halfstep.distill.schedule import DiscreteSchedule, schedule_from_dict

from . import diffusers_pipeline
from .diffusers_pipeline import HalfstepPipeline
from .manifest import requested_students

PARITY_ATOL = 1e-4  # float32, max abs difference against the eager reference sampler
PIPELINE_FILE = "pipeline.py"
INFO_FILE = "halfstep.json"
PARITY_SEEDS = (0, 1, 2, 3)


class DiffusersExportError(ValueError):
    """A student that could not be exported, or whose pipeline did not match halfstep."""


def pipeline_schedule(schedule: dict) -> dict:
    """The schedule constants HalfstepPipeline reads: cosine's two log-SNR bounds, or the
    discrete schedule's per-step log-SNR table (float64 values; JSON keeps them exact)."""
    sched = schedule_from_dict(schedule)
    if isinstance(sched, DiscreteSchedule):
        return {**sched.to_dict(), "log_snr": [float(v) for v in sched.log_snr_table]}
    return sched.to_dict()


def pipeline_config(bundle: Bundle, steps: int) -> dict:
    cfg = bundle.config
    return {"steps": steps, "parameterization": cfg.parameterization,
            "time_scale": cfg.time_scale, "num_labels": cfg.num_labels,
            "schedule": pipeline_schedule(cfg.schedule)}


def parity_inputs(bundle: Bundle) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise and labels covering every label and "no label" (K)."""
    noise = noise_for_seeds(list(PARITY_SEEDS), bundle.image_shape)
    labels = torch.arange(len(PARITY_SEEDS)) % (bundle.num_labels + 1)
    return noise, labels


def parity(pipe: HalfstepPipeline, bundle: Bundle, steps: int) -> float:
    """Max abs difference between the pipeline and the reference sampler on fixed inputs."""
    noise, labels = parity_inputs(bundle)
    want = reference_images(bundle, "student", steps, noise, labels)
    got = pipe(noise=noise, class_labels=labels if bundle.num_labels else None,
               output_type="raw").images
    return float((got.float().cpu() - want).abs().max())


def _write_folder(folder: Path, unet: UNet2DModel, config: dict, info: dict) -> None:
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    model_index = {"_class_name": ["pipeline", HalfstepPipeline.__name__],
                   "_diffusers_version": info["diffusers"],
                   "unet": ["diffusers", "UNet2DModel"], **config}
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    shutil.copyfile(diffusers_pipeline.__file__, folder / PIPELINE_FILE)
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _replace(staging: Path, final: Path) -> None:
    """Move `staging` to `final`; an older `final` is removed only after the move."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def export_student(bundle: Bundle, steps: int, out: Path, atol: float = PARITY_ATOL) -> Path:
    """Write, reload, check and move into place OUT/student-N; returns that folder."""
    import diffusers

    config = pipeline_config(bundle, steps)
    staging = out / f".student-{steps}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        info = {"bundle": bundle.name, "bundle_path": str(bundle.root.resolve()),
                "model": "student", "steps": steps,
                "weights_sha256": bundle.weights_sha256("student", steps),
                "time_input": bundle.config.time_input, "parity_atol": atol,
                "parity_seeds": list(PARITY_SEEDS), "torch": torch.__version__,
                "diffusers": diffusers.__version__}
        _write_folder(staging, bundle.denoiser("student", steps).unet, config, info)
        unet = UNet2DModel.from_pretrained(staging / "unet").eval()
        written = json.loads((staging / "model_index.json").read_text())
        pipe = HalfstepPipeline(unet, **{k: written[k] for k in config})
        err = parity(pipe, bundle, steps)
        if not err <= atol:  # also catches NaN
            raise DiffusersExportError(f"student-{steps} diffusers pipeline does not match "
                                       f"halfstep: max abs error {err:.3g} > {atol:g}; not written")
        info["parity_max_abs"] = err
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        final = out / f"student-{steps}"
        _replace(staging, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_diffusers(root: str | os.PathLike, out: str | os.PathLike,
                     steps: list[int] | None = None, log=print) -> list[Path]:
    """Export each requested student (all by default) to OUT/student-N; returns the folders."""
    bundle = Bundle(root)
    steps = requested_students(bundle, steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for n in steps:
        started = time.perf_counter()
        folder = export_student(bundle, n, out)
        err = json.loads((folder / INFO_FILE).read_text())["parity_max_abs"]
        log(f"student-{n}: {folder} (parity {err:.2e}, {time.perf_counter() - started:.1f}s)")
        folders.append(folder)
    return folders
