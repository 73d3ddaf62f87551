#!/usr/bin/env bash
# The reference set (issue 16): the paper's protocol under `--profile reference`, one torch thread per
# cell, two workers side by side on a 2-core machine. Each cell trains (resuming from its checkpoints
# if it was stopped), then evaluates; its log goes to $ROOT/logs. Usage:
#   scripts/reference_runs.sh ROOT WORKER   (WORKER: 1 or 2, then 3 and 4; two at once for the split below)
# The same cells through DVC, one experiment per row of the table (see reports/reference/README.md):
#   dvc exp run -S profile=reference -S 'omniglot.run.algorithms=[maml,fomaml]' \
#     -S 'omniglot.run.settings=[5w1s,5w5s,20w1s,20w5s]' omniglot-train omniglot-evaluate
set -euo pipefail
ROOT=${1:?ROOT folder for the runs}
WORKER=${2:?worker 1 to 6}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$ROOT/logs"
DATA=(--prepared data/prepared/omniglot --episodes data/episodes/omniglot)

omniglot() {  # algorithm setting seed
  local run="$ROOT/omniglot/$1-$2-seed$3" log="$ROOT/logs/omniglot-$1-$2-seed$3.log"
  [ -f "$run/eval/metrics.json" ] && return 0
  { echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) load: $(cut -d' ' -f1-3 /proc/loadavg)"
    mamlbench train omniglot -a "$1" -s "$2" --seed "$3" --profile reference --run-dir "$run" "${DATA[@]}" --no-progress
    mamlbench evaluate omniglot -a "$1" -s "$2" --seed "$3" --profile reference --runs "$run" --out "$run/eval" "${DATA[@]}"
    echo "# $(date -u +%FT%TZ) done load: $(cut -d' ' -f1-3 /proc/loadavg)"; } >"$log" 2>&1
}

sinusoid() {  # seed
  local run="$ROOT/sinusoid/seed$1" log="$ROOT/logs/sinusoid-seed$1.log"
  [ -f "$run/eval/metrics.json" ] && return 0
  { echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) load: $(cut -d' ' -f1-3 /proc/loadavg)"
    mamlbench train sinusoid --model maml --seed "$1" --profile reference --run-dir "$run/maml" --no-progress
    mamlbench train sinusoid --model pretrain --seed "$1" --profile reference --run-dir "$run/pretrain" --no-progress
    mamlbench evaluate sinusoid --seed "$1" --profile reference --runs "$run" --out "$run/eval"
    echo "# $(date -u +%FT%TZ) done load: $(cut -d' ' -f1-3 /proc/loadavg)"; } >"$log" 2>&1
}

# Workers 3 and 4: the variants added later (issue 18), at the same 5-way 1-shot budget.
if [ "$WORKER" = 3 ]; then
  omniglot boil 5w1s 0; omniglot protonet 5w1s 0; omniglot protomaml 5w1s 0; exit 0
elif [ "$WORKER" = 4 ]; then
  omniglot cavia 5w1s 0; omniglot imaml 5w1s 0; exit 0
elif [ "$WORKER" = 6 ]; then   # the fine-tuning baseline (Chen et al. 2019), added after the rest
  omniglot baseline 5w1s 0; exit 0
elif [ "$WORKER" = 5 ]; then   # first-order MAML's other two seeds, run last (at commit d4fd792, as the first set)
  omniglot fomaml 5w1s 1; omniglot fomaml 5w1s 2; exit 0
fi
if [ "$WORKER" = 1 ]; then
  omniglot maml 5w1s 0; omniglot maml 5w5s 0; omniglot maml 20w1s 0; omniglot maml 20w5s 0
  omniglot anil 5w1s 0; omniglot metasgd 5w1s 0; omniglot maml 5w1s 1; omniglot maml 5w1s 2
else
  sinusoid 0
  omniglot fomaml 5w1s 0; omniglot fomaml 5w5s 0; omniglot fomaml 20w1s 0; omniglot fomaml 20w5s 0
  omniglot mamlpp 5w1s 0; omniglot reptile 5w1s 0
fi
