"""ONNX Runtime on CPU runs exactly the batch's rows (no bucket padding), and a row's bytes do
not depend on how many rows share its batch, whatever that count."""

from __future__ import annotations

import pytest
import torch

from halfstep.distill.bundle import Bundle

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'halfstep[onnx]')")

from halfstep.engines.onnxruntime import OrtEngine  # noqa: E402
from tests.test_export import exported_bundle_dir  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Bundle:
    return Bundle(exported_bundle_dir(tmp_path_factory))


def test_ort_cpu_runs_exact_rows_and_rows_are_batch_invariant(exported):
    engine = OrtEngine(exported, buckets=(1, 2, 4, 8, 16, 32))
    assert engine.batch_invariant
    assert [engine.rows_for("student", n) for n in (1, 3, 17)] == [1, 3, 17]
    assert engine.rows_for("teacher", 3) == 4  # the torch teacher keeps its 4-row floor
    noise, labels = torch.randn(17, *exported.image_shape), torch.arange(17) % 11
    together = engine.run("student", 2, noise, labels)
    for size in (1, 3, 5):
        part = engine.run("student", 2, noise[:size], labels[:size])
        assert torch.equal(part, together[:size])
