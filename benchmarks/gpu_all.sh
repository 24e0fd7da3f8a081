#!/usr/bin/env bash
# Everything the GPU machine runs, in one call; each part is switched on by a variable:
#   TESTS=1      kernel + flex tests in bf16/fp16 on the GPU (default config, no autotuning)
#   BENCH=1      `vidsparse bench attention` at the Wan2.1-1.3B 480p shape
#   BENCH_14B=1  the same at the Wan2.1-14B 720p shape (fewer sparsities, no flex)
#   VARIANTS=1   benchmarks/kernel_variants.py: pointer vs TMA kernels, same run
#   WAN_STEP=1   one Wan2.1-1.3B denoising step, dense vs vidsparse (needs .whl with diffusers)
#   WAN14_LAYERS=N  also the 14B step with N layers
#   MASKERS=1    benchmarks/bench_maskers.py: every masker's plan + kernel time at the 1.3B shape
#   COMPARE=1    `vidsparse compare` on the tiny model (all maskers, 80/90/95%), into $OUT/compare
# Logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
if [ -n "${TESTS:-}" ]; then
  VIDSPARSE_TEST_GPU=1 VIDSPARSE_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider ${TEST_FILES:-tests/test_triton_kernels.py tests/test_flex.py} \
    2>&1 | grep -v DEBUG > "$OUT/gpu_tests.log"; tail -5 "$OUT/gpu_tests.log"
fi
if [ -n "${BENCH:-}" ]; then
  python3 -m vidsparse.cli bench attention --out "$OUT/bench_wan1.3b.json" 2>&1 > "$OUT/bench_wan1.3b.log"
  tail -16 "$OUT/bench_wan1.3b.log"
fi
if [ -n "${VARIANTS:-}" ]; then
  python3 benchmarks/kernel_variants.py --out "$OUT/kernel_variants.json" > "$OUT/kernel_variants.log" 2>&1
  tail -9 "$OUT/kernel_variants.log"
fi
if [ -n "${BENCH_14B:-}" ]; then
  python3 -m vidsparse.cli bench attention --shape wan14b-720p --sparsities 0,0.95 --rep-ms 200 --no-flex \
    --out "$OUT/bench_wan14b.json" > "$OUT/bench_wan14b.log" 2>&1; tail -6 "$OUT/bench_wan14b.log"
fi
if [ -n "${WAN_STEP:-}" ]; then
  python3 benchmarks/bench_wan_step.py --out "$OUT/wan13b_step.json" > "$OUT/wan13b_step.log" 2>&1; tail -15 "$OUT/wan13b_step.log"
fi
if [ -n "${WAN14_LAYERS:-}" ]; then
  python3 benchmarks/bench_wan_step.py --config 14b --layers "$WAN14_LAYERS" --out "$OUT/wan14b_step.json" \
    > "$OUT/wan14b_step.log" 2>&1; tail -12 "$OUT/wan14b_step.log"
fi
if [ -n "${MASKERS:-}" ]; then
  python3 benchmarks/bench_maskers.py --out "$OUT/bench_maskers.json" > "$OUT/bench_maskers.log" 2>&1; tail -20 "$OUT/bench_maskers.log"
fi
if [ -n "${COMPARE:-}" ]; then
  python3 -m vidsparse.cli compare --out "$OUT/compare" ${COMPARE_ARGS:-} > "$OUT/compare.log" 2>&1; tail -30 "$OUT/compare.log"
fi
