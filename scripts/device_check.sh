#!/usr/bin/env bash
# The CUDA measurements, as one prepared run on a machine with a GPU (about 15 minutes).
# Writes JSON and logs under $OUT.
#   run: bash scripts/device_check.sh        (OUT defaults to ./device_out)
# What it measures: ResNet-50 b256 224x224 and the 4-layer GPT-1 b32 x 256 tokens, step-time
# ratios to fused Adam/AdamW, opt.step() and statistics time, peak step memory; then the CUDA
# tests of the fused path.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
if [ ! -x .venv/bin/python ]; then bash scripts/setup-venv.sh >"$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 1; }; fi
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
$PY -m lightning_adafisher.bench speed --device cuda --model resnet50 --batch-size 256 --image-size 224 \
    --repeats 20 --warmup 5 --no-peers --fused --threads 0 --out "$OUT/resnet50_b256.json" 2>&1 | tee "$OUT/resnet50.log" | tail -14
$PY -m lightning_adafisher.bench speed --device cuda --model gpt --batch-size 32 --context 256 \
    --repeats 20 --warmup 5 --no-peers --fused --threads 0 --out "$OUT/gpt_b32x256.json" 2>&1 | tee "$OUT/gpt.log" | tail -12
$PY -m lightning_adafisher.bench speed --device cuda --model resnet18 --batch-size 128 \
    --repeats 20 --warmup 5 --threads 0 --out "$OUT/resnet18_b128_peers.json" 2>&1 | tee "$OUT/resnet18.log" | tail -16
