#!/usr/bin/env bash
# Watch a quality suite that outlives one device call (a call lasts at most 10 minutes):
#   OUT=/tmp/q ... setsid bash bench/suite_quality.sh real > /tmp/q/suite.log 2>&1 < /dev/null &   # call 1
#   bash bench/watch_quality.sh /tmp/q 550      # calls 1, 2, ...: wait up to 550 s, or until the suite ends
# Each call prints every run's plan, re-plan, training and summary lines and its last logged step, then packs
# the results (not the checkpoints) into $OUT/results.tgz, which the device tool brings back.
Q=${1:?usage: watch_quality.sh SUITE_OUT SECONDS}
end=$(( $(date +%s) + ${2:?usage: watch_quality.sh SUITE_OUT SECONDS} ))
while [ "$(date +%s)" -lt "$end" ] && pgrep -f suite_quality.sh > /dev/null; do sleep 5; done
echo "$(date -u +%H:%M:%S) suite processes running: $(pgrep -f suite_quality.sh | wc -l)"
for log in "$Q"/real_*.log; do
  [ -e "$log" ] || continue
  name=$(basename "$log" .log); name=${name#real_}
  echo "== $name"
  grep -E '^\{"(plan|replan|train|note|summary)' "$log" | cut -c1-600
  tail -1 "$Q/real/$name/train/metrics_rank0.jsonl" 2>/dev/null | cut -c1-200
  grep -iE 'error|Traceback' "$log" | tail -3
  cp "$Q/real/$name/train/metrics_rank0.jsonl" "$Q/real/$name/metrics.jsonl" 2>/dev/null
done
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" -C "$Q" --exclude='*/train/*' --exclude='*/calibrate/*' . 2>/dev/null
fi
true
