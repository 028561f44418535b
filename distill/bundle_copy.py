"""`halfstep copy-bundle`: a bundle with fewer students, some students from other bundles, or
its weights stored in another type.

A student can be taken from another bundle distilled from the same teacher (a longer last round
run as an experiment, say) instead of re-running distillation. The taken entry keeps its
metrics; the config that made it is copied under `configs.taken[i]`, and the entry says where
it came from, so the manifest still tells how every file was made. `--dtype float16` stores
every weight file as float16: half the size on disk, while the model still runs in float32
(loading casts), so only the weights' rounding changes the images.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    append_config,
    config_that_made,
    refuse_existing_bundle,
)
from .io import atomic_save_safetensors, atomic_write_json

# Fields that must agree for a student of one bundle to run in another (beside the teacher).
SHARED_FIELDS = ("image_shape", "num_labels", "schedule", "parameterization", "time_input",
                 "model")
# `--dtype` choices: the storage type of the copy's weight files.
COPY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_same_teacher(source: Bundle, other: Bundle, steps: int) -> None:
    if other.manifest["teacher"]["sha256"] != source.manifest["teacher"]["sha256"]:
        raise BundleError(
            f"student {steps} of {other.root} was distilled from another teacher than "
            f"{source.root}'s (teacher sha256 {other.manifest['teacher']['sha256'][:12]} vs "
            f"{source.manifest['teacher']['sha256'][:12]}): a bundle's students share its teacher"
        )
    for field in SHARED_FIELDS:
        if other.manifest.get(field) != source.manifest.get(field):
            raise BundleError(f"{other.root} and {source.root} differ in {field!r}: student "
                              f"{steps} cannot be taken")


def _taken_entry(manifest: dict, other: Bundle, steps: int, given_path: str) -> dict:
    """Student `steps` of `other` as an entry of `manifest`, its config under configs.taken."""
    entry = json.loads(json.dumps(next(
        s for s in other.manifest["students"] if s["steps"] == steps)))
    entry["config"] = append_config(manifest, "taken", {
        "bundle": given_path,
        "name": other.name,
        "steps": steps,
        "config_there": entry.get("config", "distill"),
        "config": config_that_made(other.manifest, entry),
    })
    return entry


def _cast_weights(path: Path, dtype: str) -> dict[str, torch.Tensor]:
    """The tensors of `path` as `dtype`; refuses values the narrower type cannot hold."""
    state = {k: v.to(COPY_DTYPES[dtype]) for k, v in load_file(path).items()}
    overflow = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if overflow:
        raise BundleError(f"{path}: {overflow[0]} has values beyond {dtype}'s range; keep "
                          "float32 or use bfloat16")
    return state


def _write_weights(entry: dict, source: Bundle, dst: Path, dtype: str | None,
                   cast: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy one weight file into `dst`; with a dtype write the cast tensors and record their
    sha256 and storage type in `entry`."""
    if dtype is None:
        shutil.copyfile(source.path(entry["file"]), dst / entry["file"])
        return
    entry["sha256"] = atomic_save_safetensors(cast[entry["file"]], dst / entry["file"])
    entry["stored_as"] = dtype


def copy_bundle(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    students: list[int] | None = None,
    take: dict[int, str | os.PathLike] | None = None,
    dtype: str | None = None,
) -> Path:
    """Copy a verified bundle, keeping only the listed students (default: all of them and the
    taken ones); `take` maps a step count to another bundle whose student replaces (or adds)
    that one; `dtype` (a COPY_DTYPES key) re-stores every weight file in that type. Exports
    are not copied: they are rebuilt with `halfstep export`. Files first, manifest last; the
    copy is verified before returning.
    """
    if dtype is not None and dtype not in COPY_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(COPY_DTYPES)}, got {dtype!r}")
    source = Bundle(src)
    take = dict(take or {})
    others = {steps: Bundle(path) for steps, path in take.items()}
    for steps, other in others.items():
        if steps not in other.student_steps:
            raise BundleError(f"{other.root} has no student {steps}; it has {other.student_steps}")
        _check_same_teacher(source, other, steps)
    keep = sorted(set(source.student_steps) | set(take)) if students is None else sorted(students)
    not_kept = sorted(set(take) - set(keep))
    if not_kept:
        raise BundleError(f"students {not_kept} are taken from other bundles but not in the "
                          f"students to keep {keep}: add them or drop the take")
    missing = sorted(set(keep) - set(source.student_steps) - set(take))
    if missing:
        raise BundleError(f"{src} has no students {missing}; it has {source.student_steps}")
    dst = Path(dst)
    refuse_existing_bundle(dst, "remove it first")

    manifest = json.loads(json.dumps(source.manifest))
    manifest["exports"] = []
    entries = {s["steps"]: s for s in manifest["students"] if s["steps"] in keep}
    for steps, other in sorted(others.items()):
        entries[steps] = _taken_entry(manifest, other, steps, str(take[steps]))
    manifest["students"] = [entries[s] for s in keep]
    origin = {manifest["teacher"]["file"]: source} | {
        e["file"]: others.get(e["steps"], source) for e in manifest["students"]}
    # every cast before the first write: a refused copy writes nothing
    cast = {} if dtype is None else {
        f: _cast_weights(b.path(f), dtype) for f, b in origin.items()}
    dst.mkdir(parents=True, exist_ok=True)
    for entry in [manifest["teacher"], *manifest["students"]]:
        _write_weights(entry, origin[entry["file"]], dst, dtype, cast)
    atomic_write_json(dst / MANIFEST, manifest)
    Bundle(dst)  # the copy verifies
    return dst
