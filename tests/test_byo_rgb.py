"""Your own colour images, end to end: a folder of RGB PNGs in two classes -> train (tiny) ->
distill 4 -> 2 -> ONNX export -> serve -> /generate answers RGB PNGs of the data's size."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from halfstep.cli import main
from halfstep.distill.bundle import Bundle
from halfstep.engines.factory import make_engine
from halfstep.server.app import create_app
from halfstep.server.settings import Settings

from .test_server_support import serving

SIZE = 16


def write_images(root: Path, per_class: int = 12) -> Path:
    """Two classes: reddish and bluish squares with a random bright patch, a few sizes (so the
    resize path runs), all drawn from a fixed seed."""
    rng = np.random.default_rng(0)
    for cls, base in (("red", (200, 40, 40)), ("blue", (40, 60, 210))):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            side = (SIZE, 20, 24)[i % 3]
            px = np.clip(np.array(base) + rng.integers(-30, 30, (side, side, 3)), 0, 255)
            x, y = rng.integers(0, side - 4, 2)
            px[y : y + 4, x : x + 4] = 255
            Image.fromarray(px.astype(np.uint8), "RGB").save(root / cls / f"{i:02d}.png")
    return root


def test_rgb_folder_pipeline(tmp_path, capsys):
    data, run, bundle = write_images(tmp_path / "imgs"), tmp_path / "run", tmp_path / "bundle"
    assert main(["train", "--data", f"folder:{data}", "--image-size", str(SIZE), "--out",
                 str(run), "--preset", "tiny", "--max-steps", "3", "--checkpoint-every", "3",
                 "--batch-size", "8"]) == 0
    assert "some images are in colour: using --channels 3" in capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == f"folder:{data}?channels=3&size={SIZE}"
    assert (config["model"]["channels"], config["model"]["image_size"]) == (3, SIZE)
    assert Image.open(run / "samples-000003.png").mode == "RGB"

    assert main(["distill", "--teacher", str(run), "--out", str(bundle), "--from-steps", "4",
                 "--to-steps", "2", "--iters-per-round", "2", "--batch-size", "4"]) == 0
    b = Bundle(bundle)
    assert b.image_shape == (3, SIZE, SIZE) and b.student_steps == [2] and b.num_labels == 2
    assert main(["export", "--bundle", str(bundle), "--format", "onnx", "--max-batch", "4"]) == 0
    assert [e["format"] for e in Bundle(bundle).manifest["exports"]] == ["onnx"]

    b = Bundle(bundle)
    engine = make_engine(b, "onnxruntime", buckets=(1, 2, 4))
    app = create_app(Settings(bundle=str(bundle), backend="onnxruntime", max_batch=4,
                              max_wait_ms=10.0), engine=engine)
    with serving(app) as url:
        one = httpx.post(f"{url}/generate", params={"steps": 2, "seed": 3, "label": 1}, timeout=60)
        grid = httpx.post(f"{url}/generate", params={"steps": 2, "n": 3}, timeout=60)
        js = httpx.post(f"{url}/generate", params={"steps": 2, "n": 2, "format": "json"},
                       timeout=60)
    assert one.status_code == 200 and one.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(one.content))
    assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))
    assert one.headers["x-halfstep-backend"] == "onnxruntime"
    image = Image.open(io.BytesIO(grid.content))
    assert (image.mode, image.size) == ("RGB", (2 * SIZE, 2 * SIZE))  # 2x2 grid for n=3
    for item in js.json()["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(item["png"])))
        assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))


def test_distill_reads_folder_data_like_the_teacher(tmp_path):
    """`distill --data folder:DIR` takes the teacher's channels and size; a clash is refused."""
    from halfstep.distill.data import DataError
    from halfstep.distill.data_args import distill_data_spec

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"channels": 3, "image_size": 16}}))
    assert distill_data_spec("folder:/d", None, None, str(run)) == "folder:/d?channels=3&size=16"
    assert distill_data_spec("mnist:/m", None, None, str(run)) == "mnist:/m"
    assert distill_data_spec(None, None, None, str(run)) is None
    with pytest.raises(DataError, match="trained with channels=3"):
        distill_data_spec("folder:/d", 1, None, str(run))
    with pytest.raises(DataError, match="with --data only"):
        distill_data_spec(None, None, 32, str(run))
