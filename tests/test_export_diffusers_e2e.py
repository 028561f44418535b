"""A model made with diffusers' own API, end to end: trained as diffusers' training example
does (DDPMScheduler.add_noise), saved with save_pretrained, then `halfstep import-diffusers`
-> `distill` 8 -> 2 -> `sample` -> served (/generate?steps=2 is a PNG) -> `export --format
diffusers` -> loaded by diffusers, giving halfstep's images. For a v-prediction
squaredcos_cap_v2 teacher and an epsilon-prediction linear-beta one."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from PIL import Image

from halfstep.cli import main
from halfstep.distill.bundle import Bundle
from halfstep.distill.sample import reference_images
from halfstep.distill.sampling import noise_for_seeds
from halfstep.server.client import Client

from .test_server_support import make_app, serving

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub
SIZE = 16
CLASSES = ("0-square", "1-disc")


def shapes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n grayscale SIZE x SIZE images in [0, 255]: label 0 a filled square, 1 a filled disc,
    of random size and place on a dark background."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    labels = rng.integers(0, 2, n)
    images = np.zeros((n, SIZE, SIZE), dtype=np.uint8)
    for i, label in enumerate(labels):
        r = rng.integers(3, 6)
        cx, cy = rng.integers(r, SIZE - r, 2)
        if label == 0:
            mask = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
        else:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        images[i][mask] = 230
    return images, labels


def train_diffusers(root: Path, prediction: str, beta_schedule: str, steps: int = 200,
                    batch: int = 16) -> tuple[float, float]:
    """Train a tiny class-conditional UNet2DModel; returns (first, last) mean loss of 20."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    unet = UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1,
                       block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       num_class_embeds=len(CLASSES))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                              prediction_type=prediction)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        images, labels = shapes(batch, rng)
        x = torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1
        noise = torch.randn_like(x)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        noisy = scheduler.add_noise(x, noise, t)
        target = noise if prediction == "epsilon" else scheduler.get_velocity(x, noise, t)
        out = unet(noisy, t, class_labels=torch.from_numpy(labels)).sample
        loss = F.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    unet.save_pretrained(root / "unet")
    scheduler.save_pretrained(root / "scheduler")
    return float(np.mean(losses[:20])), float(np.mean(losses[-20:]))


def write_folder(root: Path, per_class: int = 16) -> Path:
    images, labels = shapes(4 * per_class, np.random.default_rng(1))
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, "L").save(root / CLASSES[label] / f"{i:03d}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("prediction, beta_schedule", [("v_prediction", "squaredcos_cap_v2"),
                                                       ("epsilon", "linear")])
def test_diffusers_model_end_to_end(tmp_path, prediction, beta_schedule):
    first, last = train_diffusers(tmp_path / "src", prediction, beta_schedule)
    assert last < 0.8 * first  # it learned something
    data = write_folder(tmp_path / "shapes")
    run, bundle, out = tmp_path / "run", tmp_path / "bundle", tmp_path / "hf"
    assert main(["import-diffusers", str(tmp_path / "src"), "--out", str(run),
                 "--data", f"folder:{data}"]) == 0
    assert main(["distill", "--teacher", str(run), "--out", str(bundle), "--from-steps", "8",
                 "--to-steps", "2", "--iters-per-round", "10", "--batch-size", "8"]) == 0
    b = Bundle(bundle)
    assert b.student_steps == [2, 4] and b.manifest["time_input"] == "(T-1)t"
    assert main(["sample", "--bundle", str(bundle), "--steps", "2", "--n", "4", "--label", "1",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").mode == "L"

    app, _ = make_app(bundle)
    with serving(app) as url, Client(url) as client:
        got = client.generate(steps=2, seed=3, label=0)
    assert got.headers["content-type"] == "image/png" and got.steps == 2
    assert Image.open(io.BytesIO(got.content)).size == (SIZE, SIZE)

    assert main(["export", "--bundle", str(bundle), "--format", "diffusers", "--out", str(out),
                 "--steps", "2"]) == 0
    pipe = DiffusionPipeline.from_pretrained(out / "student-2", trust_remote_code=True,
                                             custom_pipeline=str(out / "student-2/pipeline.py"))
    noise = noise_for_seeds([0, 1, 2, 3], b.image_shape)
    labels = torch.tensor([0, 1, 2, 0])  # 2 = no label
    want = reference_images(b, "student", 2, noise, labels)
    got = pipe(noise=noise, class_labels=labels, output_type="raw").images
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
