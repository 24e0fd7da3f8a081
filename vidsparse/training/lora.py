"""What a fine-tuning run trains: all parameters, the attention modules, or peft LoRA adapters.

:func:`add_lora` injects adapters, :func:`select_trainable` sets ``requires_grad``,
:func:`merged_state_dict` folds the adapters back into plain weights for export and
:func:`save_adapter` saves them in peft's own format instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["TRAINABLE", "LORA_TARGETS", "LORA_SAVE", "lora_config", "add_lora", "select_trainable",
           "merged_state_dict", "save_adapter"]

#: what ``trainable`` may name
TRAINABLE = ("all", "attention", "lora")
#: what ``lora_targets`` may name
LORA_TARGETS = ("attention", "attention+ffn")
#: how a trained LoRA student may be saved: folded into the weights, or as a peft adapter
LORA_SAVE = ("merged", "adapter")
# module-name patterns (re.fullmatch) of the LoRA targets in a diffusers Wan transformer
_LORA_PATTERNS = {
    "attention": r".*blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "attention+ffn": r".*blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))",
}


def lora_config(rank: int, alpha: float | None = None, targets: str = "attention"):
    """The ``peft.LoraConfig`` of :func:`add_lora` (no dropout, no bias, alpha defaults to rank)."""
    if targets not in LORA_TARGETS:
        raise ValueError(f"lora_targets must be one of {LORA_TARGETS}, got {targets!r}")
    try:
        from peft import LoraConfig
    except ImportError as e:  # pragma: no cover - peft is in requirements-ci.txt
        raise ImportError("trainable='lora' needs the peft package: pip install 'vidsparse[train]'") from e
    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=0.0,
                      target_modules=_LORA_PATTERNS[targets], bias="none")


def add_lora(
    model: torch.nn.Module, rank: int, alpha: float | None = None, targets: str = "attention", *, seed: int = 0
) -> list[str]:
    """Inject peft LoRA adapters (adapter "default", no dropout) into ``model`` in place.

    ``targets``: "attention" = ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every block's attn1
    and attn2; "attention+ffn" adds the FFN's two projections. ``alpha`` defaults to ``rank``
    (scale alpha / rank = 1). The adapters start at zero (B = 0), so the model's outputs are
    unchanged; A is drawn from a generator seeded by ``seed`` (the global RNG is left untouched),
    so runs repeat. Works on a patched model too: vidsparse's processors call the wrapped projections.

    Returns the names of the LoRA parameters. Raises ImportError without ``peft`` and ValueError
    when no module matches (not a Wan-style model).
    """
    config = lora_config(rank, alpha, targets)
    from peft import inject_adapter_in_model

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # peft draws A with the global RNG (kaiming-uniform)
            inject_adapter_in_model(config, model, adapter_name="default")
    except ValueError as e:
        raise ValueError(f"lora_targets={targets!r} matches no module of {type(model).__name__}: {e}") from e
    return [name for name, _ in model.named_parameters() if ".lora_" in name]


def select_trainable(model: torch.nn.Module, trainable: str) -> list[str]:
    """Set ``requires_grad`` for "all" parameters, only "attention" (attn1/attn2) ones, or only the
    "lora" adapters (inject them first with :func:`add_lora`).

    Returns the names of the trainable parameters. Raises ValueError for an unknown ``trainable``
    or when it matches nothing (not a Wan-style model, or no LoRA injected).
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    has_lora = any(".lora_" in name for name, _ in model.named_parameters())
    if has_lora and trainable != "lora":
        raise ValueError(f"trainable={trainable!r} on a model with LoRA adapters; use 'lora'")
    names = []
    for name, p in model.named_parameters():
        if trainable == "lora":
            keep = ".lora_" in name
        else:
            keep = trainable == "all" or ".attn1." in name or ".attn2." in name
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        hint = " (call add_lora first)" if trainable == "lora" else ""
        raise ValueError(f"trainable={trainable!r} selects no parameter of {type(model).__name__}{hint}")
    return names


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every peft LoRA adapter merged into its base weight.

    Keys are those of the model without adapters (``x.base_layer.weight`` -> ``x.weight``, the
    ``lora_*`` tensors dropped), so the result loads into a plain copy of the architecture. The
    model itself is not modified. A model without adapters gives its own state dict (detached).
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if not any(".lora_" in k for k in state):
        return state
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = base.weight.detach()
            with torch.no_grad():
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{name}.weight"] = weight
    out = {}
    for k, v in state.items():
        if ".lora_" in k:
            continue
        k = k.replace(".base_layer.", ".")
        out[k] = merged.get(k, v)
    return out


def save_adapter(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike, *, rank: int,
                 alpha: float | None = None, targets: str = "attention", base_model: str | None = None) -> Path:
    """Save trained LoRA adapters in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``model``: the plain architecture without adapters (its weights are not read and may be on
    the meta device; it is consumed: adapters are injected into it). ``state``: the state dict
    of the model :func:`add_lora` was applied to, with the same ``rank``, ``alpha`` and
    ``targets``. ``base_model`` is recorded as ``base_model_name_or_path``. Load the result with
    ``peft.PeftModel.from_pretrained(base, path)``, or with diffusers'
    ``base.load_lora_adapter(path, weight_name="adapter_model.safetensors", prefix="base_model.model")``.
    """
    from peft import get_peft_model

    config = lora_config(rank, alpha, targets)
    config.base_model_name_or_path = base_model
    with torch.random.fork_rng(devices=[]):  # peft draws the (overwritten) initial A with the global RNG
        peft_model = get_peft_model(model, config)
    peft_model.base_model.model.load_state_dict(state, strict=True, assign=True)
    peft_model.save_pretrained(Path(path), safe_serialization=True)
    return Path(path)
