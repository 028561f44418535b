#!/usr/bin/env bash
# The reference MNIST bundle from the reference teacher (scripts/reference_teacher.sh), resumable
# end to end: run it again after any interruption and it continues where it stopped.
#
# 1. The teacher's quality curve: every kept EMA snapshot at DDIM 32 (500 fixed seeds), into
#    runs/curve/snapshots.json.
# 2. The teacher's rows of the final eval (N = 2,000: DDIM and DPM-Solver++), from a bundle that
#    holds only the teacher; the final eval takes them from its cache.
# 3. Distillation starts at the fewest DDIM steps whose classifier FD (N = 2,000) is within 2%
#    of the teacher's best, with a lower learning rate in the early rounds (the student starts a
#    fraction of a pixel level from its teacher there) and more iterations towards the last
#    rounds, where the gap doubles each round. (Not at 500 samples: their FD carries a bias of
#    about +5.4 that hides differences between step counts: 64 steps looked 1.6% from the best
#    there and is 6% from it at N = 2,000.)
# 4. The embedded bundle is re-made from it (teacher + students 1, 2, 4, 8, 16).
# 5. `halfstep eval` at N = 2,000 (rows are cached: an interrupted eval resumes).
#
# Run it at idle priority: `nohup chrt -i 0 scripts/reference_distill.sh > runs/distill.log 2>&1 &`
# Another teacher run goes through the same steps with its own folders, e.g. TEACHER=runs/t2
# CURVE=runs/curve-t2 TEACHER_ONLY=runs/teacher-only-t2 BUNDLE=runs/bundle-t2
# EMBEDDED=runs/embedded-t2 EVAL_OUT=runs/eval-t2; FROM_STEPS=256 skips step 3's choice (and the
# teacher rows before distilling: the final eval makes them); EMBED_DTYPE=float16 halves the
# embedded copy (copy-bundle --dtype); CLASSIFIER=FILE scores with other classifier weights
# (default: the results table's, which ship with halfstep).
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST="${HALFSTEP_MNIST_DIR:-$(cd .. && pwd)/shared/data/mnist}"
HALFSTEP=${HALFSTEP:-.venv/bin/halfstep}
TEACHER=${TEACHER:-runs/mnist-teacher}
TEACHER_ONLY=${TEACHER_ONLY:-runs/teacher-only}
CURVE=${CURVE:-runs/curve}
EMBEDDED=${EMBEDDED:-runs/mnist-embedded}
EMBED_DTYPE=${EMBED_DTYPE:-float32}
EVAL_OUT=${EVAL_OUT:-runs}
FROM_STEPS=${FROM_STEPS:-}
# per-round iterations and peak learning rates, by the student's step count (the defaults are
# the embedded bundle's recipe from 256 steps: 19,700 iterations, about 2.3 hours of rounds on 2
# idle CPU cores; the rounds a start does not make are dropped below)
ROUND_ITERS=${ROUND_ITERS:-128=500,64=500,32=500,16=1200,8=2000,4=3000,2=6000,1=6000}
ROUND_LR=${ROUND_LR:-128=5e-5,64=5e-5,32=5e-5,16=1e-4,8=1e-4,4=1e-4,2=1e-4,1=1e-4}
# DDIM step counts of the teacher rows of the eval (the start of distillation is chosen from
# these); at N = 2,000 each teacher step costs about 5 s on 2 CPU cores (256 alone: about 15
# minutes; 512: about 47)
EVAL_TEACHER_STEPS=${EVAL_TEACHER_STEPS:-2,4,8,16,32,64,128,256,512}
EVAL_DPM_STEPS=${EVAL_DPM_STEPS:-4,8,16}
# threads of the distillation (2: the machine; 1 leaves a core to an eval of the teacher's rows
# running beside it, which the final eval then takes from its cache)
DISTILL_THREADS=${DISTILL_THREADS:-2}
CLASSIFIER=${CLASSIFIER:-}
mkdir -p "$CURVE"

[ -f "$TEACHER/ema.safetensors" ] || { echo "no finished teacher in $TEACHER" >&2; exit 1; }
CLASSIFIER_ARGS=()
[ -n "$CLASSIFIER" ] && CLASSIFIER_ARGS=(--classifier "$CLASSIFIER")
# (a rerun scores only the snapshots the JSON lacks)
"$HALFSTEP" teacher-curve --run "$TEACHER" "${CLASSIFIER_ARGS[@]}" \
  --data "mnist:$MNIST" --samples 500 --ddim-steps 32 --json "$CURVE/snapshots.json"
EVAL_ARGS=(--data "mnist:$MNIST" --teacher-steps "$EVAL_TEACHER_STEPS" --dpm-steps "$EVAL_DPM_STEPS"
  --samples 2000 --fid-ref-samples 2000 --batch-size 64 --cache-dir runs/cache
  "${CLASSIFIER_ARGS[@]}")

from_steps=$FROM_STEPS
if [ -z "$from_steps" ]; then
# the teacher alone as a bundle: the same teacher file (and sha256) the distilled bundle gets
[ -f "$TEACHER_ONLY/bundle.json" ] ||
  "$HALFSTEP" bundle --teacher "$TEACHER" --out "$TEACHER_ONLY" --name mnist
OMP_NUM_THREADS=2 "$HALFSTEP" eval --bundle "$TEACHER_ONLY" --steps "" "${EVAL_ARGS[@]}" \
  --json "$CURVE/teacher-rows.json" --quiet

from_steps=$(python3 - "$CURVE/teacher-rows.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["method"] == "ddim"]
best = min(r["fd_classifier"] for r in rows)
fits = sorted(r["steps"] for r in rows if r["fd_classifier"] <= 1.02 * best)
print(f"teacher DDIM FD by steps: {[(r['steps'], round(r['fd_classifier'], 3)) for r in rows]}",
      file=sys.stderr)
print(max(fits[0], 2))
PY
)
fi
BUNDLE=${BUNDLE:-runs/mnist-bundle-$from_steps}
echo "distilling from $from_steps steps into $BUNDLE"
# keep the per-round settings of the rounds this start makes (students below from_steps)
rounds_below() { tr ',' '\n' <<<"$1" | awk -F= -v start="$from_steps" '$1 < start' | paste -sd, -; }
ROUND_ITERS=$(rounds_below "$ROUND_ITERS")
ROUND_LR=$(rounds_below "$ROUND_LR")
resume=()
[ -f "$BUNDLE/bundle.json" ] && resume=(--resume)
OMP_NUM_THREADS=$DISTILL_THREADS "$HALFSTEP" distill --teacher "$TEACHER" --out "$BUNDLE" --name mnist \
  --from-steps "$from_steps" --to-steps 1 --batch-size 32 --lr 1e-4 \
  --round-iters "$ROUND_ITERS" --round-lr "$ROUND_LR" "${resume[@]}"

rm -rf "$EMBEDDED"
"$HALFSTEP" copy-bundle "$BUNDLE" "$EMBEDDED" --students 1,2,4,8,16 --dtype "$EMBED_DTYPE"
mkdir -p "$EVAL_OUT"
OMP_NUM_THREADS=2 "$HALFSTEP" eval --bundle "$EMBEDDED" --steps 1,2,4,8,16 "${EVAL_ARGS[@]}" \
  --json "$EVAL_OUT/eval-ref.json" --plot "$EVAL_OUT/quality-ref.png" --grids "$EVAL_OUT/grids-ref"
echo "done: compare $EVAL_OUT/eval-ref.json with docs/results/eval.json; if better, replace"
echo "server/bundles/mnist with $EMBEDDED and the docs/results files"
