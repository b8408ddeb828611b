#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md ("GPU") in one run, on a machine with one GPU and no network.
# From the project root, with the Python dependencies importable (for an offline machine: unpack them and
# put them on PYTHONPATH first, then `bash launch/gpu-check.sh`). Writes under $OUT (default
# /tmp/maskcon-gpu): gpu-benchmarks.md (the block for BENCHMARKS.md), gpu-benchmarks.md.json (every part's
# report) and log.txt. Extra arguments go to `launch/bench.py gpu`.
set -u
OUT=${OUT:-/tmp/maskcon-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
timeout 540 python3 launch/bench.py gpu --out "$OUT/gpu-benchmarks.md" --work /tmp/maskcon-gpu-work "$@" 2>&1 \
  | grep -v "nvjpeg2k\|nvtiff\|nvJPEG2000\|nvTIFF" | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
echo "exit status $status" | tee -a "$OUT/log.txt"
exit "$status"
