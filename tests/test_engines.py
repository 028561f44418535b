"""Engines: eager reference, batch independence, padding, CUDA graph parity (gpu), benchmark."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch

from halfstep.bench.engines import bench_engines, format_table, main, targets
from halfstep.distill.bundle import Bundle, BundleError
from halfstep.distill.sampling import ddim_sample, noise_for_seeds
from halfstep.engines.base import EngineError
from halfstep.engines.cudagraph import (
    CudaGraphEngine,
    check_buckets,
    image_error,
    make_sampler,
    parse_dtype,
    within_tolerance,
)
from halfstep.engines.eager import CPU_MIN_ROWS, TorchEngine


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny nets on a busy 2-core machine: OpenMP spin-waiting made 2 threads ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


KEYS = [("student", 1), ("student", 2), ("student", 4), ("student", 8), ("teacher", 8)]


def batch(bundle, seeds, label=None):
    k = bundle.num_labels
    labels = torch.tensor([label if label is not None else s % (k + 1) for s in seeds])
    return noise_for_seeds(seeds, bundle.image_shape), labels


def ddim_by_hand(den, noise, labels, steps):
    """An independent DDIM loop: z_s = alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t."""
    z = noise.double()
    for i in range(steps, 0, -1):
        t, s = (torch.tensor(v, dtype=torch.float64) for v in (i / steps, (i - 1) / steps))
        x = den(z.float(), torch.full((len(z),), i / steps), labels).double().clamp(-1, 1)
        if i == 1:
            return x.float()
        (a_t, s_t), (a_s, s_s) = den.schedule.alpha_sigma(t), den.schedule.alpha_sigma(s)
        z = a_s * x + s_s * (z - a_t * x) / s_t


# -- CPU: the eager engine and the function the graph captures ------------------------------
@pytest.mark.parametrize("model,steps", KEYS)
def test_engine_matches_reference_ddim(tiny_bundle, model, steps):
    noise, labels = batch(tiny_bundle, [0, 1, 2, 3])  # CPU_MIN_ROWS: no padding rows
    den = tiny_bundle.denoiser(model, steps if model == "student" else None)
    out = TorchEngine(tiny_bundle).run(model, steps, noise, labels)
    ref = ddim_sample(den, noise, labels, steps, den.schedule)
    assert out.dtype == torch.float32 and out.shape == (4, *tiny_bundle.image_shape)
    assert torch.equal(out, ref)
    torch.testing.assert_close(out, ddim_by_hand(den, noise, labels, steps), atol=1e-4, rtol=0)
    # What CudaGraphEngine captures is exactly ddim_sample in float32.
    assert torch.equal(make_sampler(den, torch.float32, steps)(noise, labels), ref)


@pytest.mark.parametrize("model,steps", [("student", 1), ("student", 4), ("teacher", 8)])
def test_request_is_independent_of_its_batch(tiny_bundle, model, steps):
    engine = TorchEngine(tiny_bundle)
    alone = engine.run(model, steps, *batch(tiny_bundle, [123], label=3))
    others = list(range(1000, 1015))
    seeds = others[:7] + [123] + others[7:]
    noise, labels = batch(tiny_bundle, seeds)
    labels[7] = 3
    together = engine.run(model, steps, noise, labels)
    assert together.shape[0] == 16
    assert (together[7] - alone[0]).abs().max() <= 1e-5
    assert (together[6] - alone[0]).abs().max() > 1e-3  # another seed: another image


def test_padding_to_a_bucket_does_not_change_outputs(tiny_bundle):
    bucketed = TorchEngine(tiny_bundle, buckets=(1, 4, 16))
    assert bucketed.bucket_for(3) == 4 and bucketed.bucket_for(5) == 16
    noise, labels = batch(tiny_bundle, [7, 8, 9, 10, 11])
    padded = bucketed.run("student", 2, noise, labels)
    exact = TorchEngine(tiny_bundle).run("student", 2, noise, labels)
    assert padded.shape == exact.shape == (5, *tiny_bundle.image_shape)
    assert (padded - exact).abs().max() <= 1e-5
    for i in range(5):
        one = bucketed.run("student", 2, noise[i:i + 1], labels[i:i + 1])
        assert (one[0] - exact[i]).abs().max() <= 1e-5


def test_cpu_torch_pads_small_batches_to_min_rows(tiny_bundle):
    engine = TorchEngine(tiny_bundle, buckets=(1, 2, 4, 8, 16))
    assert engine.min_rows == CPU_MIN_ROWS == 4
    assert [engine.bucket_for(n) for n in (1, 3, 4, 5)] == [4, 4, 4, 8]
    assert engine.used_buckets() == [4, 8, 16]
    assert TorchEngine(tiny_bundle, buckets=(1, 2)).bucket_for(1) == 2  # capped at max batch
    assert TorchEngine(tiny_bundle, buckets=(1, 64)).bucket_for(1) == 4  # not padded to 64
    assert TorchEngine(tiny_bundle).bucket_for(1) == 4
    noise, labels = batch(tiny_bundle, list(range(16)))
    together = engine.run("student", 2, noise, labels)
    for i in (0, 9):
        alone = engine.run("student", 2, noise[i:i + 1], labels[i:i + 1])
        assert (alone[0] - together[i]).abs().max() <= 1e-5


def test_warmup_runs_every_bucket_and_times_each_key(tiny_bundle):
    engine = TorchEngine(tiny_bundle, buckets=(1, 8))
    seen = []
    run = engine.run
    engine.run = lambda model, steps, noise, labels: seen.append((steps, noise.shape[0])) or run(
        model, steps, noise, labels)
    report = engine.warmup([("student", 1), ("student", 4)])
    assert report["keys"] == 2 and report["warmup_s"] > 0
    # used buckets 4 and 8 (CPU torch pads to 4 rows), then one timed lone image per key
    assert seen == [(1, 4), (1, 8), (4, 4), (4, 8), (1, 1), (4, 1)]
    assert set(engine.warm_run_s) == {("student", 1), ("student", 4)}
    assert all(s > 0 for s in engine.warm_run_s.values())


def test_bad_run_arguments_are_clear(tiny_bundle):
    engine = TorchEngine(tiny_bundle, buckets=(1, 2))
    noise, labels = batch(tiny_bundle, [0, 1])
    with pytest.raises(BundleError, match="steps=3 is not in bundle.*1, 2, 4, 8"):
        engine.run("student", 3, noise, labels)
    with pytest.raises(BundleError, match="teacher steps must be in 1..64"):
        engine.run("teacher", 65, noise, labels)
    with pytest.raises(EngineError, match="noise must be"):
        engine.run("student", 1, noise[:, :, :5], labels)
    with pytest.raises(EngineError, match="labels must be in 0..10"):
        engine.run("student", 1, noise, torch.tensor([0, 11]))
    with pytest.raises(EngineError, match="exceeds the largest bucket 2"):
        engine.run("student", 1, *batch(tiny_bundle, [0, 1, 2]))


@pytest.mark.parametrize("buckets,message", [
    ((), "positive integers"), ((0, 1), "positive integers"), ((1, 1), "distinct"),
    ((1.5,), "positive integers"), (8, "sequence"), (("2",), "positive integers"),
])
def test_bad_buckets_are_clear(tiny_bundle, buckets, message):
    with pytest.raises(EngineError, match=message):
        check_buckets(buckets)
    with pytest.raises(EngineError, match=message):  # checked before CUDA, on any machine
        CudaGraphEngine(tiny_bundle, buckets=buckets)


def test_bucket_and_dtype_parsing(tiny_bundle):
    assert check_buckets(None) == (1, 2, 4, 8, 16, 32, 64)
    assert check_buckets([8, 1, 2]) == (1, 2, 8)
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(EngineError, match="float32, float16, bfloat16"):
        CudaGraphEngine(tiny_bundle, dtype="float64")
    with pytest.raises(EngineError, match="CUDA devices only"):
        CudaGraphEngine(tiny_bundle, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cudagraph_without_cuda_is_a_clear_error(tiny_bundle):
    from halfstep.engines.factory import make_engine

    builds = (lambda: CudaGraphEngine(tiny_bundle), lambda: make_engine(tiny_bundle, "cudagraph"))
    for build in builds:
        with pytest.raises(EngineError, match="needs a CUDA GPU") as info:
            build()
        assert "\n" not in str(info.value)


def test_reduced_precision_sampler_keeps_float32_state(tiny_bundle):
    den = tiny_bundle.denoiser("student", 2)
    noise, labels = batch(tiny_bundle, [0, 1])
    ref = make_sampler(den, torch.float32, 2)(noise, labels)
    low = make_sampler(copy.deepcopy(den).to(torch.bfloat16), torch.bfloat16, 2)(noise, labels)
    assert low.dtype == torch.float32
    err = image_error(low, ref)
    assert 0 < err["max_abs_error"] < 0.5 and err["psnr_db"] > 20
    assert image_error(ref, ref) == {"psnr_db": float("inf"), "max_abs_error": 0.0}
    assert within_tolerance(err, 20.0, 0.5) and not within_tolerance(err, 1000.0, 0.5)
    assert not within_tolerance(err, 0.0, 0.0)
    nan = image_error(torch.full_like(ref, float("nan")), ref)
    assert not within_tolerance(nan, 0.0, 2.0)  # overflowed half precision is refused


# -- CPU: the benchmark ------------------------------------------------------------------------
def test_bench_rows_table_and_cli(tiny_bundle, tiny_bundle_dir, tmp_path):
    rows = bench_engines(tiny_bundle, ["torch"], [1, 4], [1, 2], teacher_steps=6, repeats=2)
    assert [(r["model"], r["steps"], r["batch"]) for r in rows] == [
        ("student", 1, 1), ("student", 1, 2), ("student", 4, 1), ("student", 4, 2),
        ("teacher", 6, 1)]
    assert all(r["median_ms"] > 0 and r["repeats"] == 2 for r in rows)
    table = format_table(rows)
    assert table.splitlines()[0].startswith("backend") and "teacher" in table
    assert "torch_student4_vs_teacher6_b1" in targets(rows)
    out = tmp_path / "bench.json"
    assert main(["--bundle", str(tiny_bundle_dir), "--json", str(out), "--steps", "1",
                 "--batches", "2", "--teacher-steps", "0", "--repeats", "1"]) == 0
    assert [r["batch"] for r in json.loads(out.read_text())["rows"]] == [2]


def test_bench_bad_arguments(tiny_bundle, tiny_bundle_dir, capsys):
    with pytest.raises(BundleError, match="teacher steps must be in 1..64"):
        bench_engines(tiny_bundle, ["torch"], [1], [1], teacher_steps=256, repeats=1)
    with pytest.raises(EngineError, match="unknown backend"):
        bench_engines(tiny_bundle, ["tpu"], [1], [1], teacher_steps=None, repeats=1)
    assert main(["--bundle", str(tiny_bundle_dir), "--steps", "3", "--repeats", "1"]) == 2
    assert "steps=3 is not in bundle" in capsys.readouterr().err


# -- GPU: the captured graphs ------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_bundle(tiny_bundle_dir):
    """Its own Bundle: TorchEngine(device='cuda') moves the cached denoisers it is given."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none found)")
    return Bundle(tiny_bundle_dir)


@pytest.fixture(scope="module")
def graph_engine(gpu_bundle):
    engine = CudaGraphEngine(gpu_bundle, buckets=(1, 4, 16))
    engine.warmup()  # students are captured here only; the teacher runs eagerly
    return engine


@pytest.mark.gpu
@pytest.mark.parametrize("model,steps", KEYS)
def test_graph_equals_eager(gpu_bundle, graph_engine, model, steps):
    # Same buckets, so eager runs the same shapes (cuDNN picks per shape; TF32 is on by default).
    eager = TorchEngine(gpu_bundle, device="cuda", buckets=graph_engine.buckets)
    for n in (1, 3, 16):
        noise, labels = batch(gpu_bundle, list(range(10, 10 + n)))
        torch.testing.assert_close(graph_engine.run(model, steps, noise, labels),
                                   eager.run(model, steps, noise, labels), atol=1e-5, rtol=0)
    assert ((model, steps, 4) in graph_engine.captured) == (model == "student")


@pytest.mark.gpu
def test_graph_engine_teacher_chunks_equal_its_whole_run(gpu_bundle, graph_engine):
    noise, labels = batch(gpu_bundle, [3, 4, 5])
    z = noise
    for start in range(0, 8, 3):
        z = graph_engine.run_chunk("teacher", 8, z, labels, start, min(start + 3, 8))
    assert torch.equal(z, graph_engine.run("teacher", 8, noise, labels))
    assert not any(model == "teacher" for model, _, _ in graph_engine.captured)


@pytest.mark.gpu
def test_replays_never_return_stale_results(gpu_bundle, graph_engine):
    a, b = batch(gpu_bundle, [1, 2, 3]), batch(gpu_bundle, [4, 5, 6])
    first = graph_engine.run("student", 4, *a)
    kept = first.clone()
    second = graph_engine.run("student", 4, *b)
    assert (second - first).abs().max() > 1e-3
    assert torch.equal(first, kept)  # an earlier result is never overwritten by a later replay
    torch.testing.assert_close(graph_engine.run("student", 4, *a), kept, atol=1e-5, rtol=0)
    eager = TorchEngine(gpu_bundle, "cuda", graph_engine.buckets).run("student", 4, *b)
    torch.testing.assert_close(second, eager, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_concurrent_callers_are_serialised(gpu_bundle, graph_engine):
    seeds = [[100 + 4 * i + j for j in range(1 + i % 4)] for i in range(12)]
    expected = [graph_engine.run("student", 2, *batch(gpu_bundle, s)) for s in seeds]
    inside, most, results = [0], [0], [None] * len(seeds)
    original = graph_engine._run

    def counting_run(*args):  # the real _run, counting how many run at once
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            return original(*args)
        finally:
            inside[0] -= 1

    graph_engine._run = counting_run
    try:
        def call(i):
            results[i] = graph_engine.run("student", 2, *batch(gpu_bundle, seeds[i]))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(seeds))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del graph_engine._run
    assert most[0] == 1
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_warmup_captures_every_graph_and_reports_memory(gpu_bundle):
    engine = CudaGraphEngine(gpu_bundle, buckets=(1, 2, 8))
    report = engine.warmup()
    assert report["graphs"] == len(engine.captured) == 4 * 3
    assert report["warmup_s"] > 0 and report["gpu_memory_reserved_mib"] > 0
    assert report["gpu_memory_added_mib"] >= 0
    assert set(engine.warm_run_s) == set(engine.default_keys())
    before = engine.captured
    engine.run("student", 8, *batch(gpu_bundle, [0, 1, 2]))
    assert engine.captured == before  # served from the warmed graphs, nothing captured lazily


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_is_checked_against_float32(gpu_bundle, dtype):
    strict = CudaGraphEngine(gpu_bundle, buckets=(1, 2), dtype=dtype, max_abs_error=0.0,
                             min_psnr_db=1000.0)
    with pytest.raises(EngineError, match=f"--dtype {dtype} changes student steps=1.*float32"):
        strict.warmup([("student", 1)])
    assert strict.captured == []
    loose = CudaGraphEngine(gpu_bundle, buckets=(1, 2), dtype=dtype, max_abs_error=2.0,
                            min_psnr_db=0.0)
    report = loose.warmup([("student", 4)])
    assert report["precision_vs_float32"]["student/4"]["psnr_db"] > 0
    images = loose.run("student", 4, *batch(gpu_bundle, [0, 1]))
    assert images.dtype == torch.float32 and images.abs().max() <= 1.0


def test_teacher_fallback_reports_either_parts_failure(tiny_bundle):
    from halfstep.engines.fallback import TeacherFallback

    students, teacher = TorchEngine(tiny_bundle), TorchEngine(tiny_bundle)
    engine = TeacherFallback(students, teacher)
    assert engine.failure is None
    teacher.failure = "capture failed"
    assert engine.failure == "capture failed"
