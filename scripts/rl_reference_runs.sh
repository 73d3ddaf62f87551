#!/usr/bin/env bash
# Meta-RL reference runs (issue 13) under `--profile rl_reference`, two workers side by side on a 2-core
# machine, one torch thread each. Worker 1: 2D navigation's MAML for the paper's 500 meta-iterations,
# then (once worker 2 has trained navigation's pretrained baseline) the evaluation of MAML, pretrained
# and random on the fixed test tasks. Worker 2: the four MuJoCo families at 8 minutes of MAML each (the
# pretrained baseline gets as many TRPO steps), each evaluated, then navigation's pretrained baseline.
# Logs go to $ROOT/logs. Usage:
#   scripts/rl_reference_runs.sh ROOT WORKER   (WORKER: 1 or 2, both at once)
# Then: mamlbench rl report --runs ROOT --out reports/rl
# Through DVC (one process per env): dvc exp run -S profile=rl_reference -S 'rl.envs=[navigation,ant_vel]'
set -euo pipefail
ROOT=${1:?ROOT folder for the runs}
WORKER=${2:?worker 1 or 2}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$ROOT/logs"
stamp() { echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) $1 load: $(cut -d' ' -f1-3 /proc/loadavg)"; }

rl() {  # env: train both, then evaluate
  local run="$ROOT/rl/$1" log="$ROOT/logs/rl-$1.log"
  [ -f "$run/metrics.json" ] && return 0
  { stamp start
    mamlbench rl train "$1" --profile rl_reference --out "$run" --no-progress
    stamp trained
    mamlbench rl evaluate "$1" --profile rl_reference --runs "$run" --plots "$run/plots"
    stamp done; } >"$log" 2>&1
}

NAV="$ROOT/rl/navigation"
if [ "$WORKER" = 1 ]; then
  { stamp "navigation maml"
    mamlbench rl train navigation --only maml --profile rl_reference --out "$NAV" --metrics "$NAV/train-maml.json" --no-progress
    stamp "maml trained"
    while [ ! -f "$ROOT/nav-pretrained.done" ]; do sleep 20; done
    stamp evaluate
    mamlbench rl evaluate navigation --profile rl_reference --runs "$NAV" --plots "$NAV/plots"
    stamp done; } >"$ROOT/logs/rl-navigation.log" 2>&1
else
  rl halfcheetah_dir; rl halfcheetah_vel; rl ant_dir; rl ant_vel
  { stamp "navigation pretrained"
    mamlbench rl train navigation --only pretrained --profile rl_reference --out "$NAV" \
      --metrics "$NAV/train-pretrained.json" --no-progress
    stamp done; } >"$ROOT/logs/rl-navigation-pretrained.log" 2>&1
  touch "$ROOT/nav-pretrained.done"
fi
