"""Results of `halfstep eval`: the table, JSON, the quality-vs-steps plot, sample grids, and
the quality targets checked against the numbers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from halfstep.distill.images import png_bytes, to_uint8
from halfstep.distill.io import atomic_write_bytes, atomic_write_json

METRICS = ("fd_classifier", "fid")  # lower is better
NOT_MEASURED = "not measured"  # the detail of a target whose rows were not in the run
LABELS = {"fd_classifier": "FD-classifier", "fid": "FID", "label_accuracy": "label acc"}
METHOD_NAMES = {"real": "real data (floor)", "student": "student (distilled)",
                "ddim": "teacher DDIM", "dpm++": "teacher DPM-Solver++"}


def find(results: dict, method: str, steps: int | None) -> dict | None:
    return next((r for r in results["rows"] if r["method"] == method and r["steps"] == steps), None)


def _method_rows(results: dict, method: str) -> list[dict]:
    return sorted((r for r in results["rows"] if r["method"] == method), key=lambda r: r["steps"])


def teacher_best_row(results: dict, metric: str = "fd_classifier") -> dict | None:
    """The teacher row (DDIM or DPM-Solver++) with the best (lowest) value of `metric`."""
    rows = [r for r in results["rows"]
            if r["method"] in ("ddim", "dpm++") and r.get(metric) is not None]
    return min(rows, key=lambda r: r[metric]) if rows else None


def teacher_best(results: dict, metric: str) -> float | None:
    """The lowest value of a distance metric over every teacher row (DDIM and DPM-Solver++)."""
    row = teacher_best_row(results, metric)
    return None if row is None else row[metric]


def floor_ratio(value: float | None, best: float | None, floor: float | None) -> float | None:
    """How far a row is above the real-data floor, relative to the teacher's best:
    (x - floor) / (best - floor). 1.0 is the teacher's best, 0.0 the floor. A plain ratio x / best
    flatters rows when the floor is a large part of both (the finite-N bias under FD and FID)."""
    if value is None or best is None or floor is None or best <= floor:
        return None
    return (value - floor) / (best - floor)


def _floor(results: dict, metric: str) -> float | None:
    row = find(results, "real", None)
    return None if row is None else row.get(metric)


def format_table(results: dict) -> str:
    """One row per method and step count; per metric its ratio to the teacher's best (`x best`)
    and the floor-subtracted ratio (`-floor`, see floor_ratio)."""
    best = {m: teacher_best(results, m) for m in METRICS}
    floor = {m: _floor(results, m) for m in METRICS}
    head = (f"{'method':<22}{'steps':>6}{'FD-classifier':>15}{'x best':>8}{'-floor':>8}"
            f"{'label acc':>11}{'FID':>9}{'x best':>8}{'-floor':>8}{'sample s':>10}")
    lines = [head, "-" * len(head)]
    for r in results["rows"]:
        cells = [f"{METHOD_NAMES[r['method']]:<22}{r['steps'] or '-':>6}"]
        for metric, width in (("fd_classifier", 15), ("label_accuracy", 11), ("fid", 9)):
            value = r.get(metric)
            digits = 4 if metric == "label_accuracy" else 3
            cells.append(f"{'n/a' if value is None else f'{value:.{digits}f}':>{width}}")
            if metric in METRICS:
                ratio = value / best[metric] if value is not None and best[metric] else None
                cells.append(f"{'' if ratio is None else f'{ratio:.2f}':>8}")
                above = None if r["method"] == "real" else floor_ratio(value, best[metric],
                                                                      floor[metric])
                cells.append(f"{'' if above is None else f'{above:.2f}':>8}")
        cells.append(f"{r.get('sample_seconds', 0):>10.1f}")
        lines.append("".join(cells))
    return "\n".join(lines)


def _target(name: str, metric: str, passed: bool | None, detail: str, **values) -> dict:
    return {"target": name, "metric": metric, "passed": passed, "detail": detail, **values}


def _compare(name: str, metric: str, student: dict, other: dict) -> dict:
    a, b = student[metric], other[metric]
    return _target(name, metric, a < b, f"{a:.3f} vs {b:.3f}", value=a, bound=b)


def _label_target(results: dict, student: dict | None) -> dict:
    """Label accuracy >= 97% and within 1 point of the teacher's best samples: the teacher row
    with the best FD-classifier. Not the row with the highest accuracy: a 2-step DDIM teacher
    draws blurry class means that the classifier labels almost perfectly (100% at N=200)."""
    name = "student@4 label accuracy >= 97% and >= teacher best - 1 point"
    best = teacher_best_row(results)
    if student is None or best is None:
        return _target(name, "label_accuracy", None, NOT_MEASURED)
    acc, ref = student["label_accuracy"], best["label_accuracy"]
    bound = max(0.97, ref - 0.01)
    where = f"{METHOD_NAMES[best['method']]}@{best['steps']}"
    return _target(name, "label_accuracy", acc >= bound,
                   f"{acc:.4f} vs max(0.97, {ref:.4f} ({where}, best FD-classifier) - 0.01) = "
                   f"{bound:.4f}", value=acc, bound=bound)


# Bounds on a student's ratio to the teacher's best, by metric and student steps. The 1-step
# bound is set on the classifier distance only; its FID ratio is reported beside it.
STUDENT_BOUNDS = {"fd_classifier": {4: 1.15, 1: 2.0}, "fid": {4: 1.15}}
FLOOR_BOUND = 2.0  # the teacher's best within this factor of the real-data floor


def _student_vs_best(results: dict, metric: str, steps: int, best: float | None) -> dict | None:
    """The student's bound against the teacher's best, or, where the metric sets none for this
    step count, its ratio as information (None when there is nothing to report)."""
    s, factor = find(results, "student", steps), STUDENT_BOUNDS[metric].get(steps)
    if factor is None:
        if s is None or not best:
            return None
        return _target(f"student@{steps} vs teacher best", metric, None,
                       f"{s[metric]:.3f} = {s[metric] / best:.2f} x {best:.3f}", value=s[metric])
    name = f"student@{steps} <= {factor}x teacher best"
    if s is None or best is None:
        return _target(name, metric, None, NOT_MEASURED)
    bound = factor * best
    return _target(name, metric, s[metric] <= bound, f"{s[metric]:.3f} vs {factor} x {best:.3f} "
                   f"= {bound:.3f}", value=s[metric], bound=bound)


def check_targets(results: dict) -> list[dict]:
    """The quality targets, each pass/fail (None: a row it needs was not measured)."""
    out = []
    for metric in METRICS:
        if all(r.get(metric) is None for r in results["rows"]):
            continue
        best = teacher_best(results, metric)
        out.append(_teacher_vs_floor(results, metric, best))
        for steps in (4, 1):
            target = _student_vs_best(results, metric, steps, best)
            if target is not None:
                out.append(target)
        for n in (1, 2, 4):
            s, d = find(results, "student", n), find(results, "ddim", 2 * n)
            name = f"student@{n} < teacher DDIM@{2 * n}"
            if s is None or d is None:
                out.append(_target(name, metric, None, NOT_MEASURED))
                continue
            out.append(_compare(name, metric, s, d))
        for n in sorted({r["steps"] for r in results["rows"] if r["method"] == "dpm++"}):
            s, d = find(results, "student", n), find(results, "dpm++", n)
            if n > 4 or s is None:
                continue
            out.append(_compare(f"student@{n} < DPM-Solver++@{n}", metric, s, d))
        out.append(_catch_up(results, metric))
    out.append(_label_target(results, find(results, "student", 4)))
    return out


def _teacher_vs_floor(results: dict, metric: str, best: float | None) -> dict:
    """The teacher's best within FLOOR_BOUND x the real-data floor: how close training came to
    the data."""
    name, floor = f"teacher best <= {FLOOR_BOUND}x real-data floor", _floor(results, metric)
    if best is None or floor is None:
        return _target(name, metric, None, NOT_MEASURED)
    bound = FLOOR_BOUND * floor
    return _target(name, metric, best <= bound, f"{best:.3f} vs {FLOOR_BOUND} x {floor:.3f} = "
                   f"{bound:.3f}", value=best, bound=bound)


def _catch_up(results: dict, metric: str) -> dict:
    """Informational: the fewest DPM-Solver++ steps that match the student at the same count."""
    name = "DPM-Solver++ catches up with the student"
    for d in _method_rows(results, "dpm++"):
        s = find(results, "student", d["steps"])
        if s is not None and d[metric] <= s[metric]:
            return _target(name, metric, None, f"at {d['steps']} steps: {d[metric]:.3f} <= "
                           f"{s[metric]:.3f}", steps=d["steps"])
    return _target(name, metric, None, "not within the measured step counts", steps=None)


def format_targets(targets: list[dict]) -> str:
    mark = {True: "PASS", False: "FAIL", None: "info"}
    return "\n".join(f"[{mark[t['passed']]}] {LABELS[t['metric']]:<13} {t['target']}: {t['detail']}"
                     for t in targets)


def write_json(results: dict, path: str | os.PathLike) -> Path:
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    atomic_write_json(path, {**public, "targets": check_targets(results)})
    return Path(path)


def plot(results: dict, path: str | os.PathLike) -> Path:
    """Quality against steps (log x), one line per method, the real-data floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    metrics = [m for m in (*METRICS, "label_accuracy")
               if any(r.get(m) is not None for r in results["rows"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for method in ("student", "ddim", "dpm++"):
            rows = _method_rows(results, method)
            if rows:
                ax.plot([r["steps"] for r in rows], [r[metric] for r in rows], marker="o",
                        label=METHOD_NAMES[method])
        floor = find(results, "real", None)
        if floor is not None and floor.get(metric) is not None:
            ax.axhline(floor[metric], linestyle="--", color="gray", label=METHOD_NAMES["real"])
        ax.set_xscale("log", base=2)
        if metric in METRICS:
            ax.set_yscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(LABELS[metric])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['bundle']}: {results['samples']} samples")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def write_grids(results: dict, directory: str | os.PathLike) -> list[Path]:
    """One PNG per step count: two rows of labels 0..9 per method (student, DDIM, DPM++)."""
    grids = results["_grids"]
    written = []
    steps = sorted({s for (_, s) in grids})
    for s in steps:
        methods = [m for m in ("real", "student", "ddim", "dpm++") if (m, s) in grids]
        blocks = [to_uint8(grids[(m, s)]) for m in methods]
        rows = [np.concatenate(list(b[i : i + 10]), axis=1)
                for b in blocks for i in range(0, len(b), 10)]
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        name = "real.png" if s == 0 else f"steps-{s}.png"
        path = Path(directory) / name
        atomic_write_bytes(path, png_bytes(np.concatenate(rows, axis=0)))
        results.setdefault("grids", {})[name] = methods
        written.append(path)
    return written
