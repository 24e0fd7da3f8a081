"""Regression tests for the reliability defects of issue 17 (library core).

Each test failed before its fix: NaN in a dropped block leaking into results, masks changed
behind their back, tracebacks where a sentence is due, copies of a patched model.
"""

from __future__ import annotations

import copy
import os
import pickle
import signal

import pytest
import torch

import vidsparse
from vidsparse import BlockMask

GRAD_BACKENDS = ("reference", "gather", "triton")  # triton runs in the interpreter here


def _mask(rows):
    """16x16 blocks, one batch and head, from a list of kept-block lists per query block."""
    nkb = 1 + max((j for r in rows for j in r), default=0)
    dense = torch.zeros(1, 1, len(rows), max(nkb, 2), dtype=torch.bool)
    for i, r in enumerate(rows):
        dense[0, 0, i, list(r)] = True
    return BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=16 * len(rows), k_len=16 * dense.shape[-1])


def _run(backend, q, k, v, mask, do):
    q, k, v = (t.clone().requires_grad_(backend != "flex") for t in (q, k, v))
    if backend == "flex":
        with torch.no_grad():
            o, lse = vidsparse.block_sparse_attention(q, k, v, mask, backend="flex", return_lse=True)
        return o, lse
    o, lse = vidsparse.block_sparse_attention(q, k, v, mask, backend=backend, return_lse=True)
    return (o, lse, *torch.autograd.grad(o, (q, k, v), do))


# (mask rows, tensor, token, what): each token lies in a block that no query keeps, or in a query
# block that keeps nothing
DROPPED_CASES = [
    # the case: only block (0, 0) kept, key 20 (block 1) dropped by everyone
    ([[0], []], "k", 20, "dropped key"),
    ([[0], []], "v", 20, "dropped value"),
    ([[0], []], "q", 20, "query of an empty row"),
    # query block 1 keeps only key block 2: gather pads its table with block 0, which no one keeps
    ([[1, 2], [2]], "k", 3, "key in gather's padding block"),
    ([[1, 2], [2]], "v", 3, "value in gather's padding block"),
]


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
@pytest.mark.parametrize("rows,which,token,what", DROPPED_CASES, ids=[c[3] for c in DROPPED_CASES])
@pytest.mark.parametrize("backend", GRAD_BACKENDS + ("flex",))
def test_a_dropped_block_never_influences_any_result(backend, rows, which, token, what, bad):
    mask = _mask(rows)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, mask.q_len, 8, generator=g)
    k, v = (torch.randn(1, 1, mask.k_len, 8, generator=g) for _ in range(2))
    do = torch.randn(1, 1, mask.q_len, 8, generator=g)
    clean = _run(backend, q, k, v, mask, do)
    poisoned = dict(q=q.clone(), k=k.clone(), v=v.clone())
    poisoned[which][0, 0, token, 0] = bad
    dirty = _run(backend, poisoned["q"], poisoned["k"], poisoned["v"], mask, do)
    names = ("o", "lse", "dq", "dk", "dv")
    for name, a, b in zip(names, clean, dirty):
        assert not b.isnan().any(), f"{backend}: NaN/inf in a dropped {which} reached {name}"
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=f"{backend}: {name} changed")


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_empty_rows_get_zero_gradient_next_to_a_nan_key(backend):
    """The issue's exact report: every row of dq became NaN, including empty rows."""
    mask = _mask([[0], []])
    q, k, v = (torch.randn(1, 1, 32, 16) for _ in range(3))
    k[..., 20, 0] = float("nan")
    q.requires_grad_()
    o = vidsparse.block_sparse_attention(q, k, v, mask, backend=backend)
    (dq,) = torch.autograd.grad(o.sum(), q)
    assert torch.isfinite(dq).all()
    assert torch.equal(dq[0, 0, 16:], torch.zeros(16, 16))


@pytest.mark.parametrize("backend", ("reference", "gather"))
def test_nan_in_a_kept_block_stays_in_the_rows_that_keep_it(backend):
    # query block 0 keeps key block 0 (with the NaN); query block 1 keeps key block 1 only
    mask = _mask([[0], [1]])
    q, k, v = (torch.randn(1, 1, 32, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k_bad = k.detach().clone()
    k_bad[0, 0, 3, 0] = float("nan")
    k_bad.requires_grad_()
    o = vidsparse.block_sparse_attention(q, k_bad, v, mask, backend=backend)
    dq, dk, dv = torch.autograd.grad(o.sum(), (q, k_bad, v))
    assert o[0, 0, :16].isnan().all() and torch.isfinite(o[0, 0, 16:]).all()
    assert dq[0, 0, :16].isnan().any() and torch.isfinite(dq[0, 0, 16:]).all()
    assert torch.isfinite(dk[0, 0, 16:]).all() and torch.isfinite(dv[0, 0, 16:]).all()


# ------------------------------------------------------------------ masks cannot change behind their back
def test_editing_the_callers_block_map_does_not_change_the_mask():
    dense = torch.zeros(1, 1, 4, 8, dtype=torch.bool)
    mask = BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=64, k_len=128)
    dense.fill_(True)  # after construction
    assert not mask.dense.any()
    assert int(mask.kv_counts.sum()) == 0


def test_editing_the_callers_index_table_does_not_change_the_mask():
    idx = torch.tensor([[[[0, 1], [2, 3]]]], dtype=torch.int32)
    cnt = torch.tensor([[[1, 2]]], dtype=torch.int32)
    mask = BlockMask.from_indices(idx, cnt, block_q=16, block_k=16, q_len=32, k_len=64)
    idx.zero_()
    cnt.fill_(2)
    assert mask.dense[0, 0].tolist() == [[True, False, False, False], [False, False, True, True]]


@pytest.mark.parametrize("view", ["dense", "kv_indices", "kv_counts"])
def test_editing_a_view_in_place_is_caught_at_the_next_use(view):
    mask = BlockMask.from_dense(torch.eye(4, dtype=torch.bool), block_q=16, block_k=16, q_len=64, k_len=64)
    getattr(mask, view).zero_()
    with pytest.raises(RuntimeError, match="edited in place"):
        mask.dense  # noqa: B018
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(RuntimeError, match="masks are immutable"):
        vidsparse.block_sparse_attention(q, q, q, mask, backend="gather")


def test_an_inference_mode_mask_still_works():
    with torch.inference_mode():
        mask = BlockMask.from_dense(torch.eye(2, dtype=torch.bool), block_q=16, block_k=16, q_len=32, k_len=32)
        assert mask.kv_counts.tolist() == [[[1, 1]]]


def test_a_copied_or_pickled_mask_is_the_same_mask():
    mask = BlockMask.from_dense(torch.eye(3, dtype=torch.bool), block_q=16, block_k=32, q_len=48, k_len=96)
    mask.kv_indices  # noqa: B018  (caches built before copying must not confuse the copy)
    for other in (copy.deepcopy(mask), pickle.loads(pickle.dumps(mask))):
        assert torch.equal(other.dense, mask.dense) and torch.equal(other.kv_counts, mask.kv_counts)


def test_from_indices_range_checks_before_the_int32_cast():
    idx = torch.tensor([[[[2**32 + 3]]]], dtype=torch.int64)  # would wrap to 3 in int32
    with pytest.raises(ValueError, match=r"kv_indices must lie in \[0, 4\)"):
        BlockMask.from_indices(idx, torch.ones(1, 1, 1, dtype=torch.int64), block_q=16, block_k=16, q_len=16, k_len=64)
    with pytest.raises(ValueError, match=r"kv_counts must lie in \[0, 1\]"):
        BlockMask.from_indices(torch.zeros(1, 1, 1, 1, dtype=torch.int64), torch.full((1, 1, 1), 2**32 + 1),
                               block_q=16, block_k=16, q_len=16, k_len=64)


# ------------------------------------------------------------------ a sentence, not a traceback
@pytest.mark.parametrize("arg,value,err", [("heads", -1, ValueError), ("heads", 0, ValueError),
                                           ("batch", 0, ValueError), ("batch", -2, ValueError),
                                           ("heads", 1.5, TypeError), ("batch", True, TypeError)])
def test_full_rejects_bad_batch_and_heads(arg, value, err):
    with pytest.raises(err, match=rf"{arg} must be a positive int"):
        BlockMask.full(block_q=16, block_k=16, q_len=32, k_len=32, **{arg: value})


def test_zero_heads_is_named_where_it_happens():
    q = torch.randn(1, 0, 32, 16)
    with pytest.raises(ValueError, match=r"q, k, v have no heads"):
        vidsparse.block_sparse_attention(q, q, q, BlockMask.full(block_q=16, block_k=16, q_len=32, k_len=32))
    with pytest.raises(ValueError, match=r"batch >= 1 and heads >= 1"):
        BlockMask.from_dense(torch.ones(1, 0, 2, 2, dtype=torch.bool), block_q=16, block_k=16, q_len=32, k_len=32)


def test_mask_broadcast_message_states_what_fits():
    q = torch.randn(1, 2, 32, 16)
    mask = BlockMask.full(block_q=16, block_k=16, q_len=32, k_len=32, heads=3)
    with pytest.raises(ValueError, match=r"mask has batch=1, heads=3 but q has batch=1, heads=2; the mask's "
                                         r"batch must be 1 and its heads 1 or 2"):
        vidsparse.block_sparse_attention(q, q, q, mask)


@pytest.mark.parametrize("argv,flag", [(["--sparsities", "abc"], "--sparsities"), (["--sparsities", "0.5,1"], "--sparsities"),
                                       (["--block-q", "48"], "--block-q"), (["--heads", "0"], "--heads")])
def test_bench_rejects_bad_values_with_exit_2(argv, flag, capsys):
    from vidsparse import bench

    with pytest.raises(SystemExit) as exc:
        bench.main(["attention", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}:" in err and "Traceback" not in err


@pytest.mark.parametrize("backend", ("reference", "gather", "flex"))
@pytest.mark.parametrize("dtype,lse_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float32),
                                             (torch.float64, torch.float64)])
def test_lse_dtype_is_float32_except_for_float64_inputs(backend, dtype, lse_dtype):
    q = torch.randn(1, 1, 32, 16, dtype=dtype)
    mask = BlockMask.full(block_q=16, block_k=16, q_len=32, k_len=32)
    _, lse = vidsparse.block_sparse_attention(q, q, q, mask, backend=backend, return_lse=True)
    assert lse.dtype == lse_dtype


# ------------------------------------------------------------------ optional dependencies
def test_require_names_the_extra_to_install(monkeypatch):
    from vidsparse._optional import MissingDependencyError, require

    assert require("json", "video").dumps(1) == "1"
    monkeypatch.setitem(__import__("sys").modules, "torchmetrics", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"'torchmetrics'.*pip install 'vidsparse\[video\]'") as err:
        require("torchmetrics", "video")
    assert isinstance(err.value, ImportError)


def test_patch_without_diffusers_says_which_extra(monkeypatch):
    import subprocess
    import sys

    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import torch, vidsparse\n"
            "try:\n    vidsparse.patch(torch.nn.Linear(2, 2))\n"
            "except ImportError as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == ("MissingDependencyError vidsparse needs the optional package 'diffusers' here, which is "
                           "not installed: pip install 'vidsparse[diffusers]'")


# ------------------------------------------------------------------ copies of a patched model
def _tiny_wan_and_inputs():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ).eval()
    g = torch.Generator().manual_seed(10)
    x, ehs = torch.randn(1, 4, 5, 16, 16, generator=g), torch.randn(1, 12, 32, generator=g)
    inputs = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=ehs)
    return model, inputs


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_patched_model_is_patched_on_its_own(how):
    model, inputs = _tiny_wan_and_inputs()
    run = lambda m: m(**inputs).sample  # noqa: E731
    with torch.no_grad():
        dense = run(model)
        vidsparse.patch(model, topk=0.1, topp=None, token_order="tiled", block_q=16, block_k=32,
                        backend="reference", collect_stats=True)
        sparse = run(model)
        twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
        assert vidsparse.is_patched(twin)
        torch.testing.assert_close(run(twin), sparse)  # sparse, with its own grid and step state
        # its statistics are its own: the original's log did not grow
        assert len(vidsparse.stats(model).records) == 2 and len(vidsparse.stats(twin).records) == 4
        vidsparse.unpatch(twin)
        assert not vidsparse.is_patched(twin) and vidsparse.is_patched(model)
        torch.testing.assert_close(run(twin), dense)
        torch.testing.assert_close(run(model), sparse)  # the original is untouched
        vidsparse.patch(twin, topk=1.0, topp=None, block_q=16, block_k=32, backend="reference")  # re-patch
        torch.testing.assert_close(run(twin), dense, rtol=1e-4, atol=1e-4)
        vidsparse.unpatch(twin)
        vidsparse.unpatch(model)
        torch.testing.assert_close(run(model), dense)


def test_bench_without_triton_names_the_extra(monkeypatch):
    from vidsparse import bench

    monkeypatch.setitem(__import__("sys").modules, "triton.testing", None)
    with pytest.raises(SystemExit, match=r"pip install 'vidsparse\[triton\]'"):
        bench.main(["attention", "--sparsities", "0.5"])


# ------------------------------------------------------------------ distillation runs (issue 16)
# Each fault of issue 16's list, reproduced through distill() or `vidsparse distill` (the sharded
# FSDP / DCP path: tests/test_distill_parallel.py).


def _distill_helpers():
    from test_distill import _cfg, _losses, _mini_model

    return _cfg, _losses, _mini_model


def _signal_at(step, sig):
    from test_distill import _SignalAt

    return _SignalAt(step, sig)


def test_distill_non_finite_gradient_stops_before_saving_and_keeps_the_last_checkpoint(tmp_path):
    import json

    from vidsparse.training.distill import distill
    from vidsparse.training.loop import list_checkpoints

    from test_distill import _poison_gradients_from

    _cfg, _losses, _mini_model = _distill_helpers()
    model = _poison_gradients_from(_mini_model(), call=2)  # the student's third forward on: NaN gradients
    with pytest.raises(FloatingPointError, match=r"non-finite grad_norm by step 3.*step-0000002\.pt"):
        distill(_cfg(tmp_path, steps=6, keep_checkpoints=1), model=model)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002.pt"]
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert all(torch.isfinite(v).all() for v in torch.load(list_checkpoints(tmp_path)[0], weights_only=True)["model"].values())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_distill_signal_writes_a_checkpoint_and_resumes_exactly(tmp_path, sig):
    from vidsparse.training.distill import distill
    from vidsparse.training.loop import list_checkpoints

    _cfg, _losses, _mini_model = _distill_helpers()
    distill(_cfg(tmp_path / "straight", steps=4), model=_mini_model())
    with pytest.raises(KeyboardInterrupt, match=rf"{sig.name} at step 2: checkpoint .*step-0000002\.pt; resume with --resume"):
        distill(_cfg(tmp_path / "run", steps=4, ckpt_every=100), model=_mini_model(), source=_signal_at(1, sig))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000002.pt"]
    assert not (tmp_path / "run" / "student").exists() and signal.getsignal(sig) is not None
    distill(_cfg(tmp_path / "run", steps=4, resume="auto"), model=_mini_model())
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")


@pytest.mark.parametrize("damage", ["overwritten", "truncated"])
def test_distill_damaged_latest_checkpoint_falls_back_with_a_warning_naming_it(tmp_path, damage):
    from vidsparse.training.distill import distill
    from vidsparse.training.loop import list_checkpoints

    _cfg, _losses, _mini_model = _distill_helpers()
    distill(_cfg(tmp_path, steps=4), model=_mini_model())
    latest = list_checkpoints(tmp_path)[-1]
    expected, losses = torch.load(latest, weights_only=True)["model"], _losses(tmp_path)
    data = bytearray(latest.read_bytes())
    if damage == "overwritten":  # same size: torch.load reads it without complaint, the sha256 does not match
        data[len(data) // 2: len(data) // 2 + 64] = os.urandom(64)
    latest.write_bytes(bytes(data if damage == "overwritten" else data[: len(data) // 2]))
    with pytest.warns(RuntimeWarning, match=rf"checkpoint {latest} is (damaged|unreadable).*falling back"):
        distill(_cfg(tmp_path, steps=4, resume="auto"), model=_mini_model())
    assert _losses(tmp_path) == losses
    for k, v in torch.load(list_checkpoints(tmp_path)[-1], weights_only=True)["model"].items():
        assert torch.equal(v, expected[k]), k


def test_distill_torn_last_log_line_is_dropped_on_resume(tmp_path):
    from vidsparse.training.distill import distill

    _cfg, _losses, _mini_model = _distill_helpers()
    distill(_cfg(tmp_path / "straight", steps=4), model=_mini_model())
    distill(_cfg(tmp_path / "run", steps=2), model=_mini_model())
    with (tmp_path / "run" / "log.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # a crash mid-write
    with pytest.warns(RuntimeWarning, match="torn last line"):
        distill(_cfg(tmp_path / "run", steps=4, resume="auto"), model=_mini_model())
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")


def _distill_cli_args(tmp_path):
    _cfg, _losses, _mini_model = _distill_helpers()
    model_dir = tmp_path / "model"
    if not model_dir.exists():
        _mini_model().save_pretrained(model_dir, safe_serialization=True)
    return ["--model", str(model_dir), "--steps", "2", "--batch-size", "2", "--timesteps", "uniform", "--topk", "0.25",
            "--topp", "none", "--block-q", "16", "--block-k", "16", "--backend", "reference", "--frames", "4",
            "--size", "16", "--ckpt-every", "2", "--device", "cpu", "--no-progress", "--no-export"]


def test_cli_refuses_an_out_holding_a_run_without_resume_saying_what_is_there(tmp_path, capsys):
    from vidsparse.cli import main

    args = ["distill", *_distill_cli_args(tmp_path), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    log = (tmp_path / "out" / "log.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "vidsparse distill: error: --out" in err and "already holds a run (1 checkpoint(s), latest step-0000002.pt)" in err
    assert "--resume" in err and "Traceback" not in err
    assert (tmp_path / "out" / "log.jsonl").read_text() == log  # untouched


def test_cli_refuses_an_unwritable_out_before_any_work(tmp_path, capsys):
    from vidsparse.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["distill", *_distill_cli_args(tmp_path), "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert f"vidsparse distill: error: --out {blocker / 'run'} is not writable" in err
    assert "distill: 0." not in err  # the start line: no model was built


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--grad-clip", "--t-mean", "--t-std", "--t-shift",
                                  "--lora-alpha", "--distill-weight", "--diffusion-weight", "--min-lr-ratio",
                                  "--time-limit-min"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_cli_numeric_flags_refuse_non_finite_values(tmp_path, capsys, flag, value):
    from vidsparse.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["distill", "--out", str(tmp_path / "never"), f"{flag}={value}"])  # "-inf" would read as a flag
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {flag}" in err and "finite" in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("field", ["lr", "weight_decay", "grad_clip", "t_mean", "t_std", "t_shift", "min_lr_ratio",
                                   "lora_alpha", "distill_weight", "time_limit_min"])
def test_distill_config_refuses_non_finite_numbers_naming_the_field(field):
    from vidsparse.training.distill import DistillConfig

    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=field):
            DistillConfig(out="unused", **{field: value})


@pytest.mark.parametrize("changes, message", [
    (dict(weight_decay=-0.1), "weight_decay"), (dict(t_shift=0.0), "t_shift"), (dict(betas=(0.9, 1.0)), "betas"),
    (dict(lora_save="adapter"), "trainable='lora'"), (dict(parallel="zero3"), "parallel"),
])
def test_distill_config_refuses_out_of_range_values(changes, message):
    from vidsparse.training.distill import DistillConfig

    with pytest.raises(ValueError, match=message):
        DistillConfig(out="unused", **changes)
