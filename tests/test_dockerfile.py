"""The Dockerfile, checked statically with Docker's own parser (the `dockerfile` package): the
test suite never builds the image, so what can be checked without a Docker engine is checked
here, including the shared runtime script, which runs under `sh` for its health probe."""

from __future__ import annotations

import http.server
import importlib
import os
import re
import shutil
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
SCRIPT = "halfstep-runtime"  # the set-up both serving stages share, written in the runtime stage


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


def all_commands() -> list:
    return list(dockerfile.parse_file(str(ROOT / "Dockerfile")))


def runtime_script() -> str:
    """The shell script the `runtime` stage writes (a COPY heredoc) for cpu and gpu to run."""
    (copy,) = [c for c in stage("runtime") if c.cmd == "COPY" and c.value[-1] == f"/{SCRIPT}"]
    (doc,) = copy.heredocs
    return doc.content


def script_case(name: str) -> str:
    """The body of one `case` branch of the runtime script (`name)` up to its `;;`)."""
    match = re.search(rf"^{name}\)\n(.*?)^\s*;;", runtime_script(), re.MULTILINE | re.DOTALL)
    assert match, f"{SCRIPT} has no {name} command"
    return match.group(1)


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
        if base not in names and base != "scratch":
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
        assert check.json and list(check.value) == ["CMD", SCRIPT, "healthcheck"], name
        # The stage installs the shared script and runs its user set-up, as root, before USER.
        assert any(c.cmd == "COPY" and ("--from=runtime",) == c.flags
                   and c.value[0] == f"/{SCRIPT}" for c in cmds), f"{name}: {SCRIPT} not copied"
        kinds = [c.cmd for c in cmds]
        (setup,) = [i for i, c in enumerate(cmds)
                    if c.cmd == "RUN" and c.value[0].strip() == f"{SCRIPT} user"]
        assert setup < kinds.index("USER"), name
    # The documented mount point exists and belongs to the runtime user, whose UID is the USER's.
    setup = script_case("user")
    uid = re.search(r"^RUNTIME_UID=(\d+)$", runtime_script(), re.MULTILINE).group(1)
    assert uid == user and '--uid "$RUNTIME_UID"' in setup
    assert re.search(r"mkdir -p /models\b", setup)
    assert 'chown -R "$RUNTIME_UID:$RUNTIME_UID" /models /home/halfstep' in setup


def test_runtime_setup_is_written_once() -> None:
    """The user, its directories and the health probe are defined once, in the runtime stage."""
    text = "\n".join(c.original for c in all_commands())  # commands and heredocs
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for needle in ("groupadd", "useradd", "mkdir -p /models", "/healthz", "urlopen"):
        assert text.count(needle) == 1, f"{needle!r} appears {text.count(needle)} times"
    (_, base, _), = [s for s in parse()[1] if s[0] == "runtime"]
    assert base == "scratch", "the runtime stage carries the script and nothing else"
    checks = {tuple(c.value) for c in all_commands() if c.cmd == "HEALTHCHECK"}
    assert checks == {("CMD", SCRIPT, "healthcheck")}, checks


def test_runtime_script_is_valid_sh(tmp_path: Path) -> None:
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX sh here")
    script = tmp_path / SCRIPT
    script.write_text(runtime_script())
    assert runtime_script().startswith("#!/bin/sh\n")
    proc = subprocess.run([sh, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sh, str(script), "no-such-command"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_no_package_index_is_hard_coded() -> None:
    """pip's own configuration picks the index; build args may pass one through, empty by
    default."""
    global_args, stages = parse()
    stage_args = {c.value[0].partition("=")[0]: c.value[0] for _, _, cmds in stages
                  for c in cmds if c.cmd == "ARG"}
    for key, default in [*global_args.items(), *stage_args.items()]:
        assert not re.search(r"https?://", default), f"ARG {key} has a URL default: {default}"
    for name in RUNTIME_STAGES:
        declared = {c.value[0] for c in stage(name) if c.cmd == "ARG"}
        assert {"TORCH_INDEX_URL", "PIP_INDEX_URL"} <= declared, f"{name}: {declared}"
    text = "\n".join(c.original for c in all_commands())
    literal = re.findall(r"--(?:extra-)?index-url[= ]+[\"']?https?://\S*", text)
    assert not literal, f"index URL written into the Dockerfile: {literal}"
    assert not re.search(r"\bENV\b[^\n]*PIP_(?:EXTRA_)?INDEX_URL", text)
    install = script_case("install")
    assert '--index-url "$TORCH_INDEX_URL"' in install
    assert '[ -n "${TORCH_INDEX_URL:-}" ]' in install


def test_extras_per_target() -> None:
    """cpu: ONNX Runtime for the CPU; gpu: the `gpu` extra (onnxruntime-gpu), never both, since
    the two distributions ship the same `onnxruntime` module."""
    cpu = " ".join(c.value[0] for c in stage("cpu") if c.cmd == "RUN")
    gpu = " ".join(c.value[0] for c in stage("gpu") if c.cmd == "RUN")
    assert f"{SCRIPT} install serve,onnx" in cpu and "gpu" not in cpu
    assert re.search(rf"{SCRIPT} install serve,gpu\b", gpu) and "onnx" not in gpu
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert any(r.startswith("onnxruntime-gpu") for r in extras["gpu"])
    assert not any(r.startswith("onnxruntime") and not r.startswith("onnxruntime-gpu")
                   for r in extras["gpu"] + extras["serve"])
    for name in RUNTIME_STAGES:  # the wheel is bind-mounted, so it never stays in a layer
        (install,) = [c for c in stage(name)
                      if c.cmd == "RUN" and f"{SCRIPT} install" in c.value[0]]
        assert "--mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels" in install.flags
    assert "/tmp/wheels/halfstep-*.whl" in script_case("install")
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


def test_packaged_classifier_is_package_data() -> None:
    """The eval's default classifier weights ship in the wheel (and the image's build context)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["halfstep.eval"]
    shipped = sorted((ROOT / "eval" / "weights").iterdir())
    assert {p.suffix for p in shipped} == {".safetensors", ".json"}
    for path in shipped:
        assert any(path.relative_to(ROOT / "eval").match(g) for g in globs), path
        assert not _dockerignore_excludes(str(path.relative_to(ROOT))), path


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
def test_healthcheck_command_reads_healthz(status: int, healthy: bool, tmp_path: Path) -> None:
    """Run the HEALTHCHECK's own command against a local stand-in for the server."""
    if shutil.which("sh") is None:
        pytest.skip("no POSIX sh here")
    # The image's PATH: the script in /usr/local/bin, `python` from the virtualenv.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / SCRIPT).write_text(runtime_script())
    (bin_dir / SCRIPT).chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    handler = type("Handler", (_Health,), {"status": status})
    srv = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        for name in RUNTIME_STAGES:
            argv = list(last(stage(name), "HEALTHCHECK").value[1:])
            env = {**os.environ, "HALFSTEP_PORT": str(srv.server_address[1]),
                   "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
            proc = subprocess.run([str(bin_dir / argv[0]), *argv[1:]], env=env,
                                  capture_output=True, timeout=30)
            assert (proc.returncode == 0) == healthy, (name, proc.stderr[-300:])
    finally:
        srv.shutdown()
        srv.server_close()
