#!/usr/bin/env bash
# The single-GPU figures of docs/BENCHMARKS.md in one go (about 6 minutes on one H100).
#   OUT=results bash bench/suite_1gpu.sh [parts...]      parts: final curves diag packing packing2 fa4 decode
#                                                         accum1
#                                                         (default: final curves)
# final:  every fixed-length case beside the baseline in one process, then the real trainer
#         against the harness on the built-in data set
# curves: 300-step loss curves, fast vs baseline
# diag:   DeepSpeed settings and attention kernels on varying lengths, with Chrome traces
# packing: the packing tests (the GPU kernels included), then the real trainer on the built-in real-grid
#         data (gpt2, 600 scenes, 40 steps): one sample per micro-batch (bench/trainer_compare.json)
#         against packed rows of 13056 positions, 3 a step (bench/trainer_packed.json: about the same
#         tokens a step), varlen flash attention; each run's step-40 line goes to $OUT/packing.txt
# packing2: the packed run with flex attention instead, and with 8 rows a step (varlen)
#         (each packing part takes about 5 minutes; two parts so that each fits a 10-minute call)
# fa4:    flash-attn-4 (GRASPGPT_ATTENTION=fa4; the package must import) against the default kernels: the
#         kernels alone (bench_attention.py), its GPU tests, the harness at gpt2 T 8192 (4 rows x accumulation
#         8, and 1 x 1), then the real command with the gpt2 recipe (configs/quality_gpt2.json, 60 steps),
#         default and fa4 alternating three times (about 14 minutes, the first kernel compilations included)
# accum1: the harness at gpt2 T 8192 without accumulation (item 2 at accumulation 1): the baseline and ours at 1 and
#         4 rows a micro-batch, ZeRO 1 and 2, with the one-rank rule (overlap_comm off) and without it (--ds
#         overlap_comm=true, the behaviour before 2026-12-03), two rounds; accumulation 8 beside; where the host's
#         time goes (--host-profile); the fused q/k/v and gate/up prototype (bench/fused_proto.py);
#         $OUT/accum1.jsonl (about 4 minutes)
# decode: grasp decoding (bench_decode.py, untrained gpt-mini and gpt2 on built-in real-grid scenes): the
#         quality evaluation's decoding of 8 scenes x 128 independent grasps (decoded tokens/s), one scene's
#         128 grasps at batch 1, one grounded row's ms a token; three rounds, then one profiled (host
#         functions, device busy time); then the shared prompt cache's logits against a cache row per
#         sequence (check_decode_cache.py); $OUT/decode.jsonl (about 3 minutes). Against older code: run the same
#         bench_decode.py line with a copy of its graspGPT/ first on PYTHONPATH (docs/BENCHMARKS.md, "Decoding")
. "$(dirname "$0")/suite_env.sh"
parts=${*:-final curves}
log="$OUT/log.txt"
run() {  # a command whose output goes to the log; failures to the screen
  echo "+ $*" >> "$log"
  "$@" >> "$log" 2>&1 || { echo "FAILED ($?): $*"; tail -n 15 "$log"; }
}
trainer() {  # name, then the trainer's flags: 40 steps of the real trainer on one GPU; its step-40 line
  local name=$1 dir=/tmp/graspgpt-packing/$1; shift
  rm -rf "$dir"
  run bash run_deepspeed_training.sh 1 --no_wandb --max_iters 40 --save_every 1000 --output_dir "$dir" "$@"
  grep -a -h 'packing:' "$dir/training_rank_0.log" | sed "s/.*INFO /$name: /" >> "$OUT/packing.txt"
  echo "$name: $(grep -a -h 'step 40/40' "$dir/training_rank_0.log" | sed 's/.*INFO //')" | tee -a "$OUT/packing.txt"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv > "$OUT/gpu.txt"
B="python3 bench/bench_train.py --out $OUT/bench.jsonl --warmup 3 --steps 15"
BUILTIN="python3 bench/bench_train.py --seq-len builtin:600 --max-len 13000 --grad-accum 8"
for part in $parts; do
  case $part in
    final)
      C=""
      for c in baseline/gpt2/8192/1 fast/gpt2/8192/1 fast+cudnn/gpt2/8192/1 baseline/gpt2/13000/1 fast/gpt2/13000/1 \
               baseline/gpt2/16384/1 fast/gpt2/16384/1 baseline/gpt-mini/8192/1 fast/gpt-mini/8192/1 \
               baseline/gpt2/8192/1/8 fast/gpt2/8192/1/8; do C="$C --case $c"; done
      run $B --profile $C
      run bash run_deepspeed_training.sh 1 --config bench/trainer_compare.json --no_wandb --max_iters 40
      grep -h "step .*tokens/s" /tmp/graspgpt-trainer-compare/training_rank_0.log > "$OUT/trainer.log"
      run $BUILTIN --out "$OUT/bench_builtin.jsonl" --zero 2 --impl fast --warmup 20 --steps 20 ;;
    curves)
      run python3 bench/loss_curves.py --model gpt2 --seq-len 2048 --micro-batch 2 --steps 300 --out "$OUT/curves.jsonl" ;;
    diag)
      run $B --model gpt2 --seq-len 8192 --impl baseline,fast --trace "$OUT"
      run $B --model gpt2 --seq-len 8192 --impl fast --zero 0,1,2 --ds timers.throughput.enabled=false
      run $B --model gpt2 --seq-len 8192 --impl fast --ds zero_optimization.overlap_comm=false
      run $BUILTIN --out "$OUT/bench_builtin.jsonl" --zero 1 --impl fast,fast+cudnn,fast+eager --warmup 2 --steps 8 ;;
    packing)
      run python3 -m pytest -q tests/test_packing.py  # the varlen and flex kernels against the SDPA path, on this GPU
      grep -a -E "passed|failed" "$log" | tail -n 1
      trainer unpacked --config bench/trainer_compare.json
      GRASPGPT_PACKED_ATTENTION=varlen trainer packed_varlen --config bench/trainer_packed.json ;;
    packing2)
      GRASPGPT_PACKED_ATTENTION=flex trainer packed_flex --config bench/trainer_packed.json
      GRASPGPT_PACKED_ATTENTION=varlen trainer packed_varlen_8rows --config bench/trainer_packed.json --batch_size 8 ;;
    fa4)
      python3 -c "import flash_attn.cute" || { echo "part fa4: flash-attn-4 does not import (see the guide)"; exit 2; }
      run python3 bench/bench_attention.py
      grep -a '^{"model"' "$log" > "$OUT/attention.jsonl"
      run python3 -m pytest -q tests/test_packing.py -k fa4
      grep -a -E "passed|failed" "$log" | tail -n 1
      run python3 bench/bench_train.py --out "$OUT/bench.jsonl" --warmup 2 --steps 4 --micro-batch 4 \
        --case fast/gpt2/8192/1/8 --case fast+fa4/gpt2/8192/1/8
      run $B --case fast/gpt2/8192/1 --case fast+fa4/gpt2/8192/1
      for round in 1 2 3; do
        for attention in auto fa4; do
          dir=/tmp/graspgpt-fa4/$attention$round; rm -rf "$dir"
          GRASPGPT_ATTENTION=$attention run bash run_deepspeed_training.sh 1 --config configs/quality_gpt2.json \
            --no_wandb --max_iters 60 --save_every 1000 --output_dir "$dir"
          grep -a -h -E 'step (40|60)/60' "$dir/training_rank_0.log" | sed "s/.*INFO /$attention$round: /" \
            | tee -a "$OUT/packing.txt"
          rm -rf "$dir"  # its final checkpoint
        done
      done ;;
    accum1)
      A="python3 bench/bench_train.py --out $OUT/accum1.jsonl --warmup 3 --steps 10"
      ON="--ds zero_optimization.overlap_comm=true"
      for round in 1 2; do
        run $A --micro-batch 1 --case baseline/gpt2/8192/1/1 --case fast/gpt2/8192/1/1 --case fast/gpt2/8192/2/1
        run $A --micro-batch 1 --case fast/gpt2/8192/1/1 --case fast/gpt2/8192/2/1 $ON
      done
      run $A --micro-batch 4 --case baseline/gpt2/8192/1/1 --case fast/gpt2/8192/1/1 --case fast/gpt2/8192/1/8
      run $A --micro-batch 4 --case fast/gpt2/8192/1/1 --case fast/gpt2/8192/1/8 $ON
      run $A --micro-batch 1 --case fast/gpt2/8192/1/1 --host-profile
      run python3 bench/fused_proto.py --out "$OUT/accum1_fused.jsonl" --warmup 3 --steps 10 --micro-batch 1 \
        --case fast/gpt2/8192/1/1 ;;
    decode)
      D="python3 bench/bench_decode.py --model gpt-mini,gpt2 --scenes 8 --max_new 16 --evaluation 128"
      for round in 1 2 3; do run $D --grasps 128 --label round$round; done
      run $D --label profiled --profile --device_profile
      run python3 bench/check_decode_cache.py --model gpt2 --prompt 3600 --samples 8 --steps 4
      grep -a -E '^\{"(label|check)"' "$log" > "$OUT/decode.jsonl" ;;
    *) echo "unknown part $part (final, curves, diag, packing, packing2, fa4, decode)"; exit 2 ;;
  esac
done
[ -f "$OUT/curves.jsonl" ] && grep -h summary "$OUT/curves.jsonl"
[ -f "$OUT/trainer.log" ] && cat "$OUT/trainer.log"
[ -f "$OUT/packing.txt" ] && cat "$OUT/packing.txt"
if ls "$OUT"/bench*.jsonl > /dev/null 2>&1; then python3 bench/report.py "$OUT"/bench*.jsonl; fi
