#!/usr/bin/env bash
# One command for a CUDA GPU (bounded by its timeouts at ~10 minutes plus wheel installs;
# typically far less):
#   scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else /tmp/halfstep-gpu-check)
# 1. installs the wheels carried in .whl/ that are not installed yet, then the project itself,
#    built from this working tree (both into /tmp/site, offline, --no-deps),
# 2. runs the tests marked `gpu` (GPU_TESTS=path overrides which; default: tests),
# 3. benchmarks eager vs CUDA-graph engines: student steps {1,2,4,8} x batch {1,8,64} and the
#    teacher at 256 steps, then a short reduced-precision run (informational),
# 4. runs `halfstep bench --quick` on the embedded bundle (HTTP, engines, FLOP floor, diffusers:
#    the GPU rows of docs/benchmarks.md; needs fastapi, uvicorn, httpx and matplotlib wheels in
#    .whl/; informational, bounded at 150 s),
# 5. writes gpu-tests.{txt,xml}, engine_bench.{json,txt}, bench.{json,txt,png}, env.txt and
#    install.txt to OUT_DIR; prints the engine table last.
# Exit status: 0 when the tests and the float32 benchmark both succeeded.
set -uo pipefail

OUT_DIR="${1:-${OUT:-/tmp/halfstep-gpu-check}}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SITE=/tmp/site
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR" "$SITE"
# Python runs from an empty directory: `python -m` puts the cwd first on sys.path, and the
# repository root's halfstep/ (the CLI alone: the subpackages live in distill/, export/, ...
# and are mapped in by pyproject.toml) would shadow the installed package.
RUN_DIR="$(mktemp -d /tmp/halfstep-run.XXXXXX)"
cd "$REPO" || exit 1
started=$(date +%s)
say() { echo "== gpu_check [$(( $(date +%s) - started ))s] $*"; }

# The installed project first; the repository root after it, for the `tests` package.
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"

# -- carried wheels not installed yet ---------------------------------------------------------
missing=()
for whl in .whl/*.whl; do
  [ -e "$whl" ] || continue
  dist="$(basename "$whl" | cut -d- -f1)"
  if ! "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null
  then missing+=("$whl"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${#missing[@]} wheel(s): $(printf '%s ' "${missing[@]##*/}")"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${missing[@]}" || say "pip install failed (continuing to see what imports)"
else
  say "no wheels to install"
fi

# -- the project, built from this working tree ---------------------------------------------
# Offline and without build isolation, so the build uses the setuptools (and, before setuptools
# 70.1, wheel) already here or carried in .whl/; --upgrade replaces an earlier run's install.
# setuptools builds in build/ and never prunes it: a module deleted since the last run would
# still be packaged, so start from an empty build/ (an ignored build output).
say "installing the project from $REPO"
rm -rf "$REPO/build"
if ! "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
    --target "$SITE" "$REPO" > "$OUT_DIR/install.txt" 2>&1; then
  tail -n 20 "$OUT_DIR/install.txt"
  say "cannot install the project (install.txt): building it needs setuptools>=68 (and wheel"
  say "for setuptools older than 70.1); carry their wheels in .whl/"
  exit 3
fi

# -- what is installed ------------------------------------------------------------------------
(cd "$RUN_DIR" && "$PY" -) <<'EOF' 2>&1 | tee "$OUT_DIR/env.txt"
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "diffusers", "safetensors", "pytest", "onnxruntime", "fastapi"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # report every missing piece, not just the first
        print(f"{name} MISSING ({type(exc).__name__}: {exc})")
try:
    import halfstep
    print(f"halfstep {halfstep.__version__} from {halfstep.__file__}")
except Exception as exc:
    print(f"halfstep MISSING ({type(exc).__name__}: {exc})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
if ! (cd "$RUN_DIR" && "$PY" -c 'import halfstep.distill, torch, diffusers, safetensors, pytest; assert torch.cuda.is_available()'); then
  say "cannot run: needs halfstep, torch with CUDA, diffusers, safetensors and pytest (env.txt);"
  say "carry the missing wheels (and their dependencies) in .whl/"
  exit 3
fi
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1

# -- 2. tests marked gpu ------------------------------------------------------------------------
say "pytest -m gpu ${GPU_TESTS:-tests}"
# --import-mode=append: pytest must not put the repo root ahead of the installed package.
(cd "$RUN_DIR" && timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider --import-mode=append \
  --continue-on-collection-errors --junitxml="$OUT_DIR/gpu-tests.xml" \
  "$REPO/${GPU_TESTS:-tests}") 2>&1 | tee "$OUT_DIR/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}

# -- 3. benchmark (float32), then a short reduced-precision run --------------------------------
say "engine benchmark: torch vs cudagraph"
(cd "$RUN_DIR" && timeout 200 "$PY" -m halfstep.bench.engines --backends torch,cudagraph \
  --steps 1,2,4,8 --batches 1,8,64 --teacher-steps 256 --repeats 10 \
  --json "$OUT_DIR/engine_bench.json") > "$OUT_DIR/engine_bench.txt" 2>&1
bench_rc=$?
say "reduced precision (informational: may be refused by the float32 tolerance check)"
(cd "$RUN_DIR" && timeout 60 "$PY" -m halfstep.bench.engines --backends cudagraph \
  --dtype float16 --steps 4 --batches 1,64 --teacher-steps 0 --repeats 10 \
  --json "$OUT_DIR/engine_bench_float16.json") 2>&1 | tee "$OUT_DIR/engine_bench_float16.txt"

# -- 4. halfstep bench (informational: its exit status does not change ours) ------------------
say "halfstep bench --quick on the embedded bundle"
(cd "$RUN_DIR" && timeout 210 "$PY" -m halfstep bench --bundle "$REPO/server/bundles/mnist" --quick \
  --cell-budget-s 5 --json "$OUT_DIR/bench.json" --plot "$OUT_DIR/bench.png") \
  > "$OUT_DIR/bench.txt" 2>&1
say "halfstep bench exit $?"

say "gpu tests exit ${tests_rc}: $(tail -n 1 "$OUT_DIR/gpu-tests.txt")"
say "benchmark exit ${bench_rc}; results in $OUT_DIR"
cat "$OUT_DIR/engine_bench.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
