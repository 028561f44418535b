"""`halfstep bench`: HTTP latency/throughput, in-process engines, the FLOP floor and the
diffusers baseline, measured in one run (http.py: HTTP; floor.py: in process).

Everything is measured; `targets` compares the ratios with their goals (bench/targets.py) and
reports the miss factor, never asserts.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from halfstep.distill.bundle import Bundle

from . import floor as bench_floor
from . import http as bench_load
from . import mixed as bench_mixed
from .engines import bench_engines
from .targets import (
    TARGET_FLOOR,
    TARGET_OVERHEAD,
    TARGET_RISING,
    TARGET_TEACHER_RATIO,
    TARGET_THROUGHPUT,
    TARGET_VS_DIFFUSERS,
    find_row,
    judge,
)

STEPS = (1, 2, 4, 8, 16)
QUICK_STEPS = (1, 4)
TEACHER_REFERENCE = 256
CONCURRENCIES = (1, 8, 32)
DEADLINE_MAX_CLIENTS, QUICK_DEADLINE_MAX_CLIENTS = 64, 32
ENGINE_FIELDS = ("backend", "steps", "batch", "median_ms", "repeats")  # per engine row


@dataclass
class BenchConfig:
    url: str | None = None
    bundle: str | None = None
    backend: str = "auto"
    allow_remote: bool = False
    quick: bool = False
    steps: tuple[int, ...] = STEPS
    requests: int = 30
    repeats: int = 10
    batches: tuple[int, ...] = (1, 64)
    concurrencies: tuple[int, ...] = CONCURRENCIES
    cell_budget_s: float = 60.0
    teacher_reference: int = TEACHER_REFERENCE
    mixed: bool = True  # the mixed-load cell (students while a teacher n=64 runs)
    mixed_clients: int = 16
    deadline_ms: int = 100  # the deadline cell's deadline; 0: no deadline cell
    deadline_max_clients: int = DEADLINE_MAX_CLIENTS  # the ramp's top load
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.url is None and self.bundle is None:
            raise ValueError("give --url (a running server) or --bundle (started here); with "
                             "both, the bundle is used for the in-process measurements only")
        if self.url is not None:
            self.url = bench_load.check_url(self.url, self.allow_remote)
        if self.quick:
            if tuple(self.steps) == STEPS:  # explicit --steps win over --quick's few
                self.steps = QUICK_STEPS
            self.requests, self.repeats = min(self.requests, 5), min(self.repeats, 3)
            self.cell_budget_s = min(self.cell_budget_s, 10.0)
            self.deadline_max_clients = min(self.deadline_max_clients, QUICK_DEADLINE_MAX_CLIENTS)
        for name in ("requests", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.steps or min(self.steps) < 1 or min(self.batches) < 1 \
                or min(self.concurrencies) < 1:
            raise ValueError("steps, batches and concurrencies must be positive integers")
        if self.teacher_reference < 1:
            raise ValueError(f"--teacher-steps must be >= 1, got {self.teacher_reference}")
        if self.cell_budget_s <= 0:
            raise ValueError(f"--cell-budget-s must be > 0, got {self.cell_budget_s}")
        if self.mixed_clients < 1 or self.deadline_max_clients < 1:
            raise ValueError("--mixed-clients and --deadline-max-clients must be >= 1")
        if not 0 <= self.deadline_ms <= 600_000:
            raise ValueError(f"--deadline-ms must be in 0..600000 (0: off), got {self.deadline_ms}")


def plan_steps(info: dict, wanted: tuple[int, ...], reference: int = TEACHER_REFERENCE
               ) -> tuple[list[int], list[int], dict]:
    """Student steps that exist, teacher steps (reference + the same counts), and skips."""
    have = info["student_steps"]
    students = [s for s in wanted if s in have]
    skipped = {f"student {s}": "no such student in the bundle" for s in wanted if s not in have}
    tmax = info.get("teacher_limit", info["teacher_max_steps"])  # the server's own cap
    if tmax < 1:
        skipped["teacher"] = "the server has the teacher turned off"
        return students, [], skipped
    if reference > tmax:
        skipped[f"teacher {reference}"] = (f"the server's teacher limit is {tmax}; "
                                           f"reference is {tmax}")
        reference = tmax
    teacher = sorted({reference, *(s for s in students if s <= tmax)})
    return students, teacher, skipped


def run_bench(cfg: BenchConfig, progress=print) -> dict:
    """One full run; the returned dict is what --json writes."""
    started = time.perf_counter()
    server_args = () if cfg.url or not cfg.mixed else bench_mixed.server_args(cfg.cell_budget_s)
    server = None if cfg.url else bench_load.LocalServer(cfg.bundle, cfg.backend,
                                                         extra_args=server_args)
    try:
        url = server.url if server else cfg.url
        info = _models(url, cfg.api_key)
        students, teacher, skipped = plan_steps(info, cfg.steps, cfg.teacher_reference)
        if not students:
            raise ValueError(f"none of steps {list(cfg.steps)} is a student of this bundle "
                             f"(students: {info['student_steps']})")
        tput_steps = 4 if 4 in students else students[0]
        http_result = asyncio.run(bench_load.run_http(
            url, students, teacher, list(cfg.concurrencies), cfg.requests, tput_steps,
            cfg.cell_budget_s, progress, cfg.api_key))
        scheduler = asyncio.run(bench_mixed.run_cells(
            url, cfg.api_key, steps=tput_steps, deadline_ms=cfg.deadline_ms,
            max_clients=cfg.deadline_max_clients, mixed=cfg.mixed,
            mixed_clients=cfg.mixed_clients, teacher_steps=max(teacher),
            teacher_n=min(bench_mixed.TEACHER_N, info.get("max_n", bench_mixed.TEACHER_N)),
            requests=cfg.requests, budget_s=cfg.cell_budget_s, progress=progress))
    finally:
        if server:
            server.close()
    result = {"machine": machine(), "config": {**asdict(cfg), "api_key": None},
              "server": http_result["server"], "server_args": list(server_args),
              "skipped": skipped, "latency": http_result["latency"],
              "throughput": http_result["throughput"], **scheduler}
    _skips_of_scheduler_cells(cfg, result)
    if cfg.bundle is None:
        result["skipped"]["in-process"] = "--url without --bundle: pass the server's bundle too"
    else:
        bundle = Bundle(cfg.bundle)
        backends, engine_skips = bench_floor.engine_backends(bundle)
        rows = bench_engines(bundle, backends, students, list(cfg.batches), teacher_steps=None,
                             repeats=cfg.repeats, skipped=engine_skips, progress=progress)
        engines = [{k: r[k] for k in ENGINE_FIELDS} for r in rows]
        result["skipped"].update({f"engine {k}": v for k, v in engine_skips.items()})
        result["engines"] = engines
        progress("bench: matmul rate and FLOP counts")
        rate = bench_floor.matmul_rate(seconds=0.5 if cfg.quick else 2.0)
        result["floor"] = bench_floor.floor_rows(bundle, engines, rate)
        result["diffusers"] = bench_floor.bench_diffusers(bundle, students, cfg.repeats,
                                                          progress=progress)
    result["targets"] = targets(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _skips_of_scheduler_cells(cfg: BenchConfig, result: dict) -> None:
    """Say which scheduler cell did not run, and why."""
    skipped = result["skipped"]
    if not cfg.mixed:
        skipped["mixed"] = "--no-mixed"
    elif result["mixed"].get("skipped"):
        hint = ("; a --url server must admit it (start it with --max-request-s 86400 "
                "--timeout-s 120, or lower --teacher-steps)" if cfg.url else "")
        skipped["mixed"] = result["mixed"]["skipped"] + hint
    if not cfg.deadline_ms:
        skipped["deadline"] = "--deadline-ms 0"


def _models(url: str, api_key: str | None) -> dict:
    """GET /v1/models; an unreachable or refusing server is the user's to fix (ValueError)."""
    httpx = bench_load.httpx
    try:
        with httpx.Client(base_url=url, timeout=30.0, headers=_auth(api_key)) as http:
            return http.get("/v1/models").raise_for_status().json()
    except (httpx.TransportError, httpx.HTTPStatusError) as exc:
        raise ValueError(f"cannot query {url}/v1/models: {exc}") from None


def _auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "device": bench_floor.device_name(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average": _loadavg()}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def targets(r: dict) -> dict:
    out = {}
    lat = r["latency"]
    s4 = find_row(lat, model="student", steps=4)
    teacher = [x for x in lat if x["model"] == "teacher"]
    ref = max(teacher, key=lambda x: x["steps"]) if teacher else None
    if s4 and ref and s4["p50_ms"] and ref["p50_ms"]:
        out["http_student4_vs_teacher"] = judge(
            ref["p50_ms"] / s4["p50_ms"], TARGET_TEACHER_RATIO, True,
            f"teacher {ref['steps']} steps p50 / student 4 steps p50")
    engines = r.get("engines") or []
    backend = r["server"].get("backend")
    e4 = find_row(engines, backend=backend, steps=4, batch=1)
    if s4 and e4 and s4["p50_ms"]:
        out["server_overhead_b1"] = judge(s4["p50_ms"] / e4["median_ms"], TARGET_OVERHEAD,
                                            False, f"HTTP p50 / {backend} engine, 4 steps")
    fastest = min((e for e in engines if e["steps"] == 4 and e["batch"] == 1),
                  key=lambda e: e["median_ms"], default=None)
    d4 = find_row(r.get("diffusers"), steps=4, batch=1)
    if fastest and d4:
        out["engine_vs_diffusers_4"] = judge(
            fastest["median_ms"] / d4["median_ms"], TARGET_VS_DIFFUSERS, False,
            f"{fastest['backend']} engine / diffusers DDIMScheduler, 4 steps, batch 1")
    top = max(r.get("throughput") or [], key=lambda t: t["concurrency"], default=None)
    rates = [e["batch"] / e["median_ms"] * 1e3 for e in engines
             if top and e["backend"] == backend and e["steps"] == top["steps"]]
    if top and rates and top["images_per_s"]:
        out["throughput_vs_engine"] = judge(
            top["images_per_s"] / max(rates), TARGET_THROUGHPUT, True,
            f"HTTP images/s at concurrency {top['concurrency']} / best in-process {backend} "
            f"images/s over batches, {top['steps']} steps")
    levels = sorted((t for t in r.get("throughput") or [] if t["images_per_s"]),
                    key=lambda t: t["concurrency"])
    if len(levels) > 1:
        pairs = [(b["images_per_s"] / a["images_per_s"], a["concurrency"], b["concurrency"])
                 for a, b in zip(levels, levels[1:])]
        worst = min(pairs)
        out["throughput_rising"] = judge(
            worst[0], TARGET_RISING, True,
            f"lowest images/s ratio between neighbouring concurrencies ({worst[2]} vs "
            f"{worst[1]} clients)")
    if "mixed" in r:
        out["mixed_p99_vs_solo_p50"] = bench_mixed.mixed_target(r["mixed"])
    if "deadline" in r:
        out["deadline_in_time_share"] = bench_mixed.deadline_target(r["deadline"])
    cpu64 = [f for f in r.get("floor") or [] if f["batch"] == 64]
    if cpu64 and not torch.cuda.is_available():
        best = max(cpu64, key=lambda f: f["fraction"])
        out["cpu_floor_b64"] = judge(best["fraction"], TARGET_FLOOR, True,
                                       f"{best['backend']} {best['steps']} steps, achieved / "
                                       "measured matmul FLOP/s")
    return out
