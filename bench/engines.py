"""Benchmark engines: eager vs CUDA graph over steps x batch, and the teacher at many steps.

    python -m halfstep.bench.engines [--bundle DIR] [--json OUT.json]
        [--backends torch,cudagraph] [--steps 1,2,4,8] [--batches 1,8,64] [--teacher-steps 256]

Each cell is the median of `repeats` timed `engine.run` calls (noise in, CPU images out: what
the server sees) after untimed warm-up runs. Without --bundle, a random-weight bundle with the
reference MNIST architecture (ModelConfig defaults) is built in a temporary directory: weights
do not change the speed. `halfstep bench` times its engines with the same `bench_engines`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from halfstep.distill.bundle import Bundle, add_student, create_bundle
from halfstep.distill.cli_args import positive_ints
from halfstep.distill.denoiser import Denoiser, ModelConfig
from halfstep.distill.sampling import noise_for_seeds
from halfstep.engines.base import Engine, EngineError
from halfstep.engines.factory import make_engine

from .targets import TARGET_GRAPH_SPEEDUP, TARGET_TEACHER_RATIO, find_row

BACKENDS = ("torch", "cudagraph")  # the default comparison; any make_engine backend is accepted


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


def cuda_sync() -> None:
    """Wait for queued GPU work, so a timer around a call includes its kernels."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], repeats: int, warmup_runs: int = 1) -> list[float]:
    """Seconds per fn() for `repeats` timed calls after `warmup_runs` untimed ones."""
    if repeats < 1 or warmup_runs < 0:
        raise ValueError("repeats must be >= 1, warmup_runs >= 0")
    for _ in range(warmup_runs):
        fn()
    times = []
    for _ in range(repeats):
        cuda_sync()
        started = time.perf_counter()
        fn()
        cuda_sync()
        times.append(time.perf_counter() - started)
    return times


def time_run(engine: Engine, model: str, steps: int, batch: int, repeats: int,
             warmup_runs: int = 1) -> list[float]:
    """Seconds per engine.run (noise in, CPU images out) on `batch` seeded inputs."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    noise = noise_for_seeds(list(range(batch)), engine.bundle.image_shape)
    labels = torch.arange(batch, dtype=torch.int64) % (engine.bundle.num_labels + 1)
    return time_calls(lambda: engine.run(model, steps, noise, labels), repeats, warmup_runs)


def device_label() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bench_engines(bundle: Bundle, backends=BACKENDS, steps_list=(1, 2, 4, 8), batches=(1, 8, 64),
                  teacher_steps: int | None = 256, repeats: int = 5, teacher_batches=(1,),
                  dtype: str = "float32", warmups: dict | None = None,
                  skipped: dict | None = None, progress=None) -> list[dict]:
    """One row per (backend, model, steps, batch), engines built by `make_engine`.

    `warmups` gets each engine's warm-up report. With `skipped`, a backend that cannot be built
    or warmed up here is recorded in it (backend -> why) and left out instead of raising.
    `progress` gets a line before each cell.
    """
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
    device = device_label()
    rows = []
    for backend in backends:
        try:
            engine = make_engine(bundle, backend, buckets, dtype=dtype)
            report = engine.warmup([("student", s) for s in steps_list])
        except Exception as exc:  # e.g. a TensorRT engine that was never built
            if skipped is None:
                raise
            skipped[backend] = f"{type(exc).__name__}: {exc}"
            continue
        if warmups is not None:
            warmups[backend] = report
        for model, steps, batch in cells:
            if progress is not None:
                progress(f"bench: engine {backend} {model} {steps} steps batch {batch}")
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


def targets(rows: list[dict]) -> dict:
    """The goals the rows allow: cudagraph speedup over eager, and student vs teacher."""
    out = {}
    eager = find_row(rows, backend="torch", model="student", steps=4, batch=1)
    graph = find_row(rows, backend="cudagraph", model="student", steps=4, batch=1)
    if eager and graph:
        speedup = eager["median_ms"] / graph["median_ms"]
        out["cudagraph_speedup_4step_b1"] = {"value": round(speedup, 2),
                                             "target": TARGET_GRAPH_SPEEDUP,
                                             "met": speedup >= TARGET_GRAPH_SPEEDUP}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        student = find_row(rows, backend=backend, model="student", steps=4, batch=1)
        teacher = find_row(rows, backend=backend, model="teacher", batch=1)
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
        eager = find_row(rows, backend="torch", model=r["model"], steps=r["steps"],
                         batch=r["batch"])
        speedup = f"{eager['median_ms'] / r['median_ms']:.2f}" if eager else "-"
        lines.append(f"{r['backend']:<10} {r['dtype']:<8} {r['model']:<7} {r['steps']:>5} "
                     f"{r['batch']:>5} {r['median_ms']:>10.3f} {r['ms_per_image']:>9.3f} "
                     f"{r['images_per_s']:>9.1f} {speedup:>8}")
    for name, t in targets(rows).items():
        lines.append(f"target {name}: {t['value']}x (want >= {t['target']}x) "
                     f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


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
