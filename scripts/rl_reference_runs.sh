#!/usr/bin/env bash
# Meta-RL reference runs (issue 13) under `--profile rl_reference`: worker 1 trains 2D navigation for
# the paper's 500 meta-iterations, worker 2 the four MuJoCo families at 8 minutes of MAML each (the
# pretrained baseline gets as many TRPO steps); each then evaluates MAML, pretrained and random on the
# fixed test tasks. One torch thread per worker, two workers side by side. Logs go to $ROOT/logs. Usage:
#   scripts/rl_reference_runs.sh ROOT WORKER   (WORKER: 1 or 2)
# Through DVC: dvc exp run -S profile=rl_reference -S 'rl.envs=[navigation,halfcheetah_dir,...]'
set -euo pipefail
ROOT=${1:?ROOT folder for the runs}
WORKER=${2:?worker 1 or 2}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$ROOT/logs"

rl() {  # env
  local run="$ROOT/rl/$1" log="$ROOT/logs/rl-$1.log"
  [ -f "$run/metrics.json" ] && return 0
  { echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) load: $(cut -d' ' -f1-3 /proc/loadavg)"
    mamlbench rl train "$1" --profile rl_reference --out "$run" --no-progress
    echo "# $(date -u +%FT%TZ) trained load: $(cut -d' ' -f1-3 /proc/loadavg)"
    mamlbench rl evaluate "$1" --profile rl_reference --runs "$run" --plots "$run/plots"
    echo "# $(date -u +%FT%TZ) done load: $(cut -d' ' -f1-3 /proc/loadavg)"; } >"$log" 2>&1
}

if [ "$WORKER" = 1 ]; then
  rl navigation
else
  rl halfcheetah_dir; rl halfcheetah_vel; rl ant_dir; rl ant_vel
fi
