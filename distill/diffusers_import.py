"""`halfstep import-diffusers DIR --out RUN`: a diffusers UNet2DModel + DDPM/DDIM scheduler
(`save_pretrained` layout) as a halfstep training run, ready for `halfstep distill`.

DIR holds the UNet (config.json + weights) and scheduler_config.json, either side by side or
in `unet/` and `scheduler/` sub-folders (a pipeline's layout). Recorded: the discrete
schedule (betas and num_train_timesteps), the parameterization from prediction_type, and
class conditioning when the UNet has class embeddings. A class-conditional UNet gets one more
embedding row, the mean of its K rows, as halfstep's "no label" index K.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .denoiser import DISCRETE_TIME_INPUT, Denoiser, ModelConfig
from .io import atomic_save_safetensors, atomic_write_json
from .schedule import DiscreteSchedule

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}
IMPORT_INFO = "imported.json"


class DiffusersError(ValueError):
    """A diffusers directory halfstep cannot import; the message names the file and field."""


def _find(root: Path, sub: str, name: str) -> Path:
    for path in (root / name, root / sub / name):
        if path.is_file():
            return path
    raise DiffusersError(f"no {name} in {root} or {root / sub}")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DiffusersError(f"cannot read {path}: {exc}") from None


def read_scheduler(path: Path) -> tuple[DiscreteSchedule, str]:
    """(schedule, halfstep parameterization) from a DDPM/DDIM scheduler_config.json."""
    cfg = _read(path)
    if cfg.get("_class_name") not in SCHEDULERS:
        raise DiffusersError(f"{path}: _class_name {cfg.get('_class_name')!r} is not one of "
                           f"{', '.join(SCHEDULERS)}")
    if cfg.get("trained_betas") is not None:
        raise DiffusersError(f"{path}: trained_betas are not supported; use a named beta_schedule")
    if cfg.get("rescale_betas_zero_snr"):
        raise DiffusersError(f"{path}: rescale_betas_zero_snr gives infinite log-SNR at t = 1")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise DiffusersError(f"{path}: prediction_type {prediction!r} is not one of "
                           f"{', '.join(PREDICTION_TYPES)}")
    try:
        schedule = DiscreteSchedule(
            beta_schedule=cfg.get("beta_schedule", "linear"),
            beta_start=float(cfg.get("beta_start", 0.0001)),
            beta_end=float(cfg.get("beta_end", 0.02)),
            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        )
    except (TypeError, ValueError) as exc:
        raise DiffusersError(f"{path}: {exc}") from None
    return schedule, PREDICTION_TYPES[prediction]


def _with_null_label(unet, unet_config: dict) -> tuple[dict, dict[str, torch.Tensor], int]:
    """(config, weights, K): class embeddings grow a mean row for halfstep's label K."""
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    classes = unet_config.get("num_class_embeds")
    if unet_config.get("class_embed_type") is not None:
        kind = unet_config["class_embed_type"]
        raise DiffusersError(f"class_embed_type {kind!r} is not supported (only num_class_embeds)")
    if not classes:
        return unet_config, state, 0
    table = state["class_embedding.weight"]
    state["class_embedding.weight"] = torch.cat([table, table.mean(0, keepdim=True)])
    return {**unet_config, "num_class_embeds": int(classes) + 1}, state, int(classes)


def import_diffusers(src: str | os.PathLike, out: str | os.PathLike, data: str = "") -> Path:
    """Write RUN/config.json, RUN/ema.safetensors and RUN/imported.json; returns RUN."""
    from diffusers import UNet2DModel

    from .train import CONFIG, EMA_WEIGHTS, TrainConfig

    src, out = Path(src), Path(out)
    unet_json = _find(src, "unet", "config.json")
    if _read(unet_json).get("_class_name") != "UNet2DModel":
        raise DiffusersError(f"{unet_json}: _class_name is not UNet2DModel")
    schedule, parameterization = read_scheduler(_find(src, "scheduler", "scheduler_config.json"))
    try:
        unet = UNet2DModel.from_pretrained(unet_json.parent)
    except Exception as exc:  # diffusers raises many types for missing/bad weights
        raise DiffusersError(f"cannot load the UNet in {unet_json.parent}: {exc}") from None
    unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    unet_config, state, num_labels = _with_null_label(unet, unet_config)
    size = unet_config["sample_size"]
    if not isinstance(size, int):
        raise DiffusersError(f"{unet_json}: sample_size must be one int (square), got {size}")
    channels = int(unet_config["in_channels"])
    try:
        model = ModelConfig(
            image_size=size, channels=channels, num_labels=num_labels,
            parameterization=parameterization,
            block_out_channels=tuple(unet_config["block_out_channels"]),
            layers_per_block=int(unet_config["layers_per_block"]),
            norm_num_groups=int(unet_config["norm_num_groups"]),
            schedule=schedule.to_dict(), time_input=DISCRETE_TIME_INPUT, unet=unet_config,
        )
    except ValueError as exc:
        raise DiffusersError(f"{unet_json}: {exc}") from None
    if int(unet_config["out_channels"]) != channels:
        raise DiffusersError(f"{unet_json}: out_channels {unet_config['out_channels']} != "
                           f"in_channels {channels}")
    Denoiser(model).unet.load_state_dict(state)  # the weights fit the recorded config
    cfg = TrainConfig(data=data, out=str(out), preset="diffusers", model=model, max_steps=0)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(state, out / EMA_WEIGHTS)
    atomic_write_json(out / IMPORT_INFO, {"source": str(src.resolve()),
                                          "prediction_type": parameterization})
    atomic_write_json(out / CONFIG, cfg.to_dict())
    return out
