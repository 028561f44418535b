"""The layering of docs/ARCHITECTURE.md, checked on the source, and the repository's own text.

Layers, bottom to top: distill <- export <- engines <- server; bench and eval sit on top and
nothing imports them; the CLI (halfstep/cli.py) reaches every package lazily and nothing imports
it. Every import statement counts, including those inside functions and under TYPE_CHECKING;
module names in strings (the CLI's plugin list, loaded through importlib) are not imports.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")

ROOT = Path(__file__).resolve().parents[1]
TOP = "halfstep"
CLI = "cli"  # halfstep.cli and halfstep.__main__: the command line, above everything
LAYERS = ("distill", "export", "engines", "server")  # each may import only those before it
ON_TOP = ("bench", "eval")  # import the layers; imported by nobody
# package -> the packages it must not import
FORBIDDEN = {
    "distill": {"export", "engines", "server", "bench", "eval"},
    "export": {"engines", "server", "bench", "eval"},
    "engines": {"server", "bench", "eval"},
    "server": {"bench", "eval"},
}
ONLY_FROM_ITSELF = {"bench", "eval", CLI}  # nothing outside the package imports it

# Notes and a folder that live outside this repository. The folder is spelled in parts so that
# a plain text search for it does not find this file.
STALE_REFERENCES = ("PAPER.md", "STYLE.md", "SERVING.md", "/".join(("..", "shared")))
# Where stale references may remain: design notes, generated data, this file.
TEXT_EXEMPT_DIRS = {"docs", ".git", ".venv", "runs"}
TEXT_EXEMPT_FILES = {"tests/test_architecture.py"}
# Build and tool outputs: never part of the repository (used when git cannot list its files).
OUTPUT_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "build", "dist",
               ".halfstep", ".whl", ".ci"}


def package_dirs() -> dict[str, str]:
    """Source folder -> package name under halfstep ('distill', ..., and TOP for halfstep/)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    return {folder: TOP if name == TOP else name.split(".", 1)[1]
            for name, folder in mapping.items()}


@dataclass(frozen=True)
class Edge:
    path: str  # relative to ROOT
    line: int
    source: str  # importing package
    target: str  # imported package (TOP for halfstep/__init__, CLI for the command line)
    module: str  # the dotted module name as resolved

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} imports {self.module}"


def _package_of(module: str, subpackages: set[str]) -> str | None:
    """'halfstep.engines.base' -> 'engines'; 'halfstep.cli' -> CLI; other top-level names ->
    None (not ours)."""
    parts = module.split(".")
    if parts[0] != TOP:
        return None
    if len(parts) == 1:
        return TOP
    if parts[1] in subpackages:
        return parts[1]
    if parts[1] in ("cli", "__main__"):
        return CLI
    return TOP


def imports_in(source: str, module: str, is_package: bool, subpackages: set[str]):
    """(line, dotted module) for every import statement in `source`, the file being `module`
    (a package's __init__ when is_package). Relative imports are resolved; `from P import x`
    counts as P.x, since x may be a submodule."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"line {node.lineno}: relative import beyond {TOP}")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                yield node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"


def _module_name(path: Path, folder: str, package: str) -> tuple[str, bool]:
    dotted = TOP if package == TOP else f"{TOP}.{package}"
    rel = path.relative_to(ROOT / folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([dotted, *parts]), path.name == "__init__.py"


def import_graph() -> list[Edge]:
    dirs = package_dirs()
    subpackages = {p for p in dirs.values() if p != TOP}
    edges = []
    for folder, package in dirs.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if OUTPUT_DIRS.intersection(path.relative_to(ROOT).parts):
                continue
            module, is_package = _module_name(path, folder, package)
            source_pkg = CLI if package == TOP and path.stem in ("cli", "__main__") else package
            for line, name in imports_in(path.read_text(), module, is_package, subpackages):
                target = _package_of(name, subpackages)
                if target is not None:
                    edges.append(Edge(str(path.relative_to(ROOT)), line, source_pkg, target, name))
    return edges


def violations(edges: list[Edge]) -> list[str]:
    found = []
    for e in edges:
        if e.source == e.target:
            continue
        if e.target in FORBIDDEN.get(e.source, ()):
            found.append(f"{e} ({e.source} sits below {e.target})")
        elif e.target in ONLY_FROM_ITSELF:
            found.append(f"{e} (nothing outside {e.target} may import it)")
    return found


def test_every_package_folder_is_walked() -> None:
    dirs = package_dirs()
    assert set(dirs.values()) == {TOP, *LAYERS, *ON_TOP}, dirs
    edges = import_graph()
    sources = {e.source for e in edges}
    # the walk sees imports in every layer above the bottom one, and in the command line
    assert {"export", "engines", "server", "bench", "eval", CLI} <= sources, sources


def test_relative_imports_resolve_to_their_package() -> None:
    subpackages = {"distill", "export", "engines", "server", "bench", "eval"}
    source = (
        "from .base import Engine\n"
        "from . import floor\n"
        "from .. import __version__\n"
        "from ..server.client import Client\n"
        "import halfstep.eval.fid as fid\n"
        "def f():\n"
        "    from halfstep.bench import run\n"
        "    import importlib\n"
        "    importlib.import_module('halfstep.eval.cli')\n"
    )
    found = [(line, name, _package_of(name, subpackages))
             for line, name in imports_in(source, "halfstep.engines.factory", False, subpackages)]
    assert found == [
        (1, "halfstep.engines.base.Engine", "engines"),
        (2, "halfstep.engines.floor", "engines"),
        (3, "halfstep.__version__", TOP),
        (4, "halfstep.server.client.Client", "server"),
        (5, "halfstep.eval.fid", "eval"),
        (7, "halfstep.bench.run", "bench"),
        (8, "importlib", None),
    ]
    (_, name), = imports_in("from . import x\n", "halfstep.server", True, subpackages)
    assert name == "halfstep.server.x"  # in an __init__, `.` is the package itself


def test_layers_import_only_downwards() -> None:
    """distill <- export <- engines <- server; bench and eval on top, imported by nobody."""
    found = violations(import_graph())
    assert not found, "imports against the layering:\n" + "\n".join(found)


# -- the repository's text ------------------------------------------------------------------------


def repository_files() -> list[Path]:
    """The files of this repository: what git tracks or would add, else a walk without build
    outputs."""
    if shutil.which("git") and (ROOT / ".git").exists():
        proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                               "--exclude-standard"], cwd=ROOT, capture_output=True, timeout=60)
        if proc.returncode == 0:
            names = sorted({n for n in proc.stdout.decode().split("\0") if n})
            return [ROOT / n for n in names if (ROOT / n).is_file()]
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in OUTPUT_DIRS and d not in TEXT_EXEMPT_DIRS
                       and not d.endswith(".egg-info")]
        files += [Path(dirpath) / f for f in filenames]
    return sorted(files)


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary: weights, images
    return data.decode("utf-8", errors="replace")


def test_no_references_to_notes_outside_the_repository() -> None:
    """Those notes and that folder are not part of this repository: no file outside docs/
    points at them."""
    found = []
    for path in repository_files():
        rel = path.relative_to(ROOT)
        if rel.parts[0] in TEXT_EXEMPT_DIRS or rel.as_posix() in TEXT_EXEMPT_FILES:
            continue
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for needle in STALE_REFERENCES:
                if needle in line:
                    found.append(f"{rel.as_posix()}:{number}: {needle}: {line.strip()[:100]}")
    assert not found, "references to files outside this repository:\n" + "\n".join(found)


LINK = re.compile(r"\]\(\s*(?:<([^>\n]+)>|([^)\s]+))(?:\s+[\"'][^)\n]*[\"'])?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)


def readme_links(text: str) -> list[tuple[int, str]]:
    links = []
    for pattern in (LINK, REFERENCE):
        for m in pattern.finditer(text):
            target = next(g for g in m.groups() if g is not None)
            links.append((text.count("\n", 0, m.start()) + 1, target))
    return sorted(links)


def test_readme_links_resolve_inside_the_repository() -> None:
    readme = ROOT / "README.md"
    broken = []
    for line, target in readme_links(readme.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http(s), mailto: and anchors are not files
        rel = target.split("#", 1)[0].split("?", 1)[0]
        path = (readme.parent / rel).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(f"README.md:{line}: ({target})")
    assert not broken, "README links to files not in this repository:\n" + "\n".join(broken)


def test_readme_link_parser() -> None:
    text = ("see [a](docs/a.md) and [b](<docs/b c.md>), [c](https://x.org/y) "
            "[d](docs/d.md#part \"title\")\n[ref]: ../elsewhere/x.md\n")
    assert readme_links(text) == [(1, "docs/a.md"), (1, "docs/b c.md"), (1, "docs/d.md#part"),
                                  (1, "https://x.org/y"), (2, "../elsewhere/x.md")]
