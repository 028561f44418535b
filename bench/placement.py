"""Where the ONNX Runtime engine should run on a CPU server: one table, one student, same inputs.

    python -m halfstep.bench.placement --bundle DIR [--steps 4] [--batch 16] [--seconds 20]
        [--json out.json]

Each placement runs batches of the same seeded inputs back to back for a fixed wall time, on
the bundle's ONNX export of one student (a cached exported copy when the bundle has none):

  a  one session, intra-op threads = cores, one Python thread (what the server runs)
  b  a, with intra-op spinning off ("session.intra_op.allow_spinning" = "0")
  c  one session, 1 intra-op thread
  d  N = cores single-threaded sessions, each on its own Python thread, separate batches
     (ORT releases the GIL during Run)
  e  a, in a spawned worker process fed through shared memory and a pipe; one batch in
     flight, timed from the copy in to the copy out
  f  a, with a "server load" thread in the same process doing the server's per-image work
     for every image the engine makes: draw its noise (noise_for_seeds), encode a PNG

Sessions come from `cpu_session`, OrtEngine's helper, so providers and options are the
server's. Every output of every placement is compared with a's output on the same inputs
(bitwise or within 1e-5, else it exits), so every row measures the same work. CPU is the
process's (and the worker's) CPU time over wall time x cores: spinning threads show up here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import statistics
import sys
import threading
import time
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import torch

from halfstep.distill.bundle import Bundle
from halfstep.distill.images import png_bytes, to_uint8
from halfstep.distill.sampling import noise_for_seeds
from halfstep.export.manifest import export_entries, verified_path
from halfstep.export.onnx import cpu_session, run_session

PROG = "python -m halfstep.bench.placement"
ATOL = 1e-5  # outputs may differ from a's by this much (thread counts change reduction order)
PLACEMENTS = {
    "a": "1 session, cores threads",
    "b": "a, spinning off",
    "c": "1 session, 1 thread",
    "d": "N sessions x 1 thread",
    "e": "worker process (shm)",
    "f": "a + server load thread",
}


def cores() -> int:
    return len(os.sched_getaffinity(0))


def session(path: Path, threads: int, spinning: bool = True):
    """OrtEngine's CPU session; spinning=False adds one session config entry. cpu_session has
    no hook for config entries, so its options are read back from a throwaway session rather
    than written out again here: b differs from a by that entry only."""
    made = cpu_session(path, threads)
    if spinning:
        return made
    import onnxruntime as ort

    opts = made.get_session_options()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=made.get_providers())


def student_onnx(bundle: Bundle, steps: int) -> Path:
    """The verified ONNX file of the `steps` student, exporting a cached copy if needed."""
    bundle.check_steps("student", steps)
    if steps not in export_entries(bundle, "onnx"):
        from halfstep.server.embedded import exported_copy

        bundle = exported_copy(bundle)  # prints its progress on stderr
    return verified_path(bundle, export_entries(bundle, "onnx")[steps])


class Loop:
    """One thread of batches: per-batch seconds, and the largest difference from a's output
    (a tensor, so that a NaN output stays NaN instead of vanishing in max())."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = reference
        self.latencies: list[float] = []
        self.worst = torch.zeros(())
        self.finished = 0.0  # perf_counter when its last batch ended

    def check(self, out: torch.Tensor) -> None:
        self.worst = torch.maximum(self.worst, (out - self.reference).abs().max())

    def run(self, batch_fn, deadline: float) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            out = batch_fn()
            self.finished = time.perf_counter()
            self.latencies.append(self.finished - started)
            self.check(out)


def row(key: str, threads: str, loops: list[Loop], batch: int, started: float,
        cpu_s: float, **extra) -> dict:
    """The row of one placement; exits when its outputs differ from a's."""
    wall = max(lp.finished for lp in loops) - started
    latencies = [t for lp in loops for t in lp.latencies]
    worst = float(torch.stack([lp.worst for lp in loops]).max())
    if not worst <= ATOL:  # also NaN
        raise SystemExit(f"{PROG}: error: placement {key} ({PLACEMENTS[key]}) differs from a "
                         f"by {worst:.3g} > {ATOL:g}: it is not computing the same images")
    images = batch * len(latencies)
    return {"placement": key, "name": PLACEMENTS[key], "threads": threads,
            "batches": len(latencies), "images": images, "wall_s": round(wall, 3),
            "images_per_s": round(images / wall, 2) if wall > 0 else 0.0,
            "p50_ms": round(1e3 * statistics.median(latencies), 3) if latencies else None,
            "cpu_percent": round(100 * cpu_s / (wall * cores()), 1) if wall > 0 else 0.0,
            "max_abs_diff": worst, "bitwise": worst == 0.0, **extra}


def single(key: str, path: Path, inputs, reference, seconds: float, threads: int,
           spinning: bool = True, load: bool = False) -> dict:
    """a, b, c and f: one session, batches back to back in this thread."""
    sess = session(path, threads, spinning)
    noise, labels = inputs
    loop = Loop(reference)
    loop.check(run_session(sess, noise, labels))  # warm-up, untimed
    server = ServerLoad(noise.shape[1:]) if load else None
    cpu0, started = time.process_time(), time.perf_counter()

    def batch_fn():
        out = run_session(sess, noise, labels)
        if server is not None:
            server.todo.put(out)  # the load thread does the per-image work for these
        return out

    loop.run(batch_fn, started + seconds)
    cpu_s = time.process_time() - cpu0
    extra = {}
    if server is not None:
        extra["load_images"] = server.stop()
    return row(key, str(threads), [loop], noise.shape[0], started, cpu_s, **extra)


class ServerLoad:
    """What the server does per image besides the engine, in a thread of the same process:
    the request's seeded noise and the PNG of its image. It is fed the engine's outputs, so it
    runs at the engine's rate; `stop` says how many images it got through (did it keep up?)."""

    def __init__(self, image_shape) -> None:
        self.image_shape = tuple(image_shape)
        self.todo: queue.Queue = queue.Queue()
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                images = self.todo.get(timeout=0.05)
            except queue.Empty:
                continue
            for pixels in to_uint8(images):
                noise_for_seeds([self.done], self.image_shape)
                png_bytes(pixels)
                self.done += 1
                if self._stop.is_set():
                    return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.done


def sessions_in_threads(path: Path, inputs, reference, seconds: float) -> dict:
    """d: N single-threaded sessions, one Python thread each, separate batches at once."""
    n = cores()
    noise, labels = inputs
    sessions = [session(path, 1) for _ in range(n)]
    loops = [Loop(reference) for _ in range(n)]
    for sess, loop in zip(sessions, loops):
        loop.check(run_session(sess, noise, labels))  # warm-up, untimed
    cpu0, started = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=loop.run,
                                args=(lambda s=sess: run_session(s, noise, labels),
                                      started + seconds))
               for sess, loop in zip(sessions, loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return row("d", f"1 x {n}", loops, noise.shape[0], started, time.process_time() - cpu0)


def _views(shm_in: SharedMemory, shm_out: SharedMemory, shape: tuple[int, ...]):
    """noise, labels and images as numpy arrays over the two shared blocks."""
    noise = np.ndarray(shape, np.float32, buffer=shm_in.buf)
    labels = np.ndarray(shape[:1], np.int64, buffer=shm_in.buf, offset=noise.nbytes)
    return noise, labels, np.ndarray(shape, np.float32, buffer=shm_out.buf)


def _worker(path: str, threads: int, names: tuple[str, str], shape: tuple[int, ...],
            conn) -> None:
    """e's process: owns the session; per request runs the batch in shared memory, writes the
    images back there and answers with its CPU time so far. None stops it."""
    shm_in, shm_out = SharedMemory(name=names[0]), SharedMemory(name=names[1])
    noise, labels, out = _views(shm_in, shm_out, shape)
    sess = session(Path(path), threads)
    conn.send("ready")
    while conn.recv() is not None:
        out[...] = run_session(sess, torch.from_numpy(noise), torch.from_numpy(labels)).numpy()
        conn.send(time.process_time())
    del noise, labels, out  # no views may outlive the blocks
    shm_in.close()
    shm_out.close()


def _answer(conn, proc):
    """The worker's next message; exits, not hangs, when the worker died."""
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise SystemExit(f"{PROG}: error: the engine worker process exited "
                             f"(code {proc.exitcode})")
    return conn.recv()


def worker_process(path: Path, inputs, reference, seconds: float) -> dict:
    """e: the engine in its own process; the hand-off (copy in, two messages, copy out) is
    inside every timed batch, one batch in flight as in the server's engine thread."""
    noise, labels = inputs
    shape = tuple(noise.shape)
    shm_in = SharedMemory(create=True, size=noise.numel() * 4 + labels.numel() * 8)
    shm_out = SharedMemory(create=True, size=noise.numel() * 4)
    ctx = mp.get_context("spawn")  # fork would copy this process's ORT and torch thread pools
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_worker, daemon=True,
                       args=(str(path), cores(), (shm_in.name, shm_out.name), shape, there))
    shared = list(_views(shm_in, shm_out, shape))  # cleared before the blocks are closed
    cpu_marks = []  # the worker's CPU time after each batch

    def batch_fn():
        np.copyto(shared[0], noise.numpy())
        np.copyto(shared[1], labels.numpy())
        here.send(1)
        cpu_marks.append(_answer(here, proc))
        return torch.from_numpy(shared[2].copy())

    try:
        proc.start()
        _answer(here, proc)  # "ready": imports and session load are not timed
        loop = Loop(reference)
        loop.check(batch_fn())  # warm-up, untimed
        cpu0, started = time.process_time(), time.perf_counter()
        loop.run(batch_fn, started + seconds)
        cpu_s = time.process_time() - cpu0 + cpu_marks[-1] - cpu_marks[0]
        here.send(None)
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.kill()
        shared.clear()  # a block cannot close while a view of it is alive
        for shm in (shm_in, shm_out):
            shm.close()
            shm.unlink()
    return row("e", str(cores()), [loop], shape[0], started, cpu_s)


def measure(path: Path, batch: int, seconds: float, num_labels: int,
            image_shape, placements: str = "abcdef", progress=None) -> list[dict]:
    """One row per placement, in order; a always runs first (it makes the reference)."""
    noise = noise_for_seeds(list(range(batch)), tuple(image_shape))
    labels = torch.arange(batch, dtype=torch.int64) % (num_labels + 1)
    inputs = (noise, labels)
    reference = run_session(session(path, cores()), noise, labels)
    runners = {
        "a": lambda: single("a", path, inputs, reference, seconds, cores()),
        "b": lambda: single("b", path, inputs, reference, seconds, cores(), spinning=False),
        "c": lambda: single("c", path, inputs, reference, seconds, 1),
        "d": lambda: sessions_in_threads(path, inputs, reference, seconds),
        "e": lambda: worker_process(path, inputs, reference, seconds),
        "f": lambda: single("f", path, inputs, reference, seconds, cores(), load=True),
    }
    rows = []
    for key in dict.fromkeys("a" + placements):
        if progress is not None:
            progress(f"placement {key}: {PLACEMENTS[key]}, {seconds:g} s")
        rows.append(runners[key]())  # each runner's sessions are gone before the next one
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'placement':<28} {'threads':>7} {'images/s':>9} {'ms/batch p50':>12} "
            f"{'CPU %':>6} {'x a':>5}  vs a")
    lines = [head, "-" * len(head)]
    base = rows[0]["images_per_s"] or float("nan")
    for r in rows:
        match = "bitwise" if r["bitwise"] else f"{r['max_abs_diff']:.1e}"
        lines.append(f"{r['placement']} {r['name']:<26} {r['threads']:>7} "
                     f"{r['images_per_s']:>9.1f} {r['p50_ms']:>12.2f} {r['cpu_percent']:>6.1f} "
                     f"{r['images_per_s'] / base:>5.2f}  {match}")
        if "load_images" in r:
            lines.append(f"  (f's load thread handled {r['load_images']} of {r['images']} "
                         "images)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="bundle directory")
    p.add_argument("--steps", type=int, default=4, help="the student to run")
    p.add_argument("--batch", type=int, default=16, help="images per batch")
    p.add_argument("--seconds", type=float, default=20.0, help="wall time per placement")
    p.add_argument("--placements", default="abcdef", help="which to run (a always runs)")
    p.add_argument("--json", help="write the settings and every row here")
    args = p.parse_args(argv)
    if args.batch < 1 or not args.seconds > 0:
        p.error("--batch must be >= 1 and --seconds > 0")
    if set(args.placements) - set(PLACEMENTS):
        p.error(f"--placements takes letters from {''.join(PLACEMENTS)}")
    try:
        import onnxruntime
    except ImportError:
        raise SystemExit(f"{PROG}: error: needs onnxruntime (pip install 'halfstep[onnx]')"
                         ) from None
    try:
        bundle = Bundle(args.bundle)
        path = student_onnx(bundle, args.steps)
    except (OSError, ValueError) as exc:  # BundleError is a ValueError: the user's to fix
        raise SystemExit(f"{PROG}: error: {exc}") from None
    torch.set_num_threads(1)  # torch only draws noise and compares here; keep it off the cores
    info = {"bundle": str(args.bundle), "onnx": path.name, "steps": args.steps,
            "batch": args.batch, "seconds": args.seconds, "cores": cores(),
            "onnxruntime": onnxruntime.__version__, "machine": platform.processor()
            or platform.machine(), "loadavg_before": list(os.getloadavg())}
    print(f"{PROG}: {bundle.name} student {args.steps} ({path.name}), batch {args.batch}, "
          f"{args.seconds:g} s each, {cores()} cores, load {info['loadavg_before']}",
          file=sys.stderr)
    rows = measure(path, args.batch, args.seconds, bundle.num_labels,
                   bundle.image_shape, args.placements,
                   progress=lambda line: print(line, file=sys.stderr, flush=True))
    info["loadavg_after"] = list(os.getloadavg())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**info, "rows": rows}, indent=2))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
