#!/usr/bin/env bash
# Train on several nodes under SLURM: one `accelerate launch` per node, one process per GPU.
#
#   sbatch --nodes 2 launch/slurm.sh --dataset imagenet32 --global-batch 256 --mixed-precision bf16
#
# Submit from the repository root with the Python environment active (sbatch passes the environment on).
# Every argument goes to launch/train.py unchanged. The run is checked once first, here, for all its processes
# (`launch/train.py --check`: options, the global batch over all GPUs, shards, --resume checkpoint, W&B); a
# mistake is one line and exit 2 before any node starts. `accelerate launch -q` keeps its own traceback out.
# The node count comes from sbatch (--nodes); GPUs per node from SLURM's allocation (--gpus-per-node, 8 by
# the #SBATCH line below: change it to your nodes), or GPUS_PER_NODE=N to say it. The rendezvous is the first
# node of the job on port MAIN_PROCESS_PORT (default 29500 + job id mod 1000, so jobs sharing a node differ).
#
# A shared file system is assumed for the repository, the environment and --output-dir: they must be visible
# at the same path on every node (checkpoints are written by every process into one folder and read back by all
# of them on --resume). The shards too, unless --shards is a remote folder (s3://, gs://, https://), which each
# node stages into its own --shard-cache.
#
# --help prints this text and train.py's options; --check and --print-config print the plan or the resolved
# configuration of the whole job (every GPU of every node) and start nothing.
#
# CPUs: srun has not inherited sbatch's --cpus-per-task since Slurm 22.05, so it is passed on explicitly;
# otherwise the one task per node, with all its processes and loader threads, gets a single CPU.
#
# Preemption: SLURM sends SIGTERM 120 s before the time limit (--signal below) to `accelerate launch`, whose
# elastic agent forwards it to the processes and SIGKILLs them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
# (torch's default: 30; PyTorch 2.10, the CUDA 12 install, has a fixed 30 s and ignores the variable). It is
# raised here to the whole 120 s, so the trainer has the grace to agree on
# stopping and write a checkpoint. The job is requeue-safe: unless the arguments name them, the run writes to
# runs/JOBNAME-JOBID (kept by a requeued job) with --resume auto, so the first start begins afresh and every
# later start of the same job continues from its newest intact checkpoint.
#
#SBATCH --job-name=maskcon
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --output=slurm-%j.out
#SBATCH --requeue
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"

case " $* " in *" --help "*|*" -h "*)
    sed -n '2,/^#SBATCH/p' "$0" | sed '$d; s/^# \{0,1\}//'
    echo
    exec python "$(dirname "$0")/train.py" --help ;;
esac

missing=
[[ -n "${SLURM_JOB_NUM_NODES:-}" ]] || missing="SLURM_JOB_NUM_NODES is not set"
command -v scontrol > /dev/null || missing=${missing:-"scontrol is not found"}
if [[ -n "$missing" ]]; then
    echo "error: launch/slurm.sh runs in a SLURM job (sbatch --nodes N launch/slurm.sh OPTIONS); here $missing" >&2
    exit 2
fi
nodes=$SLURM_JOB_NUM_NODES
# SLURM_GPUS_PER_NODE may read "8" or "a100:8"; keep the count.
gpus_per_node=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}}
gpus_per_node=${gpus_per_node##*:}
if [[ -z "$gpus_per_node" ]] && command -v nvidia-smi > /dev/null; then
    gpus_per_node=$(nvidia-smi --list-gpus 2> /dev/null | grep -c '^GPU ' || true)
fi
if [[ -z "$gpus_per_node" || "$gpus_per_node" == 0 ]]; then
    echo "error: cannot tell how many processes to start per node: the job has no --gpus-per-node and" \
         "nvidia-smi lists no GPU here; set GPUS_PER_NODE=N (processes per node; on nodes without GPUs they" \
         "train on the CPUs)" >&2
    exit 2
fi
# All host names are read (no `| head`, whose early exit would fail the pipe under pipefail).
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
main_node=${hosts[0]:?no host names in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST}
main_port=${MAIN_PROCESS_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
# CPUs of the task: sbatch's --cpus-per-task, else every CPU of the node's allocation.
cpus_per_task=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
cpu_option=()
if [[ -n "$cpus_per_task" ]]; then
    cpu_option=(--cpus-per-task "$cpus_per_task")
fi
grace_s=120   # the TERM@ lead time of --signal above: change both together
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$grace_s}

run_args=("$@")
case " $* " in *" --output-dir"*|*" --output_dir"*) ;; *) run_args+=(--output-dir "runs/${SLURM_JOB_NAME:-maskcon}-${SLURM_JOB_ID:?}") ;; esac
case " $* " in *" --resume"*) ;; *) run_args+=(--resume auto) ;; esac

case " $* " in *" --check "*|*" --print-config "*|*" --print_config "*)   # the job's plan or configuration alone
    WORLD_SIZE=$((nodes * gpus_per_node)) exec python launch/train.py "${run_args[@]}" ;;
esac
WORLD_SIZE=$((nodes * gpus_per_node)) python launch/train.py --check "${run_args[@]}" >&2 || exit $?

echo "nodes $nodes x $gpus_per_node GPUs, ${cpus_per_task:-?} CPUs per node, rendezvous $main_node:$main_port," \
     "shutdown timeout ${TORCH_ELASTIC_SHUTDOWN_TIMEOUT} s" >&2

# One task per node; SLURM_NODEID (0 .. nodes-1) is read on each node, so the single quotes are deliberate.
srun --nodes "$nodes" --ntasks-per-node 1 "${cpu_option[@]}" --kill-on-bad-exit=1 bash -c '
    exec accelerate launch -q \
        --config_file launch/accelerate/multinode.yaml \
        --num_machines "$0" \
        --num_processes "$1" \
        --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$2" \
        --main_process_port "$3" \
        launch/train.py "${@:4}"
' "$nodes" "$((nodes * gpus_per_node))" "$main_node" "$main_port" "${run_args[@]}"
