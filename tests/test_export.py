"""ONNX export: round trip through `halfstep export`, parity, manifest, interruption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from halfstep.cli import main
from halfstep.distill.bundle import Bundle, BundleError
from halfstep.distill.io import sha256_file
from tests.conftest import build_tiny_bundle

onnx = pytest.importorskip("onnx", reason="needs the onnx extra (pip install 'halfstep[onnx]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'halfstep[onnx]')")

from halfstep.engines.onnxruntime import OrtEngine  # noqa: E402
from halfstep.export import manifest as manifest_mod  # noqa: E402
from halfstep.export import onnx as export_mod  # noqa: E402
from halfstep.export.onnx import ExportError, export_onnx  # noqa: E402

EXPORTED_STEPS = (1, 2)
_CACHE: dict[str, Path] = {}


def exported_bundle_dir(tmp_path_factory) -> Path:
    """A tiny bundle (students 1, 2) exported once per session by the CLI; read-only."""
    if "root" not in _CACHE:
        root = build_tiny_bundle(tmp_path_factory.mktemp("exported") / "tiny", EXPORTED_STEPS)
        assert main(["export", "--bundle", str(root), "--format", "onnx"]) == 0
        _CACHE["root"] = root
    return _CACHE["root"]


@pytest.fixture(scope="session")
def exported_dir(tmp_path_factory) -> Path:
    return exported_bundle_dir(tmp_path_factory)


@pytest.fixture
def exported_copy(exported_dir, tmp_path) -> Path:
    return Path(shutil.copytree(exported_dir, tmp_path / "bundle"))


def onnx_entries(root: Path) -> list[dict]:
    return [e for e in json.loads((root / "bundle.json").read_text())["exports"]
            if e["format"] == "onnx"]


def test_export_records_each_student_with_sha_opset_exporter_and_parity(exported_dir):
    entries = onnx_entries(exported_dir)
    assert sorted(e["steps"] for e in entries) == list(EXPORTED_STEPS)
    for e in entries:
        path = exported_dir / e["file"]
        assert sha256_file(path) == e["sha256"]
        assert e["sha256"][:12] in e["file"]
        assert (e["opset"], e["exporter"], e["model"]) == (18, "torchscript", "student")
        assert 0 <= e["parity_max_abs"] <= 1e-4
    Bundle(exported_dir)  # still a valid bundle
    assert not list(exported_dir.glob(".*.tmp"))


def test_exported_graph_is_unrolled_with_dynamic_batch(exported_dir):
    entry = next(e for e in onnx_entries(exported_dir) if e["steps"] == 2)
    model = onnx.load(exported_dir / entry["file"])
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Loop", "If", "Scan"}  # ORT CUDA graphs refuse control flow
    assert sum(n.op_type == "Conv" for n in model.graph.node) > 2  # two UNet calls unrolled
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert inputs["noise"].elem_type == onnx.TensorProto.FLOAT
    assert inputs["labels"].elem_type == onnx.TensorProto.INT64
    dims = [d.dim_param or d.dim_value for d in inputs["noise"].shape.dim]
    assert isinstance(dims[0], str) and dims[0] and dims[1:] == [1, 28, 28]
    assert [o.name for o in model.graph.output] == ["images"]


def test_parity_failure_reports_the_measured_error_and_writes_nothing(exported_copy):
    before = sorted(p.name for p in exported_copy.iterdir())
    manifest = (exported_copy / "bundle.json").read_text()
    with pytest.raises(ExportError, match=r"max abs error \d.*> 1e-12.*not written"):
        export_onnx(exported_copy, [1], atol=1e-12, log=lambda _: None)
    assert sorted(p.name for p in exported_copy.iterdir()) == before
    assert (exported_copy / "bundle.json").read_text() == manifest


@pytest.mark.parametrize("stage", ["parity", "record_export"])
def test_interrupted_export_leaves_previous_bundle_loadable(exported_copy, monkeypatch, stage):
    before = onnx_entries(exported_copy)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(manifest_mod if stage == "record_export" else export_mod, stage, interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(exported_copy, [1], opset=17, log=lambda _: None)
    assert onnx_entries(exported_copy) == before
    assert not list(exported_copy.glob(".*.tmp"))
    engine = OrtEngine(Bundle(exported_copy))  # verifies every recorded export's sha256
    assert engine.run("student", 1, *_inputs(2)).shape == (2, 1, 28, 28)


def test_reexport_replaces_the_entry_and_removes_the_old_file(exported_copy):
    old = next(e for e in onnx_entries(exported_copy) if e["steps"] == 1)
    (new,) = export_onnx(exported_copy, [1], opset=17, log=lambda _: None)
    entries = [e for e in onnx_entries(exported_copy) if e["steps"] == 1]
    assert entries == [new] and new["opset"] == 17
    assert new["file"] != old["file"] and not (exported_copy / old["file"]).exists()
    assert (exported_copy / new["file"]).is_file()


def test_export_validates_its_arguments(tiny_bundle_dir):
    with pytest.raises(BundleError, match="steps=3 is not in bundle"):
        export_onnx(tiny_bundle_dir, [3])
    with pytest.raises(ExportError, match="unknown exporter 'jit'"):
        export_onnx(tiny_bundle_dir, [1], exporter="jit")
    with pytest.raises(ExportError, match="max_batch"):
        export_onnx(tiny_bundle_dir, [1], max_batch=0)


def test_cli_rejects_bad_combinations_in_one_line(tiny_bundle_dir, capsys):
    assert main(["export", "--bundle", str(tiny_bundle_dir), "--format", "onnx", "--fp16"]) == 2
    assert main(["export", "--bundle", str(tiny_bundle_dir), "--format", "onnx",
                 "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--fp16" in err[0] and "steps=3" in err[1]


@pytest.mark.slow
def test_dynamo_exporter_also_meets_parity(exported_copy):
    (entry,) = export_onnx(exported_copy, [1], exporter="dynamo", log=lambda _: None)
    assert entry["exporter"] == "dynamo" and entry["parity_max_abs"] <= 1e-4
    assert OrtEngine(Bundle(exported_copy)).run("student", 1, *_inputs(3)).shape[0] == 3


def _inputs(n: int):
    import torch

    return torch.randn(n, 1, 28, 28), torch.full((n,), 10, dtype=torch.int64)
