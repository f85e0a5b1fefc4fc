#!/usr/bin/env bash
# The multi-GPU figures of docs/BENCHMARKS.md on one 4-GPU machine: tokens/s on 1, 2 and 4 GPUs
# (ZeRO 1 and 2; scaling = tokens/s of all GPUs over one GPU) and ZeRO-3 against ZeRO-1 memory
# for gpt2-large on 4 GPUs.   OUT=results bash bench/suite_multi.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bench/*.py import this checkout's package
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
export GRASPGPT_NO_PROGRESS=1 PYTHONUNBUFFERED=1
log="$OUT/log_multi.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu_multi.txt"
nvidia-smi topo -m >> "$OUT/gpu_multi.txt" 2>&1
B="bench/bench_train.py --out $OUT/multi.jsonl --warmup 3 --steps 12"
S="--case fast/gpt2/8192/1 --case fast/gpt2/8192/2"
launch() {  # GPUS PORT args...: one torchrun per GPU set
  local gpus=$1 port=$2; shift 2
  local n=$(( $(tr -cd , <<< "$gpus" | wc -c) + 1 ))
  echo "+ GPUs $gpus: $*" >> "$log"
  CUDA_VISIBLE_DEVICES=$gpus python3 -m torch.distributed.run --nproc_per_node "$n" --master_port "$port" \
    $B "$@" >> "$log" 2>&1 || { echo "FAILED on GPUs $gpus"; tail -n 20 "$log"; }
}
launch 0 29501 $S &            # 1 and 2 GPUs side by side on separate GPUs
launch 1,2 29502 $S &
# meanwhile on the fourth GPU: the built-in data (varying lengths), compiled and eager, with traces
( export GRASPGPT_CACHE=/tmp/graspgpt-cache
  CUDA_VISIBLE_DEVICES=3 python3 bench/bench_train.py --out "$OUT/builtin.jsonl" --seq-len builtin:600 \
    --grad-accum 8 --zero 1 --impl fast,fast+eager --warmup 10 --steps 10 --trace "$OUT" >> "$OUT/log_builtin.txt" 2>&1 \
    || { echo "FAILED builtin"; tail -n 20 "$OUT/log_builtin.txt"; } ) &
wait
launch 0,1,2,3 29503 $S --case fast+ckpt/gpt2-large/8192/1 --case fast+ckpt/gpt2-large/8192/3
python3 bench/report.py "$OUT/multi.jsonl" "$OUT/builtin.jsonl"
