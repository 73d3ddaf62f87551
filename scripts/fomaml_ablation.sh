#!/usr/bin/env bash
# Why first-order MAML falls behind MAML under the quick profile: Omniglot 5-way 1-shot, seed 0, MAML
# and FOMAML trained and tested at the quick budget with one factor flipped per arm, so each arm
# isolates one of the things quick (and the protocol work before it) changed. One torch thread, one
# process at a time; results and the page built from them: reports/ablations/fomaml_quick/README.md.
# Usage:
#   scripts/fomaml_ablation.sh ROOT PREPARED EPISODES [ARM ...]     (no ARM: every arm below, in order)
#   ALGORITHMS=fomaml scripts/fomaml_ablation.sh ...   (FOMAML alone: paired against the quick arm's MAML)
# e.g. scripts/fomaml_ablation.sh /tmp/fomaml-ablation data/prepared/omniglot data/episodes/omniglot
# Each arm's params file is params.yaml ($PARAMS to use another) plus a profile `ablation_<arm>`: the
# Omniglot keys of `profiles.quick` as the quick report's 50.87% was made with (commit 73836b1: 300
# updates of 16 tasks, PyTorch's init, validation every 100 on 50 episodes, 600 test episodes),
# written out rather than extended, so that a later edit of quick does not move the baseline; then
# the arm's dotted keys. Everything else is params.yaml's protocol (shot_sum, alpha 0.4, one query
# per class, BatchNorm shift only). MLflow is off in the copies, so nothing is logged to the
# project's store. An arm whose evaluation exists is skipped; a stopped one resumes its checkpoints.
set -euo pipefail
ROOT=${1:?ROOT folder for the runs}
PREPARED=$(realpath "${2:?prepared Omniglot folder}")
EPISODES=$(realpath "${3:?fixed episodes folder}")
shift 3
HERE=$(cd "$(dirname "$0")/.." && pwd)
PARAMS=$(realpath "${PARAMS:-$HERE/params.yaml}")
mkdir -p "$ROOT/logs"
ROOT=$(realpath "$ROOT")
read -r -a ALGS <<<"${ALGORITHMS:-maml fomaml}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MAMLBENCH_CACHE_DIR="$ROOT/cache"

# arm -> the dotted keys it changes from quick (JSON); "quick" itself changes nothing.
QUICK='{"omniglot.init": "torch", "omniglot.train.iterations": 300, "omniglot.train.meta_batch_size": 16,
 "omniglot.train.validate_every": 100, "omniglot.train.n_val_episodes": 50, "omniglot.evaluate.n_episodes": 600}'
declare -A ARM=(
  [quick]='{}'
  [init_reference]='{"omniglot.init": "reference"}'
  [mean_a04]='{"omniglot.train.loss_reduction": "mean"}'
  [shot_sum_a008]='{"omniglot.train.inner_lr": 0.08}'
  [query15]='{"omniglot.settings.5w1s.train.n_query": 15}'
  [meta_batch32]='{"omniglot.train.meta_batch_size": 32}'
  [mean_a04_query15]='{"omniglot.train.loss_reduction": "mean", "omniglot.settings.5w1s.train.n_query": 15}'
)
ORDER=(quick init_reference mean_a04 shot_sum_a008 query15 meta_batch32 mean_a04_query15)
[ $# -gt 0 ] && ORDER=("$@")

params_for() {  # arm -> $ROOT/params-<arm>.yaml
  python - "$PARAMS" "$1" "$QUICK" "${ARM[$1]}" "$ROOT/params-$1.yaml" <<'EOF'
import json, sys, yaml
src, arm, quick, overrides, out = sys.argv[1:]
params = yaml.safe_load(open(src))
params["profiles"]["ablation_" + arm] = {**json.loads(quick), **json.loads(overrides)}
params["tracking"]["enabled"] = False
yaml.safe_dump(params, open(out, "w"), sort_keys=False)
EOF
  mamlbench check-params "$ROOT/params-$1.yaml" >/dev/null
}

cell() {  # arm algorithm
  local p="$ROOT/params-$1.yaml" run="$ROOT/$1/$2" log="$ROOT/logs/$1-$2.log"
  local data=(--prepared "$PREPARED" --episodes "$EPISODES")
  [ -f "$run/eval/metrics.json" ] && return 0
  { echo "# $(date -u +%FT%TZ) $(git -C "$HERE" rev-parse --short HEAD) arm $1 ${ARM[$1]} load: $(cut -d' ' -f1-3 /proc/loadavg)"
    local t0=$SECONDS
    mamlbench train omniglot -p "$p" --profile "ablation_$1" -a "$2" -s 5w1s --seed 0 --run-dir "$run" "${data[@]}" --no-progress
    echo "# train wall s: $((SECONDS - t0))"
    mamlbench evaluate omniglot -p "$p" --profile "ablation_$1" -a "$2" -s 5w1s --seed 0 --runs "$run" --out "$run/eval" "${data[@]}"
    echo "# $(date -u +%FT%TZ) done load: $(cut -d' ' -f1-3 /proc/loadavg)"; } >"$log" 2>&1
}

cd "$ROOT"   # anything a run writes beside itself stays under ROOT
for arm in "${ORDER[@]}"; do
  [ -n "${ARM[$arm]+x}" ] || { echo "unknown arm $arm (known: ${!ARM[*]})" >&2; exit 2; }
  params_for "$arm"
  for alg in "${ALGS[@]}"; do cell "$arm" "$alg"; done
  # the test episodes are the same in every arm (1 query per class at test), so FOMAML pairs with
  # the quick arm's MAML where the arm trained no MAML of its own
  maml="$ROOT/$arm/maml/eval"; [ -f "$maml/metrics.json" ] || maml="$ROOT/quick/maml/eval"
  mamlbench compare "$ROOT/$arm/fomaml/eval" "$maml" >"$ROOT/$arm/compare.txt"
  echo "$arm: $(tail -n 3 "$ROOT/$arm/compare.txt" | tr '\n' ' ')"
done
