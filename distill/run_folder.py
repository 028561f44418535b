"""A training run's folder: the files `halfstep train` writes, and what `--resume` does with it.

`--resume` continues from checkpoint.pt. Where there is none yet it starts the run at step 0,
provided the folder holds only what a run writes before its first checkpoint completes (a
Kubernetes Job restarted after a kill, with one command for its first start and its restarts);
any other folder is refused. On resume, what the run wrote after the step it continues from
(loss lines, EMA snapshots, sample grids) is dropped: those steps are trained again, and a
quality curve must not score weights from a discarded future.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .io import atomic_write_bytes

CHECKPOINT = "checkpoint.pt"
EMA_WEIGHTS = "ema.safetensors"
CONFIG = "config.json"
LOSS_LOG = "loss.jsonl"
SNAPSHOT = re.compile(r"ema-(\d+)\.safetensors$")  # --snapshot-every
SAMPLES = re.compile(r"samples-(\d+)\.png$")  # a grid beside every checkpoint
# An atomic write's temporary file (distill/io.py) that a kill left behind, and what a freshly
# formatted volume holds at its root.
LEFTOVERS = re.compile(r"^\..+\.tmp$|^lost\+found$")
RUN_FILES = (CHECKPOINT, EMA_WEIGHTS, CONFIG, LOSS_LOG)


def refuse_foreign_folder(run_dir: Path) -> None:
    """`--resume` without a checkpoint: refuse a folder that is not a run's (a file, a bundle,
    a folder holding anything a run does not write, an unreadable or foreign config.json)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--resume: {run_dir} is a file, not a training run's folder")
    if not run_dir.is_dir():
        return
    others = sorted(p.name for p in run_dir.iterdir() if not _written_by_a_run(p.name))
    if others:
        raise FileNotFoundError(
            f"--resume: no checkpoint at {run_dir / CHECKPOINT}, and {run_dir} holds files a "
            f"training run does not write ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}): pass the run's own --out, or a new one"
        )
    if (run_dir / CONFIG).is_file():
        recorded_config(run_dir)


def _written_by_a_run(name: str) -> bool:
    return (name in RUN_FILES or bool(SNAPSHOT.fullmatch(name) or SAMPLES.fullmatch(name))
            or bool(LEFTOVERS.match(name)))


def recorded_config(run_dir: Path) -> dict:
    """The settings a run recorded in config.json, refused in one line if they are not a
    run's (another tool's file, a truncated write)."""
    path = run_dir / CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is not a training run's config ({exc}); pass the run's own "
                         "--out, or a new one") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError(f"{path} is not a training run's config (no model settings); pass the "
                         "run's own --out, or a new one")
    return raw


def check_same_model(run_dir: Path, wanted: dict) -> None:
    """--resume continues the network the run was started with: another width, depth, norm
    grouping or parameterization would fail to load, or (GroupNorm groups: same tensor shapes)
    load silently and train a different model from then on."""
    if not (run_dir / CONFIG).is_file():
        return  # a checkpoint without config.json: loading it is the only check left
    recorded = recorded_config(run_dir)["model"]
    differ = sorted(k for k in wanted if k in recorded and recorded[k] != wanted[k])
    if differ:
        changes = "; ".join(f"{k}: {recorded[k]!r} there, {wanted[k]!r} asked" for k in differ)
        raise ValueError(
            f"--resume: {run_dir} holds a run of another model ({changes}); pass the flags it "
            "was started with (--preset, --widths, --layers-per-block, --norm-groups, "
            "--parameterization) or a new --out"
        )


def discard_after(run_dir: Path, step: int) -> None:
    """Drop what the run wrote after `step`, where it continues from: the loss lines (and a
    line cut short by a kill), EMA snapshots and sample grids of later steps."""
    for path in run_dir.iterdir():
        numbered = SNAPSHOT.fullmatch(path.name) or SAMPLES.fullmatch(path.name)
        if numbered and int(numbered.group(1)) > step:
            path.unlink()
    log = run_dir / LOSS_LOG
    if log.is_file():
        kept = [line + "\n" for line in log.read_text().splitlines()
                if (logged := _logged_step(line)) is not None and logged <= step]
        atomic_write_bytes(log, "".join(kept).encode())


def _logged_step(line: str) -> int | None:
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None
