"""`halfstep serve --backend auto` on CPU: a bundle without ONNX exports is served from a copy
exported once into $HALFSTEP_CACHE/exports, reused by later serves, rebuilt when damaged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from halfstep.distill.bundle import Bundle
from halfstep.engines.factory import auto_backend
from halfstep.server.app import build_engine, served_bundle
from halfstep.server.cli import export_cache_enabled
from halfstep.server.embedded import cache_entry
from halfstep.server.settings import Settings

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'halfstep[onnx]')")


@pytest.fixture
def cpu_cache(tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """A CPU machine whose cache is tmp_path; (tmp_path, the export_onnx calls so far)."""
    import halfstep.export.onnx as onnx_export

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HALFSTEP_CACHE", str(tmp_path))
    real = onnx_export.export_onnx
    calls: list[str] = []

    def counted(root, *args, **kwargs):
        calls.append(str(root))
        return real(root, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", counted)
    return tmp_path, calls


def test_export_cache_is_built_once_reused_and_rebuilt_when_damaged(tiny_bundle_dir, cpu_cache,
                                                                    capsys):
    settings = Settings(bundle=str(tiny_bundle_dir), backend="auto", max_batch=4)
    cache, calls = cpu_cache

    bundle, source = served_bundle(settings, export_cache=True)
    assert source == Path(tiny_bundle_dir) and len(calls) == 1
    assert bundle.root.parent == cache / "exports" and bundle.root.name.startswith("tiny-")
    assert bundle.root == cache_entry(Bundle(tiny_bundle_dir), cache)
    assert auto_backend(bundle) == "onnxruntime"
    assert build_engine(settings, bundle).name == "onnxruntime"
    assert "to ONNX once (about a minute), cached in" in capsys.readouterr().err
    assert [p.name for p in (cache / "exports").iterdir()] == [bundle.root.name]  # no tmp

    again, _ = served_bundle(settings, export_cache=True)  # reused, verified, not re-exported
    assert again.root == bundle.root and len(calls) == 1

    onnx = sorted(bundle.root.glob("*.onnx"))[0]
    onnx.write_bytes(onnx.read_bytes()[:100])  # a truncated file: rebuilt
    rebuilt, _ = served_bundle(settings, export_cache=True)
    assert rebuilt.root == bundle.root and len(calls) == 2
    assert auto_backend(rebuilt) == "onnxruntime"
    assert "incomplete or corrupt; rebuilding" in capsys.readouterr().err

    (bundle.root / "bundle.json").unlink()  # a partial entry (no manifest): rebuilt too
    served_bundle(settings, export_cache=True)
    assert len(calls) == 3


def test_no_export_cache_serves_the_bundle_itself_on_torch(tiny_bundle_dir, cpu_cache):
    settings = Settings(bundle=str(tiny_bundle_dir), backend="auto", max_batch=4)
    bundle, source = served_bundle(settings, export_cache=False)
    assert bundle.root == Path(tiny_bundle_dir) and source is None
    assert build_engine(settings, bundle).name == "torch"
    cache, calls = cpu_cache
    assert not (cache / "exports").exists() and calls == []


def test_an_explicit_backend_or_a_gpu_never_exports(tiny_bundle_dir, cpu_cache, monkeypatch):
    torch_only = Settings(bundle=str(tiny_bundle_dir), backend="torch")
    assert served_bundle(torch_only, export_cache=True)[1] is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto picks cudagraph
    assert served_bundle(Settings(bundle=str(tiny_bundle_dir)), export_cache=True)[1] is None
    assert cpu_cache[1] == []


def test_the_flag_and_env_turn_the_cache_off():
    from halfstep.cli import build_parser

    assert build_parser().parse_args(["serve", "--no-export-cache"]).export_cache is False
    assert build_parser().parse_args(["serve"]).export_cache is None
    assert export_cache_enabled(None, {}) is True
    assert export_cache_enabled(None, {"HALFSTEP_EXPORT_CACHE": "false"}) is False
    assert export_cache_enabled(False, {"HALFSTEP_EXPORT_CACHE": "true"}) is False
    with pytest.raises(ValueError, match="HALFSTEP_EXPORT_CACHE"):
        export_cache_enabled(None, {"HALFSTEP_EXPORT_CACHE": "maybe"})


def test_default_cache_dir_follows_halfstep_cache_then_xdg(monkeypatch, tmp_path):
    from halfstep.distill.cache import default_cache_dir

    monkeypatch.delenv("HALFSTEP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "halfstep"
    monkeypatch.setenv("HALFSTEP_CACHE", str(tmp_path / "own"))
    assert default_cache_dir() == tmp_path / "own"


def test_a_failed_export_serves_the_bundle_on_torch(tiny_bundle_dir, cpu_cache, monkeypatch,
                                                    capsys):
    import halfstep.export.onnx as onnx_export

    def broken(root, *args, **kwargs):
        raise onnx_export.ExportError("no exporter here")

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    settings = Settings(bundle=str(tiny_bundle_dir), backend="auto", max_batch=4)
    bundle, source = served_bundle(settings, export_cache=True)
    assert bundle.root == Path(tiny_bundle_dir) and source is None
    assert "could not export" in capsys.readouterr().err
    assert list((cpu_cache[0] / "exports").iterdir()) == []  # the temporary copy is gone
