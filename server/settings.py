"""`halfstep serve` options: each one also reads `HALFSTEP_<NAME>` (for the container).

Precedence: command-line flag > environment variable > default. The API key is read from the
environment only (`HALFSTEP_API_KEY`), so it never shows up in `ps` output or shell history.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from halfstep.engines.names import BACKENDS

ENV_PREFIX = "HALFSTEP_"
TEACHER_CHOICES = ("on", "off")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(raw: str) -> bool:
    """A boolean option's text: 1/true/yes/on or 0/false/no/off (any case)."""
    text = str(raw).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(f"{raw!r} is not a boolean: use true/false, 1/0, yes/no or on/off")


@dataclass
class Settings:
    bundle: str | None = None  # one bundle: [NAME=]DIR (HALFSTEP_BUNDLE)
    bundles: tuple[str, ...] | str | None = None  # several: [NAME=]DIR each (HALFSTEP_BUNDLES)
    host: str = "127.0.0.1"  # this machine only; the container image sets 0.0.0.0
    port: int = 8000
    backend: str = "auto"
    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_wait_fraction: float = 0.1
    max_queue: int = 256
    timeout_s: float = 30.0
    drain_s: float = 30.0
    max_body_bytes: int = 16 * 1024
    max_backlog_s: float = 0.0  # bound on queued work in seconds of engine time; 0 = unbounded
    max_teacher_steps: int | None = None  # None: the bundle's teacher default_steps
    teacher: str = "on"  # off: model=teacher is refused (422)
    max_request_s: float = 60.0  # most predicted engine seconds one request may cost
    watchdog_factor: float = 10.0  # a batch over k x its predicted time (and 5 s) has stalled
    auth_metrics: bool = False  # /metrics needs the bearer token too (when api_key is set)
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        checks = [
            ("port", 0 <= self.port <= 65535, "0..65535"),
            ("max_batch", 1 <= self.max_batch <= 1024, "1..1024"),
            ("max_wait_ms", 0 <= self.max_wait_ms <= 10_000, "0..10000"),
            ("max_wait_fraction", 0 <= self.max_wait_fraction <= 1000, "0..1000"),
            ("max_queue", 1 <= self.max_queue <= 1_000_000, "1..1000000"),
            ("timeout_s", 0 < self.timeout_s <= 3600, "(0, 3600]"),
            ("drain_s", 0 <= self.drain_s <= 3600, "0..3600"),
            ("max_body_bytes", 64 <= self.max_body_bytes, ">= 64"),
            ("max_backlog_s", 0 <= self.max_backlog_s, ">= 0"),
            ("max_teacher_steps", self.max_teacher_steps is None or self.max_teacher_steps >= 1,
             ">= 1"),
            ("teacher", self.teacher in TEACHER_CHOICES, " or ".join(TEACHER_CHOICES)),
            ("max_request_s", 0 < self.max_request_s <= 86_400, "(0, 86400]"),
            ("watchdog_factor", 1 <= self.watchdog_factor <= 1000, "1..1000"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be in {allowed}, got {getattr(self, name)}")
        if isinstance(self.bundles, str):  # HALFSTEP_BUNDLES: comma-separated specs
            self.bundles = tuple(part.strip() for part in self.bundles.split(",") if part.strip())
        if self.bundle and self.bundles:
            raise ValueError("give the bundle once: HALFSTEP_BUNDLE (one) or HALFSTEP_BUNDLES "
                             "(several, NAME=DIR,NAME=DIR), not both")
        if self.api_key is not None and not self.api_key.strip():
            self.api_key = None  # an empty HALFSTEP_API_KEY means "no auth", not "empty token"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """Defaults, then HALFSTEP_* variables, then explicit overrides that are not None."""
        environ = os.environ if environ is None else environ
        values: dict = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, f.type, raw)
        given = {k: v for k, v in overrides.items() if v is not None}
        if "bundle" in given or "bundles" in given:  # --bundle replaces both variables
            values.pop("bundle", None)
            values.pop("bundles", None)
        values.update(given)
        return cls(**values)

    def bundle_specs(self) -> tuple[str, ...]:
        """The bundles to serve as `[NAME=]DIR` texts; () means the embedded bundle."""
        if self.bundles:
            return tuple(self.bundles)
        return (self.bundle,) if self.bundle else ()


def _parse(name: str, type_name, raw: str):
    kind = str(type_name)
    if kind.startswith("bool"):
        try:
            return parse_bool(raw)
        except ValueError:
            raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a boolean: use "
                             "true/false, 1/0, yes/no or on/off") from None
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a number") from None
    return raw


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to max_batch, plus max_batch itself (engines pad up to min_rows)."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return tuple(buckets + [max_batch])
