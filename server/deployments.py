"""The bundles one server serves, each a `Deployment`: a name, the directory it is read from,
the loaded bundle, its engine and its warm-up state.

`halfstep serve --bundle mnist=DIR --bundle other=DIR` (or `HALFSTEP_BUNDLES=mnist=DIR,other=DIR`)
serves several; a spec without `NAME=` is named by its manifest. The first is the default of
`/generate` (`?bundle=NAME` picks another). Names are configuration, never client input, so they
can label metrics and lanes; they are also URL path segments (`/v2/models/{name}`), hence the
pattern below.

A deployment is immutable once serving: a reload (`reload.py`) builds a new one beside it and
swaps the server's entry; requests admitted before the swap keep the old engine (their jobs hold
it) and finish on it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from halfstep.distill.bundle import Bundle, BundleError
from halfstep.engines.base import Engine

from .embedded import exported_copy, load_bundle, sha256_of, weights_sha256s
from .settings import Settings, batch_buckets

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
NAME_RULE = "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class BundleSpec:
    """One `[NAME=]DIR` of --bundle / HALFSTEP_BUNDLES: DIR None = the embedded bundle."""

    name: str | None
    path: str | None

    @classmethod
    def parse(cls, text: str | None) -> BundleSpec:
        """`NAME=DIR` or `DIR` (a DIR that itself holds '=' needs the NAME= form)."""
        if not text:
            return cls(None, None)
        name, sep, path = text.partition("=")
        if sep and "/" not in name and "\\" not in name:
            if not NAME.fullmatch(name):
                raise ValueError(f"bundle name {name!r} in {text!r} is not valid: {NAME_RULE}")
            if not path:
                raise ValueError(f"bundle {name!r} has no directory: write {name}=DIR")
            return cls(name, path)
        return cls(None, text)


@dataclass(eq=False)
class Deployment:
    """One served bundle. `source` is the directory reloads re-read (None: the embedded one);
    `bundle` may be a cached ONNX-exported copy of it (`exported_from` then says of what)."""

    name: str
    source: str | None
    bundle: Bundle
    engine: Engine
    exported_from: Path | None = None
    generation: int = 1  # 1 at start, +1 per swap by a reload
    warmup: dict | str | None = None  # info dict when done, error text when it failed
    ready: bool = False
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.digest = weights_digest(self.bundle)


def weights_digest(bundle: Bundle) -> str:
    """sha256 over the manifest's weight sha256s, image shape and label count: what a reload
    compares (an exported copy has the same digest as the bundle it was exported from)."""
    return sha256_of({**weights_sha256s(bundle), "image_shape": list(bundle.image_shape),
                      "num_labels": bundle.num_labels})


def deployment_name(spec: BundleSpec, bundle: Bundle) -> str:
    """The spec's name, else the bundle's own (which must then be a valid name)."""
    if spec.name:
        return spec.name
    if not NAME.fullmatch(bundle.name):
        raise BundleError(f"bundle {bundle.root} is named {bundle.name!r}, which cannot name a "
                          f"served model ({NAME_RULE}); name it: --bundle NAME={spec.path}")
    return bundle.name


def check_distinct(names: list[str]) -> None:
    """Every served bundle needs its own name."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise BundleError(f"two bundles are named {name!r}; give each its own name: "
                              f"--bundle {name}=DIR --bundle other=DIR")
        seen.add(name)


def build_engine(settings: Settings, bundle: Bundle) -> Engine:
    """The engine for `settings.backend`, with batch buckets 1, 2, 4, ... up to max_batch."""
    from halfstep.engines.factory import make_engine

    return make_engine(bundle, settings.backend, buckets=batch_buckets(settings.max_batch))


def served_bundle(settings: Settings, export_cache: bool = False, cache_dir: Path | None = None,
                  bundle: Bundle | None = None) -> tuple[Bundle, Path | None]:
    """(the bundle to serve, the directory it was exported from or None) for `bundle`
    (default: settings.bundle, loaded). With `export_cache`, `--backend auto` on a CPU machine
    with onnxruntime serves a cached ONNX-exported copy of a bundle that has no exports (built
    once, `embedded.exported_copy`), so auto picks ONNX Runtime; anywhere else the bundle
    itself."""
    from halfstep.engines.factory import missing_exports_only

    bundle = bundle or load_bundle(BundleSpec.parse(settings.bundle).path)
    if export_cache and settings.backend == "auto" and missing_exports_only(bundle):
        try:
            return exported_copy(bundle, cache_dir), bundle.root
        except Exception as exc:  # exporting is an optimisation: serve on torch instead
            print(f"halfstep: warning: could not export {bundle.root} to ONNX "
                  f"({type(exc).__name__}: {exc}); serving it on eager torch", file=sys.stderr,
                  flush=True)
    return bundle, None


def open_deployment(settings: Settings, spec: BundleSpec, export_cache: bool = False,
                    name: str | None = None, generation: int = 1,
                    bundle: Bundle | None = None) -> Deployment:
    """Load (and verify) the bundle of `spec` (unless given loaded), pick what to serve
    (`served_bundle`) and build its engine; not warmed up. `name` overrides the spec's (a
    reload keeps the served name)."""
    bundle = bundle or load_bundle(spec.path)
    name = name or deployment_name(spec, bundle)
    served, exported_from = served_bundle(settings, export_cache, bundle=bundle)
    return Deployment(name, spec.path, served, build_engine(settings, served), exported_from,
                      generation)


def open_deployments(settings: Settings, export_cache: bool = False) -> list[Deployment]:
    """Every bundle of the settings (`--bundle`, HALFSTEP_BUNDLE(S); none: the embedded one),
    in order: the first is the default. Names are checked before any engine is built."""
    specs = [BundleSpec.parse(text) for text in settings.bundle_specs()] or [BundleSpec.parse(None)]
    bundles = [load_bundle(spec.path) for spec in specs]
    names = [deployment_name(spec, bundle) for spec, bundle in zip(specs, bundles)]
    check_distinct(names)
    return [open_deployment(settings, spec, export_cache, name, bundle=bundle)
            for spec, bundle, name in zip(specs, bundles, names)]
