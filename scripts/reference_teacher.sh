#!/usr/bin/env bash
# The reference MNIST teacher, resumable end to end: run it again after any interruption.
#
# 1. A short comparison on identical batches (every step's batch is seeded by (seed, step)):
#    GroupNorm groups 32 vs 8 crossed with peak learning rates 2e-4 vs 5e-4, SHORT_STEPS each.
# 2. The configuration with the lowest mean training loss over the second half of the short
#    run is continued from its own checkpoint to MAX_STEPS, keeping the EMA weights every
#    SNAPSHOT_EVERY steps so that `halfstep teacher-curve` can score the quality curve.
#
# Run it at idle priority, e.g. `nohup chrt -i 0 scripts/reference_teacher.sh > runs/teacher.log 2>&1 &`,
# and pause it (kill -STOP / -CONT on the `halfstep train` process) while timing anything.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="mnist:${HALFSTEP_MNIST_DIR:-$(cd .. && pwd)/shared/data/mnist}"
HALFSTEP=${HALFSTEP:-.venv/bin/halfstep}
SHORT_STEPS=${SHORT_STEPS:-400}
MAX_STEPS=${MAX_STEPS:-10000}
SNAPSHOT_EVERY=${SNAPSHOT_EVERY:-1000}
SWEEP=runs/teacher-sweep
FINAL=runs/mnist-teacher

train() {  # train OUT GROUPS LR MAX_STEPS [extra args]
  local out=$1 groups=$2 lr=$3 steps=$4; shift 4
  # --resume continues from the checkpoint, or starts where there is none yet
  "$HALFSTEP" train --data "$DATA" --out "$out" --preset mnist --norm-groups "$groups" --lr "$lr" \
    --max-steps "$steps" --resume "$@"
}

if [ ! -f "$FINAL/checkpoint.pt" ]; then
  for config in "g32-lr2e-4 32 2e-4" "g8-lr2e-4 8 2e-4" "g8-lr5e-4 8 5e-4" "g32-lr5e-4 32 5e-4"; do
    set -- $config
    train "$SWEEP/$1" "$2" "$3" "$SHORT_STEPS" --checkpoint-every 100 --snapshot-every 200
  done
  winner=$(python3 - "$SWEEP" "$SHORT_STEPS" <<'PY'
import json, pathlib, sys
sweep, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
scores = {}
for log in sorted(sweep.glob("*/loss.jsonl")):
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    late = [r["loss"] for r in rows if r["step"] > steps // 2]
    scores[log.parent.name] = sum(late) / len(late)
for name, score in sorted(scores.items(), key=lambda kv: kv[1]):
    print(f"{name}: mean loss over steps {steps // 2}-{steps} = {score:.5f}", file=sys.stderr)
print(min(scores, key=scores.get))
PY
)
  echo "continuing $winner"
  cp -r "$SWEEP/$winner" "$FINAL.tmp" && mv "$FINAL.tmp" "$FINAL"
fi
groups=$(python3 -c "import json; print(json.load(open('$FINAL/config.json'))['model']['norm_num_groups'])")
lr=$(python3 -c "import json; print(json.load(open('$FINAL/config.json'))['lr'])")
train "$FINAL" "$groups" "$lr" "$MAX_STEPS" --checkpoint-every 250 --snapshot-every "$SNAPSHOT_EVERY"
