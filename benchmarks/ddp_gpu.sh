#!/usr/bin/env bash
# Velocity distillation on 2 GPUs with DDP (torchrun), then the same global batch on 1 GPU, to
# compare loss curves and throughput. Logs and summaries go to $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
nvidia-smi -L
STEPS=${STEPS:-60}
ARGS=(--steps "$STEPS" --batch-size ${BATCH:-32} --lr 1e-4 --data shifted --log-every 5 --ckpt-every 1000 --no-progress)
torchrun --standalone --nproc_per_node 2 -m vidsparse.training.distill --out runs/ddp2 "${ARGS[@]}" > "$OUT/ddp2.log" 2>&1
echo "2-GPU rc $?"; tail -4 "$OUT/ddp2.log"; cp runs/ddp2/summary.json "$OUT/ddp2_summary.json"; cp runs/ddp2/log.jsonl "$OUT/ddp2_log.jsonl"
runs=(ddp2)
if [ "${SINGLE:-1}" != 0 ]; then  # SINGLE=0: the 2-GPU run only
  CUDA_VISIBLE_DEVICES=0 python3 -m vidsparse.training.distill --out runs/ddp1 "${ARGS[@]}" > "$OUT/gpu1.log" 2>&1
  echo "1-GPU rc $?"; tail -4 "$OUT/gpu1.log"; cp runs/ddp1/summary.json "$OUT/gpu1_summary.json"; cp runs/ddp1/log.jsonl "$OUT/gpu1_log.jsonl"
  runs+=(gpu1)
fi
python3 - "$OUT" "${runs[@]}" <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
rec = {n: [json.loads(l) for l in open(f"{out}/{n}_log.jsonl")] for n in names}
s = {n: json.load(open(f"{out}/{n}_summary.json")) for n in names}
print("step  " + "  ".join(f"loss({n})" for n in names))
for recs in zip(*(rec[n] for n in names)):
    if recs[0].get("kind") == "train":
        print(f"{recs[0]['step']:4d}  " + "  ".join(f"{r['loss']:.6f}" for r in recs))
for n in s:
    print(n, {k: s[n].get(k) for k in ("steps", "wall_time_s", "train_loop_s", "steps_per_s", "world_size", "first_loss", "final_loss")})
PY
