#!/usr/bin/env bash
# Nsight Compute counters for the attention kernels, forward and backward, at the Wan2.1-1.3B
# shape and 95% sparsity (bf16, 128x64 blocks, default configs), in one GPU call:
#
#   OUT=out bash benchmarks/ncu_attention.sh                 # default kernels (TMA on sm_90+)
#   OUT=out VIDSPARSE_TMA=0 bash benchmarks/ncu_attention.sh # the pointer kernels
#
# KERNELS (a regex over kernel names) narrows what is profiled; LAUNCH_SKIP / LAUNCH_COUNT count
# launches of the matching kernels only (defaults 3 / 3: the second iteration of forward, dK/dV and
# dQ; for KERNELS=_fwd use 1 / 1). NAME names the report, $OUT/$NAME.txt (default ncu_attention);
# the key lines are printed.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
command -v ncu >/dev/null || { echo "ncu not found"; exit 1; }
cat > /tmp/ncu_attention_target.py <<'PY'
import torch
from vidsparse.kernels.triton_masker import fused_hybrid_block_mask
from vidsparse.kernels import triton_attention as A
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
           for _ in range(3))
m = fused_hybrid_block_mask(q, k, topk=0.05, topp=None)
for _ in range(2):
    o, _lse = A.attention(q, k, v, m, 128 ** -0.5)
    torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
torch.cuda.synchronize()
PY
# the second iteration is profiled (the first compiles)
VIDSPARSE_AUTOTUNE=0 timeout 300 ncu --clock-control none --kernel-name regex:"${KERNELS:-_fwd|_bwd_dkdv|_bwd_dq}" \
  --launch-skip "${LAUNCH_SKIP:-3}" --launch-count "${LAUNCH_COUNT:-3}" \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
  --section WarpStateStats --section ComputeWorkloadAnalysis \
  python3 /tmp/ncu_attention_target.py > "$OUT/${NAME:-ncu_attention}.txt" 2>&1
grep -E "^  [_a-zA-Z].*\(|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Theoretical Occupancy|Block Limit|Shared Memory Configuration Size|Local" \
  "$OUT/${NAME:-ncu_attention}.txt" | head -90
