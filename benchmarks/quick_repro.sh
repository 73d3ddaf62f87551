#!/usr/bin/env bash
# The README's main job timed from a fresh clone: `dvc repro` on the quick profile, in DIR, at COMMIT.
# The clone's own package goes on PYTHONPATH and the active venv is used (the install is not timed);
# strategy and compile caches start empty; torch's default threads. Log: DIR.log (start, end, load).
#   . .venv/bin/activate && bash benchmarks/quick_repro.sh /tmp/qafter HEAD
# Per-run seconds afterwards: sqlite3 DIR/mlflow.db "select name, (end_time - start_time) / 1000.0 from runs"
set -u
dir=$1; commit=${2:-HEAD}; origin=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
rm -rf "$dir"; git clone -q "$origin" "$dir"; cd "$dir"; git checkout -q "$commit"
export PYTHONPATH=$dir MAMLBENCH_CACHE_DIR=$dir/.cache-mamlbench
{ echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) $(nproc) cores, start load: $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s)
  dvc repro
  echo "# $(date -u +%FT%TZ) rc $? done in $(( $(date +%s) - start )) s load: $(cut -d' ' -f1-3 /proc/loadavg)"; } > "$dir.log" 2>&1
