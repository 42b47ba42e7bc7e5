#!/usr/bin/env bash
# The GPU speed check, prepared to run once on a lent GPU machine (H100/H200, no network; a few
# minutes, at most 8 by its time limits). Run it from the repository root: `bash tools/gpu_check.sh`.
#
#   1. torch version and GPU name;
#   2. the pretraining step, base config, batch 64: bf16 + every fast path (SDPA, gathered heads,
#      dynamic padding, fused AdamW) against the plain fp32 path, with the top CUDA operators;
#      then fp32 + the fast paths, which separates their gain from bf16's;
#   3. the Flickr30K retrieval evaluation benchmark, base config, on CUDA: both rates and the projected
#      time of the full 5,000 x 1,000 test.
#
# The machine's python3 holds a CUDA torch but not this project's environment: nothing is installed,
# the checkout goes on PYTHONPATH. The benchmarks run here read no LMDB and no vocabulary file, so the
# missing lmdb / msgpack-numpy / bundled vocabulary package do not matter.
# Outputs go to $OUT (the device tool brings that folder back; a new temporary folder without it) and
# are echoed as they come.
set -uo pipefail

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BASE=config/bert_base_6layer_interbert.json
FAILED=0

# step NAME SECONDS COMMAND...: run with a time limit, output to the screen and to $OUT/NAME.txt.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee "$OUT/$name.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit status $status" | tee -a "$OUT/$name.txt"
    if [ "$status" -ne 0 ]; then FAILED=1; fi
}

step device 60 python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
if [ "$FAILED" -ne 0 ]; then echo "no usable CUDA torch: stopping"; exit 1; fi

# The project from this checkout, without installing it (scripts run from benchmarks/ must find it).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step train_step_bf16 150 python3 benchmarks/bench_train_step.py --config "$BASE" --device cuda \
    --precision bf16 --batch_size 64 --steps 20 --warmup 5 --profile
step train_step_fp32 100 python3 benchmarks/bench_train_step.py --config "$BASE" --device cuda \
    --precision fp32 --batch_size 64 --steps 20 --warmup 5
if [ -f benchmarks/bench_eval_retrieval.py ]; then
    step eval_retrieval 150 python3 benchmarks/bench_eval_retrieval.py --config "$BASE" --device cuda \
        --num_images 1000 --num_captions 16
else
    echo "benchmarks/bench_eval_retrieval.py is missing: retrieval check skipped" | tee "$OUT/eval_retrieval.txt"
fi

{
    echo "== summary"
    sed -n 2p "$OUT/device.txt"
    for name in train_step_bf16 train_step_fp32; do
        echo "-- $name"
        grep -E '^(plain|fast) *[=:]|^ratio=' "$OUT/$name.txt"
    done
    echo "-- eval_retrieval"
    grep -E '5,000 x 1,000|^ratio=|differ' "$OUT/eval_retrieval.txt"
} | tee "$OUT/summary.txt"
echo "outputs in $OUT"
exit "$FAILED"
