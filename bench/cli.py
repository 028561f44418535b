"""`halfstep bench`: the subcommand, its one table, the JSON and the plot (see bench/run.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from halfstep.distill.cli_args import positive_ints

from .targets import format_target


def _ints(text: str) -> tuple[int, ...]:
    return tuple(positive_ints(text))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark a server and the engines (latency, throughput, floor, peer)",
        description="Measure HTTP latency and throughput of a halfstep server (--url, loopback "
                    "only unless --allow-remote, or --bundle: started on a free loopback port "
                    "and stopped at the end), the in-process engines, the FLOP floor and the "
                    "diffusers DDIMScheduler baseline, in one run. Every loop is bounded.")
    p.add_argument("--url", help="a running server, http://HOST:PORT")
    p.add_argument("--bundle", help="bundle directory: serve it here (or, with --url, the "
                                    "server's bundle for the in-process measurements)")
    p.add_argument("--backend", default="auto", help="server backend when started here")
    p.add_argument("--allow-remote", action="store_true", help="permit a non-loopback --url")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: steps 1,4, 5 requests per cell, 3 repeats, 10 s per HTTP "
                        "cell, deadline ramp up to 32 clients")
    p.add_argument("--steps", type=_ints, default=(1, 2, 4, 8, 16), help="student steps")
    p.add_argument("--requests", type=int, default=30, help="requests per latency cell")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per in-process cell")
    p.add_argument("--batches", type=_ints, default=(1, 64), help="engine batch sizes")
    p.add_argument("--concurrency", type=_ints, default=(1, 8, 32))
    p.add_argument("--teacher-steps", type=int, default=256,
                   help="the teacher reference step count (capped at the bundle's maximum)")
    p.add_argument("--cell-budget-s", type=float, default=60.0,
                   help="wall-clock cap per HTTP cell")
    p.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True,
                   help="the mixed-load cell: student p99 while teacher n=64 requests at "
                        "--teacher-steps run back to back, against the p50 without them "
                        "(a server started here gets --max-request-s/--timeout-s to admit them)")
    p.add_argument("--mixed-clients", type=int, default=16,
                   help="closed-loop student clients of the mixed cell")
    p.add_argument("--deadline-ms", type=int, default=100,
                   help="the deadline cell: raise plain load until it misses this, then send "
                        "deadline_ms requests under it (0: no deadline cell)")
    p.add_argument("--deadline-max-clients", type=int, default=64,
                   help="top of the deadline cell's load ramp (8, 16, ... up to this; "
                        "--quick: at most 32)")
    p.add_argument("--json", help="write the full result here")
    p.add_argument("--plot", help="write latency vs steps (PNG) here")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import os

    from .run import BenchConfig, run_bench

    cfg = BenchConfig(url=args.url, bundle=args.bundle, backend=args.backend,
                      allow_remote=args.allow_remote, quick=args.quick, steps=args.steps,
                      requests=args.requests, repeats=args.repeats, batches=args.batches,
                      concurrencies=args.concurrency, cell_budget_s=args.cell_budget_s,
                      teacher_reference=args.teacher_steps, mixed=args.mixed,
                      mixed_clients=args.mixed_clients, deadline_ms=args.deadline_ms,
                      deadline_max_clients=args.deadline_max_clients,
                      api_key=os.environ.get("HALFSTEP_API_KEY"))
    result = run_bench(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        write_plot(result, args.plot)
    return 0


def _ms(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _row(section: str, what: str, steps, batch, p: dict, other: str) -> str:
    """One table row from a percentiles dict (p50_ms, p95_ms, p99_ms)."""
    return (f"{section:<11} {what:<24} {steps:>5} {batch:>5} {_ms(p.get('p50_ms')):>11} "
            f"{_ms(p.get('p95_ms')):>9} {_ms(p.get('p99_ms')):>9} {other:>22}")


def format_table(r: dict) -> str:
    """One fixed-width table: a section per measurement, then the targets and the skips."""
    m = r["machine"]
    lines = [f"halfstep bench on {m['device']}, {m['platform']}, torch {m['torch']}, "
             f"load {m['load_average']}; server backend {r['server'].get('backend')}"]
    teacher = [x for x in r["latency"] if x["model"] == "teacher"]
    ref = max(teacher, key=lambda x: x["steps"]) if teacher else None
    head = f"{'section':<11} {'what':<24} {'steps':>5} {'batch':>5} {'p50/median':>11} " \
           f"{'p95':>9} {'p99':>9} {'other':>22}"
    lines += [head, "-" * len(head)]
    for x in r["latency"]:
        speed = f"{ref['p50_ms'] / x['p50_ms']:.1f}x vs teacher{ref['steps']}" \
            if ref and x["p50_ms"] and x["model"] == "student" else \
            f"srv engine {_ms(x.get('server_engine_ms'))}"
        lines.append(f"{'http n=1':<11} {x['model']:<24} {x['steps']:>5} {1:>5} "
                     f"{_ms(x['p50_ms']):>11} {_ms(x['p95_ms']):>9} {_ms(x['p99_ms']):>9} "
                     f"{speed:>22}")
    for t in r["throughput"]:
        lines.append(f"{'throughput':<11} {'concurrency ' + str(t['concurrency']):<24} "
                     f"{t['steps']:>5} {'-':>5} {'-':>11} {'-':>9} {'-':>9} "
                     f"{str(t['images_per_s']) + ' img/s, b=' + str(t['mean_batch']):>22}")
    lines += _scheduler_rows(r)
    for e in r.get("engines", []):
        lines.append(f"{'engine':<11} {e['backend']:<24} {e['steps']:>5} {e['batch']:>5} "
                     f"{_ms(e['median_ms']):>11} {'-':>9} {'-':>9} {'':>22}")
    for f in r.get("floor", []):
        lines.append(f"{'floor':<11} {f['backend']:<24} {f['steps']:>5} {f['batch']:>5} "
                     f"{'-':>11} {'-':>9} {'-':>9} "
                     f"{str(f['achieved_gflops']) + ' GF/s ' + format(f['fraction'], '.1%'):>22}")
    for d in r.get("diffusers", []):
        lines.append(f"{'diffusers':<11} {'DDIMScheduler trailing v':<24} {d['steps']:>5} "
                     f"{d['batch']:>5} {_ms(d['median_ms']):>11} {'-':>9} {'-':>9} {'':>22}")
    if r.get("floor"):
        lines.append(f"matmul rate: {r['floor'][0]['matmul_gflops']} GFLOP/s (float32, measured)")
    for x in r["latency"]:
        lines.append(f"time split {x['model']} {x['steps']}: HTTP mean {_ms(x['mean_ms'])} ms = "
                     f"engine in server {_ms(x.get('server_engine_ms'))} + queue "
                     f"{_ms(x.get('server_queue_ms'))} + HTTP/encode/client rest")
    lines += _scheduler_notes(r)
    lines.append(_client_cpu_line(r))
    lines += [format_target(name, t) for name, t in r["targets"].items()]
    for what, why in r["skipped"].items():
        lines.append(f"skipped {what}: {why}")
    return "\n".join(lines)


def _scheduler_rows(r: dict) -> list[str]:
    """The rows of the deadline ramp and probes and of the mixed cell."""
    rows = []
    d = r.get("deadline")
    if d:
        for x in d["ramp"]:
            rows.append(_row("deadline", f"plain, {x['clients']} clients", d["steps"], 1, x,
                             f"{_pct(x['over_limit_share'])} over {d['deadline_ms']}ms"))
        if d.get("applicable"):
            p = d["probes"]
            rows.append(_row("deadline", f"deadline_ms={d['deadline_ms']}", f"<={d['steps']}", 1,
                             p, f"{_pct(p['in_time_share'])} in, {_pct(p['refused_503_share'])}"
                                " 503"))
    m = r.get("mixed")
    if m:
        solo, mixed = m["solo"], m.get("mixed")
        rows.append(_row("mixed", f"{m['clients']} clients alone", m["steps"], 1, solo,
                         f"{solo['n']} ok of {solo['sent']}"))
        if mixed:
            rows.append(_row("mixed", f"{m['clients']} clients + teacher", m["steps"], 1, mixed,
                             f"{mixed['n']} ok of {mixed['sent_all']}"))
    return rows


def _scheduler_notes(r: dict) -> list[str]:
    """The statuses and counts behind those rows, in words."""
    lines = []
    d = r.get("deadline")
    if d and not d.get("applicable"):
        lines.append(f"deadline: not applicable on this machine: {d['reason']}")
    elif d:
        p, load = d["probes"], d["load"]
        lines.append(
            f"deadline: {d['clients']} plain clients kept running (p50 {_ms(load['p50_ms'])}, "
            f"p99 {_ms(load['p99_ms'])} ms, statuses {load['statuses']}) while "
            f"{d['probe_clients']} clients sent {p['sent']} requests with deadline_ms="
            f"{d['deadline_ms']}: statuses {p['statuses']}; {p['in_time']} of {p['answered']} "
            f"answered within {d['deadline_ms']} ms; steps ran {p['steps_ran']}")
    m = r.get("mixed")
    if m:
        t = m["teacher"]
        lines.append(
            f"mixed: teacher n={m['teacher_n']} x {m['teacher_steps']} steps back to back: "
            f"{t['completed']} completed (p50 {_ms(t['p50_ms'])} ms), statuses {t['statuses']}"
            + (f", refused: {t['refusal']}" if t["refusal"] else "")
            + f"; solo statuses {m['solo']['statuses']}")
        if m.get("mixed"):
            x = m["mixed"]
            lines.append(f"mixed: {x['sent']} of {x['sent_all']} {m['steps']}-step requests over "
                         f"{x['wall_s']} s were sent while a teacher request was in flight (the "
                         f"p99 is theirs); all statuses {x['statuses_all']}; waited "
                         f"{m['settle_s']} s after for the engine to go quiet")
            if not t["completed"]:
                lines.append("mixed: no teacher request finished within the cell (its count or "
                             "--cell-budget-s came first); the one in flight was cancelled")
    return lines


def _client_cpu_line(r: dict) -> str:
    """The load generator's own CPU share per HTTP cell (CPU s of this process / wall s)."""
    parts = [f"{x['model']} {x['steps']} {x.get('client_cpu')}" for x in r["latency"]]
    parts += [f"c={t['concurrency']} {t.get('client_cpu')}" for t in r["throughput"]]
    d, m = r.get("deadline"), r.get("mixed")
    if d:
        parts += [f"ramp c={x['clients']} {x['client_cpu']}" for x in d["ramp"]]
        if d.get("applicable"):
            parts.append(f"deadline probes {d['client_cpu']}")
    if m:
        parts.append(f"mixed alone {m['solo']['client_cpu']}")
        if m.get("mixed"):
            parts.append(f"mixed + teacher {m['mixed']['client_cpu']}")
    return "client cpu (bench process CPU s / wall s; 1.0 = one core): " + ", ".join(parts)


def write_plot(r: dict, path: str) -> None:
    """Latency vs steps, log-log: halfstep HTTP p50, teacher HTTP p50, diffusers in process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_model = {m: [x for x in r["latency"] if x["model"] == m] for m in ("student", "teacher")}
    series = [("halfstep student (HTTP p50)", by_model["student"], "p50_ms"),
              ("teacher (HTTP p50)", by_model["teacher"], "p50_ms"),
              ("diffusers DDIM (in process)", r.get("diffusers", []), "median_ms")]
    for label, rows, key in series:
        rows = [x for x in rows if x.get(key)]
        if rows:
            ax.plot([x["steps"] for x in rows], [x[key] for x in rows], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("latency, ms (batch 1)")
    ax.set_title(f"halfstep bench: {r['machine']['device']}")
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
