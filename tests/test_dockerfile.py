"""The Dockerfile, checked statically with Docker's own parser (the `dockerfile` package): there
is no Docker engine on the development machine, so the image itself is never built here."""

from __future__ import annotations

import http.server
import importlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

dockerfile = pytest.importorskip("dockerfile", reason="needs the dockerfile package (dev extra)")
tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_STAGES = ("cpu", "gpu")
EMBEDDED_MANIFEST = "server/bundles/mnist/bundle.json"


def parse() -> tuple[dict[str, str], list[tuple[str, str, list]]]:
    """Global ARG defaults and the stages as (name, resolved base image, commands)."""
    global_args: dict[str, str] = {}
    stages: list[tuple[str, str, list]] = []
    for cmd in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if cmd.cmd == "FROM":
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                          lambda m: global_args[m.group(1) or m.group(2)], cmd.value[0])
            name = cmd.value[2] if len(cmd.value) == 3 and cmd.value[1].upper() == "AS" else ""
            stages.append((name, base, []))
        elif stages:
            stages[-1][2].append(cmd)
        elif cmd.cmd == "ARG":
            key, _, default = cmd.value[0].partition("=")
            global_args[key] = default
    return global_args, stages


def stage(name: str) -> list:
    (cmds,) = [c for n, _, c in parse()[1] if n == name]
    return cmds


def last(cmds: list, kind: str):
    found = [c for c in cmds if c.cmd == kind]
    assert found, f"no {kind} in the stage"
    return found[-1]


def test_default_target_is_the_gpu_stage_and_cpu_exists() -> None:
    stages = parse()[1]
    names = [n for n, _, _ in stages]
    assert names[-1] == "gpu", "`docker build .` builds the last stage: it must be the GPU one"
    assert "cpu" in names and len(stages) >= 3
    bases = {n: b for n, b, _ in stages}
    assert bases["gpu"].startswith("nvidia/cuda:") and "runtime" in bases["gpu"]
    assert bases["cpu"].startswith("python:") and "slim" in bases["cpu"]


def test_base_images_are_pinned_by_tag() -> None:
    names: set[str] = set()
    for name, base, _ in parse()[1]:
        if base not in names:
            image = base.rsplit("/", 1)[-1]
            assert "@sha256:" in base or ":" in image, f"{base} has no tag"
            assert not image.endswith(":latest"), f"{base} floats"
        names.add(name)


def test_runtime_stages_run_halfstep_serve_as_non_root() -> None:
    for name in RUNTIME_STAGES:
        cmds = stage(name)
        user = last(cmds, "USER").value[0].split(":")[0]
        # Numeric, so Kubernetes' runAsNonRoot can verify it.
        assert user.isdigit() and int(user) != 0, f"{name}: USER {user}"
        entry = last(cmds, "ENTRYPOINT")
        assert entry.json and list(entry.value) == ["halfstep", "serve"], name
        assert last(cmds, "EXPOSE").value == ("8000",)
        pairs = [v for c in cmds if c.cmd == "ENV" for v in c.value]  # ENV K V K2 V2 ...
        env = dict(zip(pairs[::2], pairs[1::2], strict=True))
        assert env["HALFSTEP_HOST"] == "0.0.0.0" and env["HALFSTEP_PORT"] == "8000"
        check = last(cmds, "HEALTHCHECK")
        assert check.value[0] == "CMD" and "/healthz" in check.value[-1]
        # The documented mount point exists and belongs to the runtime user.
        runs = " ".join(c.value[0] for c in cmds if c.cmd == "RUN")
        assert re.search(r"mkdir -p /models\b", runs) and f"chown -R {user}" in runs


def test_torch_builds_per_target() -> None:
    cpu = " ".join(c.value[0] for c in stage("cpu") if c.cmd == "RUN")
    gpu = " ".join(c.value[0] for c in stage("gpu") if c.cmd == "RUN")
    assert "download.pytorch.org/whl/cpu" in cpu and "onnxruntime-gpu" not in cpu
    assert "whl/cpu" not in gpu
    assert "onnxruntime-gpu" in gpu and "pip uninstall -y onnxruntime" in gpu
    args = {c.value[0].split("=")[0] for c in stage("gpu") if c.cmd == "ARG"}
    assert "WITH_TENSORRT" in args and '"${WITH_TENSORRT}" = "1"' in gpu


def test_cpu_image_serves_the_embedded_bundle_with_onnx_exports() -> None:
    cmds = stage("cpu")
    (served,) = [c.value[0].split("=", 1)[1] for c in cmds
                 if c.cmd == "ARG" and c.value[0].startswith("SERVED_BUNDLE=")]
    runs = [c.value[0] for c in cmds if c.cmd == "RUN"]
    (made,) = [r for r in runs if "halfstep export" in r]
    assert "default_bundle_path()" in made and "halfstep copy-bundle" in made
    assert '--bundle "${SERVED_BUNDLE}" --format onnx' in made
    pairs = [v for c in cmds if c.cmd == "ENV" for v in c.value]
    env = dict(zip(pairs[::2], pairs[1::2], strict=True))
    assert env["HALFSTEP_BUNDLE"] == "${SERVED_BUNDLE}" and served.startswith("/opt/")
    # made as root before USER, so the runtime user can read it but not change it
    (at,) = [i for i, c in enumerate(cmds) if c.cmd == "RUN" and c.value[0] == made]
    assert [c.cmd for c in cmds].index("USER") > at


def test_no_add_of_urls() -> None:
    for cmd in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if cmd.cmd == "ADD":
            assert not any(re.match(r"^(https?|git)[:@]", v) for v in cmd.value), cmd.original


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent covers all."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = regex.replace(r"\[", "[").replace(r"\]", "]")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_build_context_has_the_package_and_nothing_heavy() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    source_dirs = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    copied = {c.value[0] for c in stage("wheel") if c.cmd == "COPY" and not c.flags}
    copied |= {v for c in stage("wheel") if c.cmd == "COPY" for v in c.value[:-1]}
    assert source_dirs <= copied, f"package folders not copied: {source_dirs - copied}"
    for src in copied - {"README.md*"}:
        assert (ROOT / src).exists(), f"COPY {src}: no such path"
        assert not _dockerignore_excludes(f"{src}/x.py" if (ROOT / src).is_dir() else src), src
    assert not _dockerignore_excludes(EMBEDDED_MANIFEST), "the embedded bundle must be sent"
    assert not _dockerignore_excludes("server/bundles/mnist/student-1.safetensors")
    for heavy in (".venv/bin/python", "runs/teacher/checkpoint.pt", ".git/HEAD", "tests/x.py",
                  "server/__pycache__/app.cpython-311.pyc", "halfstep.egg-info/PKG-INFO"):
        assert _dockerignore_excludes(heavy), heavy
    # The wheel stage must refuse to build an image without the embedded bundle.
    assert EMBEDDED_MANIFEST in " ".join(c.value[0] for c in stage("wheel") if c.cmd == "RUN")


def test_embedded_bundle_is_package_data() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["halfstep.server"]
    rel = Path(EMBEDDED_MANIFEST).relative_to("server")
    assert any(rel.match(g) for g in globs), f"{rel} is not matched by {globs}"


def test_entrypoint_exists_in_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, _, func = pyproject["project"]["scripts"]["halfstep"].partition(":")
    assert callable(getattr(importlib.import_module(module), func))
    try:
        importlib.import_module("halfstep.server.cli")
    except ModuleNotFoundError as exc:
        pytest.skip(f"`halfstep serve` not written yet ({exc})")
    from halfstep.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert callable(args.func)


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_reads_healthz(status: int, healthy: bool) -> None:
    """Run the HEALTHCHECK's own command against a local stand-in for the server."""
    handler = type("Handler", (_Health,), {"status": status})
    srv = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        for name in RUNTIME_STAGES:
            argv = list(last(stage(name), "HEALTHCHECK").value[1:])
            assert argv[0] == "python"
            env = {**os.environ, "HALFSTEP_PORT": str(srv.server_address[1])}
            proc = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True,
                                  timeout=30)
            assert (proc.returncode == 0) == healthy, (name, proc.stderr[-300:])
    finally:
        srv.shutdown()
        srv.server_close()
