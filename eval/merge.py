"""Replace some rows of an earlier `halfstep eval` JSON with the same rows of a later one.

A full N = 2,000 table is hours of CPU, most of it the teacher's many-step rows. When only some
students change (a longer last round, say), a later eval of those students can replace their
rows in the earlier table, but only if both runs measured the same way. The row caches cannot
show that (they live on the machine that ran each eval), so it is checked on the numbers:
every row both runs scored and that is not being replaced (at least the real-data floor) must
agree. The classifier is trained from a seed, yet CPUs with other vector units train weights
whose Frechet distances differ by about 2%; rows scored by the same weights agree to about
1e-6, so a tolerance of 1e-4 separates the two cases.
"""

from __future__ import annotations

from .report import METHOD_NAMES, find

# what a row's numbers depend on besides the weights (EvalConfig fields); the data is not a
# path to compare (it differs between machines) but part of the classifier's key (a hash of
# the MNIST files) and of the real-data row, which must agree
SAME_SETTINGS = ("samples", "fid_samples", "fid", "fid_ref_samples", "seed", "classifier_config")
AGREEMENT = 1e-4  # relative; same classifier weights: ~1e-6; another machine's: ~2e-2
METRIC_KEYS = ("fd_classifier", "fid", "label_accuracy")


class MergeError(ValueError):
    """The two evals did not measure the same way, or a requested row is missing."""


def parse_row_names(text: str) -> list[tuple[str, int | None]]:
    """'student:1,student:2,real' -> [('student', 1), ('student', 2), ('real', None)]."""
    names = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        method, _, steps = item.partition(":")
        if method not in METHOD_NAMES or (method == "real") != (not steps):
            raise MergeError(f"bad row {item!r}: use student:N, ddim:N, dpm++:N or real")
        try:
            names.append((method, int(steps) if steps else None))
        except ValueError:
            raise MergeError(f"bad row {item!r}: N must be an integer") from None
    if not names:
        raise MergeError("name at least one row to replace, e.g. student:1,student:2")
    return names


def _differs(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    return abs(a - b) > AGREEMENT * max(abs(a), abs(b), 1e-12)


def check_same_measurement(base: dict, new: dict, replaced: list[tuple[str, int | None]]) -> int:
    """Raise MergeError unless `new` measured as `base` did; returns how many shared rows agree."""
    for key in SAME_SETTINGS:
        if base["config"].get(key) != new["config"].get(key):
            raise MergeError(f"the evals differ in {key}: {base['config'].get(key)!r} against "
                             f"{new['config'].get(key)!r}; rerun the new eval with the same flags")
    if base["classifier"].get("key") != new["classifier"].get("key"):
        raise MergeError("the evals used classifiers of different settings or data")
    shared = [r for r in new["rows"] if (r["method"], r["steps"]) not in replaced
              and find(base, r["method"], r["steps"]) is not None]
    if not any(r["method"] == "real" for r in shared):
        raise MergeError("both evals need the real-data row (unreplaced) to compare classifiers")
    for row in shared:
        old = find(base, row["method"], row["steps"])
        for metric in METRIC_KEYS:
            if _differs(old.get(metric), row.get(metric)):
                raise MergeError(
                    f"{row['method']} {row['steps'] or ''} {metric}: {old.get(metric)} in the "
                    f"earlier eval, {row.get(metric)} in the later one: not the same classifier "
                    "or weights; score with the earlier eval's classifier (--classifier FILE) "
                    "or rerun the whole table")
    return len(shared)


def replace_rows(base: dict, new: dict, replaced: list[tuple[str, int | None]],
                 source: str) -> dict:
    """`base` with the named rows taken from `new` (write it with report.write_json, which checks
    the targets again); the replacement and the number of rows that agreed are recorded under
    `replaced_rows`."""
    for name, results in (("earlier", base), ("later", new)):
        if not isinstance(results, dict) or not {"config", "classifier", "rows"} <= results.keys():
            raise MergeError(f"the {name} file is not a `halfstep eval --json` file "
                             "(it needs config, classifier and rows)")
    for method, steps in replaced:
        if find(new, method, steps) is None:
            raise MergeError(f"the later eval has no {method} {steps or ''} row")
    agreed = check_same_measurement(base, new, replaced)
    rows = [find(new, r["method"], r["steps"]) if (r["method"], r["steps"]) in replaced else r
            for r in base["rows"]]
    rows += [find(new, *key) for key in replaced if find(base, *key) is None]
    record = {"rows": [f"{m}:{s}" if s else m for m, s in replaced], "from": source,
              "bundle": new["config"].get("bundle"), "rows_agreeing": agreed,
              "classifier": new["classifier"]}
    merged = {key: value for key, value in base.items() if key != "targets"}
    return {**merged, "rows": rows, "replaced_rows": [*base.get("replaced_rows", []), record]}
