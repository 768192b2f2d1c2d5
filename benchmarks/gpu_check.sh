#!/usr/bin/env bash
# The GPU throughput check of issue 16, in under 8 minutes on one H100/H200:
#   resnet50 and densenet121 at 224 px, batch 256 and 16, bf16 autocast, channels_last;
#   same-batch ceilings (eager; torch.compile'd), loader-only supply (CPU decode with every CPU, --decode gpu),
#   the real `train` command end to end over 300 steps after a warm-up, host syncs per step;
#   on generated ImageNet-like JPEGs (~500x375, q90) and 3-12 MP photos (written by all CPUs in parallel first).
#
# Run it from a copy of the repository:
#   python3 -m venv .venv && .venv/bin/pip install -e .      # once; skip where a Python with torch is installed
#   bash benchmarks/gpu_check.sh
# Results: $OUT/gpu_check (or benchmark_output/gpu_check): throughput.json, throughput.md, logs/ (one per
# measurement), nvidia-smi.txt. What does not fit the time budget is listed as skipped. Exit status: 0 when every
# measurement that ran succeeded, 1 when one failed, 2 when there is no usable Python or no GPU.
# Knobs (environment): BUDGET_SECONDS (default 420, measurements that would start later are skipped),
# MAX_SECONDS (timing cap of one measurement, default 30), EXTRA_ARGS (more benchmark_training.py flags).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$REPO/benchmark_output}/gpu_check"
mkdir -p "$OUT_DIR"
started=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - started ))s] $*"; }

usable() { "$1" -c 'import torch, torchvision, mlflow, yaml, PIL' >/dev/null 2>&1; }
PY=""
for candidate in "$REPO/.venv/bin/python" "$(command -v python3 || true)" "$(command -v python || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && usable "$candidate"; then PY="$candidate"; break; fi
done
if [ -z "$PY" ]; then
    say "no Python with torch, torchvision and mlflow found; creating $REPO/.venv (needs the package index)"
    if python3 -m venv "$REPO/.venv" && "$REPO/.venv/bin/pip" install -q -e "$REPO" && usable "$REPO/.venv/bin/python"
    then PY="$REPO/.venv/bin/python"
    else say "cannot set up Python: run 'python3 -m venv .venv && .venv/bin/pip install -e .' first"; exit 2
    fi
fi
# This checkout's sources first, whatever is installed.
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
say "python: $PY ($("$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))"

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "no CUDA device visible to torch"; exit 2
fi
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB")'
say "CPUs: $(nproc), /dev/shm: $(df -h /dev/shm 2>/dev/null | awk 'NR==2 {print $2}')"

# The whole run stays under 8 minutes: measurements that would start past BUDGET_SECONDS are skipped, and a
# hard timeout stops anything that hangs (its partial results are lost, the exit status says so).
timeout --signal=TERM --kill-after=20 460 "$PY" "$REPO/benchmarks/benchmark_training.py" --suite throughput \
    --device cuda --model resnet50,densenet121 --batch-sizes 256,16 --image-sizes 224 --images 4096 \
    --photo-images 1024 --compile --max-seconds "${MAX_SECONDS:-30}" --budget-seconds "${BUDGET_SECONDS:-420}" \
    --out "$OUT_DIR" ${EXTRA_ARGS:-}
status=$?
say "done, exit status $status; results in $OUT_DIR"
[ -f "$OUT_DIR/throughput.md" ] && cat "$OUT_DIR/throughput.md"
exit $status
