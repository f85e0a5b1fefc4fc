#!/usr/bin/env bash
# Runs the real trainer for a few steps in every DeepSpeed configuration the guide shows, on the GPUs
# of this machine, and prints one summary line per run. Used for the recorded GPU runs of the guide's
# configurations (docs/BENCHMARKS.md). Usage: OUT=dir bash bench/gpu_configs.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bench/*.py import this checkout's package
out=${OUT:-/tmp/gpu_configs}
mkdir -p "$out"
common=(--model_type gpt-mini --max_sequence_length 4096 --batch_size 8 --micro_batch_size 2 --max_iters 30
        --log_every 10 --eval_every 30 --save_every 30 --no_wandb --config bench/gpu_configs_data.json)
run() {  # name, then arguments for run_deepspeed_training.sh
  local name=$1; shift
  local dir=/tmp/gpu_configs_runs/$name
  rm -rf "$dir"
  timeout 300 ./run_deepspeed_training.sh "$@" "${common[@]}" --output_dir "$dir" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(grep -a 'step 30/30' "$dir/training_rank_0.log" | sed 's/.*INFO //') $(grep -a -o 'ZeRO [0-9], [a-z0-9]*' "$dir/training_rank_0.log" | head -1)"
}
run bf16_zero1 1 --zero_stage 1
run fp16_zero2 1 --deepspeed_config configs/deepspeed_fp16.json
run bf16_zero2_offload_optimizer 1 --deepspeed_config configs/deepspeed_offload_optimizer.json
run bf16_zero3_offload_all 1 --deepspeed_config configs/deepspeed_zero3_offload.json
CUDA_VISIBLE_DEVICES=0 run cuda_visible_devices_respected 1 --zero_stage 2
