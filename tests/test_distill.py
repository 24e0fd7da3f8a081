"""Velocity distillation (vidsparse.training.distill) on a miniature Wan model, CPU only."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidsparse import SparseConfig
from vidsparse.tiny.data import ShapesConfig, make_batch
from vidsparse.tiny import build_tiny_wan, load_tiny_wan
from vidsparse.training.distill import DistillConfig, distill, distill_loss, main, make_student_teacher
from vidsparse.training.loop import list_checkpoints

# 4 frames of 16x16, patch (1, 4, 4) -> 64 tokens = 4 blocks of 16; head dim 32
MINI = dict(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, text_dim=32, freq_dim=32)
SPARSE = SparseConfig(topk=0.25, topp=None, block_q=16, block_k=16, backend="reference")
GEOMETRY = dict(frames=4, size=16)
REPO = Path(__file__).resolve().parents[1]


def _mini_model(seed=0):
    # the zero-initialised output layer would make student and teacher both predict exactly 0
    model = build_tiny_wan(seed=seed, **MINI)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.proj_out.weight.copy_(torch.randn(model.proj_out.weight.shape, generator=g) * 0.5)
    return model


def _cfg(out, **changes):
    base = dict(out=str(out), steps=4, batch_size=4, lr=1e-4, warmup_steps=1, log_every=1, ckpt_every=2,
                timesteps="uniform", export=False, progress=False, sparse=SPARSE, **GEOMETRY)
    base.update(changes)
    return DistillConfig(**base)


def _final_student(out):
    return torch.load(list_checkpoints(out)[-1], map_location="cpu", weights_only=True)["model"]


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison_gradients_from(model, call: int):
    """From the ``call``-th forward of (a copy of) ``model`` on, its output layer's gradient is NaN
    (a copy made later, such as the student, carries the hook and its own counter)."""
    model.proj_out.calls = 0

    def hook(module, _inputs, output):
        module.calls += 1
        return _NaNGradient.apply(output) if module.calls > call and torch.is_grad_enabled() else output

    model.proj_out.register_forward_hook(hook)
    return model


class _SignalAt:
    """The shapes source, sending ``sig`` to this process when step ``step``'s batch is drawn."""

    def __init__(self, step, sig, batch_size=4):
        from vidsparse.tiny.source import ShapesSource

        self.inner, self.index, self.sig = ShapesSource(**GEOMETRY), step * batch_size, sig

    def bind(self, model):
        return self.inner.bind(model)

    def batch(self, index, count, device):
        if index == self.index:
            os.kill(os.getpid(), self.sig)
        return self.inner.batch(index, count, device)


def _fixed_batch(n=8):
    x0, emb, _ = make_batch(n, split="val", config=ShapesConfig(text_dim=MINI["text_dim"], **GEOMETRY))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    return x0, emb, noise, torch.linspace(0.05, 0.95, n)


def test_distillation_loss_falls(tmp_path):
    model = _mini_model()
    student, teacher = make_student_teacher(model, _cfg(tmp_path).sparse)
    batch = _fixed_batch()
    with torch.no_grad():
        before = float(distill_loss(student, teacher, *batch)[1])
    summary = distill(_cfg(tmp_path, steps=20, ckpt_every=20), model=model)
    student.load_state_dict(_final_student(tmp_path))
    with torch.no_grad():
        after = float(distill_loss(student, teacher, *batch)[1])
    assert before > 1e-3  # sparse attention really changes the output of the mini model
    assert after < 0.95 * before, (before, after)
    assert summary["step"] == 20 and (tmp_path / "loss_curve.png").is_file()


def test_teacher_gets_no_gradient_and_stays_identical():
    model = _mini_model()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    student, teacher = make_student_teacher(model, _cfg("unused").sparse)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for _ in range(2):
        loss, _vd = distill_loss(student, teacher, *_fixed_batch(4), diffusion_weight=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, reference[k]), k
    for k, v in model.state_dict().items():  # the caller's model is not modified either
        assert torch.equal(v, reference[k]), k
    assert any(not torch.equal(v, reference[k]) for k, v in student.state_dict().items())


def test_resume_matches_straight_run(tmp_path):
    distill(_cfg(tmp_path / "straight"), model=_mini_model())
    distill(_cfg(tmp_path / "split", steps=2), model=_mini_model())
    distill(_cfg(tmp_path / "split", resume="auto"), model=_mini_model())
    a, b = _final_student(tmp_path / "straight"), _final_student(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "split")


def test_trainable_attention_freezes_the_rest(tmp_path):
    model = _mini_model()
    distill(_cfg(tmp_path, steps=2, trainable="attention", lr=1e-2), model=model)
    trained = _final_student(tmp_path)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, trained[k])}
    assert changed and all(".attn1." in k or ".attn2." in k for k in changed), sorted(changed)


def test_missing_weights_error_names_the_path(tmp_path, capsys):
    empty = tmp_path / "no_model"
    empty.mkdir()
    assert main(["--model", str(empty), "--out", str(tmp_path / "out"), "--steps", "1"]) == 2
    assert f"--model {empty}" in capsys.readouterr().err


def test_two_process_gloo_equals_one_process(tmp_path):
    model_dir = tmp_path / "model"
    _mini_model().save_pretrained(model_dir, safe_serialization=True)  # fp32: exact on reload
    args = ["--model", str(model_dir), "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1",
            "--timesteps", "uniform", "--topk", "0.25", "--topp", "none", "--block-q", "16", "--block-k", "16", "--backend", "reference",
            "--frames", "4", "--size", "16", "--log-every", "1", "--device", "cpu", "--no-progress"]
    # one process, the same global batch in two accumulated micro-batches
    assert main([*args, "--out", str(tmp_path / "one"), "--grad-accum", "2"]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vidsparse.training.distill", *args, "--out", str(tmp_path / "two"), "--no-export"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _final_student(tmp_path / "one"), _final_student(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), rel=1e-5)
    # only rank 0 wrote: one log and one checkpoint directory
    assert len(list_checkpoints(tmp_path / "two")) == 1
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    # the exported student reloads as a plain diffusers model (fp16 safetensors)
    exported = load_tiny_wan(tmp_path / "one" / "student")
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, one[k], rtol=1e-3, atol=1e-3, msg=k)  # fp16 storage


# ---------------------------------------------------------------------------------------------
# LoRA, gradient checkpointing, diffusion-only objective, time limit

LORA = dict(trainable="lora", lora_rank=4, lora_alpha=8.0)


def test_lora_trains_only_adapters_and_exports_a_merged_model(tmp_path):
    from vidsparse.integrations.diffusers import patch
    from vidsparse.tiny.flow import predict_velocity
    from vidsparse.training.distill import add_lora, train_student

    model = _mini_model()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(tmp_path, steps=12, ckpt_every=12, lr=1e-2, export=True, **LORA)
    # one backward: gradients reach the adapters only
    student, teacher = make_student_teacher(model, cfg.sparse)
    names = add_lora(student, 4, 8.0)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert any(".attn1." in n for n in names) and any(".attn2." in n for n in names)
    assert not any(".ffn." in n for n in names)
    from vidsparse.training.distill import select_trainable

    assert sorted(select_trainable(student, "lora")) == sorted(names)
    batch = _fixed_batch()
    loss, _ = distill_loss(student, teacher, *batch)
    loss.backward()
    for n, p in student.named_parameters():
        assert (p.grad is not None) == (n in names), n
    with torch.no_grad():
        before = float(distill_loss(student, teacher, *batch)[1])  # B = 0: the base model's loss

    summary, plain = train_student(cfg, model=model)
    assert summary["trainable_parameters"] == sum(p.numel() for n, p in student.named_parameters() if n in names)
    state = _final_student(tmp_path)
    for k, v in reference.items():  # the base weights are frozen
        key = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias") if f"{k.rsplit('.', 1)[0]}.base_layer.weight" in state else k
        assert torch.equal(state[key], v), k
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)
    # the trained LoRA student (reloaded from the checkpoint) vs the merged plain model
    trained = copy.deepcopy(student)
    trained.load_state_dict(state)
    with torch.no_grad():
        after = float(distill_loss(trained, teacher, *batch)[1])
    assert after < 0.95 * before, (before, after)
    x0, emb, noise, t = batch
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    with torch.no_grad():
        v_lora = predict_velocity(trained, x_t, t, emb)
        patch(plain, cfg.sparse)
        torch.testing.assert_close(predict_velocity(plain, x_t, t, emb), v_lora, rtol=1e-4, atol=1e-5)
        # the exported fp16 model is a plain diffusers model that loads with load_tiny_wan
        exported = load_tiny_wan(tmp_path / "student")
        assert not any("lora" in k or "base_layer" in k for k in exported.state_dict())
        patch(exported, cfg.sparse)
        torch.testing.assert_close(predict_velocity(exported, x_t, t, emb), v_lora, rtol=2e-2, atol=2e-2)


def test_lora_resume_matches_straight_run(tmp_path):
    distill(_cfg(tmp_path / "straight", lr=1e-2, **LORA), model=_mini_model())
    distill(_cfg(tmp_path / "split", steps=2, lr=1e-2, **LORA), model=_mini_model())
    distill(_cfg(tmp_path / "split", resume="auto", lr=1e-2, **LORA), model=_mini_model())
    a, b = _final_student(tmp_path / "straight"), _final_student(tmp_path / "split")
    assert any(".lora_A." in k for k in a) and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "split")
    # another rank is refused with a clear message, not a shape error
    with pytest.raises(ValueError, match="lora_rank"):
        distill(_cfg(tmp_path / "split", resume="auto", steps=5, **{**LORA, "lora_rank": 2}), model=_mini_model())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = _mini_model()
    sparse = _cfg("unused").sparse
    plain, teacher = make_student_teacher(model, sparse)
    ckpt, _ = make_student_teacher(model, sparse)
    ckpt.enable_gradient_checkpointing()
    batch = _fixed_batch(4)
    losses = []
    for student in (plain, ckpt):
        loss, _ = distill_loss(student, teacher, *batch, diffusion_weight=0.5)
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_flag_trains(tmp_path):
    a = distill(_cfg(tmp_path / "a", steps=2), model=_mini_model())
    b = distill(_cfg(tmp_path / "b", steps=2, gradient_checkpointing=True), model=_mini_model())
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)
    for k, v in _final_student(tmp_path / "a").items():
        torch.testing.assert_close(_final_student(tmp_path / "b")[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_diffusion_only_objective_needs_no_teacher():
    from vidsparse.training.flow import flow_matching_loss

    model = _mini_model()
    student, _teacher = make_student_teacher(model, _cfg("unused").sparse)
    batch = _fixed_batch(4)
    with torch.no_grad():
        loss, vd = distill_loss(student, None, *batch, diffusion_weight=1.0, distill_weight=0.0)
        x0, emb, noise, t = batch
        expected = flow_matching_loss(student, x0, emb, noise, t)
    assert torch.isnan(vd)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="both 0"):
        _cfg("unused", distill_weight=0.0)


def test_diffusion_only_run_and_time_limit(tmp_path):
    summary = distill(_cfg(tmp_path, steps=50, distill_weight=0.0, diffusion_weight=1.0, time_limit_min=1e-4),
                      model=_mini_model())
    assert summary["step"] < 50 and summary["stop_reason"].startswith("time limit")
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert recs and all("vd_loss" not in r for r in recs)
    assert len(list_checkpoints(tmp_path)) == 1  # the stop still checkpoints


def test_cli_token_order_and_priors_are_trained_and_recorded_with_the_student(tmp_path):
    model_dir = tmp_path / "model"
    _mini_model().save_pretrained(model_dir, safe_serialization=True)
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--out", str(out), "--steps", "1", "--batch-size", "2", "--timesteps", "uniform",
            "--topk", "0.25", "--topp", "0.5", "--block-q", "16", "--block-k", "16", "--backend", "reference",
            "--token-order", "tiled", "--keep-diagonal", "--frames", "4", "--size", "16", "--device", "cpu",
            "--no-progress"]
    assert main(args) == 0
    saved = SparseConfig.load(out / "student")  # what `vidsparse demo --distilled-path` and `vidsparse eval` read back
    assert saved == SparseConfig(topk=0.25, topp=0.5, block_q=16, block_k=16, token_order="tiled", keep_diagonal=True,
                                 backend="reference")
    assert json.loads((out / "summary.json").read_text())["sparse_config"] == saved.to_dict()


def test_cli_rejects_an_unknown_token_order(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out", "unused", "--token-order", "diagonal"])
    assert exc.value.code == 2 and "--token-order" in capsys.readouterr().err


def test_config_holds_one_sparse_config():
    cfg = _cfg("unused")
    assert cfg.sparse is SPARSE and "sparse_config" not in dir(cfg)
    assert DistillConfig(out="x", sparse=SPARSE.to_dict()).sparse == SPARSE  # a saved dict is accepted
    assert DistillConfig(out="x").sparse == SparseConfig()
    with pytest.raises(TypeError, match="sparse"):
        DistillConfig(out="x", sparse={"topk"})


def test_cli_method_and_option_flags_make_the_students_config():
    from vidsparse.training.distill_cli import build_parser, config_from_args

    p = build_parser()
    cfg = config_from_args(p.parse_args(["--out", "x", "--method", "svg", "--option", "budget=0.1",
                                         "--token-order", "tiled", "--block-q", "16"]), p)
    assert cfg.sparse == SparseConfig(method="svg", budget=0.1, token_order="tiled", block_q=16)
    cfg = config_from_args(p.parse_args(["--out", "x", "--topp", "none", "--option", "keep_sink=true"]), p)
    assert cfg.sparse == SparseConfig(topk=0.03, topp=None, keep_sink=True)


@pytest.mark.parametrize("argv, flag", [
    (["--topk", "1.5"], "--topk"), (["--option", "nope=1"], "--option nope"), (["--method", "x"], "--method"),
    (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--steps", "0"], "--steps"), (["--min-lr-ratio", "2"], "--min-lr-ratio"),
    (["--seed", "-1"], "--seed"), (["--grad-clip", "-1"], "--grad-clip"), (["--time-limit-min", "inf"], "--time-limit-min"),
    (["--block-k", "24"], "--block-k"),
])
def test_cli_rejects_bad_values_naming_the_flag(argv, flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "never"), *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and flag in err, err
    assert not (tmp_path / "never").exists()  # before any work


def test_cli_non_finite_loss_is_one_line_naming_the_step_and_what_to_try(tmp_path, capsys):
    from vidsparse.cli import main as vidsparse_main

    model_dir = tmp_path / "model"
    _mini_model().save_pretrained(model_dir, safe_serialization=True)
    args = ["distill", "--model", str(model_dir), "--out", str(tmp_path / "out"), "--steps", "3", "--batch-size", "2",
            "--lr", "1e30", "--warmup-steps", "0", "--grad-clip", "0", "--timesteps", "uniform", "--topk", "0.25",
            "--topp", "none", "--block-q", "16", "--block-k", "16", "--backend", "reference", "--frames", "4",
            "--size", "16", "--device", "cpu", "--no-progress", "--no-export"]
    assert vidsparse_main(args) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("vidsparse distill: error: ") and "by step" in lines[0], lines[0]
    assert "--lr" in lines[0] and "--grad-clip" in lines[0], lines[0]


def test_distill_is_imported_from_its_module():
    import vidsparse.training as training
    from vidsparse.training import distill as module
    from vidsparse.training.distill import distill as function

    assert "distill" not in training.__all__ and module.__name__ == "vidsparse.training.distill"
    assert callable(function) and module.distill is function
