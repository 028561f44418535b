"""The bundle shipped inside the package, the one helper that loads a bundle or it, and the
cached ONNX-exported copy that `serve --backend auto` runs on CPU when a bundle has no exports.

The copy lives in `$HALFSTEP_CACHE/exports/<name>-<key>/` (see `default_cache_dir`), keyed by
the bundle's sha256s and the torch and onnxruntime versions: it is built once in a temporary
sibling directory, renamed into place, and verified at every load like any bundle; an entry
that fails verification is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from halfstep.distill.bundle import MANIFEST, Bundle, BundleError
from halfstep.distill.bundle_copy import copy_bundle
from halfstep.distill.cache import default_cache_dir

EMBEDDED = Path(__file__).parent / "bundles" / "mnist"
EXPORTS_DIR = "exports"


def default_bundle_path() -> Path:
    """The embedded bundle's directory; BundleError when the package was built without it."""
    if not (EMBEDDED / MANIFEST).is_file():
        raise BundleError(
            f"no embedded bundle at {EMBEDDED}; pass --bundle DIR (build one with "
            "`halfstep train` and `halfstep distill`)"
        )
    return EMBEDDED


def load_bundle(path: str | Path | None) -> Bundle:
    """The bundle at `path`, or the embedded one when path is None or empty (an empty
    HALFSTEP_BUNDLE means "no bundle given")."""
    return Bundle(path if path else default_bundle_path())


def weights_sha256s(bundle: Bundle) -> dict:
    """The manifest's sha256 of the teacher and of every student (by steps), as one dict."""
    m = bundle.manifest
    return {"teacher": m["teacher"]["sha256"],
            "students": sorted((s["steps"], s["sha256"]) for s in m["students"])}


def sha256_of(parts: dict) -> str:
    """sha256 of a JSON-able dict, independent of key order."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def export_key(bundle: Bundle) -> str:
    """sha256 over the weights' sha256s and the torch and onnxruntime versions."""
    import onnxruntime
    import torch

    return sha256_of({**weights_sha256s(bundle), "torch": torch.__version__,
                      "onnxruntime": onnxruntime.__version__})


def cache_entry(bundle: Bundle, cache_dir: Path | None = None) -> Path:
    """Where the exported copy of `bundle` lives (whether or not it exists yet)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / EXPORTS_DIR / f"{bundle.name}-{export_key(bundle)[:16]}"


def load_cached(entry: Path) -> Bundle | None:
    """The cached copy at `entry`, verified (weights and ONNX files); None if absent or bad."""
    from halfstep.engines.factory import has_onnx_exports
    from halfstep.export.manifest import export_entries, verified_path

    if not (entry / MANIFEST).is_file():
        return None
    try:
        cached = Bundle(entry)
        if not has_onnx_exports(cached):
            return None
        for onnx in export_entries(cached, "onnx").values():
            verified_path(cached, onnx)
    except (BundleError, OSError, ValueError, KeyError):
        return None
    return cached


def exported_copy(bundle: Bundle, cache_dir: Path | None = None,
                  log: Callable[[str], None] | None = None) -> Bundle:
    """A cached copy of `bundle` with ONNX exports of every student, built on first use."""
    from halfstep.export.onnx import export_onnx

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    entry = cache_entry(bundle, cache_dir)
    cached = load_cached(entry)
    if cached is not None:
        return cached
    if entry.exists():
        log(f"halfstep: cached export {entry} is incomplete or corrupt; rebuilding it")
        shutil.rmtree(entry, ignore_errors=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    students = ", ".join(map(str, bundle.student_steps))
    log(f"halfstep: exporting students {students} to ONNX once (about a minute), "
        f"cached in {entry}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        copy_bundle(bundle.root, tmp)
        export_onnx(tmp, log=lambda line: log(f"halfstep:   {line}"))
        try:
            os.rename(tmp, entry)  # atomic; fails if another process got there first
        except OSError:
            if load_cached(entry) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle(entry)
