#!/usr/bin/env bash
# Few-shot cells trained to their protocol's whole budget (reports/full/README.md), one torch thread,
# from a worktree at a fixed commit so that no code change restarts them. A sitting lasts MINUTES of
# wall time: the cell under way is stopped with SIGTERM (its newest checkpoint stays) and the next
# call of this script continues it bit-exactly, on this machine or on another one given the run
# folder. A cell whose training has ended is evaluated on the 600 fixed test episodes. Usage:
#   scripts/full_budget_runs.sh ROOT MINUTES CELL...    CELL: profile:algorithm:setting:seed
#   e.g. scripts/full_budget_runs.sh ~/full 150 paper_noconv:maml:5w1s:0 paper_noconv:maml:5w5s:0
# DATA (default data/) holds prepared/omniglot and episodes/omniglot.
set -euo pipefail
ROOT=${1:?ROOT folder for the run folders}
MINUTES=${2:?MINUTES of wall time for this sitting}
shift 2
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
DATA=${DATA:-data}
end=$(( $(date +%s) + MINUTES * 60 ))
mkdir -p "$ROOT/logs"
for cell in "$@"; do
  IFS=: read -r profile algorithm setting seed <<<"$cell"
  run="$ROOT/omniglot/$profile-$algorithm-$setting-seed$seed" log="$ROOT/logs/$profile-$algorithm-$setting-seed$seed.log"
  [ -f "$run/eval/metrics.json" ] && continue
  left=$(( end - $(date +%s) ))
  [ "$left" -gt 60 ] || break
  opts=(omniglot -a "$algorithm" -s "$setting" --seed "$seed" --profile "$profile"
        --prepared "$DATA/prepared/omniglot" --episodes "$DATA/episodes/omniglot")
  cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
  echo "# $(date -u +%FT%TZ) start $(git rev-parse --short HEAD) $(uname -n) ($cpu, $(nproc) cores) load: $(cut -d' ' -f1-3 /proc/loadavg) sitting left: ${left}s" >>"$log"
  if timeout -s TERM "$left" mamlbench train "${opts[@]}" --run-dir "$run" --no-progress >>"$log" 2>&1; then
    mamlbench evaluate "${opts[@]}" --runs "$run" --out "$run/eval" >>"$log" 2>&1
    echo "# $(date -u +%FT%TZ) done load: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$log"
  else
    rc=$?   # before any other expansion resets it
    echo "# $(date -u +%FT%TZ) stopped (rc $rc): the sitting is over; rerun to continue" >>"$log"
    break
  fi
done
