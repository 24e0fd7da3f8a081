#!/usr/bin/env bash
# One long velocity distillation of the embedded tiny model on one GPU, inside one device call
# (<= 10 min): the hybrid student (k = 1/32, p = 0.0832: about 95% block sparsity) in tiled token
# order on matched data, then `vidsparse eval` of dense, training-free and distilled, and a GPU
# run of `vidsparse demo`.
#
#   OUT=out LIMIT_MIN=6.3 bash benchmarks/distill_gpu.sh
#
# $OUT receives distill.log, summary.json, log.jsonl, loss_curve.png, student/ (fp16 weights,
# sparse_config.json), eval_*.json and demo/.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export VIDSPARSE_AUTOTUNE=${VIDSPARSE_AUTOTUNE:-0}  # autotuning buys little on the tiny model
source benchmarks/gpu_env.sh
TOPK=${TOPK:-0.03125}; TOPP=${TOPP:-0.0832}; ORDER=${ORDER:-tiled}
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
python3 -m vidsparse.training.distill --out runs/distill --steps ${STEPS:-2400} --batch-size 32 --lr ${LR:-1.5e-4} \
  --warmup-steps 50 --min-lr-ratio 0.1 --timesteps logit-normal --t-mean 0 --t-std 1 --t-shift 3 \
  --topk "$TOPK" --topp "$TOPP" --token-order "$ORDER" --ckpt-every 500 --log-every 25 --seed 3 \
  --time-limit-min "${LIMIT_MIN:-6.3}" --no-progress > "$OUT/distill.log" 2>&1
rc=$?
tail -25 "$OUT/distill.log"
cp runs/distill/summary.json runs/distill/log.jsonl runs/distill/loss_curve.png "$OUT/" 2>/dev/null
cp -r runs/distill/student "$OUT/student" 2>/dev/null
setting="hybrid-$ORDER:topk=$TOPK,topp=$TOPP"
python3 -m vidsparse.cli eval --setting "$setting" --token-order "$ORDER" --no-progress --json "$OUT/eval_original.json" 2>&1 | tail -8
[ $rc -eq 0 ] && python3 -m vidsparse.cli eval --model runs/distill/student --reference vidsparse/assets/tiny_wan \
  --setting "$setting" --no-progress --json "$OUT/eval_student.json" 2>&1 | tail -8
timeout 120 python3 -m vidsparse.cli demo --out "$OUT/demo" --token-order "$ORDER" 2>&1 | tail -15
exit $rc
