"""The `vidsparse` command line. Subcommands import their modules lazily so `--help` is fast."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="vidsparse info", description="Versions, GPU, and usable backends.").parse_args(argv)
    import platform

    import torch

    from . import __version__
    from .dispatch import backend_report

    print(f"vidsparse {__version__}")
    print(f"python    {platform.python_version()} ({platform.machine()})")
    print(f"torch     {torch.__version__}")
    for mod in ("triton", "numpy", "diffusers", "transformers"):
        try:
            m = __import__(mod)
            print(f"{mod:<9} {m.__version__}")
        except ImportError:
            print(f"{mod:<9} not installed")
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1: Triton kernels run in the CPU interpreter (slow; no bf16)")
    # which attention kernels run (vidsparse/kernels/triton_attention.py)
    tma = os.environ.get("VIDSPARSE_TMA", "") or "auto"
    tma_what = {"auto": "TMA forward and dK/dV kernels for bf16/fp16 on sm_90+ GPUs, pointer kernels elsewhere",
                "0": "pointer kernels only (TMA kernels off)",
                "1": "TMA kernels wherever they apply, the CPU interpreter included"}
    print(f"VIDSPARSE_TMA={tma}: {tma_what.get(tma, 'not a valid value (auto, 0 or 1)')}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"gpu {i}     {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
        devices.append("cuda")
    else:
        print("gpu       none (CUDA not available)")
    for dev in devices:
        print(f"\nbackends for fp16 inputs on {dev}:")
        for name, status in backend_report(dev).items():
            print(f"  {name:<10} {status}")
    return 0


def _run_module(module: str):
    """A subcommand implemented by ``module.main(argv)``, imported only when it is run."""

    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).main(argv)

    return run


SUBCOMMANDS = {
    "info": (lambda argv: _cmd_info(argv), "versions, GPU, and which attention backends work here (and why not)"),
    "demo": (_run_module("vidsparse.tiny.demo"), "the main job: the embedded tiny video model, dense vs vidsparse side by side (`vidsparse demo --help`)"),
    "bench": (_run_module("vidsparse.bench"), "GPU benchmarks: `vidsparse bench attention --help`"),
    "distill": (_run_module("vidsparse.training.distill"), "velocity-distillation fine-tuning of a sparse student"),
    "encode": (_run_module("vidsparse.training.encode"), "a folder of videos (and captions) -> VAE latents and text embeddings for `vidsparse distill --latents`"),
    "eval": (_run_module("vidsparse.tiny.eval_cli"), "quality yardstick: validation loss and PSNR/SSIM vs dense, per attention setting"),
    "compare": (_run_module("vidsparse.tiny.compare"), "every registered masker at the same block sparsities on the tiny model, ranked by error vs dense"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="vidsparse", description="Block-sparse attention for video diffusion transformers.",
        epilog="Run `vidsparse COMMAND --help` for a command's options.",
    )
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), metavar="COMMAND",
                        help="; ".join(f"{name}: {text}" for name, (_, text) in SUBCOMMANDS.items()))
    if not argv:
        parser.print_help()
        return 2
    if argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args = parser.parse_args(argv[:1])
    # each subcommand parses its own flags (and --help)
    return int(SUBCOMMANDS[args.command][0](argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
