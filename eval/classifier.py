"""A small MNIST classifier: its penultimate features give the fast "FD-classifier" metric,
its predictions the label accuracy of conditional samples.

Trained once on the MNIST training set, deterministically from a seed, and cached in the cache
directory under a hash of its config and of the training file, as safetensors plus a JSON note
with its test accuracy. The default config's weights for the standard MNIST files ship with the
package (weights/), the classifier of the published results table: CPUs with other vector
units train slightly other weights from the same seed (about 2% in classifier FD), so a fixed
file makes the metric the same everywhere, as FID's fixed Inception network does.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from halfstep.distill.data import MNIST_FILES, ImageDataset, load_mnist
from halfstep.distill.io import atomic_save_safetensors, atomic_write_json, sha256_file
from halfstep.distill.progress import progress as progress_bar

PACKAGED = Path(__file__).parent / "weights"  # mnist-cnn-{key}.safetensors + .json


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that decides the trained weights; its hash names the cache file."""

    steps: int = 1200  # about 2.5 epochs at batch 128: ~99% test accuracy
    batch_size: int = 128
    lr: float = 2e-3
    feature_dim: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.feature_dim < 1 or self.lr <= 0:
            raise ValueError(f"classifier settings must be positive: {self}")

    def key(self, data_id: str) -> str:
        text = json.dumps({**asdict(self), "data": data_id, "version": 1}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class SmallCNN(nn.Module):
    """2 conv + 2 fc; input [B, 1, 28, 28] in [-1, 1]."""

    def __init__(self, feature_dim: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate (post-ReLU) activations used for the Frechet distance."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


@torch.no_grad()
def classify(model: SmallCNN, images: torch.Tensor, batch_size: int = 500):
    """(features [N, D], predicted labels [N]) for images [N, 1, 28, 28] in [-1, 1]."""
    feats, preds = [], []
    for chunk in images.split(batch_size):
        f = model.features(chunk.float())
        feats.append(f)
        preds.append(model.fc2(f).argmax(dim=1))
    return torch.cat(feats), torch.cat(preds)


def accuracy(model: SmallCNN, data: ImageDataset) -> float:
    x, y = data.batch(torch.arange(len(data)))
    return float((classify(model, x)[1] == y).float().mean())


def train_classifier(config: ClassifierConfig, train: ImageDataset, progress: bool = True):
    """Adam on shuffled minibatches; the seed fixes init and order, so runs are repeatable."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = SmallCNN(config.feature_dim, train.num_labels)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    order = torch.randperm(len(train), generator=gen)
    pos = 0
    bar = progress_bar(range(config.steps), desc="classifier", disable=not progress, leave=False)
    for _ in bar:
        if pos + config.batch_size > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        x, y = train.batch(order[pos : pos + config.batch_size])
        pos += config.batch_size
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False)


def mnist_id(directory: str | os.PathLike) -> str:
    """sha256 of the training images file: a different MNIST copy gets a different cache entry."""
    path = Path(directory) / MNIST_FILES["train"][0]
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_or_train(mnist_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                  config: ClassifierConfig | None = None, path: str | os.PathLike | None = None,
                  progress: bool = True) -> tuple[SmallCNN, dict]:
    """The classifier (training and caching it first if needed) and its info dict, with the
    weights' sha256: training is seeded, but CPUs with other vector units round differently
    over its 1,200 steps, so two machines can train weights whose Frechet distances differ by
    about 2%. Rows are cached per weights (`scorer_id`); numbers compare across machines only
    under the same weights: the packaged ones, or one file passed as `--classifier FILE`.

    Where: `path` (`--classifier PATH`) if given: load it if it exists, else train and write
    it there; else the packaged weights when the settings and MNIST files are those they were
    trained with (the default config and the standard files); else the cache.
    """
    from safetensors.torch import load_file

    config = config or ClassifierConfig()
    key = config.key(mnist_id(mnist_dir))
    name = f"mnist-cnn-{key}.safetensors"
    packaged = PACKAGED / name
    shipped = packaged.is_file() and packaged.with_suffix(".json").is_file()
    default = packaged if shipped else Path(cache_dir) / "classifier" / name
    weights = Path(path) if path else default
    info_path = weights.with_suffix(".json")
    model = SmallCNN(config.feature_dim)
    if weights.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("key") != key:
            raise ValueError(f"{weights} was trained with another config or data ({info_path})")
        model.load_state_dict(load_file(weights))
        return model.eval().requires_grad_(False), {**info, "sha256": sha256_file(weights)}
    start = time.perf_counter()
    model = train_classifier(config, load_mnist(mnist_dir, "train"), progress)
    seconds = time.perf_counter() - start
    info = {"key": key, "config": asdict(config), "train_seconds": round(seconds, 1),
            "test_accuracy": accuracy(model, load_mnist(mnist_dir, "test")), "file": str(weights)}
    sha256 = atomic_save_safetensors(
        {k: v.contiguous() for k, v in model.state_dict().items()}, weights
    )
    atomic_write_json(info_path, info)
    return model, {**info, "sha256": sha256}


def scorer_id(info: dict) -> str:
    """What cached scores depend on: the classifier's settings and data (key) and its weights."""
    return f"{info['key']}-{info['sha256'][:12]}"
