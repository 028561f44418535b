import gzip
import shutil

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
