"""Draw docs/images/architecture.png: vidsparse's data flow and where each module lives.

    python docs/images/make_architecture.py            # writes architecture.png beside this file

Needs matplotlib only. Edit the boxes below when a module moves; the page docs/architecture.md
describes the same picture in words and as a mermaid block.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

FLOW = "#dbe9f6"      # the data-flow boxes
CORE = "#f3f3f3"      # rooms of the core package
TINY = "#fdebd3"      # the tiny harness
EDGE = "#333333"


def box(ax, x, y, w, h, title, body="", color=CORE, title_size=11, body_size=8.5):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec=EDGE, lw=1.1))
    ax.text(x + w / 2, y + h - 0.1, title, ha="center", va="top", fontsize=title_size, weight="bold")
    if body:
        ax.text(x + w / 2, y + h - 0.42, body, ha="center", va="top", fontsize=body_size, linespacing=1.35)


def arrow(ax, a, b, text="", color=EDGE, style="-|>", ls="-", text_dy=0.12, text_size=8.5):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=14, lw=1.3, color=color, ls=ls))
    if text:
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + text_dy, text, ha="center", va="bottom",
                fontsize=text_size, color=color)


def draw(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(15, 9.2))
    ax.set_xlim(0, 15)
    ax.set_ylim(0, 9.2)
    ax.axis("off")

    ax.text(7.5, 9.0, "vidsparse: masker → MaskPlan → attention backend → output", ha="center",
            va="top", fontsize=15, weight="bold")

    # ------------------------------------------------------------------ the data flow (top row)
    y, h = 5.9, 2.45
    box(ax, 0.2, y, 2.2, h, "q, k, v", "(B, H, N, D)\nin the caller's\ntoken order\n\ngrid = (T, H, W)\nwhen known", FLOW)
    box(ax, 2.9, y, 2.6, h, "masker", "maskers.get(name)\n(q, k, grid=, **options)\n\ncommon options:\ntoken_order, tile,\nkeep_sink, keep_diagonal,\nwindow", FLOW)
    box(ax, 6.0, y, 2.6, h, "MaskPlan", "mask: BlockMask\n(B, H, NQB, NKB)\nin attention order\n\nperm, k_perm:\n(B|1, H|1, N) or None", FLOW)
    box(ax, 9.1, y, 2.8, h, "block_sparse_attention", "gather q, k, v into the\nattention order\n\ndispatch → backend:\ntriton | gather | flex |\nreference", FLOW, title_size=10.5)
    box(ax, 12.4, y, 2.4, h, "output", "o (B, H, N, D)\n[lse (B, H, N)]\n\nscattered back to\nthe caller's order", FLOW)
    for x0, x1 in ((2.4, 2.9), (5.5, 6.0), (8.6, 9.1), (11.9, 12.4)):
        arrow(ax, (x0, y + h / 2), (x1, y + h / 2))
    ax.text(10.5, y - 0.02, "no backend fits → NoBackendError listing each one's reasons",
            ha="center", va="top", fontsize=8.5, style="italic")

    # --------------------------------------------------------------- the core package (rooms)
    ax.add_patch(FancyBboxPatch((0.2, 0.3), 10.3, 5.0, boxstyle="round,pad=0.02,rounding_size=0.1",
                                fc="white", ec=EDGE, lw=1.6, ls="-"))
    ax.text(0.4, 5.22, "vidsparse: the core (imports torch; diffusers and Triton only when used)", ha="left",
            va="top", fontsize=11.5, weight="bold")
    rows = [
        [("mask.py + plan.py", "BlockMask: block shape,\ndense view, index tables;\nMaskPlan, as_plan,\nappend_dense_tokens"),
         ("maskers/", "registry.py: register, get,\navailable, Masker base;\nhybrid (+ hybrid_triton), svg,\nsvg2, xattention, radial,\nvmoba; groups.py; token_order"),
         ("kernels/ + dispatch.py", "triton_attention, gather,\nflex, reference;\nselect_backend explains\nrefusals")],
        [("api.py + config.py", "block_sparse_attention,\nsparse_attention;\nSparseConfig: method, options,\nblocks, dense_steps ... save/load"),
         ("integrations/", "patch / unpatch / stats:\none SparseLayer per layer\n(masker state, state['layer']),\nstep tracking, text tokens"),
         ("cli.py, cli_options.py", "the vidsparse command;\nshared mask flags (--method,\n--option KEY=VALUE) ->\nSparseConfig; demo, eval,\ncompare run tiny by name")],
        [("training/loop.py", "the one training loop:\nresume, checkpoints, DDP,\nnon-finite stop, SIGTERM\ncheckpoint, atomic saves"),
         ("training/distill.py", "DistillConfig(sparse=...),\nDataSource: batch(index,\ncount, device), bind(model);\ndistill_cli.py: the CLI"),
         ("training/lora.py, ...", "LoRA adapters, trainable\nparameters; ema, planner,\nflow, optim, plots;\nbench.py, utils.py")],
    ]
    bw, bh = 3.2, 1.4
    for r, row in enumerate(rows):
        for c, (title, body) in enumerate(row):
            box(ax, 0.45 + c * 3.35, 3.42 - r * 1.5, bw, bh, title, body, CORE, title_size=10, body_size=7.8)

    # ----------------------------------------------------------------------- the tiny harness
    box(ax, 11.0, 0.3, 3.8, 5.0, "vidsparse.tiny (the harness)",
        "model.py   tiny Wan (5.9 M params)\n"
        "data.py    procedural shapes videos\n"
        "source.py   ShapesSource (DataSource)\n"
        "flow.py    rectified flow, sampler\n"
        "classifier.py   shape accuracy\n"
        "pretrain.py   pretraining (training loop)\n"
        "ablation.py   paper Table 6\n"
        "demo.py (+ demo_*.py)   vidsparse demo\n"
        "evaluate.py + eval_cli.py   vidsparse eval\n"
        "compare.py   vidsparse compare\n"
        "cli_args.py   shared flag checks\n"
        "assets/   weights, model cards",
        TINY, title_size=11, body_size=8.6)
    arrow(ax, (11.0, 2.2), (10.5, 2.2), "imports", text_dy=0.08)
    ax.text(10.75, 1.55, "core never\nimports tiny", ha="center", va="top", fontsize=8.5,
            color="#b00020", weight="bold")

    ax.text(0.3, 5.5, "vidsparse.patch(): each patched layer feeds its q, k, v into this flow, with "
            "its own masker state (integrations/)", ha="left", va="center", fontsize=8.5, color="#555555",
            style="italic")

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight", facecolor="white")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("architecture.png"))
    args = parser.parse_args()
    draw(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
