#!/usr/bin/env bash
# GPU check (issue 7), one CUDA machine, at most 8 minutes. From the repository root:
#
#   bash benchmarks/gpu_check.sh [OUT]          # OUT: runs/gpu_check; GPU_CHECK_SECONDS=470 caps the total
#
# 1. In the background (CPU): Omniglot download from the mirror (MAMLBENCH_DATA_MIRROR, else
#    ../shared/data or ./shared/data when present), prepare, episodize: `mamlbench data`, as dvc.yaml.
#    Skipped when data/prepared/omniglot and data/episodes/omniglot are already there.
# 2. Meanwhile on the GPU: seconds per meta-iteration and peak memory, Omniglot 5w1s and 20w1s,
#    fast path vs per-task loop vs vmap vs a learn2learn-style loop, fp32 and bf16
#    (benchmarks/gpu_check.py bench).
# 3. Paper-profile Omniglot 5w1s MAML training for the minutes left, validation accuracy against
#    wall time (benchmarks/gpu_check.py train).
# Everything is printed as it comes and kept in OUT/gpu_check.log.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
TOTAL=${GPU_CHECK_SECONDS:-470}
BENCH=${GPU_CHECK_BENCH_SECONDS:-260}
START=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

[ -f .venv/bin/activate ] && . .venv/bin/activate
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # works without `pip install -e .` too
if [ -z "${MAMLBENCH_DATA_MIRROR:-}" ]; then
  for d in ../shared/data shared/data; do
    if [ -d "$d/omniglot" ]; then export MAMLBENCH_DATA_MIRROR="$(cd "$d" && pwd)"; break; fi
  done
fi
left() { echo $(( START + TOTAL - $(date +%s) )); }
cli() { nice -n 19 python -c 'from mamlbench.cli import main; main()' "$@"; }   # `mamlbench`, low priority

echo "gpu_check: $(date -u +%FT%TZ) $(python -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
echo "data mirror: ${MAMLBENCH_DATA_MIRROR:-none (params data.mirror)}"

# 1. data, in the background
(
  set -e
  if [ -f data/prepared/omniglot/meta.json ]; then
    echo "data: data/prepared/omniglot present"
  else
    cli data download omniglot data/raw/omniglot
    cli data prepare omniglot data/raw/omniglot data/prepared/omniglot
  fi
  cli data episodize omniglot data/prepared/omniglot data/episodes/omniglot
) > "$OUT/data.log" 2>&1 &
DATA_PID=$!

# 2. the meta-step benchmark
timeout --signal=INT --kill-after=10 $(( BENCH + 20 )) python benchmarks/gpu_check.py bench --deadline "$BENCH" --out "$OUT"
echo "bench exit $? at $(( $(date +%s) - START )) s"

# 3. training for what is left
if wait "$DATA_PID"; then
  tail -n 3 "$OUT/data.log"
  REMAIN=$(( $(left) - 15 ))
  if [ "$REMAIN" -gt 30 ]; then
    timeout --signal=INT --kill-after=10 $(( REMAIN + 10 )) python benchmarks/gpu_check.py train --deadline "$REMAIN" --out "$OUT"
    echo "train exit $?"
  else
    echo "train: skipped, only $(left) s left"
  fi
else
  echo "data preparation failed (last lines of $OUT/data.log):"; tail -n 20 "$OUT/data.log"
fi
echo "gpu_check: $(( $(date +%s) - START )) s in all"
