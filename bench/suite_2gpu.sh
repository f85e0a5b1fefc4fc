#!/usr/bin/env bash
# The two-GPU figures of issue 15 (items 3 and 4), on one machine of 2 GPUs (each part fits a 10-minute call):
#   OUT=dir bash bench/suite_2gpu.sh scaling      the real command on packed built-in real-grid rows (gpt2, the
#                                                 quality config's rows of 16,384, 2,000 scenes, 60 steps:
#                                                 bench/trainer_scaling.json) on one
#                                                 GPU and on two, with ZeRO 1 and with ZeRO 2; the same global batch (8
#                                                 rows a step) everywhere. Each run's last log line (tokens/s of all
#                                                 GPUs, steps 41-60) goes to $OUT/scaling.txt
#   OUT=dir bash bench/suite_2gpu.sh zero3        gpt2-large, T 8192, activation checkpointing, on two GPUs: ZeRO 1,
#                                                 ZeRO 3 (parameters gathered a few at a time), ZeRO 3 with the
#                                                 optimizer on the CPU: peak memory per GPU and tokens/s per GPU
#                                                 ($OUT/zero3.jsonl, bench/bench_train.py)
# SCALING_CONFIG and ZERO3_CASE=MODEL/T replace the runs' shapes (the CPU smoke test of this script uses tiny ones).
# Packed rows hold about the same tokens each (99% filled), so ranks get equal tokens, not only equal samples.
. "$(dirname "$0")/suite_env.sh"
log="$OUT/log_2gpu.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1

trainer() {  # NAME GPUS ZERO: 60 steps of the real command (bench/trainer_scaling.json: the quality config's
             # packed rows, 8 a step, 2 a micro-batch); its step-60 line to $OUT/scaling.txt
  local name=$1 gpus=$2 zero=$3 dir=/tmp/graspgpt-2gpu/$1
  rm -rf "$dir"
  echo "+ $name" >> "$log"
  bash run_deepspeed_training.sh "$gpus" --config "${SCALING_CONFIG:-bench/trainer_scaling.json}" --zero_stage "$zero" --output_dir "$dir" \
    >> "$log" 2>&1 || { echo "FAILED: $name"; tail -n 20 "$log"; }
  echo "$name: $(grep -a -h 'step 60/60' "$dir/training_rank_0.log" | sed 's/.*INFO //')" | tee -a "$OUT/scaling.txt"
}

zero3() {  # bench_train.py CASES on both GPUs, ZeRO 3 gathering at most 10^8 parameters at a time, buckets of 2x10^7
          # (the shipped 2x10^8 keeps a gradient bucket that large under ZeRO 3: docs/BENCHMARKS.md)
  python3 -m torch.distributed.run --nproc_per_node 2 bench/bench_train.py --out "$OUT/zero3.jsonl" --warmup 3 \
    --steps 8 --ds zero_optimization.stage3_max_live_parameters=100000000 \
    --ds zero_optimization.stage3_max_reuse_distance=100000000 \
    --ds zero_optimization.stage3_prefetch_bucket_size=20000000 --ds zero_optimization.reduce_bucket_size=20000000 \
    --ds zero_optimization.allgather_bucket_size=20000000 "$@" >> "$log" 2>&1 \
    || { echo "FAILED: zero3 $*"; tail -n 20 "$log"; }
}

for part in ${*:-scaling zero3}; do
  case $part in
    scaling)
      trainer gpus1_zero1 1 1
      trainer gpus2_zero1 2 1
      trainer gpus1_zero2 1 2
      trainer gpus2_zero2 2 2 ;;
    zero3)
      m=${ZERO3_CASE:-gpt2-large/8192}
      zero3 --case "fast+ckpt/${m%/*}/${m#*/}/1" --case "fast+ckpt/${m%/*}/${m#*/}/3"
      zero3 --case "fast+ckpt/${m%/*}/${m#*/}/3" --ds 'zero_optimization.offload_optimizer={"device": "cpu", "pin_memory": true}' ;;
    *) echo "unknown part $part (scaling, zero3)"; exit 2 ;;
  esac
done
