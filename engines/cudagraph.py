"""CudaGraphEngine: the unrolled N-step DDIM loop as one CUDA graph per (student steps, bucket).

Graphs are captured at warm-up only, for the students (a bounded set: students x buckets); the
teacher, whose step count clients choose, runs eagerly (and in chunks of steps, `run_chunk`).

One replay launches every kernel of all N steps, so a small batch no longer pays the Python
and launch overhead of each kernel. `ddim_sample` bakes the time grid and alpha/sigma in as
Python floats and builds each step's t with `torch.full` (a fill kernel whose value is a kernel
argument), and the UNet forward has no host syncs or data-dependent branches, so running it on
static buffers under capture records all N steps as one graph. Noise is drawn by the caller
(`noise_for_seeds`) outside the graph, so an image never depends on its batch.

Two batches in flight (`launch`): while batch k's images are copied back to the host, batch k+1
is already running. Each (steps, bucket) has BUFFER_SETS = 2 buffer sets, each with its own
captured graph, static device tensors (noise, labels, out) and pinned host staging:

- Two sets, because a set is busy until its batch is collected: the graph writes its `out`
  and the copy fills its pinned `host_out`, so batch k+1 needs other buffers while k's result
  is still being copied (or still waiting for its caller). A third launch of the same key
  waits for the oldest batch and moves its images out before reusing its set (`SlotRing`).
- Streams: the input copies (pinned host -> device) and every replay run in order on one
  compute stream (`_stream`, also the capture stream: replays of graphs sharing the memory
  pool must never overlap); the output copy (device -> pinned host) runs on a dedicated copy
  stream (`_copy_stream`) behind an event recorded after the replay, so it overlaps the next
  batch's replay. (An input copy on the copy stream would queue behind the previous batch's
  output copy, which waits for that batch's replay: the pipeline would serialise.)
- An event recorded on the copy stream after the device->host copy is what `result()` waits
  on (event.synchronize()): when it has fired the pinned `host_out` holds the images and the
  set's device buffers are no longer read. `launch` itself never synchronizes with the host.
- Each graph's final node copies the sampler's output into a static `out` allocated before
  capture, outside the shared graph pool: another graph's replay reuses the pool's memory
  for its intermediates and would clobber an output that lived there before it was copied out.
- The lock is held only while a batch is enqueued, so a second launch can enqueue while the
  first still runs on the GPU; `run` is `launch(...).result()` under the lock, so every replay
  (run or launch) goes through the same stream and buffer sets.

The pipelined path is verified on CPU only for its bookkeeping (engines/pipeline.py); the GPU
path is exercised by the gpu-marked tests (tests/test_engine_pipeline.py).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from halfstep.distill.bundle import Bundle
from halfstep.distill.sampling import ddim_sample, ddim_steps, noise_for_seeds

from .base import DEFAULT_BUCKETS, Engine, EngineError
from .pipeline import PendingBatch, SlotRing, pad_rows

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Reduced precision is accepted only if, on CHECK_SEEDS, every image stays this close to the
# float32 image (pixels on the [0, 1] scale): PSNR >= MIN_PSNR_DB and max |error| <= MAX_ABS_ERROR.
MIN_PSNR_DB = 35.0
MAX_ABS_ERROR = 0.1
CHECK_SEEDS = tuple(range(8))
WARMUP_ITERS = 2  # eager runs on the capture stream first, so cuDNN/cuBLAS set up outside capture
BUFFER_SETS = 2  # batches of one (steps, bucket) that can be in flight at once


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or the torch dtype itself) -> torch.dtype."""
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return value
    raise EngineError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")


def check_buckets(buckets: Iterable[int] | None) -> tuple[int, ...]:
    """Sorted, distinct, positive integer batch buckets; None gives DEFAULT_BUCKETS."""
    if buckets is None:
        return DEFAULT_BUCKETS
    if isinstance(buckets, (int, str)):
        raise EngineError(f"buckets must be a sequence of batch sizes, got {buckets!r}")
    values = tuple(buckets)
    if not values or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                             for b in values):
        raise EngineError(f"buckets must be positive integers, e.g. 1,2,4,8; got {values!r}")
    if len(set(values)) != len(values):
        raise EngineError(f"buckets must be distinct, got {values!r}")
    return tuple(sorted(values))


def make_sampler(den: torch.nn.Module, dtype: torch.dtype, steps: int,
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(noise, labels) -> images with `ddim_sample`; the network runs in `dtype`.

    z and the DDIM update stay in float32 (rounding errors would otherwise accumulate over the
    steps); only the denoiser's input is cast down and its x_hat cast back up.
    """
    denoise = reduced(den, dtype)
    return lambda noise, labels: ddim_sample(denoise, noise, labels, steps, den.schedule)


def reduced(den: torch.nn.Module, dtype: torch.dtype) -> Callable:
    """The denoiser in `dtype`, taking and giving float32 (z and the update stay float32)."""
    if dtype == torch.float32:
        return den
    return lambda z, t, labels: den(z.to(dtype), t, labels).float()


def image_error(images: torch.Tensor, reference: torch.Tensor) -> dict:
    """PSNR (dB) and max absolute error of images in [-1, 1], measured on the [0, 1] scale."""
    diff = (images.float() - reference.float()) / 2.0
    mse = float(diff.pow(2).mean())
    psnr = math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)
    return {"psnr_db": round(psnr, 2), "max_abs_error": round(float(diff.abs().max()), 5)}


def within_tolerance(err: dict, min_psnr_db: float, max_abs_error: float) -> bool:
    """True when image_error() is inside both bounds; NaN (e.g. float16 overflow) never is."""
    return err["psnr_db"] >= min_psnr_db and err["max_abs_error"] <= max_abs_error


@dataclass
class _Slot:
    """One buffer set: a graph captured on it, whose replay reads `noise`/`labels` and writes
    `out` (static device tensors, allocated outside the graph pool), and pinned host staging
    for the non_blocking copies in (`host_noise`, `host_labels`) and out (`host_out`)."""

    graph: torch.cuda.CUDAGraph
    noise: torch.Tensor
    labels: torch.Tensor
    out: torch.Tensor
    host_noise: torch.Tensor
    host_labels: torch.Tensor
    host_out: torch.Tensor


@dataclass
class _GraphSet:
    """One (model, steps, bucket): BUFFER_SETS slots, handed out by `ring`."""

    slots: list[_Slot]
    ring: SlotRing


class CudaGraphEngine(Engine):
    """BUFFER_SETS CUDA graphs per (model, steps, bucket), one shared memory pool, one compute
    stream, one copy stream, one lock held only while a batch is enqueued (`launch`)."""

    name = "cudagraph"
    pipelined = True  # launch() only enqueues: the scheduler keeps two batches in flight

    def __init__(self, bundle: Bundle, buckets: tuple[int, ...] | None = None,
                 dtype: str | torch.dtype = "float32", device: str | torch.device = "cuda",
                 min_psnr_db: float = MIN_PSNR_DB, max_abs_error: float = MAX_ABS_ERROR) -> None:
        buckets = check_buckets(buckets)  # arguments first, so their errors show on any machine
        self.dtype = parse_dtype(dtype)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise EngineError(f"device must be 'cuda' or 'cuda:N', got {device!r}") from None
        if self.device.type != "cuda":
            raise EngineError(f"the cudagraph backend runs on CUDA devices only, got {device!r}")
        if not torch.cuda.is_available():
            raise EngineError("the cudagraph backend needs a CUDA GPU and none is available; "
                              "use --backend torch (or auto)")
        if self.device.index is not None and self.device.index >= torch.cuda.device_count():
            raise EngineError(f"{device} does not exist: {torch.cuda.device_count()} GPU(s) found")
        super().__init__(bundle, buckets)
        self.min_psnr_db, self.max_abs_error = float(min_psnr_db), float(max_abs_error)
        with torch.cuda.device(self.device):
            # Captures and replays share one stream and one pool: replays run one after another
            # on the stream, so graphs sharing the pool never run concurrently.
            self._stream = torch.cuda.Stream()
            self._copy_stream = torch.cuda.Stream()  # device -> host copies of the images
            self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple[str, int, int], _GraphSet] = {}
        self._samplers: dict[tuple[str, int], Callable] = {}
        self._weights: dict[tuple[str, int], torch.nn.Module] = {}
        self.precision: dict[str, dict] = {}  # "model/steps" -> error vs float32 (reduced only)

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    @property
    def captured(self) -> list[tuple[str, int, int]]:
        """(model, steps, bucket) of every graph captured so far."""
        return sorted(self._graphs)

    # -- building -----------------------------------------------------------------------
    def _denoiser(self, model: str, steps: int, dtype: torch.dtype) -> torch.nn.Module:
        # A private copy: a graph bakes in parameter addresses, so nobody else may move them
        # (TorchEngine moves the bundle's cached denoiser with .to(device)).
        den = self.bundle.denoiser(model, steps if model == "student" else None)
        return copy.deepcopy(den).to(device=self.device, dtype=dtype)

    def _weights_for(self, model: str, steps: int) -> torch.nn.Module:
        weights = (model, steps if model == "student" else 0)  # one teacher for all steps
        if weights not in self._weights:
            self._weights[weights] = self._denoiser(model, steps, self.dtype)
        return self._weights[weights]

    def _sampler(self, model: str, steps: int) -> Callable:
        if model == "teacher":  # never cached: clients choose teacher steps freely
            return make_sampler(self._weights_for(model, steps), self.dtype, steps)
        if (model, steps) not in self._samplers:
            if self.dtype != torch.float32:
                self._check_precision(model, steps)
            self._samplers[(model, steps)] = make_sampler(self._weights_for(model, steps),
                                                          self.dtype, steps)
        return self._samplers[(model, steps)]

    def _check_precision(self, model: str, steps: int) -> None:
        """Refuse a reduced dtype whose images drift past the stated tolerance of float32."""
        n = len(CHECK_SEEDS)
        noise = noise_for_seeds(list(CHECK_SEEDS), self.bundle.image_shape, device=self.device)
        labels = torch.arange(n, device=self.device) % (self.bundle.num_labels + 1)
        images = {}
        for dtype in (torch.float32, self.dtype):
            den = self._denoiser(model, steps, dtype)
            images[dtype] = make_sampler(den, dtype, steps)(noise, labels)
            del den
        err = image_error(images[self.dtype], images[torch.float32])
        self.precision[f"{model}/{steps}"] = err
        if not within_tolerance(err, self.min_psnr_db, self.max_abs_error):
            raise EngineError(
                f"--dtype {self.dtype_name} changes {model} steps={steps} images too much vs "
                f"float32 (PSNR {err['psnr_db']} dB, max abs pixel error {err['max_abs_error']}; "
                f"tolerance PSNR >= {self.min_psnr_db} dB, max error <= {self.max_abs_error}); "
                "use --dtype float32")

    def _capture(self, model: str, steps: int, bucket: int) -> _GraphSet:
        """Warm up on the side stream, then capture the unrolled loop once per buffer set into
        the shared pool. Static tensors are allocated before capture (outside the pool)."""
        sampler = self._sampler(model, steps)
        shape = (bucket, *self.bundle.image_shape)
        k = self.bundle.num_labels
        static = [(torch.zeros(shape, device=self.device),
                   torch.full((bucket,), k, dtype=torch.int64, device=self.device),
                   torch.zeros(shape, device=self.device)) for _ in range(BUFFER_SETS)]
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for _ in range(WARMUP_ITERS):
                sampler(*static[0][:2])
        torch.cuda.current_stream().wait_stream(self._stream)
        slots = []
        for noise, labels, out in static:
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (callers preparing inputs, an eager engine) may use
            # the GPU while this thread captures; the captured region makes no unsafe calls.
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream,
                                  capture_error_mode="thread_local"):
                out.copy_(sampler(noise, labels))  # the sampler's own output lives in the pool
            slots.append(_Slot(graph, noise, labels, out,
                               host_noise=torch.zeros(shape, pin_memory=True),
                               host_labels=torch.full((bucket,), k, dtype=torch.int64,
                                                      pin_memory=True),
                               host_out=torch.zeros(shape, pin_memory=True)))
        self._graphs[(model, steps, bucket)] = _GraphSet(slots, SlotRing(BUFFER_SETS))
        return self._graphs[(model, steps, bucket)]

    # -- running ------------------------------------------------------------------------
    def chunkable(self, model: str) -> bool:
        return model == "teacher"

    def _run_chunk(self, model, steps, z, labels, start, stop):
        """The teacher, eagerly, a slice of its steps (the scheduler interleaves students)."""
        with torch.cuda.device(self.device):
            den = self._weights_for(model, steps)
            out = ddim_steps(reduced(den, self.dtype), z.to(self.device),
                             labels.to(self.device), steps, den.schedule, start, stop)
            return out.float().cpu()

    def _run(self, model, steps, noise, labels):
        """Under the lock (run()): a captured key is launched and collected at once."""
        with torch.cuda.device(self.device):
            graphs = self._graphs.get((model, steps, noise.shape[0]))
            if graphs is None:  # teacher, or a key not captured at warm-up: eager, never captured
                out = self._sampler(model, steps)(noise.to(self.device), labels.to(self.device))
                return out.float().cpu()
            return self._enqueue(graphs, noise, labels, noise.shape[0]).result()

    def launch(self, model: str, steps: int, noise: torch.Tensor,
               labels: torch.Tensor) -> PendingBatch:
        """Enqueue a batch on its captured graph and return at once; `.result()` waits for the
        images (the same bytes as run()). The lock is held only while enqueuing, and while
        waiting for the oldest batch of the same key when both of its buffer sets are still
        uncollected (SlotRing: a set is reused only after its images were copied out). The
        teacher and keys not captured at warm-up run synchronously (Engine.launch)."""
        self.check_inputs(model, steps, noise, labels)
        n = noise.shape[0]
        bucket = self.bucket_for(n)
        graphs = self._graphs.get((model, steps, bucket))
        if graphs is None:
            return super().launch(model, steps, noise, labels)
        noise, labels = pad_rows(noise, labels, bucket)
        with self.lock, torch.cuda.device(self.device):
            return self._enqueue(graphs, noise, labels.to(torch.int64), n)

    def _enqueue(self, graphs: _GraphSet, noise: torch.Tensor, labels: torch.Tensor,
                 n: int) -> PendingBatch:
        """Enqueue one bucket-sized batch on a free buffer set; no host sync (caller holds the
        lock). Compute stream: pinned inputs -> static inputs, replay, event `computed`. Copy
        stream: wait `computed`, static out -> pinned host_out, event `copied`. The returned
        batch waits on `copied`, then copies its n rows out of the pinned staging."""

        def start(i: int) -> PendingBatch:
            slot = graphs.slots[i]
            # Host copies into the pinned staging: the set's previous batch is collected
            # (SlotRing), so no copy of it still reads these buffers.
            slot.host_noise.copy_(noise)
            slot.host_labels.copy_(labels)
            with torch.cuda.stream(self._stream):
                slot.noise.copy_(slot.host_noise, non_blocking=True)
                slot.labels.copy_(slot.host_labels, non_blocking=True)
                slot.graph.replay()
                computed = torch.cuda.Event()
                computed.record(self._stream)
            self._copy_stream.wait_event(computed)
            with torch.cuda.stream(self._copy_stream):
                slot.host_out.copy_(slot.out, non_blocking=True)
                copied = torch.cuda.Event(blocking=True)  # result() sleeps, no spin
                copied.record(self._copy_stream)

            def finish() -> torch.Tensor:
                copied.synchronize()
                return slot.host_out[:n].clone()  # the set's staging is reused later

            return PendingBatch(finish)

        return graphs.ring.claim(start)

    def capture_students(self, keys: list[tuple[str, int]]) -> None:
        """Capture every student key x bucket (largest bucket first: one pool). The only place
        graphs are captured, so their number is bounded by students x buckets. A failed
        capture sets `failure` (the server's liveness and readiness turn off) and raises."""
        try:
            for bucket in reversed(self.buckets):
                for model, steps in keys:
                    if model == "student" and (model, steps, bucket) not in self._graphs:
                        self._capture(model, steps, bucket)
        except EngineError:
            raise  # a refused configuration (e.g. --dtype precision), not a broken device
        except Exception as exc:
            self.failure = f"CUDA graph capture failed: {type(exc).__name__}: {exc}"
            raise EngineError(self.failure) from exc

    def warmup(self, keys: list[tuple[str, int]] | None = None) -> dict:
        """Capture every student (model, steps) x bucket up front; the teacher runs eagerly."""
        keys = list(keys) if keys is not None else self.default_keys()
        for model, steps in keys:
            self.bundle.check_steps(model, steps)
        started = time.perf_counter()
        with self.lock, torch.cuda.device(self.device):
            torch.cuda.synchronize()
            allocated0, reserved0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            self.capture_students(keys)
            torch.cuda.synchronize()
            allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        self.time_lone_batches(keys)  # replays; outside the lock, which run() takes itself
        mib = 2.0**20
        return {
            "warmup_s": round(time.perf_counter() - started, 3), "keys": len(keys),
            "graphs": len(self._graphs), "buffer_sets": BUFFER_SETS,
            "buckets": list(self.buckets), "dtype": self.dtype_name,
            "gpu_memory_added_mib": round((allocated - allocated0) / mib, 1),
            "gpu_memory_reserved_added_mib": round((reserved - reserved0) / mib, 1),
            "gpu_memory_allocated_mib": round(allocated / mib, 1),
            "gpu_memory_reserved_mib": round(reserved / mib, 1),
            "precision_vs_float32": dict(self.precision),
        }
