"""The bundle shipped inside the package: what `halfstep serve` runs without --bundle."""

from __future__ import annotations

from pathlib import Path

from halfstep.distill.bundle import MANIFEST, BundleError

EMBEDDED = Path(__file__).parent / "bundles" / "mnist"


def default_bundle_path() -> Path:
    if not (EMBEDDED / MANIFEST).is_file():
        raise BundleError(
            f"no embedded bundle at {EMBEDDED}; pass --bundle DIR (build one with "
            "`halfstep train` and `halfstep distill`)"
        )
    return EMBEDDED
