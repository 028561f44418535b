"""Benchmark engines: eager vs CUDA graph over steps x batch, and the teacher at many steps.

    python -m halfstep.bench.engines [--bundle DIR] [--json OUT.json]
        [--backends torch,cudagraph] [--steps 1,2,4,8] [--batches 1,8,64] [--teacher-steps 256]

Each cell is the median of `repeats` timed `engine.run` calls (noise in, CPU images out: what
the server sees) after untimed warm-up runs. Without --bundle, a random-weight bundle with the
reference MNIST architecture (ModelConfig defaults) is built in a temporary directory: weights
do not change the speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from halfstep.distill.bundle import Bundle, add_student, create_bundle
from halfstep.distill.cli_args import positive_ints
from halfstep.distill.denoiser import Denoiser, ModelConfig
from halfstep.distill.sampling import noise_for_seeds
from halfstep.engines.base import Engine, EngineError
from halfstep.engines.eager import TorchEngine

BACKENDS = ("torch", "cudagraph")
TARGET_GRAPH_SPEEDUP = 3.0  # cudagraph vs eager, 4-step student, batch 1
TARGET_TEACHER_RATIO = 50.0  # 4-step student vs teacher at 256 steps, batch 1


def random_bundle(root: str | Path, student_steps=(1, 2, 4, 8), teacher_max_steps: int = 1024,
                  seed: int = 0) -> Path:
    """A bundle of random weights with the reference MNIST architecture (for timing only)."""
    torch.manual_seed(seed)
    den = Denoiser(ModelConfig())
    state = den.unet.state_dict()
    create_bundle(root, "random-mnist", den.config, state,
                  default_steps=min(256, teacher_max_steps),
                  max_steps=teacher_max_steps, configs={"note": "random weights, for benchmarks"})
    for n in student_steps:
        add_student(root, n, state, {"distilled_from": 2 * n})
    return Path(root)


def make_bench_engine(bundle: Bundle, backend: str, buckets: tuple[int, ...],
                      dtype: str = "float32") -> Engine:
    if backend == "torch":
        return TorchEngine(bundle, "cuda" if torch.cuda.is_available() else "cpu", buckets)
    if backend == "cudagraph":
        from halfstep.engines.cudagraph import CudaGraphEngine

        return CudaGraphEngine(bundle, buckets=buckets, dtype=dtype)
    raise EngineError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_run(engine: Engine, model: str, steps: int, batch: int, repeats: int,
             warmup_runs: int = 1) -> list[float]:
    """Seconds per engine.run for `repeats` timed calls after `warmup_runs` untimed ones."""
    k = engine.bundle.num_labels
    noise = noise_for_seeds(list(range(batch)), engine.bundle.image_shape)
    labels = torch.arange(batch, dtype=torch.int64) % (k + 1)
    for _ in range(warmup_runs):
        engine.run(model, steps, noise, labels)
    times = []
    for _ in range(repeats):
        _sync()
        started = time.perf_counter()
        engine.run(model, steps, noise, labels)
        _sync()
        times.append(time.perf_counter() - started)
    return times


def bench_engines(bundle: Bundle, backends=BACKENDS, steps_list=(1, 2, 4, 8), batches=(1, 8, 64),
                  teacher_steps: int | None = 256, repeats: int = 5, teacher_batches=(1,),
                  dtype: str = "float32", warmups: dict | None = None) -> list[dict]:
    """One row per (backend, model, steps, batch); `warmups` gets each engine's warm-up report."""
    if repeats < 1:
        raise EngineError(f"repeats must be >= 1, got {repeats}")
    for steps in steps_list:
        bundle.check_steps("student", steps)
    if teacher_steps:
        bundle.check_steps("teacher", teacher_steps)
    cells = [("student", s, b) for s in steps_list for b in batches]
    if teacher_steps:
        cells += [("teacher", teacher_steps, b) for b in teacher_batches]
    buckets = tuple(sorted({b for _, _, b in cells}))  # exact buckets: no padding in the timings
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    rows = []
    for backend in backends:
        engine = make_bench_engine(bundle, backend, buckets, dtype)
        report = engine.warmup([("student", s) for s in steps_list])
        if warmups is not None:
            warmups[backend] = report
        for model, steps, batch in cells:
            times = time_run(engine, model, steps, batch, repeats)
            median = statistics.median(times)
            rows.append({
                "backend": backend, "dtype": dtype if backend == "cudagraph" else "float32",
                "device": device, "model": model, "steps": steps, "batch": batch,
                "median_ms": round(1e3 * median, 3), "min_ms": round(1e3 * min(times), 3),
                "ms_per_image": round(1e3 * median / batch, 3),
                "images_per_s": round(batch / median, 1), "repeats": repeats,
            })
        del engine
    return rows


def _find(rows, backend, model, steps, batch):
    return next((r for r in rows if (r["backend"], r["model"], r["steps"], r["batch"])
                 == (backend, model, steps, batch)), None)


def targets(rows: list[dict]) -> dict:
    """The issue's targets where the rows allow them: graph speedup and student vs teacher."""
    out = {}
    eager, graph = _find(rows, "torch", "student", 4, 1), _find(rows, "cudagraph", "student", 4, 1)
    if eager and graph:
        speedup = eager["median_ms"] / graph["median_ms"]
        out["cudagraph_speedup_4step_b1"] = {"value": round(speedup, 2),
                                             "target": TARGET_GRAPH_SPEEDUP,
                                             "met": speedup >= TARGET_GRAPH_SPEEDUP}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        student = _find(rows, backend, "student", 4, 1)
        teacher = next((r for r in rows if r["backend"] == backend and r["model"] == "teacher"
                        and r["batch"] == 1), None)
        if student and teacher:
            ratio = teacher["median_ms"] / student["median_ms"]
            out[f"{backend}_student4_vs_teacher{teacher['steps']}_b1"] = {
                "value": round(ratio, 1), "target": TARGET_TEACHER_RATIO,
                "met": ratio >= TARGET_TEACHER_RATIO}
    return out


def format_table(rows: list[dict]) -> str:
    """A fixed-width table; `x eager` compares each row with torch on the same cell."""
    head = f"{'backend':<10} {'dtype':<8} {'model':<7} {'steps':>5} {'batch':>5} " \
           f"{'median ms':>10} {'ms/img':>9} {'img/s':>9} {'x eager':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        eager = _find(rows, "torch", r["model"], r["steps"], r["batch"])
        speedup = f"{eager['median_ms'] / r['median_ms']:.2f}" if eager else "-"
        lines.append(f"{r['backend']:<10} {r['dtype']:<8} {r['model']:<7} {r['steps']:>5} "
                     f"{r['batch']:>5} {r['median_ms']:>10.3f} {r['ms_per_image']:>9.3f} "
                     f"{r['images_per_s']:>9.1f} {speedup:>8}")
    for name, t in targets(rows).items():
        lines.append(f"target {name}: {t['value']}x (want >= {t['target']}x) "
                     f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def time_engine(engine: Engine, model: str, steps: int, batch: int = 1, repeats: int = 30,
                warmup: int = 3) -> float:
    """Median wall time of engine.run in seconds on fixed random inputs."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch and repeats must be >= 1, warmup >= 0")
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, *engine.bundle.image_shape, generator=gen)
    labels = torch.zeros(batch, dtype=torch.int64)
    for _ in range(warmup):
        engine.run(model, steps, noise, labels)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.run(model, steps, noise, labels)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ort_vs_torch(bundle: Bundle, steps: list[int] | None = None, batch: int = 1,
                 repeats: int = 30, threads: int | None = None) -> list[dict]:
    """Eager torch vs ONNX Runtime on the CPU, per student: median ms and speedup.

    With `threads`, both runtimes get the same intra-op thread count for a fair comparison.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        from halfstep.engines.onnxruntime import OrtEngine

        eager, ort_engine = TorchEngine(bundle), OrtEngine(bundle, threads=threads)
        rows = []
        for n in steps or bundle.student_steps:
            with torch.inference_mode():
                t_torch = time_engine(eager, "student", n, batch, repeats)
            t_ort = time_engine(ort_engine, "student", n, batch, repeats)
            rows.append({"steps": n, "batch": batch, "torch_ms": round(t_torch * 1e3, 3),
                         "onnxruntime_ms": round(t_ort * 1e3, 3),
                         "speedup": round(t_torch / t_ort, 2)})
        return rows
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    default_backends = "torch,cudagraph" if torch.cuda.is_available() else "torch"
    p = argparse.ArgumentParser(prog="python -m halfstep.bench.engines",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="bundle directory (default: random MNIST-sized weights)")
    p.add_argument("--json", help="write rows, targets and warm-up reports here")
    p.add_argument("--backends", default=default_backends, help=f"from {', '.join(BACKENDS)}")
    p.add_argument("--steps", type=positive_ints, default=[1, 2, 4, 8], help="student steps")
    p.add_argument("--batches", type=positive_ints, default=[1, 8, 64])
    p.add_argument("--teacher-steps", type=int, default=256, help="0 to skip the teacher")
    p.add_argument("--teacher-batches", type=positive_ints, default=[1])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", help="cudagraph dtype: float32|float16|bfloat16")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = args.bundle or random_bundle(Path(tmp) / "random-mnist",
                                                args.steps, max(args.teacher_steps, 1))
            bundle = Bundle(root)
            warmups: dict = {}
            rows = bench_engines(bundle, [b.strip() for b in args.backends.split(",") if b.strip()],
                                 args.steps, args.batches, args.teacher_steps, args.repeats,
                                 args.teacher_batches, args.dtype, warmups)
    except ValueError as exc:  # EngineError, BundleError: the user's to fix
        print(f"engine_bench: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "torch": torch.__version__, "bundle": args.bundle or "random (ModelConfig defaults)",
            "rows": rows, "targets": targets(rows), "warmup": warmups}, indent=2))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
