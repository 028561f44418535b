"""Building the `halfstep` parser imports nothing heavy, so `halfstep --help` starts at once.

Each subcommand imports torch, diffusers, ONNX Runtime or FastAPI inside its handler; the
parser needs only argparse and the torch-free argument types. Checked in a fresh interpreter,
since this test process has long imported torch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "numpy", "onnxruntime", "fastapi")


def heavy_modules_after(code: str) -> list[str]:
    probe = (
        f"import sys\n{code}\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return eval(proc.stdout.strip().splitlines()[-1])  # a printed list of strings


def test_building_the_parser_imports_nothing_heavy():
    assert heavy_modules_after("import halfstep.cli; halfstep.cli.build_parser()") == []


@pytest.mark.parametrize(
    "module",
    [
        "halfstep.distill.cli_args",
        "halfstep.engines.names",
        "halfstep.export.cli",
        "halfstep.server.cli",
        "halfstep.bench.cli",
        "halfstep.eval.cli",
    ],
)
def test_parser_modules_are_light(module):
    assert heavy_modules_after(f"import {module}") == []


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["sample", "--help"]])
def test_help_runs_without_heavy_imports(argv):
    code = (
        "import halfstep.cli\n"
        "try:\n"
        f"    halfstep.cli.main({argv!r})\n"
        "except SystemExit:\n"
        "    pass"
    )
    assert heavy_modules_after(code) == []
