#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md ("GPU"), on a machine with one GPU and no network, in two calls that each
# fit 10 minutes: `bash launch/gpu-check.sh speed` (loader, step, compiled step, real, official, objectives,
# the JPEG path), then `bash launch/gpu-check.sh job` (the main job with the GPU's utilisation, the GPU
# tests, a profile of 20 steps); the second reuses the shards the first wrote. `all` runs both in one call;
# `tune` runs the --parts and --variant entries given after it (BENCHMARKS.md, "Tuning").
# From the project root, with the Python dependencies importable (for an offline machine: unpack them and
# put them on PYTHONPATH first). Writes under $OUT (default /tmp/maskcon-gpu): gpu-GROUP.md (the block for
# BENCHMARKS.md), gpu-GROUP.md.json (every part's report) and log-GROUP.txt. Extra arguments go to
# `launch/bench.py gpu`.
set -u
group=${1:-speed}
shift $(( $# > 0 ? 1 : 0 ))
case $group in
  speed|job|all) parts=(--parts "$group");;
  tune) parts=();;
  *) echo "error: the first argument is speed, job, all or tune, not '$group'" >&2; exit 2;;
esac
OUT=${OUT:-/tmp/maskcon-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
timeout 560 python3 launch/bench.py gpu "${parts[@]}" --out "$OUT/gpu-$group.md" --work /tmp/maskcon-gpu-work \
  "$@" 2>&1 | grep -v "nvjpeg2k\|nvtiff\|nvJPEG2000\|nvTIFF" | tee "$OUT/log-$group.txt"
status=${PIPESTATUS[0]}
echo "exit status $status" | tee -a "$OUT/log-$group.txt"
exit "$status"
