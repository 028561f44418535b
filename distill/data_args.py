"""The folder-data options of `halfstep train` and `halfstep distill`: `--channels`,
`--image-size`, folded into the `--data` spec so the run's config records them.

Light at import (argparse only): the data modules load inside the functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_folder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="folder data: 1 (grayscale) or 3 (RGB); default 3 when any image has colour",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="N",
        help="folder data: resize the shorter side to N and center-crop N x N "
        "(default: the images' own size, which must agree)",
    )


def train_data_spec(data: str, channels: int | None, image_size: int | None) -> str:
    """The absolute spec with the flags folded in (defaults are resolved after loading)."""
    from .data import absolute_spec, with_options

    return absolute_spec(with_options(data, channels, image_size))


def distill_data_spec(
    data: str | None, channels: int | None, image_size: int | None, teacher: str
) -> str | None:
    """`distill --data` with the flags folded in; folder options left out are taken from the
    teacher's model, so the students see images shaped like the teacher's, and options that
    disagree with the teacher are refused."""
    from .data import DataError, absolute_spec, with_options
    from .folder import split_spec
    from .train import CONFIG

    if data is None:
        if channels is not None or image_size is not None:
            raise DataError("--channels and --image-size apply with --data only")
        return None
    spec = absolute_spec(with_options(data, channels, image_size))
    config = Path(teacher) / CONFIG
    if not spec.startswith("folder:") or not config.is_file():
        return spec
    model = json.loads(config.read_text()).get("model", {})
    want = {"channels": model.get("channels"), "size": model.get("image_size")}
    given = split_spec(spec.partition(":")[2])[1]
    for key, value in given.items():
        if want[key] is not None and value != want[key]:
            raise DataError(
                f"the teacher in {teacher} was trained with {key}={want[key]}, but --data asks "
                f"for {key}={value}"
            )
    return with_options(spec, want["channels"], want["size"])
