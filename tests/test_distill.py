"""Velocity distillation (vidsparse.training.distill) on a miniature Wan model, CPU only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidsparse.data import ShapesConfig, make_batch
from vidsparse.models import build_tiny_wan, load_tiny_wan
from vidsparse.training.distill import DistillConfig, distill, distill_loss, main, make_student_teacher
from vidsparse.training.pretrain import list_checkpoints

# 4 frames of 16x16, patch (1, 4, 4) -> 64 tokens = 4 blocks of 16; head dim 32
MINI = dict(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, text_dim=32, freq_dim=32)
SPARSE = dict(topk=0.25, topp=None, block_q=16, block_k=16, backend="reference")
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
                timesteps="uniform", export=False, progress=False, **SPARSE, **GEOMETRY)
    base.update(changes)
    return DistillConfig(**base)


def _final_student(out):
    return torch.load(list_checkpoints(out)[-1], map_location="cpu", weights_only=True)["student"]


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _fixed_batch(n=8):
    x0, emb, _ = make_batch(n, split="val", config=ShapesConfig(text_dim=MINI["text_dim"], **GEOMETRY))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    return x0, emb, noise, torch.linspace(0.05, 0.95, n)


def test_distillation_loss_falls(tmp_path):
    model = _mini_model()
    student, teacher = make_student_teacher(model, _cfg(tmp_path).sparse_config())
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
    student, teacher = make_student_teacher(model, _cfg("unused").sparse_config())
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
