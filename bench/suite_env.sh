# Sourced by bench/suite_*.sh: run from the repository root with this checkout's package and the output folder.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bench/*.py import this checkout's package
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
export GRASPGPT_NO_PROGRESS=1 GRASPGPT_CACHE=${GRASPGPT_CACHE:-/tmp/graspgpt-cache} PYTHONUNBUFFERED=1
