#!/usr/bin/env bash
# The GPU measurements that issues 6 and 7 ask for, in one run, most important first, sized
# to fit one call of the device tool (an estimated 6-8 minutes on an H100/H200, never run there yet; the
# steps' limits add up to 14.5 minutes, the last step, GGUF, the one to lose when time runs short; run it
# with timeout_s near 560). See BENCHMARKS.md, "GPU suite".
#
#   bash benchmarks/gpu_suite.sh            # on the GPU machine, from the repository root
#   SMOKE=1 bash benchmarks/gpu_suite.sh    # the same steps at tiny sizes on a CPU, uncompiled (a dry run)
#
# The GPU machine has torch, transformers, safetensors and tokenizers, but not diffusers
# (the peer) nor gguf (for the GGUF step). Carry their wheels (.whl/ is git-ignored): `pip
# download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
# -d .whl diffusers==0.42.1 gguf==0.19.0`, then `carry: [".whl"]`. kino itself runs from the checkout
# (PYTHONPATH); the paths these benchmarks import need neither PyAV nor the MiniLM package.
#
# Each step writes its output to $OUT/NAME.log (the device tool returns $OUT; elsewhere OUT
# defaults to runs/gpu_suite), and a step that fails or runs past its limit does not stop the
# steps after it. The last lines printed are the JSON results, one per step.
set -u
OUT=${OUT:-runs/gpu_suite}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, go on either way
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$OUT/$name.log"
    echo "=== $name: exit $rc"
}

if [ "${SMOKE:-0}" = 1 ]; then
    DEV=cpu DTYPE=fp32 DIT=tiny VAE=tiny LATENT=3x4x4 TEXT=8 CLIP="--frames 9 --height 64 --width 64" TILE=64
    SWAP=1 COMPILE="" CHECK="--frames 5 --height 32 --width 32" TRAIN="--model tiny --latent 2x4x4 --text-len 8 --batch 2 --steps 3 --warmup 1"
else
    DEV=cuda DTYPE=bf16 DIT=wan2.1-1.3b VAE=wan2.1 LATENT=21x60x104 TEXT=512 CLIP="" TILE=256
    SWAP=30 COMPILE=--compile CHECK="" TRAIN="--model wan2.1-1.3b --latent 21x60x104 --text-len 512 --batch 1 --steps 8 --warmup 3"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# small-GPU mode's CUDA paths (side-stream prefetch, pinned copies, offload) against the plain pipeline
# shellcheck disable=SC2086
step memory_plans 90 $PY benchmarks/check_memory_plans.py --device $DEV $CHECK

# issue 7: one DiT call at 832x480x81 (32,760 tokens), kino (eager, then blocks compiled) / diffusers
# shellcheck disable=SC2086
step dit_peer 180 $PY benchmarks/bench_dit_peer.py --size $DIT --latent $LATENT --text $TEXT --device $DEV \
    --dtype $DTYPE --repeats 5 $COMPILE
# issue 7: peak device memory of a whole 832x480x81 generation, small-GPU mode, then plain bf16
# shellcheck disable=SC2086
step memory_small 120 $PY benchmarks/bench_pipeline_memory.py --dit $DIT --vae $VAE $CLIP --device $DEV \
    --weights-dtype fp8 --swap-blocks $SWAP --offload model --vae-tile $TILE --cfg sequential --text-device cpu
# shellcheck disable=SC2086
step memory_plain 90 $PY benchmarks/bench_pipeline_memory.py --dit $DIT --vae $VAE $CLIP --device $DEV \
    --text-device cpu
# issue 6: training step throughput and MFU at the Wan2.1-1.3B size, bf16, activation checkpointing, compile
# shellcheck disable=SC2086
step train_mfu 240 $PY benchmarks/bench_train.py $TRAIN --nproc 1 --device $DEV --precision $DTYPE --ac $COMPILE

# GGUF DiT (Q4_K blocks, dequantized layer by layer) against fp8 block storage: one guided DiT step's
# device memory and time at 832x480x81 (the 1.3B-size file is written first, random blocks)
# shellcheck disable=SC2086
step memory_gguf 150 $PY benchmarks/bench_memory.py --size $DIT --latent $LATENT --text $TEXT --device $DEV \
    --plans gguf-Q4_K fp8 --gguf-dir /tmp/kino-gguf

echo "=== results"
grep -h "plans as expected" "$OUT/memory_plans.log" 2>/dev/null
for f in dit_peer memory_small memory_plain train_mfu; do
    grep -h '^{' "$OUT/$f.log" 2>/dev/null | tail -n 1
done
grep -h '^| ' "$OUT/memory_gguf.log" 2>/dev/null
