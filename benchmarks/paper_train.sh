#!/usr/bin/env bash
# `mamlbench train omniglot` (MAML 5w1s) under profile paper for a 4-minute budget: strategy loop (the rule's
# choice before issue 17) against auto (the probe), one after the other, in a clone at HEAD, fresh caches.
# DATA: a folder holding prepared/ and episodes/ (e.g. a quick repro's data/).
#   . .venv/bin/activate && bash benchmarks/paper_train.sh /tmp/e2e /tmp/qafter/data
set -u
dir=$1; data=$2; origin=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
rm -rf "$dir"; git clone -q "$origin" "$dir"; cd "$dir"
export PYTHONPATH=$dir MAMLBENCH_CACHE_DIR=$dir/.cache-mamlbench
ln -s "$data" data
python - <<'PY'
import yaml
p = yaml.safe_load(open("params.yaml"))
p["profiles"]["e2e_auto"] = {"extends": "paper", "omniglot.train.time_budget_minutes": 4}
p["profiles"]["e2e_loop"] = {"extends": "e2e_auto", "omniglot.train.strategy": "loop"}
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
for prof in e2e_loop e2e_auto; do
  echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) $prof start, load $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s)
  mamlbench train omniglot --profile $prof --algorithm maml --setting 5w1s --run-dir runs/$prof --no-progress 2>&1 | tail -2
  echo "# $prof wall $(( $(date +%s) - start )) s"
  python -c "import json; t=json.load(open('runs/$prof/train.json')); print({k: t.get(k) for k in ('iterations', 'seconds', 'strategy')})"
done
