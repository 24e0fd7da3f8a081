"""Command line of velocity distillation: ``vidsparse distill`` / ``python -m vidsparse.training.distill``.

The mask flags (``--method``, ``--topk``, ``--topp``, ``--block-q/-k``, ``--token-order``,
``--keep-diagonal``, ``--keep-sink``, ``--backend``, ``--option KEY=VALUE``) come from
:mod:`vidsparse.cli_options` and become the run's one :class:`vidsparse.SparseConfig`. Every bad
value is an argparse error naming the flag (exit code 2) before any work.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Sequence

from ..cli_options import add_mask_arguments, float_in, int_at_least, sparse_config_from_args
from .distill import PRECISIONS, DistillConfig, check_data, distill
from .families import EXPERTS
from .flow import TIMESTEP_SAMPLING
from .lora import LORA_SAVE, LORA_TARGETS, TRAINABLE
from .parallel import PARALLEL

#: the module ``python -m`` runs for this command line
MODULE = "vidsparse.training.distill"

__all__ = ["build_parser", "config_from_args", "main"]

_POSITIVE = float_in(0, low_open=True)
_NONNEG = float_in(0)


def _seed(text: str) -> int:
    value = int_at_least(0)(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be < 2**32, got {value}")
    return value


def _add_training_arguments(p: argparse.ArgumentParser, d: DistillConfig) -> None:
    p.add_argument("--steps", type=int_at_least(1), default=d.steps)
    p.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size, help="global batch (all ranks, all micro-batches)")
    p.add_argument("--grad-accum", type=int_at_least(1), default=d.grad_accum, help="micro-batches per step and rank")
    p.add_argument("--lr", type=_POSITIVE, default=d.lr)
    p.add_argument("--warmup-steps", type=int_at_least(0), default=d.warmup_steps)
    p.add_argument("--min-lr-ratio", type=float_in(0, 1), default=d.min_lr_ratio, help="cosine decay floor; 1 = constant after warm-up")
    p.add_argument("--weight-decay", type=_NONNEG, default=d.weight_decay)
    p.add_argument("--grad-clip", type=_NONNEG, default=d.grad_clip, help="0 disables clipping")
    p.add_argument("--distill-weight", type=_NONNEG, default=d.distill_weight,
                   help="weight of the velocity-distillation loss (0 = diffusion-loss fine-tuning, no teacher)")
    p.add_argument("--diffusion-weight", type=_NONNEG, default=d.diffusion_weight,
                   help="weight of the flow-matching loss added to the distillation loss (paper: 0)")
    p.add_argument("--timesteps", choices=TIMESTEP_SAMPLING, default=d.timesteps)
    p.add_argument("--t-mean", type=float_in(), default=d.t_mean, help="logit-normal mean")
    p.add_argument("--t-std", type=_POSITIVE, default=d.t_std, help="logit-normal std")
    p.add_argument("--t-shift", type=_POSITIVE, default=d.t_shift,
                   help="warp of the training times; %(default)s = the pipeline scheduler's shift (flow models), else 1")
    p.add_argument("--trainable", choices=TRAINABLE, default=d.trainable,
                   help="all parameters, the attention modules only, or LoRA adapters (needs peft)")
    p.add_argument("--lora-rank", type=int_at_least(1), default=d.lora_rank, help="LoRA rank r (--trainable lora)")
    p.add_argument("--lora-alpha", type=_POSITIVE, default=d.lora_alpha, help="LoRA alpha (default: the rank, scale 1)")
    p.add_argument("--lora-targets", choices=LORA_TARGETS, default=d.lora_targets,
                   help="attention: to_q/to_k/to_v/to_out.0 of attn1 and attn2; attention+ffn: also the FFN")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in the backward pass (less memory)")
    p.add_argument("--lora-save", choices=LORA_SAVE, default=d.lora_save,
                   help="--trainable lora: save the student with the adapters merged into its weights, or the peft adapter alone")
    p.add_argument("--parallel", choices=PARALLEL, default=d.parallel,
                   help="torchrun: ddp = a full replica per GPU; fsdp = FSDP2, parameters, gradients and optimizer "
                        "states sharded over GPUs, checkpoints sharded (DCP)")


def _add_data_arguments(p: argparse.ArgumentParser, d: DistillConfig) -> None:
    g = p.add_argument_group("data (default: the tiny model's shapes clips)")
    g.add_argument("--latents", default=None, help="latents folder written by `vidsparse encode` (or a --prompts cache)")
    g.add_argument("--prompts", default=None,
                   help='prompts file (one per line, or JSON lines {"prompt": ...}): the dense teacher pipeline samples '
                        "the clean latents once, cached under --cache")
    g.add_argument("--expert", choices=EXPERTS, default=None,
                   help="Wan 2.2: distil the high-noise transformer or the low-noise transformer_2; %(default)s = high")
    g.add_argument("--teacher-steps", type=int_at_least(1), default=d.teacher_steps, help="--prompts: sampling steps")
    g.add_argument("--teacher-batch-size", type=int_at_least(1), default=d.teacher_batch_size,
                   help="--prompts: prompts per pipeline call")
    g.add_argument("--guidance", type=_NONNEG, default=d.guidance,
                   help="--prompts: guidance scale, %(default)s = the pipeline's (HunyuanVideo also trains with it)")
    g.add_argument("--height", type=int_at_least(1), default=None, help="--prompts: sample height, %(default)s = the pipeline's")
    g.add_argument("--width", type=int_at_least(1), default=None, help="--prompts: sample width, %(default)s = the pipeline's")
    g.add_argument("--num-frames", type=int_at_least(1), default=None, help="--prompts: frames (4k + 1), %(default)s = the pipeline's")
    g.add_argument("--cache", default=None, help="--prompts: cache root, %(default)s = $VIDSPARSE_CACHE or ~/.cache/vidsparse")
    g.add_argument("--data", choices=("train", "shifted"), default=d.data, help="shapes clips: the split that builds x_0")
    g.add_argument("--frames", type=int_at_least(1), default=d.frames, help="shapes clips: frames")
    g.add_argument("--size", type=int_at_least(1), default=d.size, help="shapes clips: height and width")


def _add_run_arguments(p: argparse.ArgumentParser, d: DistillConfig) -> None:
    p.add_argument("--seed", type=_seed, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision)
    p.add_argument("--ckpt-every", type=int_at_least(1), default=d.ckpt_every)
    p.add_argument("--log-every", type=int_at_least(1), default=d.log_every)
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="resume from the latest checkpoint in --out, or the given file")
    p.add_argument("--time-limit-min", type=_POSITIVE, default=None, help="stop early (checkpoint, export) before this wall time")
    p.add_argument("--no-export", action="store_true", help="skip saving the final student")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    d = DistillConfig(out="")
    p = argparse.ArgumentParser(
        prog=_prog(),
        description="Velocity-distillation fine-tuning of a sparse-attention student against its dense teacher.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None,
                   help="diffusers pipeline folder (Wan 2.1/2.2, CogVideoX, HunyuanVideo; with --latents or --prompts), "
                        "or a transformer folder (with --latents); default: the embedded tiny model")
    p.add_argument("--out", required=True, help="output directory (checkpoints, log, final student)")
    _add_training_arguments(p, d)
    add_mask_arguments(p, d.sparse, title="student's sparse attention")
    _add_data_arguments(p, d)
    _add_run_arguments(p, d)
    return p


#: DistillConfig fields read from the flag of the same name
_FIELDS = ("model", "out", "steps", "batch_size", "grad_accum", "lr", "warmup_steps", "min_lr_ratio", "weight_decay",
           "grad_clip", "distill_weight", "diffusion_weight", "timesteps", "t_mean", "t_std", "t_shift", "trainable",
           "lora_rank", "lora_alpha", "lora_targets", "gradient_checkpointing", "lora_save", "parallel", "data", "frames", "size", "seed",
           "device", "precision", "ckpt_every", "log_every", "resume", "time_limit_min", "latents", "prompts",
           "expert", "teacher_steps", "teacher_batch_size", "guidance", "height", "width", "num_frames", "cache")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str | None = None) -> DistillConfig:
    """The run's :class:`DistillConfig`; a refused value is a ``parser.error`` (exit code 2).

    The data flags are checked together with ``--model`` (:func:`check_data`: JSON files,
    safetensors headers and the prompts only), so a mismatch stops before any work.
    """
    sparse = sparse_config_from_args(args, parser)
    try:
        cfg = DistillConfig(**{k: getattr(args, k) for k in _FIELDS}, sparse=sparse, export=not args.no_export,
                            progress=not args.no_progress, command=command)
        check_data(cfg)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    return cfg


def _prog() -> str:
    """The command the user ran: ``python -m vidsparse.training.distill`` when that module is
    ``__main__``, else ``vidsparse distill`` (the console script, ``python -m vidsparse``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "python -m vidsparse.training.distill" if getattr(spec, "name", None) == MODULE else "vidsparse distill"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code.

    Exit codes: 0 done, 2 a refused flag or input, 1 a run stopped by a non-finite loss or
    gradient norm (one line naming the step and what to try), 130 interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = f"{parser.prog} " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    cfg = config_from_args(args, parser, cmd)
    try:
        summary = distill(cfg)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the loop's check: "non-finite loss by step N; ..." (training/loop.py)
        clip = f"a smaller --grad-clip (this run: {cfg.grad_clip:g})" if cfg.grad_clip else "--grad-clip 1.0"
        print(f"{parser.prog}: error: training diverged: {str(e).strip().splitlines()[0]}; try a lower --lr "
              f"(this run: {cfg.lr:g}) or {clip}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    if summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
