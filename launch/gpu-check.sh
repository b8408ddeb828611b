#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md ("GPU"), on a machine with one GPU and no network, in two calls that each
# fit 10 minutes: `bash launch/gpu-check.sh speed` (loader, step, compiled step, real, official, objectives,
# the JPEG path), then `bash launch/gpu-check.sh job` (the main job with the GPU's utilisation, the GPU
# tests, a profile of 20 steps); the second reuses the shards the first wrote. `all` runs both in one call;
# `tune` runs the --parts (all when none is given) and --variant entries given after it (BENCHMARKS.md).
# From the project root, with the Python dependencies importable (for an offline machine: unpack them and
# put them on PYTHONPATH first). Writes under $OUT (default /tmp/maskcon-gpu): gpu-GROUP.md (the block for
# BENCHMARKS.md; --out names another file), gpu-GROUP.md.json (every part's report) and log-GROUP.txt;
# the shards go to /tmp/maskcon-gpu-work (--work names another folder). Extra arguments go to
# `launch/bench.py gpu`. Ctrl-C or SIGTERM stops the running part and writes the parts before it (exit 130).
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
log="$OUT/log-$group.txt"
# in the background, so that a stop signal reaches this script at once and is passed on: the command stops its
# running part and writes the block of the parts before it (exit status 130)
child=
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null' INT TERM
out=(--out "$OUT/gpu-$group.md") work=(--work /tmp/maskcon-gpu-work)   # unless the arguments name their own
for argument in "$@"; do
  case $argument in
    --out|--out=*) out=();;
    --work|--work=*) work=();;
  esac
done
timeout --foreground 560 python3 launch/bench.py gpu "${parts[@]}" "${out[@]}" "${work[@]}" "$@" \
  > >(trap '' INT TERM; exec tee "$log") 2>&1 &
child=$!
status=0
wait "$child" || status=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
echo "exit status $status" | tee -a "$log"
exit "$status"
