#!/usr/bin/env bash
# The GPU check (issues 16 and 22) in one call on an offline GPU host, in under 8 minutes on one H100:
#   ResNet-50 at 224 px, bf16 autocast, channels_last: eager (and compiled) compute ceiling at batch 256, the real
#   `train` command end to end on generated ImageNet-like JPEGs and 3-12 MP photos (CPU and --decode gpu), loader
#   supply, the designer default batch 16, DenseNet-121; the nvJPEG stream hazard script; host syncs per step.
#
# Needs: python3 with torch and torchvision (the host's own: the check reports its version) and pip; the wheels of
# everything else in .whl/ beside this repository (`make wheelhouse` on a networked machine), installed with
# --no-index --no-deps into a private temporary folder. No network, nothing installed into the host's Python.
#   bash benchmarks/gpu_check.sh
# Results: $GPU_CHECK_OUT (default gpu_check_output/): summary.md, throughput.json, hazard.md, environment.txt,
# nvidia-smi.txt, logs.txt, gpu_check.log. Generated data goes to a temporary folder, removed at the end.
# GPU_CHECK_SMOKE=1: the same steps on the CPU at toy size (under 3 minutes). PYTHON: the interpreter (python3).
# Exit status: 0 all measurements ran (or were skipped for time) and the hazard check passed; 1 something failed;
# 2 no usable Python, wheels that do not install, or no GPU.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${GPU_CHECK_OUT:-$REPO/gpu_check_output}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
started=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - started ))s] $*"; }

probe='import sys, torch, torchvision as tv; print(sys.version.split()[0], "torch", torch.__version__, "torchvision",
tv.__version__, "CUDA", torch.version.cuda)'
if ! versions="$("$PY" -c "$probe" 2>&1)"; then
    say "$PY cannot import torch and torchvision (run where its Python has them, or set PYTHON): ${versions: -300}"
    exit 2
fi
say "python: $(command -v "$PY") ($versions)"
if [ -f "$REPO/.whl/requirements.txt" ]; then
    if ! "$PY" -m pip install --quiet --disable-pip-version-check --no-compile --no-index --no-deps \
            --target "$WORK/site" --find-links "$REPO/.whl" -r "$REPO/.whl/requirements.txt"; then
        say "the wheels in $REPO/.whl do not install for this Python (make wheelhouse covers CPython 3.10-3.13, x86_64)"
        exit 2
    fi
    say "installed $(wc -l < "$REPO/.whl/requirements.txt") wheels from .whl/ into a private folder"
else
    say "no .whl/requirements.txt: using what $PY already has (run 'make wheelhouse' for an offline host)"
fi
# This checkout's sources, then the wheels, then the host's own packages.
export PYTHONPATH="$REPO/src:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg

# Seconds from the start of this script: measurements that would end later are skipped; `timeout` is the backstop.
if [ "$SMOKE" = 1 ]; then budget=165; hard=175; else budget=440; hard=470; fi
elapsed=$(( $(date +%s) - started ))
timeout --signal=TERM --kill-after=5 "$(( hard - elapsed ))" "$PY" "$REPO/benchmarks/gpu_check.py" \
    --out "$OUT_DIR" --work "$WORK" --budget-seconds "$(( budget - elapsed ))" $([ "$SMOKE" = 1 ] && echo --smoke)
status=$?
say "done, exit status $status; results in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit $status
