"""Engines under the hardened scheduler: the teacher in chunks of steps (bit-identical to a
whole run), and CUDA graphs captured only at warm-up, a failed capture flagging the engine."""

from __future__ import annotations

import threading

import pytest
import torch

from halfstep.distill.bundle import Bundle
from halfstep.distill.sampling import ddim_sample, ddim_steps, noise_for_seeds
from halfstep.engines.base import EngineError
from halfstep.engines.cudagraph import CudaGraphEngine
from halfstep.engines.eager import TorchEngine
from halfstep.engines.fallback import TeacherFallback


def chunked(engine, model, steps, noise, labels, size):
    z = noise
    for start in range(0, steps, size):
        z = engine.run_chunk(model, steps, z, labels, start, min(start + size, steps))
    return z


def test_ddim_steps_in_slices_is_ddim_sample_bit_for_bit(tiny_bundle_dir):
    den = Bundle(tiny_bundle_dir).denoiser("teacher")
    noise = noise_for_seeds([1, 2], (1, 28, 28))
    labels = torch.tensor([3, 10])
    whole = ddim_sample(den, noise, labels, 7, den.schedule)
    z = noise
    for start, stop in ((0, 3), (3, 4), (4, 7)):
        z = ddim_steps(den, z, labels, 7, den.schedule, start, stop)
    assert torch.equal(z, whole)
    with pytest.raises(ValueError):
        ddim_steps(den, noise, labels, 7, den.schedule, 3, 3)


@pytest.mark.parametrize("size", [1, 3, 8])
def test_teacher_chunks_equal_the_whole_run(tiny_bundle_dir, size):
    engine = TorchEngine(Bundle(tiny_bundle_dir), "cpu", buckets=(4, 8))
    noise, labels = noise_for_seeds([5, 6, 7], (1, 28, 28)), torch.tensor([1, 2, 10])
    whole = engine.run("teacher", 8, noise, labels)
    assert torch.equal(chunked(engine, "teacher", 8, noise, labels, size), whole)
    with pytest.raises(EngineError, match="outside"):
        engine.run_chunk("teacher", 8, noise, labels, 6, 9)


def test_teacher_fallback_chunks_on_its_teacher_engine(tiny_bundle_dir):
    bundle = Bundle(tiny_bundle_dir)
    teacher = TorchEngine(bundle, "cpu", buckets=(4,))

    class StudentsOnly(TorchEngine):
        def chunkable(self, model):
            return False

    fallback = TeacherFallback(StudentsOnly(bundle, "cpu", buckets=(4,)), teacher)
    assert fallback.chunkable("teacher") and not fallback.chunkable("student")
    noise, labels = noise_for_seeds([1], (1, 28, 28)), torch.tensor([10])
    assert torch.equal(chunked(fallback, "teacher", 4, noise, labels, 2),
                       teacher.run("teacher", 4, noise, labels))


def bare_graph_engine(bundle, buckets=(1, 2, 4)) -> CudaGraphEngine:
    """A CudaGraphEngine without a GPU: only the capture bookkeeping, for CPU tests."""
    engine = CudaGraphEngine.__new__(CudaGraphEngine)
    engine.bundle, engine.buckets, engine.lock = bundle, buckets, threading.Lock()
    engine._graphs, engine.failure, engine.warm_run_s = {}, None, {}
    return engine


def test_graphs_are_captured_for_students_only_and_bounded(tiny_bundle_dir, monkeypatch):
    engine = bare_graph_engine(Bundle(tiny_bundle_dir))
    monkeypatch.setattr(engine, "_capture", lambda m, s, b: engine._graphs.setdefault(
        (m, s, b), object()))
    keys = [("student", s) for s in (1, 2, 4, 8)] + [("teacher", 16), ("teacher", 64)]
    engine.capture_students(keys)
    engine.capture_students(keys)  # again: nothing new
    assert len(engine._graphs) == 4 * 3
    assert all(model == "student" for model, _, _ in engine._graphs)
    assert engine.chunkable("teacher") and not engine.chunkable("student")
    assert engine.failure is None


def test_a_failed_capture_flags_the_engine(tiny_bundle_dir, monkeypatch):
    engine = bare_graph_engine(Bundle(tiny_bundle_dir))

    def broken(model, steps, bucket):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(engine, "_capture", broken)
    with pytest.raises(EngineError, match="capture failed"):
        engine.capture_students([("student", 1)])
    assert "CUDA graph capture failed: RuntimeError: operation not permitted" in engine.failure
