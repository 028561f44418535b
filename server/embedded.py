"""The bundle shipped inside the package, and the one helper that loads a bundle or it."""

from __future__ import annotations

from pathlib import Path

from halfstep.distill.bundle import MANIFEST, Bundle, BundleError

EMBEDDED = Path(__file__).parent / "bundles" / "mnist"


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
