"""The goals the benchmarks compare their measured ratios with, the row lookup they use, and
how one target is judged and printed.

Each ratio is measured and reported with its goal; nothing here asserts.
"""

from __future__ import annotations

TARGET_GRAPH_SPEEDUP = 3.0  # eager / cudagraph engine time, 4-step student, batch 1: >= 3x
TARGET_TEACHER_RATIO = 50.0  # teacher at 256 steps / 4-step student, batch 1: >= 50x
TARGET_OVERHEAD = 1.15  # HTTP p50 / engine time at batch 1: <= 1.15x
TARGET_VS_DIFFUSERS = 0.5  # fastest engine / diffusers at 4 steps, batch 1: <= 0.5x
TARGET_FLOOR = 0.5  # CPU engine at batch 64: >= 50% of the matmul rate
TARGET_THROUGHPUT = 0.9  # HTTP images/s at the top concurrency / engine's best batched: >= 0.9x
TARGET_RISING = 1.0  # throughput at each concurrency / at the one below it: never falls
TARGET_MIXED_P99 = 3.0  # 4-step p99 while a teacher n=64 runs / 4-step p50 alone: <= 3x
TARGET_DEADLINE_SHARE = 0.99  # deadline_ms requests answered 200 within the deadline: >= 99%


def find_row(rows: list[dict] | None, **match) -> dict | None:
    """The first row whose fields equal every `match` value, or None."""
    return next((r for r in rows or [] if all(r.get(k) == v for k, v in match.items())), None)


def judge(value: float | None, goal: float, higher_is_better: bool, detail: str,
          unmeasured: str | None = None) -> dict:
    """One target's record. `value` None (with `unmeasured` saying why: a skipped cell, or a
    target that does not apply here) is never met: a missing number must not read as a pass."""
    want = ">=" if higher_is_better else "<="
    if value is None:
        return {"value": None, "goal": goal, "met": False, "want": want, "missed_by_x": None,
                "detail": detail, "unmeasured": unmeasured or "not measured"}
    met = value >= goal if higher_is_better else value <= goal
    miss = None  # also when value is 0 (say, no request in time): no finite factor
    if not met and value > 0:
        miss = round(goal / value if higher_is_better else value / goal, 2)
    return {"value": round(value, 3), "goal": goal, "met": met, "want": want,
            "missed_by_x": miss, "detail": detail}


def format_target(name: str, t: dict) -> str:
    """`target NAME: VALUE (want OP GOAL; DETAIL) met | NOT met (...)`, one line."""
    if t["value"] is None:
        verdict = f"NOT met ({t.get('unmeasured', 'not measured')})"
    elif t["met"]:
        verdict = "met"
    elif t["missed_by_x"] is None:
        verdict = "NOT met"
    else:
        verdict = f"NOT met (missed by {t['missed_by_x']}x)"
    value = "-" if t["value"] is None else t["value"]
    return f"target {name}: {value} (want {t['want']} {t['goal']}; {t['detail']}) {verdict}"
