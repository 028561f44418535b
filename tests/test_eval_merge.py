"""Replacing some rows of an earlier eval with a later eval's: only when both measured alike."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from halfstep.eval.merge import MergeError, parse_row_names, replace_rows
from halfstep.eval.report import check_targets

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "replace_eval_rows.py"
CONFIG = {"bundle": "runs/a", "data": "mnist:$MNIST_DIR", "samples": 2000, "fid_samples": 2000,
          "fid": True, "fid_ref_samples": 2000, "seed": 0,
          "classifier_config": {"steps": 1200, "batch_size": 128}}


def _row(method, steps, fd, fid, acc=0.975):
    return {"method": method, "steps": steps, "fd_classifier": fd, "label_accuracy": acc,
            "fid": fid, "sample_seconds": 1.0, "metric_seconds": 1.0, "reused": False}


def _earlier() -> dict:
    rows = [_row("real", None, 4.0334, 7.5448, 0.9915), _row("student", 2, 6.444, 38.62),
            _row("student", 4, 5.200, 30.18), _row("ddim", 4, 31.93, 38.00, 0.99),
            _row("ddim", 8, 11.13, 27.63, 0.98)]
    return {"bundle": "mnist", "config": CONFIG, "classifier": {"key": "k1", "sha256": "a"},
            "samples": 2000, "rows": rows, "targets": []}


def _later(**changes) -> dict:
    """A later eval of a re-distilled 2-step student, scoring the floor and student 4 again."""
    rows = [_row("real", None, 4.0334 * (1 + 1e-6), 7.5448, 0.9915),
            _row("student", 2, 6.167, 37.52), _row("student", 4, 5.200, 30.18)]
    later = {"bundle": "mnist", "config": {**CONFIG, "bundle": "runs/b"},
             "classifier": {"key": "k1", "sha256": "a"}, "samples": 2000, "rows": rows}
    later.update(changes)
    return later


def _fid_target(results, name="student@2 < teacher DDIM@4"):
    return next(t for t in check_targets(results)
                if t["metric"] == "fid" and t["target"].startswith(name))


def test_named_rows_are_replaced_the_rest_kept_and_targets_follow():
    earlier = _earlier()
    before = copy.deepcopy(earlier)
    merged = replace_rows(earlier, _later(), [("student", 2)], "later.json")
    assert earlier == before  # the input is not modified
    by_key = {(r["method"], r["steps"]): r for r in merged["rows"]}
    assert by_key[("student", 2)]["fid"] == 37.52
    assert by_key[("real", None)] is earlier["rows"][0]  # unreplaced rows are the earlier ones
    assert [(r["method"], r["steps"]) for r in merged["rows"]] == \
        [(r["method"], r["steps"]) for r in earlier["rows"]]
    assert _fid_target(earlier)["passed"] is False and _fid_target(merged)["passed"] is True
    record = merged["replaced_rows"][-1]
    assert record["rows"] == ["student:2"] and record["rows_agreeing"] == 2
    assert "targets" not in merged  # write_json checks them on the merged rows


def test_refuses_another_classifier_naming_the_row_that_disagrees():
    later = _later()
    later["rows"][0]["fd_classifier"] = 4.031  # another machine's weights: about -0.05%
    with pytest.raises(MergeError, match="real.*fd_classifier.*not the same classifier"):
        replace_rows(_earlier(), later, [("student", 2)], "later.json")
    moved = _later(config={**CONFIG, "data": "mnist:/elsewhere"})  # the same data, elsewhere
    merged = replace_rows(_earlier(), moved, [("student", 2)], "later.json")
    assert merged["rows"][1]["fid"] == 37.52
    later = _later()
    later["rows"][2]["fid"] = 30.5  # an unreplaced student whose weights changed
    with pytest.raises(MergeError, match="student 4 fid"):
        replace_rows(_earlier(), later, [("student", 2)], "later.json")


@pytest.mark.parametrize("change, message", [
    ({"config": {**CONFIG, "samples": 1000}}, "differ in samples"),
    ({"classifier": {"key": "k2", "sha256": "a"}}, "classifiers of different settings"),
])
def test_refuses_other_settings(change, message):
    with pytest.raises(MergeError, match=message):
        replace_rows(_earlier(), _later(**change), [("student", 2)], "later.json")


def test_needs_the_floor_and_the_named_rows():
    no_floor = _later()
    no_floor["rows"] = no_floor["rows"][1:]
    with pytest.raises(MergeError, match="real-data row"):
        replace_rows(_earlier(), no_floor, [("student", 2)], "later.json")
    with pytest.raises(MergeError, match="real-data row"):
        replace_rows(_earlier(), _later(), [("real", None), ("student", 2)], "later.json")
    with pytest.raises(MergeError, match="no student 1 row"):
        replace_rows(_earlier(), _later(), [("student", 1)], "later.json")


def test_row_names():
    assert parse_row_names("student:1, ddim:4,real") == \
        [("student", 1), ("ddim", 4), ("real", None)]
    for bad in ("", "student", "teacher:4", "student:x", "real:2"):
        with pytest.raises(MergeError):
            parse_row_names(bad)


def test_script_writes_the_merged_file_or_refuses_cleanly(tmp_path):
    earlier, later = tmp_path / "earlier.json", tmp_path / "later.json"
    earlier.write_text(json.dumps(_earlier()))
    later.write_text(json.dumps(_later()))
    out = tmp_path / "merged.json"
    run = subprocess.run([sys.executable, str(SCRIPT), str(earlier), str(later), "student:2",
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    merged = json.loads(out.read_text())
    assert _fid_target(merged)["passed"] is True
    assert json.loads(earlier.read_text()) == _earlier()  # --out leaves EARLIER alone
    bad = _later()
    bad["rows"][0]["fid"] = 7.6
    later.write_text(json.dumps(bad))
    run = subprocess.run([sys.executable, str(SCRIPT), str(earlier), str(later), "student:2"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: real")
    assert "Traceback" not in run.stderr
    assert json.loads(earlier.read_text()) == _earlier()
    for text, message in (("[1, 2]", "not a `halfstep eval --json` file"),
                          ("{not json", "error: Expecting property name")):
        later.write_text(text)
        run = subprocess.run([sys.executable, str(SCRIPT), str(earlier), str(later),
                              "student:2"], capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert json.loads(earlier.read_text()) == _earlier()
