#!/usr/bin/env bash
# Stage timings and Nsight Compute counters for the predictor and the forward kernel (one GPU call).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
python3 benchmarks/profile_gpu.py --out "$OUT/profile_bhnd.json" 2>&1 | tee "$OUT/profile.log"
python3 benchmarks/profile_gpu.py --layout bnhd --out "$OUT/profile_bnhd.json" 2>&1 | tee -a "$OUT/profile.log"
if command -v ncu >/dev/null && [ -n "${NCU:-1}" ]; then
  cat > /tmp/ncu_target.py <<'PY'
import torch
from vidsparse.kernels.triton_masker import fused_hybrid_block_mask
from vidsparse.kernels import triton_attention as A
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
for _ in range(2):
    m = fused_hybrid_block_mask(q, k, topk=0.05, topp=None)
    A.attention(q, k, v, m, 128 ** -0.5)
torch.cuda.synchronize()
PY
  VIDSPARSE_AUTOTUNE=0 timeout 240 ncu --clock-control none --kernel-name regex:"_pool_kernel|_select_kernel|_fwd_kernel" --launch-skip 4 --launch-count 4 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis --section WarpStateStats \
    python3 /tmp/ncu_target.py > "$OUT/ncu.txt" 2>&1
  grep -E "^  [_a-zA-Z].*\(|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Theoretical Occupancy|Stall|Block Limit" "$OUT/ncu.txt" | head -80
fi
