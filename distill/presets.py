"""Named model + training presets. `tiny` is for smoke tests; `mnist` is the reference model.

A preset fixes the network's widths and the training recipe only: image size, channels and
label count come from the data. The image size must be divisible by 2^(levels - 1): tiny and
mnist take 28 or 32, cifar32 takes 32 (or 40, 48, ...).
"""

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
    # 32x32 colour (CIFAR-10-like): the DDPM/progressive-distillation CIFAR-10 UNet's layout
    # (4 resolutions 32-16-8-4, widths 1:2:2:2, dropout 0.1) at base width 32 instead of 128 and
    # 1 res block instead of 2, no attention: ~1.5 M parameters, so a 2-core CPU trains it.
    "cifar32": {
        "model": {"block_out_channels": (32, 64, 64, 64), "layers_per_block": 1,
                  "norm_num_groups": 32, "dropout": 0.1},
        "train": {"max_steps": 20000, "batch_size": 64, "lr": 2e-4, "warmup_steps": 500,
                  "checkpoint_every": 500, "ema_decay": 0.9995},
    },
}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
