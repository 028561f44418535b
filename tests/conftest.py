"""Shared fixtures: tiny models and bundles built in seconds, and the shared MNIST data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from halfstep.distill.bundle import Bundle, add_student, create_bundle
from halfstep.distill.denoiser import Denoiser, ModelConfig

# One intra-op thread: on a shared 2-core machine OpenMP spin-waiting makes tiny models ~50x
# slower when a server subprocess and the test process both run torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

MNIST_DIR = Path(
    os.environ.get(
        "HALFSTEP_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    )
)
TINY_STUDENT_STEPS = (1, 2, 4, 8)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        image_size=28,
        channels=1,
        num_labels=10,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
    )
    return ModelConfig(**{**base, **overrides})


def train_tiny_teacher(out: Path) -> Path:
    """A two-step teacher run on synthetic data, in seconds: what `distill --teacher` reads."""
    from halfstep.distill.train import TrainConfig, train

    train(TrainConfig.from_preset("tiny", "synthetic:32", str(out), (1, 28, 28), 10,
                                  max_steps=2, batch_size=8), progress=False)
    return out


def tiny_denoiser(seed: int = 0, **overrides) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(tiny_config(**overrides)).eval()


def build_tiny_bundle(root: Path, steps=TINY_STUDENT_STEPS, name: str = "tiny",
                      seed: int = 0, **config) -> Path:
    """A bundle of randomly initialised tiny networks (one per student): fast, fully valid.
    Another `seed` gives other weights of the same shapes; `config` overrides tiny_config."""
    teacher = tiny_denoiser(seed, **config)
    create_bundle(
        root,
        name,
        teacher.config,
        teacher.unet.state_dict(),
        default_steps=16,
        max_steps=64,
        configs={"note": "random weights for tests"},
    )
    for i, n in enumerate(steps):
        add_student(root, n, tiny_denoiser(seed + i + 1, **config).unet.state_dict(),
                    {"distilled_from": 2 * n})
    return root


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory) -> Path:
    """Read-only shared tiny bundle; copy it before modifying."""
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_dir) -> Bundle:
    return Bundle(tiny_bundle_dir)


@pytest.fixture(scope="module")
def guarded_app(tiny_bundle_dir):
    """An app on the tiny bundle with HALFSTEP_API_KEY=s3cret (not started)."""
    from .test_server_support import make_app

    return make_app(tiny_bundle_dir, api_key="s3cret")[0]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found at {MNIST_DIR}; set HALFSTEP_MNIST_DIR")
    return MNIST_DIR


def pytest_runtest_setup(item):
    """Skip marked tests with a reason when what they need is absent."""
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none found)")
    if item.get_closest_marker("tensorrt"):
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            pytest.skip("needs the tensorrt package (pip install halfstep[tensorrt])")
        if not torch.cuda.is_available():
            pytest.skip("TensorRT needs a CUDA GPU (none found)")
