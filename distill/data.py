"""Datasets: MNIST IDX files, a folder of images, and a tiny synthetic set for unit tests.

A dataset is held in memory as uint8 images [N, C, H, W] and int64 labels [N]; batches are
scaled to [-1, 1]. `--data` specs: `mnist:DIR` (or `mnist` with $HALFSTEP_MNIST_DIR),
`folder:DIR[?channels=1|3&size=N]` (see folder.py), `synthetic[:N]`.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .folder import IMAGE_SUFFIXES, DataError, join_spec, read_folder, split_spec

__all__ = ["IMAGE_SUFFIXES", "DataError", "ImageDataset", "load_dataset", "load_folder"]

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N], values in 0..num_labels-1
    num_labels: int
    name: str = ""

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images scaled to [-1, 1] (float32) and their labels."""
        x = self.images[indices].float().div_(127.5).sub_(1.0)
        return x, self.labels[indices]


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Read one gzipped IDX file (magic 0x0000 08 DIMS, big-endian sizes, uint8 payload)."""
    if not path.is_file():
        raise DataError(f"missing MNIST file: {path}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != expected_dims:
        raise DataError(f"{path} is not an IDX file of {expected_dims}-d uint8 data")
    header = 4 + 4 * expected_dims
    dims = struct.unpack(f">{expected_dims}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(
            f"{path} is truncated: header says {dims}, payload has {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(directory: str | os.PathLike | None, split: str = "train") -> ImageDataset:
    if directory is None:
        directory = os.environ.get("HALFSTEP_MNIST_DIR")
        if not directory:
            raise DataError("no MNIST directory: pass mnist:DIR or set HALFSTEP_MNIST_DIR")
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"MNIST directory not found: {directory}")
    image_file, label_file = MNIST_FILES[split]
    images = _read_idx(directory / image_file, 3)
    labels = _read_idx(directory / label_file, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{directory / image_file} has {images.shape[0]} images but "
            f"{directory / label_file} has {labels.shape[0]} labels"
        )
    if labels.max() > 9:
        raise DataError(f"{directory / label_file} has labels above 9")
    return ImageDataset(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_labels=10,
        name=f"mnist-{split}",
    )


def load_folder(
    directory: str | os.PathLike,
    image_size: int | None = None,
    channels: int | None = None,
    notice=None,
) -> ImageDataset:
    """Images under DIR; one sub-folder per class if there are sub-folders, else unlabelled.

    channels: 1 or 3 (default: 3 when any image has colour); image_size: resize the shorter
    side and center-crop (default: the images' own size, which must agree)."""
    images, labels, num_labels = read_folder(directory, channels, image_size, notice)
    return ImageDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        num_labels=num_labels,
        name=f"folder-{Path(directory).name}",
    )


def synthetic_dataset(n: int = 512, image_size: int = 28, num_labels: int = 10, seed: int = 0):
    """Label k is a bright bar at a class-dependent position: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, (n,), generator=gen)
    images = torch.zeros(n, 1, image_size, image_size, dtype=torch.uint8)
    width = max(1, image_size // (2 * num_labels))
    for i, k in enumerate(labels.tolist()):
        col = (k * image_size) // num_labels
        images[i, 0, :, col : col + width] = 255
    return ImageDataset(images=images, labels=labels, num_labels=num_labels, name="synthetic")


def load_dataset(spec: str, split: str = "train", notice=None) -> ImageDataset:
    """Parse a `--data` spec: mnist:DIR | mnist | folder:DIR[?channels=C&size=N] | synthetic[:N]."""
    kind, _, arg = spec.partition(":")
    if kind == "mnist":
        return load_mnist(arg or None, split)
    if kind == "folder":
        directory, options = split_spec(arg)
        if not directory:
            raise DataError("folder data needs a directory: folder:DIR")
        return load_folder(directory, options.get("size"), options.get("channels"), notice)
    if kind == "synthetic":
        return synthetic_dataset(int(arg) if arg else 512, seed=0 if split == "train" else 1)
    raise DataError(f"unknown data spec {spec!r}; use mnist:DIR, folder:DIR or synthetic")


def absolute_spec(spec: str) -> str:
    """Make a spec's directory absolute, so a saved config works from any working directory."""
    kind, sep, arg = spec.partition(":")
    if kind == "mnist" and arg:
        return f"{kind}:{Path(arg).resolve()}"
    if kind == "folder" and arg:
        directory, options = split_spec(arg)
        return join_spec(str(Path(directory).resolve()), options.get("channels"),
                         options.get("size"))
    return spec


def with_options(spec: str, channels: int | None = None, image_size: int | None = None) -> str:
    """Fold `--channels` / `--image-size` into a folder spec; they apply to folder data only
    and must agree with options already in the spec."""
    if channels is None and image_size is None:
        return spec
    kind, _, arg = spec.partition(":")
    if kind != "folder":
        raise DataError(f"--channels and --image-size apply to folder:DIR data, not {spec!r}")
    directory, options = split_spec(arg)
    for key, value in (("channels", channels), ("size", image_size)):
        if value is not None and options.get(key, value) != value:
            raise DataError(f"{spec!r} says {key}={options[key]} but the flag says {value}")
    return join_spec(directory, options.get("channels", channels), options.get("size", image_size))


def resolved_spec(spec: str, dataset: ImageDataset) -> str:
    """A folder spec with the channels and size the dataset was read with, for the run's
    config: re-reading it gives the same images whatever the defaults decided."""
    kind, _, arg = spec.partition(":")
    if kind != "folder":
        return spec
    channels, size, _ = dataset.image_shape
    return join_spec(split_spec(arg)[0], channels, size)
