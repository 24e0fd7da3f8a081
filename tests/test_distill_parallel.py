"""FSDP2 distillation on the CPU (gloo): two ranks against one process, sharded (DCP) checkpoints
resumed on another world size, LoRA under FSDP, the adapter export, and the faults of a sharded run.

What must match between 2 ranks and 1 process: step s draws the same global batch (items
[s*B, (s+1)*B), noise and t seeded by (seed, s)) and rank r takes its half; each rank's loss is
the mean over its half and FSDP2 averages the gradients over ranks (reduce-scatter, fp32), so
the gradient is the mean over the global batch, as in one process. Only the summation order
differs: weights and losses agree to fp32 rounding.
"""

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_distill import LORA, _SignalAt, _cfg, _fixed_batch, _losses, _mini_model, _poison_gradients_from
from vidsparse.training.distill import distill, train_student
from vidsparse.training.loop import list_checkpoints
from vidsparse.training.parallel import read_sharded_model

SPAWN_TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------
# running ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, ports, runs):
    """One rank: ``distill`` once per (out, changes, nan_on_rank) in ``runs``, each in its own process group.

    Each run gets its own port: a new gloo group on the port of a just-destroyed one can hang."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    for port, (out, changes, nan_on_rank) in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)
        model = _mini_model()
        if nan_on_rank == rank:
            _poison_gradients_from(model, call=2)  # steps 0 and 1 are fine
        try:
            distill(_cfg(out, **changes), model=model)
        except FloatingPointError as e:
            (Path(out).parent / f"error-rank{rank}.txt").write_text(str(e))


def _run_ranks(*runs, world=2):
    """``distill`` on ``world`` gloo ranks for each (out, changes[, nan_on_rank]) (one start-up for all);
    a failing or hanging rank fails the test."""
    runs = [(str(r[0]), r[1], r[2] if len(r) > 2 else None) for r in runs]
    # a fork server that imported this module (torch, diffusers) once starts the ranks in a fraction of a second
    mp.set_forkserver_preload([__name__])
    ctx = mp.start_processes(_rank_main, args=(world, [_free_port() for _ in runs], runs), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1):  # raises when a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish in {SPAWN_TIMEOUT_S} s")


def _pt_model(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(a, b, atol=1e-5):
    """Default atol: 1% of one Adam step at lr 1e-3. Adam turns the fp32 summation-order noise of a
    near-zero gradient into a weight difference of ~0.1% of a step; a wrong update differs by a step."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def _records(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# two ranks against one process


COMMON = dict(lr=1e-3, grad_clip=1e-3, keep_checkpoints=3)  # a clip this small is active at every step
LORA_ADAPTER = dict(steps=2, lr=1e-2, export=True, lora_save="adapter", **LORA)


def test_fsdp_on_two_ranks(tmp_path):
    """Three runs on one start-up of two ranks: full fine-tuning (then resumed by one process: 2 -> 1
    ranks), LoRA with the adapter export, and NaN gradients on rank 1 only."""
    _run_ranks((tmp_path / "two", dict(COMMON, steps=2, parallel="fsdp")),
               (tmp_path / "lora_two", dict(LORA_ADAPTER, parallel="fsdp")),
               (tmp_path / "nan" / "run", dict(steps=6, parallel="fsdp", keep_checkpoints=1), 1))
    _check_full(tmp_path)
    _check_lora(tmp_path)
    _check_non_finite(tmp_path / "nan")


def _check_full(tmp_path):
    common = COMMON
    distill(_cfg(tmp_path / "one", steps=4, **common), model=_mini_model())  # the reference: plain, one process

    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert all(r["grad_norm"] > common["grad_clip"] for r in one)
    (sharded,) = list_checkpoints(tmp_path / "two")
    assert sharded.is_dir() and {"__0_0.distcp", "__1_0.distcp", ".metadata", "loop.pt", "manifest.json"} <= set(os.listdir(sharded))
    reference = {_ckpt.name: _ckpt for _ckpt in list_checkpoints(tmp_path / "one")}
    _assert_same_weights(_pt_model(reference["step-0000002.pt"]), read_sharded_model(sharded))

    # the 2-rank checkpoint resumes in one process (DCP reshards), FSDP on one rank, to step 4
    distill(_cfg(tmp_path / "two", steps=4, parallel="fsdp", resume="auto", **common), model=_mini_model())
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    last = list_checkpoints(tmp_path / "two")[-1]
    assert last.name == "step-0000004" and torch.load(last / "loop.pt", weights_only=True)["step"] == 4
    _assert_same_weights(_pt_model(reference["step-0000004.pt"]), read_sharded_model(last))


def _check_lora(tmp_path):
    from safetensors.torch import load_file

    distill(_cfg(tmp_path / "lora_one", **LORA_ADAPTER), model=_mini_model())
    assert _losses(tmp_path / "lora_two") == pytest.approx(_losses(tmp_path / "lora_one"), rel=1e-5)
    state = read_sharded_model(list_checkpoints(tmp_path / "lora_two")[-1])
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in state.items())
    for k, v in _mini_model().state_dict().items():  # FSDP kept the base weights frozen
        assert torch.equal(state[k.replace(".weight", ".base_layer.weight")] if k.replace(".weight", ".base_layer.weight") in state
                           else state[k.replace(".bias", ".base_layer.bias")] if k.replace(".bias", ".base_layer.bias") in state
                           else state[k], v), k
    one = load_file(tmp_path / "lora_one" / "student" / "adapter_model.safetensors")
    two = load_file(tmp_path / "lora_two" / "student" / "adapter_model.safetensors")
    assert one and all(".lora_A." in k or ".lora_B." in k for k in one)
    _assert_same_weights(one, two, atol=0.01 * LORA_ADAPTER["lr"])
    assert {"adapter_config.json", "sparse_config.json"} <= set(os.listdir(tmp_path / "lora_two" / "student"))


# ---------------------------------------------------------------------------------------------
# faults of a sharded run


def _check_non_finite(tmp_path):
    """A non-finite gradient on one rank stops every rank before anything is saved."""
    out = tmp_path / "run"
    for rank in (0, 1):  # rank 0's own gradient was finite: the reduced gradients and the global norm were not
        msg = (tmp_path / f"error-rank{rank}.txt").read_text()
        assert "non-finite grad_norm by step 3" in msg and "step-0000002" in msg, msg
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002"]  # kept, and nothing saved after it
    assert max(r["step"] for r in _records(out)) == 2
    distill(_cfg(out, steps=3, parallel="fsdp", resume="auto"), model=_mini_model())  # and it resumes


def _fsdp_run(out, **changes):
    return distill(_cfg(out, parallel="fsdp", **changes), model=_mini_model())


@pytest.mark.parametrize("damage", ["overwritten", "truncated", "no manifest"])
def test_fsdp_damaged_latest_checkpoint_falls_back_naming_it(tmp_path, damage):
    _fsdp_run(tmp_path, steps=4)
    latest = list_checkpoints(tmp_path)[-1]
    expected, losses = read_sharded_model(latest), _losses(tmp_path)
    shard = latest / "__0_0.distcp"
    if damage == "overwritten":  # same size, other bytes: only the digest can tell
        data = bytearray(shard.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = os.urandom(64)
        shard.write_bytes(bytes(data))
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:200])
    else:
        (latest / "manifest.json").unlink()
    with pytest.warns(RuntimeWarning, match=f"{latest}.*damaged.*falling back"):
        _fsdp_run(tmp_path, steps=4, resume="auto")  # from step 2, steps 3 and 4 again
    assert _losses(tmp_path) == losses
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000004"]  # rewritten
    _assert_same_weights(expected, read_sharded_model(list_checkpoints(tmp_path)[-1]), atol=0)


def test_fsdp_sigint_checkpoints_and_resumes_exactly(tmp_path):
    _fsdp_run(tmp_path / "straight", steps=5)
    with pytest.raises(KeyboardInterrupt, match="SIGINT at step 2"):
        distill(_cfg(tmp_path / "run", steps=5, parallel="fsdp", ckpt_every=100), model=_mini_model(),
                source=_SignalAt(1, signal.SIGINT))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000002"]
    _fsdp_run(tmp_path / "run", steps=5, resume="auto")
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")


# ---------------------------------------------------------------------------------------------
# the student


@pytest.mark.parametrize("alpha", [8.0, None], ids=["alpha=2r", "alpha=r"])
def test_adapter_student_reloads_onto_the_base_model(tmp_path, alpha):
    """peft's loader reads adapter_config.json (any alpha); diffusers' load_lora_adapter reads the
    same files but takes alpha = rank, so it is exact only for the default alpha."""
    from peft import PeftModel

    import vidsparse
    from vidsparse.tiny.flow import predict_velocity

    cfg = _cfg(tmp_path, steps=3, lr=1e-2, export=True, lora_save="adapter", **{**LORA, "lora_alpha": alpha})
    summary, trained = train_student(cfg, model=_mini_model())  # in memory: LoRA merged into a plain model
    student_dir = Path(summary["student_dir"])
    assert summary["student_format"] == "adapter"
    assert sorted(os.listdir(student_dir)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                               "sparse_config.json"]
    sparse = vidsparse.SparseConfig.load(student_dir)
    assert sparse == cfg.sparse
    x0, emb, noise, t = _fixed_batch(4)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    with torch.no_grad():
        vidsparse.patch(trained, sparse)
        expected = predict_velocity(trained, x_t, t, emb)
        assert (expected - predict_velocity(_mini_model_patched(sparse), x_t, t, emb)).abs().max() > 1e-3  # trained
        via_peft = PeftModel.from_pretrained(_mini_model().eval(), student_dir).merge_and_unload()
        vidsparse.patch(via_peft, sparse)
        torch.testing.assert_close(predict_velocity(via_peft, x_t, t, emb), expected, rtol=1e-4, atol=1e-5)
        if alpha is None:
            via_diffusers = _mini_model().eval()
            via_diffusers.load_lora_adapter(student_dir, weight_name="adapter_model.safetensors", prefix="base_model.model")
            vidsparse.patch(via_diffusers, sparse)
            torch.testing.assert_close(predict_velocity(via_diffusers, x_t, t, emb), expected, rtol=1e-4, atol=1e-5)


def _mini_model_patched(sparse):
    import vidsparse

    model = _mini_model().eval()
    vidsparse.patch(model, sparse)
    return model
