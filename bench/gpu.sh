#!/usr/bin/env bash
# The GPU part of the benchmarks (issue 7), each part sized to finish well inside 10 minutes on one
# H100/H200. Run in the repository root of a machine with a CUDA GPU:
#
#   bash bench/gpu.sh latency  OUTDIR   # bench/latency.py: 3 paper models, fp32 + bf16, both layouts,
#                                       #   eager + BN-folded, uniform/irregular 0.75×/0.5×, round-to 1/8/16
#   bash bench/gpu.sh training OUTDIR   # bench/throughput.py (train-seg, sparse-mtp joint/alternating,
#                                       #   deeplabv3_resnet101, 513² crops, bf16; contiguous and channels_last)
#                                       #   + bench/mtp_step.py (one MTP round against plain steps, bf16)
#   bash bench/gpu.sh compile  OUTDIR   # bench/latency.py with torch.compile, 0.5× only (slow to compile)
#
# Each part writes its JSON files and a log into OUTDIR. Torch-Pruning, if the machine lacks it, is
# installed from wheels in .whl/ (`pip download --no-deps -d .whl torch-pruning==1.6.1`, see bench/README.md).
# MODELS="deeplabv3_resnet101 …" limits the latency parts to those models (to split a part over calls).
# SMOKE=1 runs every part at toy sizes (a CPU check of the script itself, no figures to record).
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: bash bench/gpu.sh latency|training|compile OUTDIR}
out=${2:?usage: bash bench/gpu.sh latency|training|compile OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
if ! "$py" -c "import torch_pruning" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "torch_pruning is missing and .whl/ holds no wheels" >&2; exit 1; }
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/mtprune-site .whl/*.whl
    export PYTHONPATH=/tmp/mtprune-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MTPRUNE_NO_PROGRESS=1
if [[ ${SMOKE:-0} == 1 ]]; then
    dev=cpu
    lat_size=(--size 64 64) runs=20 models=(bisenet_resnet18) ratios=(0.5) rts=(1 8)
    tp=(--model deeplabv3_resnet18 --width 0.25 --crop 64 --cls-size 32 --seg-batch 2 --cls-batch 4 --steps 4
        --warmup 1 --round-steps 1 --workers 0)
    ms=(--model deeplabv3_resnet18 --width 0.25 --seg-size 64 --cls-size 32 --seg-batch 2 --cls-batch 4
        --steps 1 --rounds 1)
else
    dev=cuda
    "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt" || true
    lat_size=() runs=30 models=(deeplabv3_resnet101 pspnet_resnet50 bisenet_resnet18) ratios=(0.25 0.5) rts=(1 8 16)
    tp=(--model deeplabv3_resnet101 --crop 513 --cls-size 224 --seg-batch 8 --cls-batch 32 --steps 30 --warmup 5
        --round-steps 5 --workers 12 --cudnn-benchmark)
    ms=(--model deeplabv3_resnet101 --width 1.0 --seg-size 513 --cls-size 224 --seg-batch 8 --cls-batch 32
        --steps 5 --rounds 4 --amp)
fi
[[ -n ${MODELS:-} ]] && read -r -a models <<<"$MODELS"
case "$part" in
latency)
    for m in "${models[@]}"; do
        "$py" bench/latency.py --timing device="$dev" runs="$runs" --models "$m" "${lat_size[@]}" \
            --ratios "${ratios[@]}" --plans uniform irregular --round-to "${rts[@]}" \
            --runtime eager,fold-bn,channels-last,channels-last+fold-bn --dtypes float32 bfloat16 \
            --json "$out/latency_${dev}_$m.json" \
            2>&1 | tee -a "$out/latency.log"
    done
    "$py" bench/latency.py --render "$out"/latency_"${dev}"_*.json | tee "$out/latency.md"
    ;;
compile)
    for m in "${models[@]}"; do
        "$py" bench/latency.py --timing device="$dev" runs="$runs" --models "$m" "${lat_size[@]}" --ratios 0.5 \
            --plans uniform irregular --round-to 1 --runtime channels-last+fold-bn,channels-last+compile \
            --dtypes bfloat16 \
            --json "$out/latency_${dev}_${m}_compile.json" 2>&1 | tee -a "$out/compile.log"
    done
    "$py" bench/latency.py --render "$out"/latency_"${dev}"_*_compile.json | tee "$out/compile.md"
    ;;
training)
    "$py" bench/throughput.py --device "$dev" "${tp[@]}" --modes joint alternating \
        --json "$out/throughput_$dev.json" 2>&1 | tee -a "$out/training.log"
    "$py" bench/throughput.py --device "$dev" "${tp[@]}" --modes joint --channels-last \
        --json "$out/throughput_$dev.json" 2>&1 | tee -a "$out/training.log"
    "$py" bench/mtp_step.py --device "$dev" "${ms[@]}" 2>&1 | tee -a "$out/training.log"
    "$py" bench/mtp_step.py --device "$dev" "${ms[@]}" --channels-last 2>&1 | tee -a "$out/training.log"
    ;;
*)
    echo "unknown part '$part': latency, training or compile" >&2
    exit 2
    ;;
esac
