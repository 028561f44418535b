"""ONNX Runtime engine: same images as torch, verified files, backend selection, benchmark."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from halfstep.cli import main
from halfstep.distill.bundle import Bundle, BundleError
from halfstep.distill.images import to_uint8
from halfstep.distill.sample import sample_images
from halfstep.engines.base import EngineError
from halfstep.engines.eager import TorchEngine

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'halfstep[onnx]')")

from halfstep.bench.engines import bench_engines, time_run  # noqa: E402
from halfstep.engines.factory import make_engine  # noqa: E402
from halfstep.engines.onnxruntime import OrtEngine  # noqa: E402
from tests.test_export import exported_bundle_dir  # noqa: E402


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Bundle:
    return Bundle(exported_bundle_dir(tmp_path_factory))


@pytest.fixture
def exported_copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported.root, tmp_path / "bundle"))


def _onnx_file(root: Path, steps: int) -> Path:
    manifest = json.loads((root / "bundle.json").read_text())
    entry = next(e for e in manifest["exports"] if e["format"] == "onnx" and e["steps"] == steps)
    return root / entry["file"]


@pytest.mark.parametrize("steps", [1, 2])
def test_same_image_as_torch_for_the_same_seed(exported, steps):
    ort_images = sample_images(exported, steps, n=5, seed=7, label=3, engine=OrtEngine(exported))
    torch_images = sample_images(exported, steps, n=5, seed=7, label=3,
                                 engine=TorchEngine(exported))
    diff = np.abs(to_uint8(ort_images).astype(int) - to_uint8(torch_images).astype(int))
    assert diff.max() <= 1  # <= 1/255 after conversion to 8-bit
    assert float((ort_images - torch_images).abs().max()) <= 1e-4
    assert ort_images.min() >= -1 and ort_images.max() <= 1


def test_buckets_pad_without_changing_images(exported):
    noise = torch.randn(3, *exported.image_shape)
    labels = torch.tensor([0, 5, 10])
    padded = OrtEngine(exported, buckets=(1, 4)).run("student", 2, noise, labels)
    plain = OrtEngine(exported).run("student", 2, noise, labels)
    assert padded.shape == (3, 1, 28, 28)
    assert torch.allclose(padded, plain, atol=1e-6)


def test_a_student_image_is_bitwise_independent_of_its_batch(exported):
    """ORT's CPU kernels need no padding rows (min_rows 1), unlike torch's oneDNN ones."""
    engine = OrtEngine(exported, buckets=(1, 2, 4, 8, 16))
    noise, labels = torch.randn(16, *exported.image_shape), torch.arange(16) % 11
    together = engine.run("student", 2, noise, labels)
    assert engine.bucket_for(1) == 1
    for i in (0, 5):
        alone = engine.run("student", 2, noise[i:i + 1], labels[i:i + 1])
        assert torch.equal(alone[0], together[i])
    # the teacher is served by torch, which pads its batches to CPU_MIN_ROWS
    alone = engine.run("teacher", 4, noise[:1], labels[:1])
    assert torch.equal(alone, engine.teacher.run("teacher", 4, noise[:4], labels[:4])[:1])


def test_teacher_falls_back_to_torch(exported):
    noise, labels = torch.randn(1, *exported.image_shape), torch.tensor([10])
    got = OrtEngine(exported).run("teacher", 2, noise, labels)
    assert torch.equal(got, TorchEngine(exported).run("teacher", 2, noise, labels))


def test_corrupted_onnx_file_is_refused_by_name(exported_copy):
    path = _onnx_file(exported_copy, 2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    bundle = Bundle(exported_copy)  # weights are fine: the bundle itself still loads
    with pytest.raises(BundleError, match=rf"corrupt \(sha256 mismatch\): .*{path.name}"):
        OrtEngine(bundle)


def test_missing_onnx_file_is_refused_by_name(exported_copy, capsys):
    path = _onnx_file(exported_copy, 1)
    path.unlink()
    with pytest.raises(BundleError, match=rf"export missing: .*{path.name}"):
        make_engine(Bundle(exported_copy), "onnxruntime")
    out = exported_copy / "grid.png"
    rc = main(["sample", "--bundle", str(exported_copy), "--steps", "1", "--n", "2",
               "--backend", "onnxruntime", "--out", str(out)])
    assert rc == 2 and path.name in capsys.readouterr().err and not out.exists()


def test_bundle_without_exports_is_refused_with_the_command_to_run(tiny_bundle):
    with pytest.raises(EngineError, match="no ONNX export for student steps 1, 2, 4, 8.*"
                                          "halfstep export"):
        OrtEngine(tiny_bundle)


def test_make_engine_backends(exported, tiny_bundle):
    assert isinstance(make_engine(exported, "onnxruntime", threads=1), OrtEngine)
    if not torch.cuda.is_available():  # auto prefers ORT on CPU only when exports exist
        assert isinstance(make_engine(exported, "auto"), OrtEngine)
        assert isinstance(make_engine(tiny_bundle, "auto"), TorchEngine)
    with pytest.raises(EngineError, match="threads must be >= 1"):
        OrtEngine(exported, threads=0)


def test_cuda_device_without_cuda_provider_is_a_clear_error(exported):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: the error path does not apply")
    with pytest.raises(EngineError, match="onnxruntime-gpu"):
        OrtEngine(exported, device="cuda")


def test_cli_sample_with_onnxruntime_backend(exported, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["sample", "--bundle", str(exported.root), "--steps", "2", "--n", "4",
               "--backend", "onnxruntime", "--out", str(out)])
    assert rc == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_measurement_helpers(exported):
    assert min(time_run(OrtEngine(exported), "student", 1, batch=2, repeats=2)) > 0
    rows = bench_engines(exported, ["torch", "onnxruntime"], [1], [1], teacher_steps=None,
                         repeats=2)
    assert [(r["backend"], r["steps"]) for r in rows] == [("torch", 1), ("onnxruntime", 1)]
    assert all(r["median_ms"] > 0 for r in rows)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        time_run(OrtEngine(exported), "student", 1, batch=0, repeats=1)


@pytest.mark.gpu
def test_cuda_graph_engine_matches_torch(exported):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (pip install 'halfstep[gpu]')")
    engine = OrtEngine(exported, device="cuda", buckets=(1, 4))
    noise, labels = torch.randn(3, *exported.image_shape), torch.tensor([0, 4, 10])
    for _ in range(2):  # the first run captures the graph, the second replays it
        got = engine.run("student", 2, noise, labels)
    want = TorchEngine(exported).run("student", 2, noise, labels)
    assert float((got - want).abs().max()) <= 1e-3


def test_serve_hints_at_onnx_only_when_auto_fell_back_for_want_of_exports(exported, tiny_bundle,
                                                                         monkeypatch):
    from halfstep.server.cli import onnx_hint
    from halfstep.server.settings import Settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine

    hint = onnx_hint(Settings(backend="auto"), "torch", tiny_bundle)
    assert hint and f"halfstep copy-bundle {tiny_bundle.root}" in hint and "--format onnx" in hint
    assert onnx_hint(Settings(backend="torch"), "torch", tiny_bundle) is None  # chosen on purpose
    assert onnx_hint(Settings(backend="auto"), "onnxruntime", exported) is None
    assert onnx_hint(Settings(backend="auto"), "torch", exported) is None  # has exports
