"""Datasets: MNIST IDX files, a folder of images, and a tiny synthetic set for unit tests.

A dataset is held in memory as uint8 images [N, C, H, W] and int64 labels [N]; batches are
scaled to [-1, 1]. `--data` specs: `mnist:DIR` (or `mnist` with $HALFSTEP_MNIST_DIR),
`folder:DIR`, `synthetic[:N]`.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class DataError(ValueError):
    """A missing or malformed data file; the message names it."""


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


def load_folder(directory: str | os.PathLike, image_size: int | None = None) -> ImageDataset:
    """Images under DIR; one sub-folder per class if there are sub-folders, else unlabelled."""
    from PIL import Image, UnidentifiedImageError

    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"image folder not found: {directory}")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    sources = [(directory / c, i) for i, c in enumerate(classes)] or [(directory, 0)]
    arrays, labels = [], []
    for folder, label in sources:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    img = img.convert("L")
                    if image_size:
                        img = img.resize((image_size, image_size), Image.BICUBIC)
                    arrays.append(np.asarray(img, dtype=np.uint8))
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"cannot read image {path}: {exc}") from None
            labels.append(label)
    if not arrays:
        raise DataError(f"no PNG/JPEG images found under {directory}")
    if len({a.shape for a in arrays}) != 1:
        raise DataError(f"images under {directory} differ in size; pass an image size to resize")
    return ImageDataset(
        images=torch.from_numpy(np.stack(arrays)).unsqueeze(1),
        labels=torch.tensor(labels, dtype=torch.int64),
        num_labels=len(classes),
        name=f"folder-{directory.name}",
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


def load_dataset(spec: str, split: str = "train") -> ImageDataset:
    """Parse a `--data` spec: mnist:DIR | mnist | folder:DIR | synthetic[:N]."""
    kind, _, arg = spec.partition(":")
    if kind == "mnist":
        return load_mnist(arg or None, split)
    if kind == "folder":
        if not arg:
            raise DataError("folder data needs a directory: folder:DIR")
        return load_folder(arg)
    if kind == "synthetic":
        return synthetic_dataset(int(arg) if arg else 512, seed=0 if split == "train" else 1)
    raise DataError(f"unknown data spec {spec!r}; use mnist:DIR, folder:DIR or synthetic")


def absolute_spec(spec: str) -> str:
    """Make a spec's directory absolute, so a saved config works from any working directory."""
    kind, sep, arg = spec.partition(":")
    if kind in ("mnist", "folder") and arg:
        return f"{kind}:{Path(arg).resolve()}"
    return spec
