"""Two batches in flight: `engine.launch(...) -> PendingBatch`, `.result()` == `engine.run`.

CPU: the base (synchronous) launch on the eager engine, PendingBatch, and the buffer-set ring
(SlotRing) that CudaGraphEngine uses to alternate its two buffer sets. GPU (marked `gpu`,
skipped without CUDA): the double-buffered CUDA-graph launch, bit for bit against run, two
batches in flight while the GPU is busy, and the reuse guard of a buffer set.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from halfstep.distill.bundle import Bundle, BundleError
from halfstep.distill.sampling import noise_for_seeds
from halfstep.engines.cudagraph import BUFFER_SETS, CudaGraphEngine
from halfstep.engines.eager import TorchEngine
from halfstep.engines.fallback import TeacherFallback
from halfstep.engines.pipeline import PendingBatch, SlotRing, pad_rows


def batch(bundle, seeds):
    k = bundle.num_labels
    return noise_for_seeds(seeds, bundle.image_shape), torch.tensor([s % (k + 1) for s in seeds])


# -- CPU: the default launch on the eager engine -----------------------------------------------
@pytest.mark.parametrize("model,steps,n", [("student", 2, 1), ("student", 4, 6), ("teacher", 4, 3)])
def test_default_launch_gives_runs_images_bit_for_bit(tiny_bundle, model, steps, n):
    engine = TorchEngine(tiny_bundle, buckets=(1, 4, 8))
    noise, labels = batch(tiny_bundle, list(range(20, 20 + n)))
    pending = engine.launch(model, steps, noise, labels)
    assert pending.collected  # the default runs the batch inside launch
    images = pending.result()
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.shape == (n, *tiny_bundle.image_shape)  # exactly n rows, padding dropped
    assert torch.equal(images, engine.run(model, steps, noise, labels))
    assert pending.result() is images  # collected once, the same tensor every time


def test_two_launches_collected_in_reverse_order(tiny_bundle):
    engine = TorchEngine(tiny_bundle, buckets=(4, 8))
    a, b = batch(tiny_bundle, [1, 2, 3]), batch(tiny_bundle, [4, 5, 6, 7, 8])
    first = engine.launch("student", 2, *a)
    second = engine.launch("student", 2, *b)
    got_b, got_a = second.result(), first.result()
    assert torch.equal(got_a, engine.run("student", 2, *a))
    assert torch.equal(got_b, engine.run("student", 2, *b))
    assert got_a.shape[0] == 3 and got_b.shape[0] == 5
    assert (got_a - got_b[:3]).abs().max() > 1e-3  # other seeds: other images


def test_pipelined_loop_equals_one_run_per_batch(tiny_bundle):
    """The serving loop: launch batch k+1, then collect batch k."""
    engine = TorchEngine(tiny_bundle, buckets=(4, 8))
    batches = [batch(tiny_bundle, [100 + 10 * i + j for j in range(1 + i)]) for i in range(5)]
    results, pending = [], None
    for b in batches:
        launched = engine.launch("student", 1, *b)
        if pending is not None:
            results.append(pending.result())
        pending = launched
    results.append(pending.result())
    for got, b in zip(results, batches, strict=True):
        assert torch.equal(got, engine.run("student", 1, *b))


def test_launch_checks_its_inputs_like_run(tiny_bundle):
    engine = TorchEngine(tiny_bundle, buckets=(4,))
    noise, labels = batch(tiny_bundle, [0, 1])
    with pytest.raises(BundleError, match="steps=3 is not in bundle"):
        engine.launch("student", 3, noise, labels)
    with pytest.raises(ValueError, match="exceeds the largest bucket 4"):
        engine.launch("student", 1, *batch(tiny_bundle, list(range(5))))


def test_teacher_fallback_launches_on_the_right_part(tiny_bundle):
    students, teacher = TorchEngine(tiny_bundle, buckets=(4,)), TorchEngine(tiny_bundle)
    engine = TeacherFallback(students, teacher)
    noise, labels = batch(tiny_bundle, [9, 10])
    assert torch.equal(engine.launch("teacher", 3, noise, labels).result(),
                       teacher.run("teacher", 3, noise, labels))
    assert torch.equal(engine.launch("student", 8, noise, labels).result(),
                       students.run("student", 8, noise, labels))


def test_pad_rows_pads_with_the_first_row(tiny_bundle):
    noise, labels = batch(tiny_bundle, [3, 4, 5])
    padded, padded_labels = pad_rows(noise, labels, 8)
    assert padded.shape[0] == padded_labels.shape[0] == 8
    assert torch.equal(padded[:3], noise) and torch.equal(padded_labels[:3], labels)
    assert all(torch.equal(padded[i], noise[0]) for i in range(3, 8))
    assert (padded_labels[3:] == labels[0]).all()
    same, same_labels = pad_rows(noise, labels, 3)
    assert same is noise and same_labels is labels


# -- CPU: PendingBatch --------------------------------------------------------------------------
def test_pending_batch_finishes_once_across_threads():
    calls, gate = [], threading.Event()

    def finish():
        calls.append(1)
        gate.wait(5)
        return torch.arange(3.0)

    pending = PendingBatch(finish)
    assert not pending.collected
    results = [None] * 4

    def collect(i):
        results[i] = pending.result()

    threads = [threading.Thread(target=collect, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1 and pending.collected
    assert all(r is results[0] for r in results) and torch.equal(results[0], torch.arange(3.0))


def test_pending_batch_failure_is_raised_by_every_result():
    calls = []

    def finish():
        calls.append(1)
        raise RuntimeError("CUDA error: an illegal memory access")

    pending = PendingBatch(finish)
    pending.wait()  # what a reusing launch does: never raises
    assert pending.collected
    for _ in range(2):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            pending.result()
    assert len(calls) == 1


def test_interrupted_wait_leaves_the_batch_pending():
    outcomes = iter([KeyboardInterrupt(), None])

    def finish():
        exc = next(outcomes)
        if exc is not None:
            raise exc
        return torch.ones(2)

    pending = PendingBatch(finish)
    with pytest.raises(KeyboardInterrupt):
        pending.result()
    assert not pending.collected
    assert torch.equal(pending.result(), torch.ones(2))


# -- CPU: SlotRing over simulated buffer sets --------------------------------------------------
class Buffers:
    """Stand-in for a graph's buffer sets: `launch` writes the batch's images into its set's
    staging (as the device->host copy does), `finish` reads them back later (as result() does).
    A set reused before its batch was collected would hand that batch the later batch's data."""

    def __init__(self, ring: SlotRing) -> None:
        self.ring = ring
        self.staging = [torch.full((2,), float("nan")) for _ in range(ring.size)]
        self.slot_of: dict[int, int] = {}
        self.finished: list[int] = []

    def launch(self, value: int) -> PendingBatch:
        def start(i):
            self.staging[i].fill_(value)
            self.slot_of[value] = i

            def finish():
                self.finished.append(value)
                return self.staging[i].clone()

            return PendingBatch(finish)

        return self.ring.claim(start)


def images_of(value: int) -> torch.Tensor:
    return torch.full((2,), float(value))


def test_ring_alternates_between_its_two_sets():
    buffers = Buffers(SlotRing(2))
    for value in range(6):
        assert torch.equal(buffers.launch(value).result(), images_of(value))
    assert [buffers.slot_of[v] for v in range(6)] == [0, 1, 0, 1, 0, 1]
    assert buffers.ring.busy() == []


def test_ring_two_in_flight_collected_in_any_order():
    buffers = Buffers(SlotRing(2))
    a, b = buffers.launch(1), buffers.launch(2)
    assert buffers.slot_of == {1: 0, 2: 1} and buffers.ring.busy() == [0, 1]
    assert buffers.finished == []  # two batches in flight: nobody waited
    assert torch.equal(b.result(), images_of(2)) and torch.equal(a.result(), images_of(1))


def test_ring_prefers_a_free_set_over_waiting():
    buffers = Buffers(SlotRing(2))
    a, b = buffers.launch(1), buffers.launch(2)
    b.result()
    c = buffers.launch(3)  # set 1 is free (b collected): a keeps set 0 and is not waited for
    assert buffers.slot_of[3] == 1 and not a.collected and buffers.finished == [2]
    assert torch.equal(a.result(), images_of(1)) and torch.equal(c.result(), images_of(3))


def test_ring_waits_for_the_oldest_batch_before_reusing_its_set():
    buffers = Buffers(SlotRing(2))
    a, b = buffers.launch(1), buffers.launch(2)
    c = buffers.launch(3)  # both sets busy: a (the oldest) is finished, then set 0 reused
    assert buffers.slot_of[3] == 0 and buffers.finished == [1]
    assert a.collected and not b.collected and buffers.ring.busy() == [0, 1]
    d = buffers.launch(4)  # now b is the oldest busy set
    assert buffers.slot_of[4] == 1 and buffers.finished == [1, 2]
    for pending, value in ((d, 4), (a, 1), (c, 3), (b, 2)):
        assert torch.equal(pending.result(), images_of(value))  # none was overwritten


def test_ring_of_one_set_serialises():
    buffers = Buffers(SlotRing(1))
    a = buffers.launch(1)
    b = buffers.launch(2)
    assert a.collected and buffers.finished == [1] and buffers.slot_of == {1: 0, 2: 0}
    assert torch.equal(a.result(), images_of(1)) and torch.equal(b.result(), images_of(2))
    with pytest.raises(ValueError, match="at least one slot"):
        SlotRing(0)


def test_ring_frees_a_set_whose_launch_failed():
    ring = SlotRing(2)
    buffers = Buffers(ring)
    a = buffers.launch(1)

    def broken(i):
        raise RuntimeError("replay failed")

    with pytest.raises(RuntimeError, match="replay failed"):
        ring.claim(broken)
    assert ring.busy() == [0]
    b = buffers.launch(2)  # the failed launch's set (1) is free again: nobody is waited for
    assert buffers.slot_of[2] == 1 and not a.collected
    assert torch.equal(a.result(), images_of(1)) and torch.equal(b.result(), images_of(2))


# -- GPU: the double-buffered CUDA-graph launch ------------------------------------------------
KEYS = [("student", 2), ("student", 4)]
BUSY_CYCLES = 1_000_000_000  # torch.cuda._sleep: ~0.5-1 s of a busy compute stream


@pytest.fixture(scope="module")
def pipe_engine(tiny_bundle_dir):
    """Its own Bundle (TorchEngine on cuda moves cached denoisers), captured at warm-up."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none found)")
    engine = CudaGraphEngine(Bundle(tiny_bundle_dir), buckets=(1, 4, 16))
    report = engine.warmup(KEYS)
    assert report["buffer_sets"] == BUFFER_SETS == 2
    return engine


def keep_gpu_busy(engine) -> None:
    """Hold the engine's compute stream busy, so launches queue up behind it."""
    with torch.cuda.device(engine.device), torch.cuda.stream(engine._stream):
        torch.cuda._sleep(BUSY_CYCLES)


@pytest.mark.gpu
@pytest.mark.parametrize("steps", [s for _, s in KEYS])
def test_graph_launch_equals_run_bit_for_bit_in_both_sets(pipe_engine, steps):
    bundle = pipe_engine.bundle
    for n in (1, 3, 16):
        noise, labels = batch(bundle, list(range(40, 40 + n)))
        ref = pipe_engine.run("student", steps, noise, labels)
        first = pipe_engine.launch("student", steps, noise, labels)
        second = pipe_engine.launch("student", steps, noise, labels)  # the other buffer set
        ring = pipe_engine._graphs[("student", steps, pipe_engine.bucket_for(n))].ring
        assert sorted(ring.busy()) == [0, 1]
        for pending in (second, first):
            images = pending.result()
            assert images.dtype == torch.float32 and images.device.type == "cpu"
            assert images.shape == (n, *bundle.image_shape)
            assert torch.equal(images, ref)
        eager = TorchEngine(bundle, device="cuda", buckets=pipe_engine.buckets)
        torch.testing.assert_close(ref, eager.run("student", steps, noise, labels),
                                   atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_two_batches_in_flight_while_the_gpu_is_busy(pipe_engine):
    bundle = pipe_engine.bundle
    a, b = batch(bundle, [1, 2, 3]), batch(bundle, [4, 5])
    want_a, want_b = pipe_engine.run("student", 4, *a), pipe_engine.run("student", 4, *b)
    torch.cuda.synchronize()
    keep_gpu_busy(pipe_engine)
    started = time.perf_counter()
    first = pipe_engine.launch("student", 4, *a)
    second = pipe_engine.launch("student", 4, *b)  # enqueued while the first has not run
    launched_s = time.perf_counter() - started
    assert not pipe_engine._stream.query(), (
        f"the compute stream finished during the launches ({launched_s:.3f} s): launch waited")
    assert not pipe_engine.lock.locked()  # the lock is not held while the batches run
    assert not first.collected and not second.collected
    assert torch.equal(second.result(), want_b)
    assert torch.equal(first.result(), want_a)


@pytest.mark.gpu
def test_a_buffer_set_is_reused_only_after_its_batch_is_copied_out(pipe_engine):
    bundle = pipe_engine.bundle
    seeds = ([10, 11, 12, 13], [20, 21], [30, 31, 32], [40])  # all in bucket 4
    batches = [batch(bundle, s) for s in seeds]
    want = [pipe_engine.run("student", 2, *b) for b in batches]
    torch.cuda.synchronize()
    keep_gpu_busy(pipe_engine)
    a = pipe_engine.launch("student", 2, *batches[0])
    b = pipe_engine.launch("student", 2, *batches[1])
    assert not a.collected and not b.collected
    c = pipe_engine.launch("student", 2, *batches[2])  # both sets busy: waits for a
    assert a.collected and not b.collected
    d = pipe_engine.launch("student", 2, *batches[3])  # waits for b
    assert b.collected
    for pending, images in zip((d, c, b, a), want[::-1], strict=True):
        assert torch.equal(pending.result(), images)  # nothing overwritten by a later batch


@pytest.mark.gpu
def test_launches_from_many_threads(pipe_engine):
    bundle = pipe_engine.bundle
    seeds = [[200 + 5 * i + j for j in range(1 + i % 5)] for i in range(16)]
    steps = [KEYS[i % 2][1] for i in range(16)]
    want = [pipe_engine.run("student", s, *batch(bundle, x)) for s, x in zip(steps, seeds)]
    got = [None] * len(seeds)

    def call(i):
        pending = pipe_engine.launch("student", steps[i], *batch(bundle, seeds[i]))
        got[i] = pending.result()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for g, w in zip(got, want, strict=True):
        assert g is not None and torch.equal(g, w)


@pytest.mark.gpu
def test_teacher_launch_runs_synchronously(pipe_engine):
    noise, labels = batch(pipe_engine.bundle, [7, 8])
    pending = pipe_engine.launch("teacher", 6, noise, labels)
    assert pending.collected
    assert torch.equal(pending.result(), pipe_engine.run("teacher", 6, noise, labels))
    assert not any(model == "teacher" for model, _, _ in pipe_engine.captured)
