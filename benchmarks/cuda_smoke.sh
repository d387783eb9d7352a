#!/usr/bin/env bash
# Every CLI path on a GPU, on a tiny random GPT-2 (nothing downloaded):
# train in full, lora and 8bit mode, evaluate, generate with each built-in
# decoder, merge, compare. Prints one "== what rc=N" line per command and
# exits non-zero if any failed. Usage: bash benchmarks/cuda_smoke.sh [WORK]
set -u
PY=${PY:-python3}
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# CUDA_SMOKE_ON_CPU=1 runs it without a GPU, to check the script itself.
if [ -z "${CUDA_SMOKE_ON_CPU:-}" ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'; print('GPU:', torch.cuda.get_device_name())" || exit 1
fi
# The tiny model and the data files, made as the benchmark makes them.
"$PY" - "$(dirname "$0")" "$WORK" > /dev/null 2>&1 <<'PYTHON' || { echo "could not build the tiny model in $WORK"; exit 1; }
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import training_speed

work = Path(sys.argv[2])
training_speed.build_model("tiny", work / "model-tiny")
training_speed.build_data(work, 6, 4)
PYTHON
M=$WORK/model-tiny T=$WORK/train.txt V=$WORK/valid.txt
failed=0
check() {  # check NAME COMMAND...: run it, show its last lines and its exit code
  local name=$1; shift
  "$@" > "$WORK/last.log" 2>&1; local rc=$?
  tail -n 3 "$WORK/last.log"; echo "== $name rc=$rc"
  [ $rc -eq 0 ] || failed=1
}
for mode in full lora 8bit; do
  check "train $mode" "$PY" -m peftgen train --model "$M" --mode $mode --train-file "$T" --valid-file "$V" \
    --max-steps 6 --eval-steps 3 --output-dir "$WORK/run-$mode" --overwrite
done
check "eval lora" "$PY" -m peftgen eval --model "$WORK/run-lora" --file "$V"
for decoder in greedy topk topp beam; do
  check "generate $decoder" "$PY" -m peftgen generate --model "$WORK/run-lora" --decoder $decoder --length 12 --seed 1
done
check "generate from 8bit" "$PY" -m peftgen generate --model "$WORK/run-8bit" --decoder topk --length 12 --seed 1
check "merge lora" "$PY" -m peftgen merge "$WORK/run-lora" --output "$WORK/merged" --overwrite
check "compare" "$PY" -m peftgen compare --model "$WORK/run-lora" --num-samples 2 --length 12
exit $failed
