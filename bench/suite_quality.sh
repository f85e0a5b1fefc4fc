#!/usr/bin/env bash
# Grasp quality (docs/BENCHMARKS.md, "Grasp quality"): the CPU lab sweep and the real-grid runs.
#   OUT=dir bash bench/suite_quality.sh lab        the lab variants in parallel, 2 CPU cores each (no GPU)
#   OUT=dir bash bench/suite_quality.sh decoding   the lab's recipe, evaluated with each grounding at T = 1 and 0.5
#   OUT=dir bash bench/suite_quality.sh cell       the lab's recipe, evaluated at T = 0.5 and with cell temperatures
#   OUT=dir MIN=8 bash bench/suite_quality.sh real gpt-mini and gpt2 on the real grid, unpacked (one sample a row, as
#                                                  those early runs were), together on one GPU, each
#                                                  with a budget of REAL_MINUTES (default 15) of training (a hard
#                                                  limit on wall time), of which this call trains at most MIN
#                                                  minutes (default 8); decoding as the configs say
#   OUT=dir MIN=8 bash bench/suite_quality.sh real_packed   the same on packed rows (the configs' recipe)
#   OUT=dir bash bench/suite_quality.sh real_compare   packing's share: gpt-mini unpacked and packed, gpt2 packed,
#                                                  the three at once on one GPU (cores 0-4, 5-9, 10-15)
#   OUT=dir bash bench/suite_quality.sh real_sinusoidal   how voxel rows start: gpt-mini packed with the normal
#                                                  and the sinusoidal start, two at once (2026-12-02 ran a third)
#   OUT=dir MODEL=gpt-mini bash bench/suite_quality.sh real_alone   one run of MODEL alone on the GPU (all cores),
#                                                  packed rows, its grasps also evaluated on 12 scenes at each of its
#                                                  8 checkpoints (precision against steps, in train/metrics_rank0.jsonl);
#                                                  EXTRA="--set model.rope_theta=10000" adds settings (there: the
#                                                  default before 2026-12-02)
# MIN empty: each run trains its whole budget in this call. CELLS=0.3,0.1: evaluate each cell temperature,
# GRASPS=128,0: each number of independent grasps (0: one sequence) (default: the configs'). SCENES=100:
# validation scenes of every real run (default 20 gpt-mini, 12 gpt2), SEQ_SCENES=20: of those for one-sequence
# decoding (slower). No calibration run: each run plans its steps at the end of its warmup.
# On a device whose calls last 10 minutes, start a real part with setsid and MIN= (the whole budget in one go)
# and watch it call by call with bench/watch_quality.sh. The real runs take cores 0-7 and 8-15 (run the lab
# elsewhere). `real` resumes where an earlier call left
# OUT (run it again to go on); once a run has trained its budget it is evaluated.
# Every line of OUT/lab.jsonl and OUT/real.jsonl is one run's summary (bench/quality.py).
OUT=${OUT:-quality-results}
. "$(dirname "$0")/suite_env.sh"
cores=$(nproc)
next_core=$((cores - 1))

lab_run() {  # NAME CPUS [quality.py flags]: one lab run (training skipped when OUT/lab/NAME has it), decoding as
             # configs/quality_lab.json says unless the flags say otherwise
  local name=$1 cpus=$2; shift 2
  CUDA_VISIBLE_DEVICES= taskset -c "$cpus" python3 bench/quality.py --model lab --steps 300 --num_scenes 50 \
    --out "$OUT/lab/$name" --log "$OUT/lab.jsonl" "$@"
}

lab() {  # NAME [flags]: one lab run in the background, pinned to two cores, counted down from the last
  local name=$1; shift
  local cpus="$((next_core - 1)),$next_core"
  next_core=$((next_core - 2))
  lab_run "$name" "$cpus" "$@" > "$OUT/lab_$name.log" 2>&1 &
}

real() {  # NAME MODEL SCENES CPUS [quality.py flags]: one real-grid run of the recipe (the configs) on the GPU
  local name=$1 model=$2 scenes=$3 cpus=$4; shift 4
  taskset -c "$cpus" python3 bench/quality.py --model "$model" --minutes "${REAL_MINUTES:-15}" --calibration_steps 0 \
    ${MIN:+--session_minutes "$MIN"} ${CELLS:+--cell_temperature "$CELLS"} ${GRASPS:+--independent_grasps "$GRASPS"} \
    ${SEQ_SCENES:+--sequence_scenes "$SEQ_SCENES"} \
    --num_scenes "$scenes" --out "$OUT/real/$name" --log "$OUT/real.jsonl" "$@" >> "$OUT/real_$name.log" 2>&1 &
}

for part in "${@:-lab}"; do
  case $part in
    lab)
      lab base
      lab answer --set dataset.loss_on=answer
      lab random --set dataset.grasp_order=random
      lab random_answer --set dataset.grasp_order=random --set dataset.loss_on=answer
      lab random_answer_g16 --set dataset.grasp_order=random --set dataset.loss_on=answer \
        --set dataset.max_grasps_per_object=16
      ;;
    decoding)
      lab decoding --temperatures 1.0,0.5 --cell_temperature none --groundings gripper,fingers
      ;;
    cell)  # one training, then each decoding of the cell-temperature table in turn (docs/QUALITY_LAB.md)
      for d in "0.5 none" "1.0 0.5" "0.7 0.4" "1.0 0.3" "1.0 0.2"; do
        set -- $d
        lab_run cell "$((next_core - 1)),$next_core" --temperatures "$1" --cell_temperature "$2" >> "$OUT/lab_cell.log" 2>&1
      done
      ;;
    real|real_packed|real_compare|real_sinusoidal|real_alone)
      case $part in real_compare|real_sinusoidal|real_alone) ;; *) MIN=${MIN-8} ;; esac
      # The runs share one data set: build it once before they start.
      python3 -c "from graspGPT.config import load_config; from graspGPT.data.source import resolve_data_dir; \
c = load_config(['--config', 'configs/quality_gpt-mini.json']); print(resolve_data_dir(c.dataset, c.system.seed))"
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
      # The configs train on packed rows (16384 positions, 8 a step: about the tokens of 32 samples);
      # the unpacked runs of the early sessions: one sample a row, 32 a step
      unpacked="--set dataset.pack_length=0 --set trainer.batch_size=32"
      if [ "$part" = real ]; then
        real gpt-mini gpt-mini "${SCENES:-20}" 0-7 $unpacked --set trainer.micro_batch_size=16
        real gpt2 gpt2 "${SCENES:-12}" 8-15 $unpacked --set trainer.micro_batch_size=8
      elif [ "$part" = real_packed ]; then
        real packed_gpt-mini gpt-mini "${SCENES:-12}" 0-7
        real packed_gpt2 gpt2 "${SCENES:-12}" 8-15
      elif [ "$part" = real_alone ]; then
        m=${MODEL:-gpt-mini}
        real "alone_$m" "$m" "${SCENES:-60}" "0-$((cores - 1))" --set trainer.eval_scenes=12 ${EXTRA:-}
      elif [ "$part" = real_sinusoidal ]; then
        real packed_gpt-mini gpt-mini "${SCENES:-20}" 0-7 --set model.coordinate_init=normal
        real sin_packed_gpt-mini gpt-mini "${SCENES:-20}" 8-15 --set model.coordinate_init=sinusoidal
      else
        real gpt-mini gpt-mini "${SCENES:-20}" 0-4 $unpacked --set trainer.micro_batch_size=16
        real packed_gpt-mini gpt-mini "${SCENES:-20}" 5-9
        real packed_gpt2 gpt2 "${SCENES:-12}" 10-15
      fi
      ;;
    *) echo "unknown part $part (lab, decoding, cell, real, real_packed, real_compare, real_sinusoidal, real_alone)"; exit 2 ;;
  esac
done
wait
cat "$OUT"/*.jsonl 2>/dev/null
