"""Why is the 0%-sparsity forward slower "incl. prediction" than "given mask" in `vidsparse bench`?

At the Wan2.1-1.3B shape (bf16) and Top-k k = 1 (every block kept) this times, interleaved and
twice, so that order and clock drift show up as differences between the two rounds:

  given     the kernel on a mask predicted once;
  incl      predictor + kernel in the timed call (what the bench reports);
  pred+given the predictor, its mask discarded, then the kernel on the cached mask;
  fresh     the kernel on a new BlockMask built from cloned tables in every call (as the predictor builds it).

An nvidia-smi log of SM clock, power and temperature is written beside the JSON.
"""
import argparse
import json
import subprocess

import torch
import triton.testing

import vidsparse
from vidsparse.maskers.hybrid_triton import fused_hybrid_block_mask
from vidsparse.mask import BlockMask


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="dense_gap.json")
    ap.add_argument("--keep", type=float, default=1.0, help="Top-k fraction kept")
    ap.add_argument("--rep-ms", type=int, default=300)
    args = ap.parse_args()
    smi = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active",
         "--format=csv", "-lms", "100"], stdout=open(args.out.replace(".json", "_smi.csv"), "w"))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    predict = lambda: fused_hybrid_block_mask(q, k, topk=args.keep, topp=None, block_q=128, block_k=64)  # noqa: E731
    mask = predict()

    def fresh():
        m = BlockMask(block_q=128, block_k=64, q_len=32760, k_len=32760, dense=mask.dense.clone(),
                      kv_indices=mask.kv_indices.clone(), kv_counts=mask.kv_counts.clone(), _kv_normalised=True)
        return vidsparse.block_sparse_attention(q, k, v, m, backend="triton")

    def pred_given():
        predict()
        return vidsparse.block_sparse_attention(q, k, v, mask, backend="triton")

    cases = {
        "given": lambda: vidsparse.block_sparse_attention(q, k, v, mask, backend="triton"),
        "incl": lambda: vidsparse.block_sparse_attention(q, k, v, predict(), backend="triton"),
        "pred+given": pred_given,
        "fresh": fresh,
    }
    rows = []
    for rnd in range(2):
        for name, fn in cases.items():
            ms = float(triton.testing.do_bench(fn, rep=args.rep_ms, return_mode="median"))
            rows.append({"round": rnd, "case": name, "ms": ms})
            print(f"round {rnd}  {name:<11} {ms:8.3f} ms", flush=True)
    smi.terminate()
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "keep": args.keep,
               "sparsity": mask.sparsity(), "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
