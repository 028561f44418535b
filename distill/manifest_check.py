"""Validation of a whole bundle.json before anything uses it: keys, types, and the image shape
against the model config and the weight files' safetensors headers.

Every problem is a `ValueError` subclass (BundleError, raised by the caller's class) whose
message names the manifest file and the bad field, so a bad bundle never surfaces as a
KeyError or a conv2d shape error deep in a request.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SHA256 = re.compile(r"^[0-9a-f]{64}$")
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "image_shape": list,
    "num_labels": int,
    "schedule": dict,
    "parameterization": str,
    "time_input": str,
    "model": dict,
    "teacher": dict,
    "students": list,
}
OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "configs": dict,
    "exports": list,
    "time_grid": str,
}
IMAGE_CHANNELS = (1, 3)  # what the PNG codec writes: grayscale or RGB


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_ok(value: Any, kind: type | tuple[type, ...]) -> bool:
    return _is_int(value) if kind is int else isinstance(value, kind)


def check_manifest(manifest: Any, where: Path, error: type[ValueError]) -> None:
    """Raise `error` naming `where` and the field for the first thing wrong with the manifest.

    Does not need the weight files; `check_weight_shapes` compares them afterwards."""

    def fail(field: str, problem: str) -> None:
        raise error(f"{where}: field {field!r} {problem}")

    if not isinstance(manifest, dict):
        raise error(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        if key not in manifest:
            if key in REQUIRED:
                fail(key, "is missing")
            continue
        if not _type_ok(manifest[key], kind):
            fail(key, f"must be {getattr(kind, '__name__', kind)}, got "
                      f"{type(manifest[key]).__name__} {manifest[key]!r:.60}")
    shape = manifest["image_shape"]
    if len(shape) != 3 or not all(_is_int(v) and v >= 1 for v in shape):
        fail("image_shape", f"must be [channels, height, width] of positive ints, got {shape}")
    if shape[0] not in IMAGE_CHANNELS:
        fail("image_shape", f"must have 1 or 3 channels, got {shape[0]}")
    if shape[1] != shape[2]:
        fail("image_shape", f"must be square, got {shape[1]}x{shape[2]}")
    if manifest["num_labels"] < 0:
        fail("num_labels", f"must be >= 0, got {manifest['num_labels']}")
    _check_model_agrees(manifest, fail)
    _check_weights_entry(manifest["teacher"], "teacher", fail)
    for key in ("default_steps", "max_steps"):
        value = manifest["teacher"].get(key)
        if not _is_int(value) or value < 1:
            fail(f"teacher.{key}", f"must be an int >= 1, got {value!r}")
    seen: set[int] = set()
    for i, entry in enumerate(manifest["students"]):
        field = f"students[{i}]"
        if not isinstance(entry, dict):
            fail(field, f"must be an object, got {type(entry).__name__}")
        _check_weights_entry(entry, field, fail)
        steps = entry.get("steps")
        if not _is_int(steps) or steps < 1:
            fail(f"{field}.steps", f"must be an int >= 1, got {steps!r}")
        if steps in seen:
            fail(f"{field}.steps", f"repeats steps={steps}")
        seen.add(steps)
    for i, entry in enumerate(manifest.get("exports", [])):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            fail(f"exports[{i}]", "must be an object with a 'file' string")


def _check_model_agrees(manifest: dict, fail) -> None:
    """The top-level fields the server reads must say what the model config builds."""
    model = manifest["model"]
    shape = manifest["image_shape"]
    pairs = [
        ("image_shape", shape, "model.channels/image_size",
         [model.get("channels"), model.get("image_size"), model.get("image_size")]),
        ("num_labels", manifest["num_labels"], "model.num_labels", model.get("num_labels")),
        ("parameterization", manifest["parameterization"], "model.parameterization",
         model.get("parameterization")),
        ("schedule", manifest["schedule"], "model.schedule", model.get("schedule")),
        ("time_input", manifest["time_input"], "model.time_input", model.get("time_input")),
    ]
    for field, value, other, expected in pairs:
        if value != expected:
            fail(field, f"is {value!r} but {other} is {expected!r}")


def _check_weights_entry(entry: dict, field: str, fail) -> None:
    if not isinstance(entry.get("file"), str) or not entry["file"]:
        fail(f"{field}.file", f"must be a file name, got {entry.get('file')!r}")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not SHA256.match(sha):
        fail(f"{field}.sha256", f"must be 64 lowercase hex digits, got {sha!r:.80}")


def check_weight_shapes(
    manifest: dict, path: Path, shapes: dict[str, tuple[int, ...]], where: Path,
    error: type[ValueError],
) -> None:
    """The weights in `path` (tensor shapes from its safetensors header) fit the manifest's
    image shape and label count: named checks before the full per-tensor comparison."""
    channels = manifest["image_shape"][0]
    conv_in = shapes.get("conv_in.weight")
    if conv_in is None or len(conv_in) != 4:
        raise error(f"{path} has no conv_in.weight [out, in, k, k]: not a halfstep UNet")
    if conv_in[1] != channels:
        raise error(
            f"{where}: field 'image_shape' says {channels} channel(s) but {path.name} "
            f"conv_in.weight takes {conv_in[1]}"
        )
    embed = shapes.get("class_embedding.weight")
    labels = manifest["num_labels"]
    rows = embed[0] if embed else 0
    if rows != (labels + 1 if labels else 0):
        raise error(
            f"{where}: field 'num_labels' is {labels} but {path.name} has "
            f"{rows or 'no'} class embedding rows (expected {labels + 1 if labels else 'none'})"
        )
