#!/usr/bin/env bash
# The reference MNIST bundle from the reference teacher (scripts/reference_teacher.sh), resumable
# end to end: run it again after any interruption and it continues where it stopped.
#
# 1. The teacher's quality curve: every kept EMA snapshot at DDIM 32 (500 fixed seeds), and the
#    final EMA at DDIM 32, 64 and 128, into runs/curve/*.json.
# 2. Distillation starts at the fewest DDIM steps whose classifier FD is within 2% of the
#    final teacher's best (128 or 64, say), with a lower learning rate in the early rounds (the
#    student starts a fraction of a pixel level from its teacher there) and more iterations
#    towards the last rounds, where the gap doubles each round.
# 3. The embedded bundle is re-made from it (teacher + students 1, 2, 4, 8, 16).
# 4. `halfstep eval` at N = 2,000 (rows are cached: an interrupted eval resumes).
#
# Run it at idle priority: `nohup chrt -i 0 scripts/reference_distill.sh > runs/distill.log 2>&1 &`
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST="${HALFSTEP_MNIST_DIR:-$(cd .. && pwd)/shared/data/mnist}"
HALFSTEP=${HALFSTEP:-.venv/bin/halfstep}
TEACHER=runs/mnist-teacher
BUNDLE=runs/mnist-bundle-ref
CURVE=runs/curve
# per-round iterations and peak learning rates, by the student's step count (the defaults are
# the embedded bundle's recipe: 15,100 iterations, about 110 minutes of rounds on 2 idle CPU
# cores; the rounds a start does not make are dropped below)
ROUND_ITERS=${ROUND_ITERS:-64=600,32=500,16=1200,8=2000,4=3000,2=2400,1=6000}
ROUND_LR=${ROUND_LR:-64=5e-5,32=5e-5,16=1e-4,8=1e-4,4=1e-4,2=1e-4,1=1e-4}
# DDIM step counts of the teacher's final curve (the start of distillation is chosen from these)
# and of the teacher rows of the eval; at N = 2,000 each teacher step costs about 5 s on 2 CPU
# cores (256 alone: about 15 minutes; 512: about 47)
FINAL_DDIM_STEPS=${FINAL_DDIM_STEPS:-32,64,128}
EVAL_TEACHER_STEPS=${EVAL_TEACHER_STEPS:-2,4,8,16,32,64,128,256,512}
EVAL_DPM_STEPS=${EVAL_DPM_STEPS:-4,8,16}
# threads of the distillation (2: the machine; 1 leaves a core to an eval of the teacher's rows
# running beside it, which the final eval then takes from its cache)
DISTILL_THREADS=${DISTILL_THREADS:-2}
mkdir -p "$CURVE"

[ -f "$TEACHER/ema.safetensors" ] || { echo "no finished teacher in $TEACHER" >&2; exit 1; }
[ -f "$CURVE/snapshots.json" ] || "$HALFSTEP" teacher-curve --run "$TEACHER" \
  --data "mnist:$MNIST" --samples 500 --ddim-steps 32 --json "$CURVE/snapshots.json"
[ -f "$CURVE/final-ddim.json" ] || "$HALFSTEP" teacher-curve --run "$TEACHER" --last \
  --data "mnist:$MNIST" --samples 500 --ddim-steps "$FINAL_DDIM_STEPS" --json "$CURVE/final-ddim.json"

from_steps=$(python3 - "$CURVE/final-ddim.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
best = min(r["fd_classifier"] for r in rows)
fits = sorted(r["ddim_steps"] for r in rows if r["fd_classifier"] <= 1.02 * best)
print(f"teacher DDIM FD by steps: {[(r['ddim_steps'], round(r['fd_classifier'], 3)) for r in rows]}",
      file=sys.stderr)
print(max(fits[0], 2))
PY
)
echo "distilling from $from_steps steps"
# keep the per-round settings of the rounds this start makes (students below from_steps)
rounds_below() { tr ',' '\n' <<<"$1" | awk -F= -v start="$from_steps" '$1 < start' | paste -sd, -; }
ROUND_ITERS=$(rounds_below "$ROUND_ITERS")
ROUND_LR=$(rounds_below "$ROUND_LR")
resume=()
[ -f "$BUNDLE/bundle.json" ] && resume=(--resume)
OMP_NUM_THREADS=$DISTILL_THREADS "$HALFSTEP" distill --teacher "$TEACHER" --out "$BUNDLE" --name mnist \
  --from-steps "$from_steps" --to-steps 1 --batch-size 32 --lr 1e-4 \
  --round-iters "$ROUND_ITERS" --round-lr "$ROUND_LR" "${resume[@]}"

rm -rf runs/mnist-embedded
"$HALFSTEP" copy-bundle "$BUNDLE" runs/mnist-embedded --students 1,2,4,8,16
OMP_NUM_THREADS=2 "$HALFSTEP" eval --bundle "$BUNDLE" --data "mnist:$MNIST" \
  --steps 1,2,4,8,16 --teacher-steps "$EVAL_TEACHER_STEPS" --dpm-steps "$EVAL_DPM_STEPS" \
  --samples 2000 --fid-ref-samples 2000 --batch-size 64 --cache-dir runs/cache \
  --json runs/eval-ref.json --plot runs/quality-ref.png --grids runs/grids-ref
echo "done: compare runs/eval-ref.json with docs/results/eval.json; if better, replace"
echo "server/bundles/mnist with runs/mnist-embedded and the docs/results files"
