#!/usr/bin/env bash
# Issue 13 on one GPU (through the device tool), from the repository root:
#   GPU placement / dtype tests, sequential == whole-model tests, then end-to-end prefill rows
#   (bf16, dynamic FP8, insertquant FP8, insertquant+rotate FP8) for 8 layers of the LLaMA-2-7B and
#   LLaMA-3-8B shapes at 4,096 tokens, and a full 32-layer LLaMA-3-8B calibration with offload
#   (model on the CPU, one block on the GPU at a time).  Results land in $OUT (or ./gpu_e2e_out).
# Stages (first argument, default "all"): tests | e2e | offload | all; "vit" runs the fused ViT forward's GPU tests
# and the CLIP ViT-B/16, ViT-L/14 encoder rows at batch 256 (vtquant.bench_e2e_vit); "fused" runs the producer-fused
# forward's GPU tests and the fused end-to-end rows of the Llama-3-8B shape (8 layers, 4,096 tokens, with
# the top CUDA kernels of each model); "unfused" the same rows through the per-Linear modules.  Each stage fits in one
# 10-minute device call; "all" needs about 12-15 minutes, so run it as two calls (tests+e2e, offload).
set -o pipefail
OUT=${OUT:-gpu_e2e_out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
PY=${PY:-python3}
stage=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [[ $stage == tests || $stage == all || $stage == tests+e2e ]]; then
  $PY -m pytest -q -p no:cacheprovider tests/test_device_dtype.py tests/test_sequential.py 2>&1 | tee "$OUT/tests.log"
fi
if [[ $stage == e2e || $stage == all || $stage == tests+e2e ]]; then
  $PY -m vtquant.bench_e2e --model-shape llama-2-7b --layers 8 --tokens 4096 --calib-batches 16 --calib-len 2048 \
      --results-file "$OUT/e2e_llama2_7b_8l.json" 2>&1 | tee "$OUT/e2e_llama2_7b_8l.log"
  $PY -m vtquant.bench_e2e --model-shape llama-3-8b --layers 8 --tokens 4096 --calib-batches 16 --calib-len 2048 \
      --results-file "$OUT/e2e_llama3_8b_8l.json" 2>&1 | tee "$OUT/e2e_llama3_8b_8l.log"
fi
if [[ $stage == offload || $stage == all ]]; then
  # the calibration target: LLaMA-3-8B shape, insertquant+rotate W8A8, 64 x 2,048 tokens, <= 10 min, <= 24 GiB
  $PY -m vtquant.bench_e2e --model-shape llama-3-8b --layers 32 --tokens 4096 --calib-batches 64 --calib-len 2048 \
      --methods insertquant+rotate --offload --repeats 3 \
      --results-file "$OUT/calib_llama3_8b_32l_offload.json" 2>&1 | tee "$OUT/calib_llama3_8b_32l_offload.log"
fi
if [[ $stage == fused ]]; then
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
  $PY -m pytest -q -s -p no:cacheprovider tests/test_gpu_fused_model.py tests/test_device_dtype.py 2>&1 | tee "$OUT/tests_fused.log"
  $PY -m vtquant.bench_e2e --model-shape llama-3-8b --layers 8 --tokens 4096 --calib-batches 16 --calib-len 2048 \
      --profile --results-file "$OUT/e2e_llama3_8b_8l_fused.json" 2>&1 | tee "$OUT/e2e_llama3_8b_8l_fused.log"
fi
if [[ $stage == unfused ]]; then
  $PY -m vtquant.bench_e2e --model-shape llama-3-8b --layers 8 --tokens 4096 --calib-batches 16 --calib-len 2048 \
      --no-fused --profile --results-file "$OUT/e2e_llama3_8b_8l_unfused.json" 2>&1 | tee "$OUT/e2e_llama3_8b_8l_unfused.log"
fi
if [[ $stage == vit ]]; then  # issue 13 vision: the fused ViT forward's GPU tests, then CLIP ViT-B/16 and ViT-L/14 at batch 256
  $PY -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
  $PY -m pytest -q -s -p no:cacheprovider tests/test_gpu_fused_vit.py 2>&1 | tee "$OUT/tests_vit.log"
  for shape in vit-b16-clip vit-l14-clip; do
    $PY -m vtquant.bench_e2e --model-shape $shape --batch 256 --profile ${VIT_ARGS:-} \
        --results-file "$OUT/e2e_${shape}_b256.json" 2>&1 | tee "$OUT/e2e_${shape}_b256.log"
  done
fi
