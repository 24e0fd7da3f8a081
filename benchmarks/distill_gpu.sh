#!/usr/bin/env bash
# One long velocity distillation of the embedded tiny model on one GPU, inside one device call
# (<= 10 min): the hybrid student (k = 1/32, p = 0.0832, 32 x 32 blocks: about 96% block sparsity;
# TOPK, TOPP, BLOCK_Q, BLOCK_K, ORDER, T_SHIFT override; KEEP_DIAGONAL=1 adds the locality prior) in
# tiled token order on matched data, then `vidsparse eval` of dense, training-free and distilled,
# and a GPU run of `vidsparse demo`.
#
#   OUT=out LIMIT_MIN=6.3 bash benchmarks/distill_gpu.sh
#
# $OUT receives 8 files (the device tool brings back no more): summary.json, loss_curve.png,
# student/ (config.json, fp16 weights, sparse_config.json), eval_original.json, eval_student.json
# and demo_results.json. The training log stays in runs/distill; its tail is printed. EVAL_ARGS adds
# flags to both evals (e.g. "--shape-samples 64 --steps 40").
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT" runs
rm -rf runs/distill runs/demo  # a warm machine keeps runs/ from an earlier call
export VIDSPARSE_AUTOTUNE=${VIDSPARSE_AUTOTUNE:-0}  # autotuning buys little on the tiny model
source benchmarks/gpu_env.sh
TOPK=${TOPK:-0.03125}; TOPP=${TOPP:-0.0832}; ORDER=${ORDER:-tiled}; BQ=${BLOCK_Q:-32}; BK=${BLOCK_K:-32}
DIAG=(); DIAG_KEY=""
if [ -n "${KEEP_DIAGONAL:-}" ]; then DIAG=(--keep-diagonal); DIAG_KEY=",keep_diagonal=true"; fi
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
python3 -m vidsparse.training.distill --out runs/distill --steps ${STEPS:-2400} --batch-size 32 --lr ${LR:-1.5e-4} \
  --warmup-steps 50 --min-lr-ratio 0.1 --timesteps logit-normal --t-mean 0 --t-std 1 --t-shift ${T_SHIFT:-1} \
  --topk "$TOPK" --topp "$TOPP" --block-q "$BQ" --block-k "$BK" --token-order "$ORDER" "${DIAG[@]}" --ckpt-every 500 --log-every 25 --seed 3 \
  --time-limit-min "${LIMIT_MIN:-6.3}" --no-progress > runs/distill.log 2>&1
rc=$?
tail -25 runs/distill.log
cp runs/distill/summary.json runs/distill/loss_curve.png "$OUT/" 2>/dev/null
cp -r runs/distill/student "$OUT/student" 2>/dev/null
setting="hybrid-$ORDER:topk=$TOPK,topp=$TOPP,block_q=$BQ,block_k=$BK$DIAG_KEY"
python3 -m vidsparse.cli eval --setting "$setting" --token-order "$ORDER" ${EVAL_ARGS:-} --no-progress --json "$OUT/eval_original.json" 2>&1 | tail -8
[ $rc -eq 0 ] && python3 -m vidsparse.cli eval --model runs/distill/student --reference vidsparse/tiny/assets/tiny_wan \
  --setting "$setting" ${EVAL_ARGS:-} --no-progress --json "$OUT/eval_student.json" 2>&1 | tail -8
[ $rc -eq 0 ] && timeout 120 python3 -m vidsparse.cli demo --distilled-path runs/distill/student --out runs/demo \
  --no-progress 2>&1 | tail -15 && cp runs/demo/results.json "$OUT/demo_results.json"
exit $rc
