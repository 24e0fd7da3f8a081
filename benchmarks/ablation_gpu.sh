#!/usr/bin/env bash
# SpargeAttention2's ablation (paper Table 6) on the tiny Wan model, on one GPU inside one device
# call: python -m vidsparse.tiny.ablation, time-budgeted to LIMIT_MIN minutes (default 9)
# counted from the start of this script (wheel installation included).
#
#   OUT=out LIMIT_MIN=9 bash benchmarks/ablation_gpu.sh
#
# $OUT receives ablation.json, ablation.md, ablation.log and distilled_hybrid/ (the velocity-
# distilled hybrid student, fp16 safetensors: config.json, diffusion_pytorch_model.safetensors,
# sampling.json, MODEL_CARD.md, sparse_config.json): 8 files, at most 2 folders deep. Checkpoints stay in
# runs/ablation. Extra arguments are passed to the module (e.g. --variants 1,4,8 --steps 200).
set -uo pipefail
start=$(date +%s)
OUT=${OUT:-out}; mkdir -p "$OUT"
LIMIT_MIN=${LIMIT_MIN:-9}
# one config per Triton kernel: autotuning 18 configs costs ~30 s of the budget and buys little
# here (at 95% sparsity attention is a small share of a tiny-model step)
export VIDSPARSE_AUTOTUNE=${VIDSPARSE_AUTOTUNE:-0}
source benchmarks/gpu_env.sh
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
left=$(python3 -c "print(round($LIMIT_MIN - ($(date +%s) - $start) / 60, 2))")
echo "ablation: $left min left of $LIMIT_MIN"
python3 -m vidsparse.tiny.ablation --out "$OUT" --work-dir runs/ablation --time-limit-min "$left" "$@" \
  > "$OUT/ablation.log" 2>&1
rc=$?
grep '^\[ablation' "$OUT/ablation.log" | tail -20
if [ $rc -ne 0 ]; then
  echo "ablation failed (rc $rc); last lines of the log:"
  tail -30 "$OUT/ablation.log"
fi
echo "total $(( $(date +%s) - start )) s"
[ -f "$OUT/ablation.md" ] && cat "$OUT/ablation.md"
exit $rc
