"""Named model + training presets. `tiny` is for smoke tests; `mnist` is the reference model."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # Small enough that 50 training steps run in seconds on a CPU.
    "tiny": {
        "model": {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8},
        "train": {"max_steps": 50, "batch_size": 32, "lr": 1e-3, "warmup_steps": 5,
                  "checkpoint_every": 25, "ema_decay": 0.9},
    },
    # The reference MNIST teacher: ~1.06 M parameters, no attention (convolutions only).
    "mnist": {
        "model": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 32},
        "train": {"max_steps": 6000, "batch_size": 64, "lr": 2e-4, "warmup_steps": 200,
                  "checkpoint_every": 250, "ema_decay": 0.9995},
    },
}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
