#!/bin/bash
# Open-Qwen2VL pretraining on a Slurm cluster: one `accelerate launch` per node, FSDP2 across all GPUs.
#
#   DATA=/shared/open-qwen2vl/packed sbatch --nodes 4 recipes/slurm/pretrain_multinode.sh [--any_key value ...]
#
# Run from the repository root (sbatch keeps the submission directory). Extra arguments are passed to
# recipes/pretrain.py and override the config. The job always passes --resume: a requeued or resubmitted job
# continues from the newest complete checkpoint in OUTPUT_DIR (which must be on a shared file system), and a first
# run starts from scratch. A resume continues the same run: resubmitting with other optimizer, schedule, batch or
# data settings is refused (use another OUTPUT_DIR). Slurm's SIGTERM/SIGUSR1 at preemption or the time limit makes
# the run checkpoint after its current step and exit 143. Set PYTHON_ENV to activate your environment on every node.
#SBATCH --job-name=open-qwen2vl-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail

CONFIG=${CONFIG:-recipes/configs/pretrain_open_qwen2vl_2b.yaml}
DATA=${DATA:?set DATA to the packed corpus (folder or hub dataset id)}
OUTPUT_DIR=${OUTPUT_DIR:-runs/pretrain_open_qwen2vl_2b}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
# awk reads all of its input: `head -n 1` can kill scontrol with SIGPIPE, which pipefail turns into exit 141
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TOKENIZERS_PARALLELISM=false

echo "nodes=$SLURM_NNODES processes=$NUM_PROCESSES master=$MASTER_ADDR:$MASTER_PORT output=$OUTPUT_DIR"

# One task per node; $SLURM_NODEID is evaluated on each node, hence the single quotes.
export CONFIG DATA OUTPUT_DIR MASTER_ADDR MASTER_PORT NUM_PROCESSES  # srun passes the environment to every node
srun --kill-on-bad-exit=1 \
  bash -c '
    if [ -n "${PYTHON_ENV:-}" ]; then source "$PYTHON_ENV/bin/activate"; fi
    accelerate launch \
      --config_file recipes/accelerate/fsdp2_multinode.yaml \
      --num_machines "$SLURM_NNODES" \
      --num_processes "$NUM_PROCESSES" \
      --machine_rank "$SLURM_NODEID" \
      --main_process_ip "$MASTER_ADDR" \
      --main_process_port "$MASTER_PORT" \
      recipes/pretrain.py \
      --config "$CONFIG" \
      --dataset_name_or_path "$DATA" \
      --output_dir "$OUTPUT_DIR" \
      --resume true \
      "$@"
  ' pretrain "$@"
