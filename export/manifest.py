"""Export entries in bundle.json: record them atomically, find them, verify them before use.

Each entry in `manifest["exports"]` names one file in the bundle directory:
`{"format": "onnx" | "tensorrt", "model": "student", "steps": N, "file": ..., "sha256": ...,
...format-specific fields}`. Export files carry a content tag in their name, so a new export
never overwrites the file the current manifest points at: an export interrupted at any moment
leaves the previous bundle, exports included, loadable and verified.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from halfstep.distill.bundle import Bundle, BundleError, update_manifest
from halfstep.distill.io import atomic_write_bytes, sha256_file

FORMATS = ("onnx", "tensorrt")


def export_entries(bundle: Bundle, fmt: str, match: Callable[[dict], bool] | None = None,
                   ) -> dict[int, dict]:
    """{steps: entry} for the students exported in format `fmt` (optionally filtered)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    found = {}
    for entry in bundle.manifest.get("exports", []):
        if entry.get("format") == fmt and entry.get("model") == "student":
            if match is None or match(entry):
                found[int(entry["steps"])] = entry
    return found


def requested_students(bundle: Bundle, steps: list[int] | None) -> list[int]:
    """`steps`, or every student when None; each must be a student of the bundle."""
    steps = list(bundle.student_steps if steps is None else steps)
    for n in steps:
        bundle.check_steps("student", n)
    return steps


def missing_students(bundle: Bundle, entries: dict[int, dict]) -> list[int]:
    return [s for s in bundle.student_steps if s not in entries]


def verified_path(bundle: Bundle, entry: dict) -> Path:
    """The entry's file, after checking it exists and matches its recorded sha256."""
    path = bundle.path(entry["file"])
    if not path.is_file():
        raise BundleError(f"{entry['format']} export missing: {path} (re-run halfstep export)")
    if sha256_file(path) != entry.get("sha256"):
        raise BundleError(
            f"{entry['format']} export corrupt (sha256 mismatch): {path} (re-run halfstep export)"
        )
    return path


def record_export(root: str | os.PathLike, entry: dict,
                  same_slot: Callable[[dict], bool]) -> list[str]:
    """Add `entry`, replacing entries for which `same_slot(old)` holds; atomic.

    Returns the files of replaced entries that no other entry still names: the caller may
    delete them once the new manifest is on disk.
    """
    replaced: list[str] = []

    def update(m: dict) -> None:
        old = m.setdefault("exports", [])
        kept = [e for e in old if not same_slot(e)]
        m["exports"] = sorted([*kept, entry], key=lambda e: (e["format"], e["steps"], e["file"]))
        named = {e["file"] for e in m["exports"]}
        replaced.extend(e["file"] for e in old if same_slot(e) and e["file"] not in named)

    update_manifest(root, update)
    return replaced


def remove_unreferenced(root: str | os.PathLike, files: list[str]) -> None:
    """Delete superseded export files; a failure here never breaks the bundle."""
    for name in files:
        path = Path(root) / name
        if path.parent.resolve() == Path(root).resolve():
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def write_export(root: str | os.PathLike, data: bytes, fmt: str, steps: int,
                 filename: Callable[[str], str], fields: dict,
                 same_slot: Callable[[dict], bool] = lambda e: True) -> dict:
    """Write one student's export into the bundle and record it; returns its manifest entry.

    The file is named `filename(sha256)` and written atomically before bundle.json names it;
    the entry replaces the student's `fmt` entries for which `same_slot(old)` holds, and the
    files they named are deleted once the new manifest is on disk.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    sha = hashlib.sha256(data).hexdigest()
    name = filename(sha)
    atomic_write_bytes(Path(root) / name, data)
    entry = {"format": fmt, "model": "student", "steps": steps, "file": name, "sha256": sha,
             **fields}
    stale = record_export(root, entry, lambda e: e.get("format") == fmt
                          and e.get("model") == "student" and e.get("steps") == steps
                          and same_slot(e))
    remove_unreferenced(root, stale)
    return entry
