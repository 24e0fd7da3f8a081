#!/usr/bin/env bash
# On a GPU machine: kernel tests in bf16/fp16, then the attention benchmark. Logs and JSON to $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
VIDSPARSE_TEST_GPU=1 VIDSPARSE_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_flex.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
python3 -m vidsparse.cli bench attention --out "$OUT/bench_wan1.3b.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_wan1.3b.log"
if [ -n "${BENCH_14B:-}" ]; then
  python3 -m vidsparse.cli bench attention --shape wan14b-720p --sparsities 0,0.9,0.95 --rep-ms 200 --no-flex \
    --out "$OUT/bench_wan14b.json" 2>&1 | tee "$OUT/bench_wan14b.log"
fi
