"""FSDP2 sharding and sharded checkpoints (torch.distributed.checkpoint) for the training loop.

:func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to every transformer block of a
diffusers model (the classes it lists in ``_no_split_modules``), then to the root. Each rank then
holds 1/world of every parameter, gradient and optimizer state; a block's parameters are
all-gathered just before it runs and freed after.

A sharded model is checkpointed with DCP into a directory instead of one ``.pt`` file::

    checkpoints/step-0000100/
        .metadata, __0_0.distcp, __1_0.distcp, ...   model + optimizer, one file per rank (DCP)
        loop.pt                                      step, elapsed time, scheduler, extra state, RNG, meta
        manifest.json                                size and sha256 of every file above

Every rank writes its shards into ``step-0000100.tmp/``; when all are written and fsynced the
ranks hash the files (each a share of them), rank 0 writes the manifest and renames the folder,
so a folder without ``.tmp`` is complete. On resume the manifest is checked before anything is
loaded (a truncated or overwritten file is found), and DCP reshards: a checkpoint written by N
ranks loads on M ranks, or into a plain model in one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

__all__ = ["PARALLEL", "is_sharded", "shard_model", "unwrapped_class", "full_state_dict", "no_grad_sync",
           "save_sharded", "verify_sharded", "load_sharded", "read_sharded_model", "file_sha256", "fsync_dir"]

#: what ``parallel`` may name: DistributedDataParallel (a full replica per rank) or FSDP2
PARALLEL = ("ddp", "fsdp")
_MANIFEST = "manifest.json"
_LOOP_STATE = "loop.pt"


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrapped_class(model: torch.nn.Module) -> type:
    """The model's own class (``fully_shard`` swaps in a subclass named FSDP<class>)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    return next(c for c in cls.__mro__ if c is not cls and not issubclass(c, FSDPModule)) if is_sharded(model) else cls


def _shard_units(model: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """(modules kept in fp32, blocks) to shard, innermost first.

    Blocks are the modules whose class the model lists in ``_no_split_modules`` (diffusers: the
    transformer blocks, patch embedders, token refiners); fp32 ones are the submodules with
    parameters named in ``_keep_in_fp32_modules`` (Wan: ``time_embedder``, ``norm2``).
    """
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    fp32_names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    named = list(model.named_modules())[1:]
    blocks = [m for _, m in reversed(named) if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"parallel='fsdp': {type(model).__name__} lists no block classes in _no_split_modules "
                         "(not a diffusers transformer); use parallel='ddp'")
    fp32 = [m for name, m in reversed(named) if name.rsplit(".", 1)[-1] in fp32_names
            and any(True for _ in m.parameters(recurse=False)) and type(m).__name__ not in block_names]
    return fp32, blocks


def shard_model(model: torch.nn.Module, device: torch.device, *, bf16: bool) -> torch.nn.Module:
    """Apply FSDP2 in place: each fp32-kept submodule, each block, then the root; returns ``model``.

    ``bf16``: compute with bf16 copies of the parameters (``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)``); the sharded parameters, gradients and optimizer states stay fp32, and
    the modules diffusers keeps in fp32 (Wan's ``time_embedder`` and ``norm2``) are sharded
    apart with an fp32 policy. Parameters sitting directly on a block (Wan's ``scale_shift_table``)
    follow the block. Inputs are not cast (``cast_forward_inputs=False``): timesteps and rotary
    tables keep their precision, autocast picks each op's dtype as in the DDP path.
    Needs an initialised process group (one rank is fine). Call after LoRA injection,
    ``requires_grad`` selection and ``enable_gradient_checkpointing``, before building the optimizer.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    keep = MixedPrecisionPolicy(cast_forward_inputs=False)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False) if bf16 else keep
    fp32, blocks = _shard_units(model)
    for module in fp32:
        fully_shard(module, mesh=mesh, mp_policy=keep)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def no_grad_sync(model: torch.nn.Module):
    """Context for a micro-batch whose gradients are not yet reduced over ranks.

    DDP: ``no_sync()`` (one all-reduce on the last micro-batch). FSDP2 and plain modules: none;
    FSDP2 reduce-scatters after every micro-batch and accumulates sharded gradients, which
    keeps the memory sharded (unsynced FSDP2 micro-batches would hold full gradients).
    """
    from torch.nn.parallel import DistributedDataParallel

    return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict as CPU tensors; collective for a sharded model (call on every
    rank: rank 0 gets the tensors, the other ranks an empty dict)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------------------------
# sharded checkpoints


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - directories cannot be fsynced on some platforms
        pass


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _shared_digests(folder: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"size", "sha256"}} of files in ``folder``; each rank hashes a share of them."""
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    mine = {n: {"size": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)} for n in names[rank::world]}
    if dist is None:
        return mine
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loop_state: dict) -> None:
    """Write a sharded checkpoint folder atomically (collective: every rank calls it).

    ``loop_state`` (rank 0's): everything but model and optimizer, saved as ``loop.pt``. A folder
    already at ``path`` (a damaged or abandoned checkpoint of the same step) is replaced.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    dist = _dist()
    main = dist is None or dist.get_rank() == 0
    tmp = path.with_name(path.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist is not None:
        dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True),
             no_dist=dist is None)
    if main:
        with open(tmp / _LOOP_STATE, "wb") as f:
            torch.save(loop_state, f)
            f.flush()
            os.fsync(f.fileno())
    if dist is not None:
        dist.barrier()
    digests = _shared_digests(tmp, sorted(p.name for p in tmp.iterdir()))
    if main:
        _write_synced(tmp / _MANIFEST, json.dumps({"files": digests}, indent=1).encode())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    if dist is not None:
        dist.barrier()


def _check_manifest(path: Path) -> str | None:
    """This rank's share of the manifest check: None when fine, else what is wrong."""
    try:
        files = json.loads((path / _MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable {_MANIFEST} ({type(e).__name__})"
    for name in (_LOOP_STATE, ".metadata"):
        if name not in files:
            return f"{_MANIFEST} lists no {name}"
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    for name in sorted(files)[rank::world]:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != files[name]["size"]:
            return f"{name} has {f.stat().st_size} bytes, {files[name]['size']} were written"
        if file_sha256(f) != files[name]["sha256"]:
            return f"{name} does not match its sha256"
    return None


def verify_sharded(path: Path, required: tuple[str, ...]) -> dict:
    """Check a checkpoint folder against its manifest and return its ``loop.pt`` state.

    Collective when a process group is initialised (each rank hashes a share of the files; every
    rank reaches the same verdict). Raises ValueError naming the folder when it is damaged.
    """
    problem = _check_manifest(path)
    dist = _dist()
    if dist is not None:
        found: list = [None] * dist.get_world_size()
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p is not None), None)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is damaged ({problem})")
    try:
        state = torch.load(path / _LOOP_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the manifest matched, so this is a foreign file
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete (missing {missing})")
    return state


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a verified checkpoint folder into ``model`` and ``optimizer``, resharding as needed.

    Works for a sharded model on any number of ranks and for a plain model (one process, or a
    replica per DDP rank). Collective when a process group is initialised.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    _dcp_load(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_sharded_model(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full model weights of a checkpoint folder, in one process (no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path)
    meta = reader.read_metadata().state_dict_metadata
    model = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    _dcp_load({"model": model}, path, reader)
    return model


def _dcp_load(state: dict, path, reader=None) -> None:
    """``dcp.load`` in place; without a process group it reads in this process (DCP warns that it
    assumes so on every call, which is what is meant here)."""
    import torch.distributed.checkpoint as dcp

    single = _dist() is None
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, storage_reader=reader or dcp.FileSystemReader(path), no_dist=single)
