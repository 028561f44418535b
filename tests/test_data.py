import gzip
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from halfstep.distill.data import DataError, load_dataset, load_folder, load_mnist


def test_mnist_loads_real_files(mnist_dir):
    test = load_mnist(mnist_dir, "test")
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert test.num_labels == 10 and set(test.labels.tolist()) == set(range(10))
    x, y = test.batch(torch.arange(8))
    assert x.min() >= -1 and x.max() <= 1 and y.shape == (8,)


def test_mnist_train_label_counts(mnist_dir):
    train = load_dataset(f"mnist:{mnist_dir}")
    counts = torch.bincount(train.labels).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_mnist_errors_name_the_file(mnist_dir, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not found"):
        load_mnist(tmp_path / "nope")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_dir / name, tmp_path / name)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, "train")
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") * 3 + b"\x00" * 5)
    with pytest.raises(DataError, match="truncated"):
        load_mnist(tmp_path, "test")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="t10k-images"):
        load_mnist(tmp_path, "test")
    monkeypatch.delenv("HALFSTEP_MNIST_DIR", raising=False)
    with pytest.raises(DataError, match="HALFSTEP_MNIST_DIR"):
        load_dataset("mnist")


def test_folder_dataset_with_classes(tmp_path):
    for cls, value in (("a", 0), ("b", 255)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("L", (8, 8), value).save(tmp_path / cls / f"{i}.png")
    ds = load_folder(tmp_path)
    assert len(ds) == 6 and ds.num_labels == 2 and ds.image_shape == (1, 8, 8)
    assert ds.images[ds.labels == 1].float().mean() == 255
    (tmp_path / "b" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        load_folder(tmp_path)


def test_unknown_spec():
    with pytest.raises(DataError, match="unknown data spec"):
        load_dataset("imagenet:/x")
    assert len(load_dataset("synthetic:64")) == 64


def _write(path, mode="RGB", size=(8, 8), colour=(200, 30, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)


def test_folder_keeps_colour_by_default(tmp_path):
    _write(tmp_path / "a" / "0.png")
    _write(tmp_path / "b" / "0.png", mode="L")
    notes: list[str] = []
    ds = load_folder(tmp_path, notice=notes.append)
    assert ds.image_shape == (3, 8, 8) and ds.num_labels == 2
    assert ds.images[0, :, 0, 0].tolist() == [200, 30, 60]
    assert ds.images[1, 0, 0, 0] == ds.images[1, 2, 0, 0] == 200  # gray -> equal RGB
    assert len(notes) == 1 and "--channels 3" in notes[0] and "colour" in notes[0]
    gray = load_folder(tmp_path, channels=1, notice=notes.append)
    assert gray.image_shape == (1, 8, 8) and len(notes) == 1  # explicit: no notice


def test_grayscale_folder_notice(tmp_path, capsys):
    _write(tmp_path / "0.png", mode="L")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.image_shape == (1, 8, 8) and ds.num_labels == 0
    assert "grayscale: using --channels 1" in capsys.readouterr().err


def test_resize_and_center_crop(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # a red band at the left edge: cropped away
    img.save(tmp_path / "wide.png")
    _write(tmp_path / "small.png", size=(4, 4))
    ds = load_dataset(f"folder:{tmp_path}?size=6&channels=3", notice=print)
    assert ds.image_shape == (3, 6, 6)
    wide = ds.images[1]  # sorted: small.png, wide.png
    assert int(wide[0].max()) < 128  # 20x10 -> 12x6, crop columns 3..8: band (0..2) is gone


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no PNG/JPEG images found"):
        load_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write(tmp_path / "a" / "x.png", size=(8, 8))
    with pytest.raises(DataError, match=r"class folder .*b has no PNG/JPEG"):
        load_folder(tmp_path)
    _write(tmp_path / "b" / "y.png", size=(10, 10))
    sizes = r"differ in size .*x.png is 8x8.*y.png is 10x10.*--image-size"
    with pytest.raises(DataError, match=sizes):
        load_folder(tmp_path)
    assert load_folder(tmp_path, image_size=8, channels=3).image_shape == (3, 8, 8)
    _write(tmp_path / "b" / "y.png", size=(8, 4))
    _write(tmp_path / "a" / "x.png", size=(8, 4))
    with pytest.raises(DataError, match=r"8x4 .*not square; pass --image-size"):
        load_folder(tmp_path)
    (tmp_path / "b" / "z.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(DataError, match=r"cannot read image .*z.jpg"):
        load_folder(tmp_path, image_size=4)


def test_folder_spec_options(tmp_path):
    from halfstep.distill.data import absolute_spec, resolved_spec, with_options

    with pytest.raises(DataError, match="unknown folder option 'colour'"):
        load_dataset(f"folder:{tmp_path}?colour=1")
    with pytest.raises(DataError, match="channels must be 1 or 3"):
        load_dataset(f"folder:{tmp_path}?channels=4")
    with pytest.raises(DataError, match="apply to folder:DIR data"):
        with_options("mnist:/x", channels=3)
    with pytest.raises(DataError, match="says size=32 but the flag says 16"):
        with_options("folder:d?size=32", image_size=16)
    assert with_options("folder:d", 3, 32) == "folder:d?channels=3&size=32"
    assert absolute_spec("folder:rel?size=8") == f"folder:{Path('rel').resolve()}?size=8"
    _write(tmp_path / "0.png")
    ds = load_dataset(f"folder:{tmp_path}", notice=lambda _: None)
    assert resolved_spec(f"folder:{tmp_path}", ds) == f"folder:{tmp_path}?channels=3&size=8"
    assert resolved_spec("mnist:/m", ds) == "mnist:/m"
