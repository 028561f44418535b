"""TensorRT: every part that runs without TensorRT here; the rest is marked `tensorrt`."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from halfstep.cli import main
from halfstep.distill.bundle import Bundle, BundleError
from halfstep.engines.base import EngineError
from halfstep.engines.eager import TorchEngine
from halfstep.engines.tensorrt import select_engines
from halfstep.export.manifest import record_export, verified_path
from halfstep.export.onnx import ExportError
from halfstep.export.tensorrt import (
    engine_filename,
    max_pixel_error,
    profile_shapes,
    require_tensorrt,
)

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def test_profile_spans_batch_one_to_max_with_a_typical_opt():
    shapes = profile_shapes((1, 28, 28), 64)
    assert shapes["noise"] == ((1, 1, 28, 28), (8, 1, 28, 28), (64, 1, 28, 28))
    assert shapes["labels"] == ((1,), (8,), (64,))
    assert profile_shapes((3, 32, 32), 4)["noise"][1] == (4, 3, 32, 32)  # opt <= max
    assert profile_shapes((1, 28, 28), 64, opt_batch=16)["labels"][1] == (16,)
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        profile_shapes((1, 28, 28), 0)
    with pytest.raises(ValueError, match=r"opt_batch must be in 1\.\.8"):
        profile_shapes((1, 28, 28), 8, opt_batch=9)


def test_engine_file_names_change_with_tensorrt_version_and_gpu():
    sha = "ab" * 32
    name = engine_filename(4, "10.7.0", (9, 0), True, sha)
    assert name == f"student-4.trt10.7.0.sm90.fp16.{sha[:12]}.plan"
    others = {engine_filename(4, "10.8.0", (9, 0), True, sha),
              engine_filename(4, "10.7.0", (8, 6), True, sha),
              engine_filename(4, "10.7.0", (9, 0), False, sha)}
    assert name not in others and len(others) == 3


def _entry(steps, version="10.7.0", sm="sm90", fp16=False, file=None):
    return {"format": "tensorrt", "model": "student", "steps": steps, "fp16": fp16,
            "file": file or f"student-{steps}.{version}.{sm}.{fp16}.plan", "sha256": "0" * 64,
            "tensorrt_version": version, "compute_capability": sm, "max_batch": 64}


@pytest.fixture
def bundle_copy(tiny_bundle_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle_dir, tmp_path / "bundle"))


def test_engines_are_selected_for_this_version_and_gpu_only(bundle_copy):
    for n in (1, 2, 4, 8):
        record_export(bundle_copy, _entry(n), lambda e: False)
        record_export(bundle_copy, _entry(n, fp16=True), lambda e: False)
    record_export(bundle_copy, _entry(1, version="10.3.0"), lambda e: False)
    bundle = Bundle(bundle_copy)
    assert all(e["fp16"] for e in select_engines(bundle, "10.7.0", (9, 0)).values())
    assert not any(e["fp16"] for e in select_engines(bundle, "10.7.0", (9, 0), False).values())
    with pytest.raises(EngineError, match=r"steps 1, 2, 4, 8 built with TensorRT 10\.8\.0 on "
                                          r"sm90; run: halfstep export .*--format tensorrt"):
        select_engines(bundle, "10.8.0", (9, 0))  # an upgrade: rebuild, never load stale
    with pytest.raises(EngineError, match="on sm86"):
        select_engines(bundle, "10.7.0", (8, 6))


def test_rebuild_replaces_only_its_own_slot_and_reports_the_stale_file(bundle_copy):
    slot = lambda e: e["steps"] == 2 and e["tensorrt_version"] == "10.7.0"  # noqa: E731
    assert record_export(bundle_copy, _entry(2, file="old.plan"), slot) == []
    record_export(bundle_copy, _entry(2, version="10.3.0", file="other.plan"), lambda e: False)
    assert record_export(bundle_copy, _entry(2, file="new.plan"), slot) == ["old.plan"]
    files = sorted(e["file"] for e in json.loads((bundle_copy / "bundle.json").read_text())
                   ["exports"])
    assert files == ["new.plan", "other.plan"]


def test_engine_file_missing_or_corrupt_is_named(bundle_copy):
    plan = bundle_copy / "student-1.plan"
    entry = _entry(1, file=plan.name)
    with pytest.raises(BundleError, match="tensorrt export missing: .*student-1.plan"):
        verified_path(Bundle(bundle_copy), entry)
    plan.write_bytes(b"not an engine")
    with pytest.raises(BundleError, match=r"corrupt \(sha256 mismatch\): .*student-1.plan"):
        verified_path(Bundle(bundle_copy), entry)


def test_fp16_acceptance_compares_8bit_pixels():
    ref = torch.linspace(-1, 1, 2 * 28 * 28).reshape(2, 1, 28, 28)
    assert max_pixel_error(ref, ref) == 0
    assert max_pixel_error(ref + 1.9 / 127.5, ref) <= 2  # within 2/255 of the float32 image
    assert max_pixel_error((ref + 3.2 / 127.5).clamp(-1, 1), ref) >= 3


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and a GPU are present: no error path")
def test_without_tensorrt_or_gpu_a_one_line_error(tiny_bundle, tiny_bundle_dir, capsys):
    with pytest.raises(ExportError) as info:
        require_tensorrt()
    assert "\n" not in str(info.value) and ("pip install" in str(info.value)
                                            or "CUDA GPU" in str(info.value))
    from halfstep.engines.factory import make_engine

    with pytest.raises(EngineError):
        make_engine(tiny_bundle, "tensorrt")
    assert main(["export", "--bundle", str(tiny_bundle_dir), "--format", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("halfstep: error: TensorRT")


@pytest.mark.tensorrt
def test_tensorrt_build_run_and_reload(bundle_copy):
    from halfstep.engines.tensorrt import TensorRTEngine
    from halfstep.export.tensorrt import export_tensorrt

    entries = export_tensorrt(bundle_copy, [1, 2, 4, 8], max_batch=8, log=lambda _: None)
    assert all(e["parity_max_abs"] <= 1e-3 for e in entries)
    bundle = Bundle(bundle_copy)
    engine = TensorRTEngine(bundle)
    assert engine.buckets == (1, 2, 4, 8)
    noise, labels = torch.randn(3, *bundle.image_shape), torch.tensor([0, 4, 10])
    want = TorchEngine(bundle, device="cuda").run("student", 4, noise, labels)
    assert float((engine.run("student", 4, noise, labels) - want).abs().max()) <= 1e-3
    fp16 = export_tensorrt(bundle_copy, [1], max_batch=8, fp16=True, log=lambda _: None)
    assert fp16[0]["parity_max_pixel_error"] <= 2
