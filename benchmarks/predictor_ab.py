"""Same-run A/B of the fused mask predictor against a baseline copy of its module, on one GPU.

    git show REV:vidsparse/maskers/hybrid_triton.py > old_masker.py
    python benchmarks/predictor_ab.py --baseline old_masker.py [--big] [--select-configs 1x2,8x2,8x8] [--out FILE]

For the Wan2.1-1.3B 480p shape (and, with --big, the 14B 720p one), bf16, 128x64 blocks, it
builds masks with both predictors for Top-k only, Top-p only and hybrid settings, counts the query
rows whose kept blocks differ (near-ties may legitimately flip a block), and times each predictor
with triton.testing.do_bench (median ms) and as a CUDA-graph replay (GPU time without the host's
launch overhead). ``--select-configs`` also times the current predictor with other (warps, fanout) settings of
the selection kernel (masks checked equal to the default's); a last row per shape times each
launch of the Top-k predictor alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

SETTINGS = {"topk 5%": dict(topk=0.05, topp=None), "topp 0.9": dict(topk=None, topp=0.9),
            "hybrid k3% p20%": dict(topk=0.03, topp=0.2)}


def load_baseline(path: str):
    """Import a copy of hybrid_triton.py whose relative imports point into the installed package."""
    text = Path(path).read_text()
    text = re.sub(r"from \.\.(\w)", r"from vidsparse.\1", text)
    text = re.sub(r"from \.(\w)", r"from vidsparse.maskers.\1", text)
    # Triton reads kernel source from the file, so the rewritten module must live in one
    tmp = Path(tempfile.mkdtemp()) / "baseline_masker.py"
    tmp.write_text(text)
    spec = importlib.util.spec_from_file_location("baseline_masker", tmp)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def graph_ms(fn) -> float:
    """Median GPU time of fn replayed from a CUDA graph."""
    return float(triton.testing.do_bench_cudagraph(fn, return_mode="median"))


def select_rows(mod, shape, q, k, warps, fanout):
    """The current predictor with its selection kernel at (warps, fanout): time, and equality."""
    default = mod._select_config
    out = []
    try:
        for label in ("topk 5%", "hybrid k3% p20%"):
            kw = SETTINGS[label]
            ref = mod.fused_hybrid_block_mask(q, k, **kw)
            mod._select_config = lambda _p2: (warps, fanout)
            m = mod.fused_hybrid_block_mask(q, k, **kw)
            row = {"shape": shape, "setting": f"{label}, select {warps}w x{fanout}",
                   "equal_to_default": bool(torch.equal(m.dense, ref.dense) and torch.equal(m.kv_counts, ref.kv_counts)),
                   "new_ms": triton.testing.do_bench(lambda: mod.fused_hybrid_block_mask(q, k, **kw)),
                   "new_graph_ms": graph_ms(lambda: mod.fused_hybrid_block_mask(q, k, **kw))}
            mod._select_config = default
            out.append(row)
            print(row, flush=True)
    finally:
        mod._select_config = default
    return out


def stage_rows(mod, shape, q, k):
    """GPU time (CUDA graphs) of the pooling launch, of the matmul, and of the whole Top-k 5% predictor."""
    q_mean, k_mean = mod._pool(q, 128, k, 64)
    rows = {"pool": lambda: mod._pool(q, 128, k, 64),
            "matmul": lambda: torch.matmul(q_mean, k_mean.transpose(-1, -2)),
            "all three": lambda: mod.fused_hybrid_block_mask(q, k, topk=0.05, topp=None)}
    out = [{"shape": shape, "setting": f"stage: {name}", "new_graph_ms": graph_ms(fn)} for name, fn in rows.items()]
    for r in out:
        print(r, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="a copy of an earlier vidsparse/maskers/hybrid_triton.py")
    p.add_argument("--big", action="store_true", help="also the Wan2.1-14B 720p shape (H=40, N=75600)")
    p.add_argument("--select-configs", default="",
                   help="comma-separated WARPSxFANOUT settings of the selection kernel to time, e.g. 1x2,8x2,8x8")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "predictor_ab.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("predictor_ab.py needs a CUDA GPU", file=sys.stderr)
        return 1
    from vidsparse.maskers import hybrid_triton as new

    old = load_baseline(args.baseline)
    shapes = [("wan1.3b-480p", 12, 32760)] + ([("wan14b-720p", 40, 75600)] if args.big else [])
    rows = []
    for name, h, n in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k = (torch.randn(1, h, n, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        for label, kw in SETTINGS.items():
            masks = {tag: mod.fused_hybrid_block_mask(q, k, **kw) for tag, mod in (("old", old), ("new", new))}
            differ = (masks["old"].dense != masks["new"].dense).any(-1).sum().item()
            row = {"shape": name, "setting": label, "rows": masks["new"].dense[..., 0].numel(),
                   "rows_that_differ": differ, "sparsity": float(masks["new"].sparsity())}
            for tag, mod in (("old", old), ("new", new)):
                row[f"{tag}_ms"] = triton.testing.do_bench(lambda: mod.fused_hybrid_block_mask(q, k, **kw))
                row[f"{tag}_graph_ms"] = graph_ms(lambda: mod.fused_hybrid_block_mask(q, k, **kw))
            rows.append(row)
            print(row, flush=True)
        for cfg in [c for c in args.select_configs.split(",") if c]:
            warps, fanout = (int(x) for x in cfg.split("x"))
            rows.extend(select_rows(new, name, q, k, warps, fanout))
        rows.extend(stage_rows(new, name, q, k))
        # the pooling stage alone: two launches before, one now
        row = {"shape": name, "setting": "pooling Q and K",
               "old_graph_ms": graph_ms(lambda: (old.pool_blocks(q, 128), old.pool_blocks(k, 64))),
               "new_graph_ms": graph_ms(lambda: new._pool(q, 128, k, 64))}
        rows.append(row)
        print(row, flush=True)

    card = torch.cuda.get_device_name()
    print(f"\n{card} | torch {torch.__version__} | triton {triton.__version__} | bf16, D=128, 128x64 blocks")
    print(f"{'shape':<13} {'setting':<16} {'old ms':>7} {'new ms':>7} {'old graph':>9} {'new graph':>9}  rows differ")
    for r in rows:
        cells = [f"{r[key]:.4f}" if key in r else "-" for key in ("old_ms", "new_ms", "old_graph_ms", "new_graph_ms")]
        differ = f"{r['rows_that_differ']} of {r['rows']}" if "rows" in r else ""
        print(f"{r['shape']:<13} {r['setting']:<16} {cells[0]:>7} {cells[1]:>7} {cells[2]:>9} {cells[3]:>9}  {differ}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": card, "torch": torch.__version__, "triton": triton.__version__,
                               "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1) + "\n")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
