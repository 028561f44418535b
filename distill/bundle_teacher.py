"""`halfstep bundle`: a trained teacher alone as a bundle, before (or without) distillation.

Serve it (`model=teacher`), evaluate its DDIM rows to choose where distillation should start,
or compare teachers with the same tools as bundles. The teacher file is written exactly as
`halfstep distill` writes it, so its sha256 matches the bundles later distilled from the run.
"""

from __future__ import annotations

import os
from pathlib import Path

# Plain numbers here, so `halfstep --help` can show them without importing torch.
# The teacher's steps when a request names none, and the most a request may ask for: DDIM
# costs one network call per step, so a server caps it.
DEFAULT_STEPS = 128
MAX_STEPS = 1024


def bundle_teacher(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    name: str | None = None,
    default_steps: int = DEFAULT_STEPS,
    max_steps: int = MAX_STEPS,
) -> Path:
    """Write the EMA teacher of `run_dir` as a bundle with no students; returns `out`."""
    from .bundle import create_bundle, refuse_existing_bundle  # torch: only when it runs
    from .train import load_run

    out = Path(out)
    if not 1 <= default_steps <= max_steps:
        raise ValueError(f"--default-steps must be in 1..--max-steps ({max_steps}), "
                         f"got {default_steps}")
    refuse_existing_bundle(out, "remove it first or choose another --out")
    train_cfg, teacher = load_run(run_dir)
    return create_bundle(out, name or out.name, teacher.config, teacher.unet.state_dict(),
                         default_steps, max_steps, configs={"train": train_cfg.to_dict()})
