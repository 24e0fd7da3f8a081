"""The `vidsparse` command line. Subcommands import their modules lazily so `--help` is fast."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.rest)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args.rest)


def _cmd_module(module: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module).main(args.rest)

    return run


SUBCOMMANDS = {
    "info": (_cmd_info, "versions, GPU, and which attention backends work here (and why not)"),
    "demo": (_cmd_demo, "the main job: dense vs sparse generation side by side (see `vidsparse demo --help`)"),
    "bench": (_cmd_bench, "GPU benchmarks: `vidsparse bench attention`"),
    "eval": (_cmd_module("vidsparse.evaluation"), "validation loss and sample fidelity, dense vs sparse"),
    "distill": (_cmd_module("vidsparse.training.distill"), "velocity-distillation fine-tuning"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vidsparse", description="Block-sparse attention for video diffusion transformers."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=(name == "info"))
        if name != "info":
            # the subcommand's own parser handles its flags (and --help)
            p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=fn)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
