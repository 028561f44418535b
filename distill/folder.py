"""A folder of your own images as a dataset: colour or grayscale, resized and center-cropped.

`folder:DIR` reads PNG/JPEG files under DIR; with class sub-folders each sub-folder is a label
(sorted by name), else the set is unlabelled. Options travel in the spec itself,
`folder:DIR?channels=3&size=32`, so a run's saved spec re-reads the data the same way:

- `channels` 1 or 3; by default 3 when any image has colour, else 1 (one notice line says
  which was chosen);
- `size` N: resize the shorter side to N (bicubic), then center-crop N x N; by default the
  images' own size, which must then be square and the same for every image.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
OPTIONS = ("channels", "size")


class DataError(ValueError):
    """A missing or malformed data file or folder; the message names it."""


FolderError = DataError


def split_spec(arg: str) -> tuple[str, dict[str, int]]:
    """'DIR?channels=3&size=32' -> ('DIR', {'channels': 3, 'size': 32}), values checked."""
    directory, _, query = arg.partition("?")
    options: dict[str, int] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in OPTIONS:
            raise FolderError(f"unknown folder option {key!r} in {arg!r}; use channels= or size=")
        try:
            options[key] = int(value)
        except ValueError:
            raise FolderError(f"folder option {key}={value!r} is not an integer") from None
    check_options(options.get("channels"), options.get("size"))
    return directory, options


def check_options(channels: int | None, size: int | None) -> None:
    if channels is not None and channels not in (1, 3):
        raise FolderError(f"--channels must be 1 or 3, got {channels}")
    if size is not None and not 1 <= size <= 4096:
        raise FolderError(f"--image-size must be in 1..4096, got {size}")


def join_spec(directory: str, channels: int | None, size: int | None) -> str:
    options = {k: v for k, v in (("channels", channels), ("size", size)) if v is not None}
    return f"folder:{directory}" + (f"?{urlencode(options)}" if options else "")


def _sources(directory: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, label)]), in a stable order."""
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    folders = [(directory / c, i) for i, c in enumerate(classes)] or [(directory, 0)]
    files = []
    for folder, label in folders:
        found = [p for p in sorted(folder.iterdir())
                 if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if classes and not found:
            raise FolderError(f"class folder {folder} has no PNG/JPEG images")
        files += [(p, label) for p in found]
    return classes, files


def _is_colour(mode: str, bands: tuple[str, ...]) -> bool:
    return "P" in mode or len(set(bands) - {"A"}) > 1


def _probe(files: list[tuple[Path, int]]) -> tuple[bool, dict[Path, tuple[int, int]]]:
    """(any colour image, {path: (width, height)}) from the headers alone."""
    from PIL import Image, UnidentifiedImageError

    colour, sizes = False, {}
    for path, _ in files:
        try:
            with Image.open(path) as img:
                colour = colour or _is_colour(img.mode, img.getbands())
                sizes[path] = img.size
        except (UnidentifiedImageError, OSError) as exc:
            raise FolderError(f"cannot read image {path}: {exc}") from None
    return colour, sizes


def _native_size(directory: Path, sizes: dict[Path, tuple[int, int]]) -> int:
    first, (w, h) = next(iter(sizes.items()))
    other = next(((p, s) for p, s in sizes.items() if s != (w, h)), None)
    if other is not None:
        (ow, oh) = other[1]
        raise FolderError(
            f"images under {directory} differ in size ({first} is {w}x{h}, {other[0]} is "
            f"{ow}x{oh}); pass --image-size N (or folder:DIR?size=N) to resize and center-crop"
        )
    if w != h:
        raise FolderError(
            f"images under {directory} are {w}x{h} ({first}), not square; pass --image-size N "
            "(or folder:DIR?size=N) to resize and center-crop"
        )
    return w


def _load(path: Path, mode: str, size: int) -> np.ndarray:
    """One image as uint8 [H, W] or [H, W, 3]: converted, shorter side -> size, center-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            w, h = img.size
            if (w, h) != (size, size):
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                img = img.resize((nw, nh), Image.BICUBIC)
                left, top = (nw - size) // 2, (nh - size) // 2
                img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise FolderError(f"cannot read image {path}: {exc}") from None


def read_folder(
    directory: str | os.PathLike,
    channels: int | None = None,
    image_size: int | None = None,
    notice: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(uint8 images [N, C, S, S], int64 labels [N], class count) of the images under DIR."""
    check_options(channels, image_size)
    directory = Path(directory)
    if not directory.is_dir():
        raise FolderError(f"image folder not found: {directory}")
    classes, files = _sources(directory)
    if not files:
        raise FolderError(f"no PNG/JPEG images found under {directory}")
    colour, sizes = _probe(files)
    if channels is None:
        channels = 3 if colour else 1
        why = "some images are in colour" if colour else "all images are grayscale"
        (notice or _stderr)(
            f"{directory}: {why}: using --channels {channels} (pass --channels to choose)"
        )
    size = image_size or _native_size(directory, sizes)
    mode = "RGB" if channels == 3 else "L"
    arrays = [_load(path, mode, size) for path, _ in files]
    images = np.stack(arrays)
    images = images[:, None] if channels == 1 else images.transpose(0, 3, 1, 2)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return np.ascontiguousarray(images), labels, len(classes)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
