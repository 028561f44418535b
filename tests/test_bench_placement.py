"""bench/placement.py: every placement runs the same work on the tiny exported bundle, the JSON
holds every number, and a bad bundle is a clear error. No timing is asserted."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'halfstep[onnx]')")

from halfstep.bench import placement  # noqa: E402
from halfstep.distill.bundle import Bundle  # noqa: E402
from halfstep.distill.sampling import noise_for_seeds  # noqa: E402
from halfstep.export.onnx import cpu_session, run_session  # noqa: E402
from tests.test_export import exported_bundle_dir  # noqa: E402

NUMBERS = ("batches", "images", "wall_s", "images_per_s", "p50_ms", "cpu_percent",
           "max_abs_diff")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return exported_bundle_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def short_run(exported, tmp_path_factory):
    """One short run of every placement: (exit code, stdout, the JSON)."""
    out = tmp_path_factory.mktemp("placement") / "out.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # capsys is per test; this run is per module
        code = placement.main(["--bundle", str(exported), "--steps", "2", "--batch", "2",
                               "--seconds", "0.5", "--json", str(out)])
    return code, stdout.getvalue(), json.loads(out.read_text())


def test_every_placement_runs_and_does_work(short_run):
    code, table, data = short_run
    assert code == 0
    assert [r["placement"] for r in data["rows"]] == list("abcdef")
    for r in data["rows"]:
        assert r["batches"] > 0 and r["images"] == 2 * r["batches"], r
        assert r["images_per_s"] > 0 and r["p50_ms"] > 0, r
        assert f"{r['placement']} {r['name']}" in table
    by_key = {r["placement"]: r for r in data["rows"]}
    cores = placement.cores()
    assert data["cores"] == cores
    assert by_key["a"]["threads"] == str(cores) and by_key["c"]["threads"] == "1"
    assert by_key["d"]["threads"] == f"1 x {cores}"
    assert 0 < by_key["f"]["load_images"] <= by_key["f"]["images"]  # the load thread ran


def test_outputs_equal_across_placements(short_run):
    rows = short_run[2]["rows"]
    assert rows[0]["bitwise"] and rows[0]["max_abs_diff"] == 0.0  # a against itself
    for r in rows:
        assert r["max_abs_diff"] <= placement.ATOL, r
        assert r["bitwise"] == (r["max_abs_diff"] == 0.0)


def test_json_has_every_number(short_run):
    data = short_run[2]
    for key in ("batch", "seconds", "cores", "steps"):
        assert isinstance(data[key], (int, float)), key
    assert data["onnx"].endswith(".onnx") and data["onnxruntime"]
    assert len(data["loadavg_before"]) == len(data["loadavg_after"]) == 3
    for r in data["rows"]:
        for key in NUMBERS:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (r, key)


def test_a_placement_computing_other_images_is_refused():
    """The equality guard itself: a different output (or a NaN) exits, it is not a row."""
    reference = torch.zeros(2, 1, 28, 28)
    for wrong in (torch.full_like(reference, 1e-3), torch.full_like(reference, float("nan"))):
        loop = placement.Loop(reference)
        loop.check(reference)
        loop.check(wrong)
        loop.latencies.append(0.01)
        with pytest.raises(SystemExit, match="differs from a"):
            placement.row("c", "1", [loop], 2, 0.0, 0.01)


def test_spinning_off_is_the_servers_session_plus_one_entry(exported):
    path = placement.student_onnx(Bundle(exported), 2)
    server = cpu_session(path, 2).get_session_options()
    quiet = placement.session(path, 2, spinning=False).get_session_options()
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for attr in ("intra_op_num_threads", "inter_op_num_threads", "execution_mode",
                 "graph_optimization_level"):
        assert getattr(quiet, attr) == getattr(server, attr), attr
    noise, labels = noise_for_seeds([0, 1, 2], (1, 28, 28)), torch.tensor([0, 3, 10])
    assert torch.equal(run_session(placement.session(path, 2, spinning=False), noise, labels),
                       run_session(cpu_session(path, 2), noise, labels))


def test_a_bundle_without_exports_gets_a_cached_exported_copy(tiny_bundle_dir, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("HALFSTEP_CACHE", str(tmp_path / "cache"))
    path = placement.student_onnx(Bundle(tiny_bundle_dir), 1)
    assert path.is_file() and path.suffix == ".onnx"
    assert (tmp_path / "cache") in path.parents  # the bundle itself is left alone
    assert not list(Path(tiny_bundle_dir).glob("*.onnx"))


def test_a_missing_bundle_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        placement.main(["--bundle", str(tmp_path / "nope"), "--seconds", "0.1"])
    message = str(err.value.code)
    assert message.startswith(f"{placement.PROG}: error:") and "nope" in message
    assert "Traceback" not in capsys.readouterr().err


def test_a_student_the_bundle_lacks_is_a_clear_error(exported):
    with pytest.raises(SystemExit, match="steps=3 is not in bundle"):
        placement.main(["--bundle", str(exported), "--steps", "3", "--seconds", "0.1"])
