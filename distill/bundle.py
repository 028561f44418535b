"""Bundles: bundle.json plus safetensors weights, the one artifact every later stage reads.

bundle.json is self-describing: format version, image shape, label count, schedule,
parameterization, time-input mapping, the teacher and every student with its sha256, the
configs that made them, and files added by later stages (`exports`). Every write is atomic;
loading validates the whole manifest (keys, types, the image shape against the model config
and the weights' headers), verifies every sha256 and tensor shape, and names the bad field or
file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .denoiser import Denoiser, ModelConfig, build_unet
from .io import atomic_save_safetensors, atomic_write_json, sha256_file
from .manifest_check import check_manifest, check_weight_shapes

FORMAT_VERSION = 1
MANIFEST = "bundle.json"
TEACHER_FILE = "teacher.safetensors"
# Weights may be stored narrower than they run: a float16 bundle is half the size and loads
# into the float32 model (load_state_dict casts). Names as safetensors headers give them.
STORAGE_DTYPES = frozenset({"F32", "F16", "BF16"})


class BundleError(ValueError):
    """A bundle that is missing, corrupt or does not have what was asked for."""


def refuse_existing_bundle(root: str | os.PathLike, hint: str) -> None:
    """Raise when `root` already holds a bundle (no command overwrites one); `hint`: what to do."""
    if (Path(root) / MANIFEST).exists():
        raise BundleError(f"{root} already holds a bundle; {hint}")


def student_file(steps: int) -> str:
    return f"student-{steps}.safetensors"


def new_manifest(
    name: str,
    config: ModelConfig,
    teacher_sha: str,
    default_steps: int,
    max_steps: int,
    configs: dict,
) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "image_shape": list(config.image_shape),
        "num_labels": config.num_labels,
        "schedule": config.schedule,
        "parameterization": config.parameterization,
        "time_input": config.time_input,
        "time_grid": "t_i = i/N, i = N..1; DDIM, x_hat clipped to [-1, 1]; last step returns x_hat",
        "model": config.to_dict(),
        "teacher": {
            "file": TEACHER_FILE,
            "sha256": teacher_sha,
            "default_steps": default_steps,
            "max_steps": max_steps,
        },
        "students": [],
        "configs": configs,
        "exports": [],
    }


def create_bundle(
    root: str | os.PathLike,
    name: str,
    config: ModelConfig,
    teacher_state: dict[str, torch.Tensor],
    default_steps: int,
    max_steps: int,
    configs: dict,
) -> Path:
    """Write the teacher weights, then the manifest (so the manifest never names a missing file)."""
    root = Path(root)
    sha = atomic_save_safetensors(teacher_state, root / TEACHER_FILE)
    atomic_write_json(
        root / MANIFEST, new_manifest(name, config, sha, default_steps, max_steps, configs)
    )
    return root


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} not found: {root} is not a halfstep bundle")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {manifest.get('format_version')!r}; "
            f"this halfstep reads version {FORMAT_VERSION}"
        )
    return manifest


def update_manifest(root: str | os.PathLike, update) -> Any:
    """Read, apply `update(manifest)` in memory, write back atomically; returns what `update`
    returns."""
    manifest = read_manifest(root)
    result = update(manifest)
    atomic_write_json(Path(root) / MANIFEST, manifest)
    return result


def append_config(manifest: dict, kind: str, config: dict) -> str:
    """Append `config` to the list `configs[kind]` and return the name a student entry records
    as its `config`: "kind[i]" (`config_that_made` reads it back)."""
    configs = manifest["configs"].setdefault(kind, [])
    configs.append(config)
    return f"{kind}[{len(configs) - 1}]"


def config_that_made(manifest: dict, entry: dict) -> dict | None:
    """The entry's `config` ("distill", "distill_resumes[1]", "taken[0]") looked up in
    `configs`; None when the manifest does not hold it."""
    match = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", entry.get("config", "distill"))
    if not match:
        return None
    found = manifest.get("configs", {}).get(match[1])
    if match[2] is not None:
        index = int(match[2])
        found = found[index] if isinstance(found, list) and index < len(found) else None
    return found if isinstance(found, dict) else None


def add_student(
    root: str | os.PathLike, steps: int, state: dict[str, torch.Tensor], info: dict[str, Any]
) -> None:
    """Write student-N weights, then record them (replacing an older student-N entry)."""
    sha = atomic_save_safetensors(state, Path(root) / student_file(steps))
    entry = {"steps": steps, "file": student_file(steps), "sha256": sha, **info}

    def record(m: dict) -> None:
        m["students"] = sorted(
            [s for s in m["students"] if s["steps"] != steps] + [entry],
            key=lambda s: s["steps"],
        )

    update_manifest(root, record)


class Bundle:
    """A verified, read-only bundle. Denoisers are built lazily and cached."""

    def __init__(self, root: str | os.PathLike, verify: bool = True) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        check_manifest(self.manifest, self.root / MANIFEST, BundleError)
        try:
            self.config = ModelConfig.from_dict(self.manifest["model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{self.root / MANIFEST}: bad model config: {exc}") from None
        self._denoisers: dict[tuple[str, int], Denoiser] = {}
        if verify:
            self.verify()

    # -- what it serves ---------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.get("name", self.root.name)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])

    @property
    def num_labels(self) -> int:
        return int(self.manifest["num_labels"])

    @property
    def student_steps(self) -> list[int]:
        return sorted(s["steps"] for s in self.manifest["students"])

    @property
    def teacher_default_steps(self) -> int:
        return int(self.manifest["teacher"]["default_steps"])

    @property
    def teacher_max_steps(self) -> int:
        return int(self.manifest["teacher"]["max_steps"])

    def student_for_budget(self, budget: int) -> int:
        """The largest distilled student whose step count is <= budget."""
        fitting = [s for s in self.student_steps if s <= budget]
        if not fitting:
            raise BundleError(
                f"steps={budget} is below the smallest student; available: "
                f"{', '.join(map(str, self.student_steps)) or 'none'}"
            )
        return fitting[-1]

    def check_steps(self, model: str, steps: int) -> None:
        if model == "student" and steps not in self.student_steps:
            raise BundleError(
                f"steps={steps} is not in bundle {self.name}; student steps available: "
                f"{', '.join(map(str, self.student_steps))}"
            )
        if model == "teacher" and not 1 <= steps <= self.teacher_max_steps:
            raise BundleError(f"teacher steps must be in 1..{self.teacher_max_steps}, got {steps}")
        if model not in ("student", "teacher"):
            raise BundleError(f"model must be 'student' or 'teacher', got {model!r}")

    # -- files ------------------------------------------------------------------------
    def path(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise BundleError(f"{self.root / MANIFEST} names a file outside the bundle: {relative}")
        return path

    def _weight_entries(self) -> list[dict]:
        return [self.manifest["teacher"], *self.manifest["students"]]

    def verify_file(self, entry: dict) -> Path:
        path = self.path(entry["file"])
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}")
        if sha256_file(path) != entry["sha256"]:
            raise BundleError(f"bundle file corrupt (sha256 mismatch): {path}")
        return path

    def verify(self) -> None:
        """Every weight file exists, matches its sha256, and has the model's tensor shapes."""
        expected = {k: tuple(v.shape) for k, v in build_unet(self.config).state_dict().items()}
        for entry in self._weight_entries():
            path = self.verify_file(entry)
            try:
                with safe_open(str(path), framework="pt") as f:
                    slices = {k: f.get_slice(k) for k in f.keys()}
                    shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
                    dtypes = {s.get_dtype() for s in slices.values()}
            except Exception as exc:  # safetensors raises its own error types
                raise BundleError(f"bundle file unreadable: {path}: {exc}") from None
            odd = sorted(dtypes - STORAGE_DTYPES)
            if odd:
                raise BundleError(f"bundle file {path} holds {odd} tensors; weights are stored "
                                  f"as one of {sorted(STORAGE_DTYPES)}")
            check_weight_shapes(self.manifest, path, shapes, self.root / MANIFEST, BundleError)
            if shapes != expected:
                bad = sorted(set(shapes.items()) ^ set(expected.items()))[:3]
                raise BundleError(f"bundle file {path} has wrong tensor names/shapes, e.g. {bad}")

    # -- models -----------------------------------------------------------------------
    def _entry(self, model: str, steps: int | None) -> tuple[tuple[str, int], dict]:
        if model == "teacher":
            return ("teacher", 0), self.manifest["teacher"]
        self.check_steps("student", steps)
        return ("student", steps), next(s for s in self.manifest["students"]
                                        if s["steps"] == steps)

    def weights_sha256(self, model: str = "student", steps: int | None = None) -> str:
        """The manifest's sha256 of the teacher's or a student's weights (verified on load)."""
        return self._entry(model, steps)[1]["sha256"]

    def denoiser(self, model: str = "student", steps: int | None = None) -> Denoiser:
        """The teacher, or the student distilled to exactly `steps` steps, in eval mode."""
        key, entry = self._entry(model, steps)
        if key not in self._denoisers:
            den = Denoiser(self.config)
            den.unet.load_state_dict(load_file(self.path(entry["file"])))
            self._denoisers[key] = den.eval().requires_grad_(False)
        return self._denoisers[key]

