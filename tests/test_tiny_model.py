"""The tiny Wan model, the rectified-flow conventions, the sampler and the pretraining loop."""

import json

import pytest
import torch

from vidsparse.tiny.data import ShapesConfig, make_batch
from vidsparse.tiny import (
    PARAM_BUDGET_BYTES,
    build_tiny_wan,
    count_parameters,
    fp16_bytes,
    load_sampling_defaults,
    load_tiny_wan,
    model_timestep,
    noisy_sample,
    sample,
    sample_timesteps,
    shift_time,
    time_grid,
    tiny_wan_config,
    token_grid,
    velocity_target,
)
from vidsparse.tiny.pretrain import TrainConfig, list_checkpoints, main, train
from vidsparse.training.flow import flow_matching_loss
from vidsparse.training.optim import make_optimizer

# a miniature model and dataset: 4 frames of 16x16 -> 4 x 4 x 4 = 64 tokens
MINI = dict(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, text_dim=32, freq_dim=32)
MINI_DATA = ShapesConfig(frames=4, size=16, text_dim=32)


def _mini_train_config(out, **changes) -> TrainConfig:
    base = dict(
        out=str(out), steps=4, batch_size=2, lr=1e-3, warmup_steps=1, ckpt_every=2, log_every=1, eval_every=2,
        eval_clips=2, export=False, progress=False, data=MINI_DATA, model_overrides=MINI,
    )
    base.update(changes)
    return TrainConfig(**base)


def _randomise_output(model, seed=0):
    # the zero-initialised output layer makes an untrained model predict exactly 0
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.proj_out.weight.copy_(torch.randn(model.proj_out.weight.shape, generator=g) * 0.05)
    return model


# ---------------------------------------------------------------------------------------------- model


def test_default_model_tokens_and_budget():
    cfg = tiny_wan_config()
    assert cfg["attention_head_dim"] == 64 and cfg["num_attention_heads"] == 4  # the kernels need head dim 64
    assert cfg["in_channels"] == cfg["out_channels"] == 3
    assert token_grid(cfg) == (16, 16, 16)
    model = build_tiny_wan().eval()
    n = count_parameters(model)
    assert 4_000_000 < n and fp16_bytes(model) <= PARAM_BUDGET_BYTES, n

    seen = []
    model.blocks[0].attn1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    x, emb, _ = make_batch(1)
    with torch.no_grad():
        out = model(x, torch.tensor([500.0]), emb).sample
    assert seen == [torch.Size([1, 4096, 256])]  # self-attention over 4096 tokens of width 4 x 64
    assert out.shape == x.shape
    assert (out == 0).all()  # zero-initialised output projection


def test_build_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = build_tiny_wan(seed=1, **MINI), build_tiny_wan(seed=1, **MINI), build_tiny_wan(seed=2, **MINI)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="num_layerz"):
        tiny_wan_config(num_layerz=2)
    with pytest.raises(ValueError, match="frames=5"):
        token_grid({"patch_size": (2, 4, 4)}, frames=5)


def test_save_load_round_trip(tmp_path):
    model = _randomise_output(build_tiny_wan(**MINI)).eval()
    model.save_pretrained(tmp_path / "fp32", safe_serialization=True)
    loaded = load_tiny_wan(tmp_path / "fp32")
    x, emb, _ = make_batch(2, config=MINI_DATA)
    t = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        ref = model(x, t, emb).sample
        assert torch.equal(loaded(x, t, emb).sample, ref)
        assert (ref != 0).any()
    # an fp16 export loads back into float32 with only rounding differences
    torch.nn.Module.to(model, dtype=torch.float16).save_pretrained(tmp_path / "fp16", safe_serialization=True)
    half = load_tiny_wan(tmp_path / "fp16", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(half(x, t, emb).sample, ref, atol=2e-2)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tiny_wan(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- flow


def test_flow_conventions():
    x0, noise = torch.randn(3, 3, 2, 4, 4), torch.randn(3, 3, 2, 4, 4)
    assert torch.equal(noisy_sample(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(noisy_sample(x0, noise, torch.ones(3)), noise)
    t = torch.tensor([0.1, 0.5, 0.9])
    # d x_t / d t equals the velocity target
    eps = 1e-3
    fd = (noisy_sample(x0, noise, t + eps) - noisy_sample(x0, noise, t - eps)) / (2 * eps)
    assert torch.allclose(fd, velocity_target(x0, noise), atol=1e-3)
    assert torch.equal(model_timestep(t), 1000 * t)
    grid = time_grid(4)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = time_grid(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > grid[1:-1]).all()
    for mode in ("logit-normal", "uniform"):
        s = sample_timesteps(1000, mode=mode, generator=torch.Generator().manual_seed(0))
        assert s.shape == (1000,) and (s > 0).all() and (s < 1).all() and abs(float(s.mean()) - 0.5) < 0.05
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_time(t, 1.0), t)
    warped = shift_time(t, 3.0)
    assert warped[0] == 0 and warped[-1] == 1 and (warped[1:-1] > t[1:-1]).all() and (warped.diff() > 0).all()
    g = torch.Generator().manual_seed(0)
    assert sample_timesteps(1000, shift=3.0, generator=g).mean() > 0.6
    with pytest.raises(ValueError, match="mode"):
        sample_timesteps(4, mode="cosine")
    with pytest.raises(ValueError, match="shift"):
        shift_time(t, 0.0)
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)


class _PointMassVelocity(torch.nn.Module):
    """The exact velocity field of a data distribution concentrated at x0: v = (x_t - x0) / t."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.proj_out = torch.nn.Linear(1, 1)  # gives the sampler a dtype to read

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        t = (timestep / 1000).view(-1, 1, 1, 1, 1)
        out = (hidden_states - self.x0.repeat(hidden_states.shape[0] // self.x0.shape[0], 1, 1, 1, 1)) / t
        return type("Output", (), {"sample": out})()


@pytest.mark.parametrize("kw", [dict(guidance_scale=1.0), dict(guidance_scale=4.0), dict(eta=0.5), dict(eta=1.0),
                                dict(guidance_scale=4.0, guidance_interval=(0.2, 0.8), eta=1.0)])
def test_sampler_follows_the_flow_exactly(kw):
    # straight paths: Euler steps of the exact velocity land on x0 from any noise, with or without CFG;
    # every x0 prediction is x0 itself, so re-noised (eta > 0) steps end there too
    x0 = torch.rand(2, 3, 2, 4, 4) * 2 - 1
    cond = torch.randn(2, 5, 8)
    out = sample(_PointMassVelocity(x0), cond, shape=(3, 2, 4, 4), steps=4, generator=torch.Generator().manual_seed(0),
                 progress=False, **kw)
    assert torch.allclose(out, x0, atol=1e-5)


class _GaussianVelocity(torch.nn.Module):
    """The exact velocity field of x0 ~ N(mu, s^2) per element: v = E[eps | x_t] - E[x0 | x_t]."""

    def __init__(self, mu: float, s: float):
        super().__init__()
        self.mu, self.s = mu, s
        self.proj_out = torch.nn.Linear(1, 1)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        t = (timestep / 1000).view(-1, 1, 1, 1, 1).double()
        x = hidden_states.double()
        var = (1 - t) ** 2 * self.s**2 + t**2
        centred = x - (1 - t) * self.mu
        x0_mean = self.mu + (1 - t) * self.s**2 / var * centred
        eps_mean = t / var * centred
        return type("Output", (), {"sample": (eps_mean - x0_mean).float()})()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_sampler_reaches_the_data_distribution_at_any_eta(eta):
    # a wrong re-noising std would widen or narrow the samples: compare their moments with the data's
    # (400 steps: the first-order steps' own bias is then < 1%; at 100 steps eta = 1 is still 5% narrow)
    mu, s = 0.7, 0.3
    cond = torch.zeros(1, 1, 4)
    out = sample(_GaussianVelocity(mu, s), cond, shape=(1, 1, 1, 200, 200), steps=400, eta=eta,
                 generator=torch.Generator().manual_seed(0), progress=False)
    assert abs(out.mean().item() - mu) < 0.01
    assert abs(out.std().item() - s) / s < 0.02


def test_sampler_eta_and_guidance_interval():
    model = _randomise_output(build_tiny_wan(**MINI)).eval()
    _, emb, _ = make_batch(2, config=MINI_DATA)
    noise = torch.randn(2, 3, 4, 16, 16)
    kw = dict(noise=noise, steps=4, progress=False)
    ode = sample(model, emb, guidance_scale=3.0, **kw)
    assert torch.equal(ode, sample(model, emb, guidance_scale=3.0, eta=0.0, guidance_interval=(0.0, 1.0), **kw))
    # eta > 0 is random but reproducible (a fixed generator when none is given)
    sde = sample(model, emb, guidance_scale=3.0, eta=1.0, **kw)
    assert torch.equal(sde, sample(model, emb, guidance_scale=3.0, eta=1.0, **kw))
    assert not torch.allclose(sde, ode, atol=1e-3)
    other = sample(model, emb, guidance_scale=3.0, eta=1.0, generator=torch.Generator().manual_seed(5), **kw)
    assert not torch.allclose(sde, other, atol=1e-3)
    # an interval that holds no step's t turns guidance off; one holding some steps is in between
    unguided = sample(model, emb, guidance_scale=1.0, **kw)
    assert torch.equal(sample(model, emb, guidance_scale=3.0, guidance_interval=(0.0, 0.0), **kw), unguided)
    partial = sample(model, emb, guidance_scale=3.0, guidance_interval=(0.3, 0.8), **kw)
    assert not torch.allclose(partial, ode, atol=1e-4) and not torch.allclose(partial, unguided, atol=1e-4)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="eta must be in"):
            sample(model, emb, eta=bad, **kw)
    for bad in ((0.8, 0.2), (0.0, 1.5), (0.1,), "ab"):
        with pytest.raises(ValueError, match="guidance_interval"):
            sample(model, emb, guidance_interval=bad, **kw)


def test_resolve_sampler_fills_only_what_is_not_given():
    from vidsparse.tiny.flow import resolve_sampler

    defaults = {"steps": 40, "guidance_scale": 4, "guidance_interval": [0.1, 0.8], "eta": 0, "shift": 1}
    assert resolve_sampler(defaults) == {"guidance_scale": 4.0, "guidance_interval": (0.1, 0.8), "eta": 0.0, "shift": 1.0}
    assert resolve_sampler(defaults, guidance_scale=2.0, guidance_interval=[0, 1], eta=0.5) == {
        "guidance_scale": 2.0, "guidance_interval": (0.0, 1.0), "eta": 0.5, "shift": 1.0}
    with pytest.raises(ValueError, match="guidance_interval"):
        resolve_sampler(defaults, guidance_interval=(0.9, 0.1))


def test_sampler_on_the_tiny_model():
    model = _randomise_output(build_tiny_wan(**MINI)).eval()
    _, emb, _ = make_batch(2, config=MINI_DATA)
    kw = dict(shape=(3, 4, 16, 16), steps=3, progress=False)
    a = sample(model, emb, generator=torch.Generator().manual_seed(0), guidance_scale=2.0, **kw)
    b = sample(model, emb, generator=torch.Generator().manual_seed(0), guidance_scale=2.0, **kw)
    assert a.shape == (2, 3, 4, 16, 16) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    noise = torch.randn(2, 3, 4, 16, 16)
    c = sample(model, emb, noise=noise, steps=3, progress=False)
    assert torch.isfinite(c).all() and not torch.equal(c, noise)
    with pytest.raises(ValueError, match="shape"):
        sample(model, emb, steps=3, progress=False)
    with pytest.raises(ValueError, match="B=2"):
        sample(model, emb, shape=(3, 3, 4, 16, 16), steps=3, progress=False)


# ---------------------------------------------------------------------------------------------- training


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = build_tiny_wan(**MINI)
    opt = make_optimizer(model, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.99))
    x0, emb, _ = make_batch(2, config=MINI_DATA)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.3, 0.7])
    losses = []
    for _ in range(40):
        loss = flow_matching_loss(model, x0, emb, noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0], losses


def _final_state(out):
    return torch.load(list_checkpoints(out)[-1], map_location="cpu", weights_only=True)


def test_resume_is_exact(tmp_path):
    straight = train(_mini_train_config(tmp_path / "straight"))
    first = train(_mini_train_config(tmp_path / "split", stop_at=2))
    assert first["step"] == 2 and first["stop_reason"] == "stop_at=2"
    second = train(_mini_train_config(tmp_path / "split", resume="auto"))
    assert straight["step"] == second["step"] == 4
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "split")
    for part in ("model", "ema"):  # the EMA is one of the loop's extra state objects
        pa, pb = (a[part], b[part]) if part == "model" else (a["state"][part], b["state"][part])
        for k in pa:
            assert torch.equal(pa[k], pb[k]), (part, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"] == b["scheduler"]
    # the resumed run's log has no duplicated steps and matches the straight run's losses
    logs = [[json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("straight", "split")]
    losses = [[(r["step"], r["loss"]) for r in log if r["kind"] == "train"] for log in logs]
    assert losses[0] == losses[1]
    # a second fresh run into a directory with checkpoints is refused
    with pytest.raises(ValueError, match="resume"):
        train(_mini_train_config(tmp_path / "straight"))


def test_train_exports_fp16_model_card_and_figures(tmp_path):
    from safetensors import safe_open

    summary = train(_mini_train_config(tmp_path, steps=3, export=True, num_samples=1, shape_samples=2, sample_steps=2,
                                       t_shift=2.0, guidance_scale=2.5, guidance_interval=(0.2, 0.8)))
    model_dir = tmp_path / "model"
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "MODEL_CARD.md", "samples.png", "loss_curve.png", "sampling.json"):
        assert (model_dir / name).is_file(), name
    assert (tmp_path / "loss_curve.png").is_file() and (tmp_path / "summary.json").is_file()
    with safe_open(model_dir / "diffusion_pytorch_model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    loaded = load_tiny_wan(model_dir)
    assert loaded.config.num_layers == 1
    assert load_sampling_defaults(model_dir) == {"steps": 2, "guidance_scale": 2.5, "guidance_interval": (0.2, 0.8),
                                                 "eta": 0.0, "shift": 2.0}
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert "| steps | 3 of 3 |" in card and "fp16" in card
    assert summary["clips_seen"] == 6 and summary["val_loss_exported"] is not None
    assert summary["shape_accuracy"] in (0.0, 0.5, 1.0) and "shape accuracy of samples" in card
    judged = [a for a in summary["shape_per_shape"].values() if a is not None]  # the breakdown reaches the card
    assert list(summary["shape_per_shape"]) == ["disc", "square", "triangle", "ring"] and judged
    assert "single-object conditions (disc " in card
    assert all(k in summary for k in ("final_train_loss", "wall_time_s", "device"))


def test_init_from_starts_at_saved_weights(tmp_path):
    # a warm restart: the first run's exported weights are the second run's step-0 weights
    train(_mini_train_config(tmp_path / "a", steps=2, export=True, num_samples=0, shape_samples=0, sample_steps=1))
    exported = load_tiny_wan(tmp_path / "a" / "model").state_dict()
    train(_mini_train_config(tmp_path / "b", steps=1, ckpt_every=1, lr=1e-12, warmup_steps=0,
                             init_from=str(tmp_path / "a" / "model")))
    after = _final_state(tmp_path / "b")["model"]
    # fp16 export round trip; one step at lr 1e-12 moves nothing measurable
    assert all(torch.allclose(after[k], exported[k].float(), atol=1e-6) for k in exported)
    assert any(not torch.allclose(after[k], build_tiny_wan(seed=0, **MINI).state_dict()[k]) for k in exported)
    with pytest.raises(ValueError, match="another architecture"):
        train(_mini_train_config(tmp_path / "c", init_from=str(tmp_path / "a" / "model"),
                                 model_overrides={**MINI, "ffn_dim": 32}))


def test_time_limit_stops_cleanly(tmp_path):
    summary = train(_mini_train_config(tmp_path, steps=100_000, time_limit_min=0.02, time_reserve_s=0.0, ckpt_every=10_000))
    assert summary["stop_reason"].startswith("time limit") and 0 < summary["step"] < 100_000
    assert list_checkpoints(tmp_path)[-1].name == f"step-{summary['step']:07d}.pt"


def test_command_line(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--steps", "2", "--batch-size", "1", "--frames", "2", "--size", "16",
            "--num-layers", "1", "--no-export", "--no-progress", "--log-every", "1"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    for bad in (["--steps", "0"], ["--guidance-interval", "0.5", "2"], ["--lr", "nan"], ["--ema-decay", "1"],
                ["--seed", "-1"], ["--guidance-interval", "0.7", "0.1"]):
        with pytest.raises(SystemExit) as exc:  # argparse errors naming the flag, before any work
            main(["--out", str(tmp_path / "x"), *bad])
        assert exc.value.code == 2 and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="timesteps"):
        TrainConfig(out="x", timesteps="cosine")
    with pytest.raises(ValueError, match="guidance_interval"):
        TrainConfig(out="x", guidance_interval=(0.7, 0.1))



def test_auto_steps_fill_the_time_limit(tmp_path, monkeypatch):
    # a fake clock that advances a fixed amount per reading makes the plan independent of how
    # busy the machine is (a loaded CI box fitted no step at all with the real clock)
    import time as real_time

    import vidsparse.tiny.pretrain as pretrain_mod
    import vidsparse.training.loop as loop_mod
    import vidsparse.training.planner as planner_mod

    class FakeClock:
        now = 0.0

        def monotonic(self):
            FakeClock.now += 0.02
            return FakeClock.now

        def __getattr__(self, name):
            return getattr(real_time, name)

    for mod in (pretrain_mod, loop_mod, planner_mod):  # the run, the loop's time limit and the plan
        monkeypatch.setattr(mod, "time", FakeClock())
    cfg = _mini_train_config(tmp_path, steps="auto", time_limit_min=0.04, time_reserve_s=0.0, warmup_steps=30,
                             log_every=10, eval_every=1000, ckpt_every=1000)
    summary = train(cfg)
    # the plan is fixed after ~25 timed steps and then run to the end of its cosine schedule
    assert summary["steps"] > 25 and summary["step"] == summary["steps"], summary
    assert torch.load(list_checkpoints(tmp_path)[-1], weights_only=True)["total_steps"] == summary["steps"]
    with pytest.raises(ValueError, match="time_limit_min"):
        TrainConfig(out="x", steps="auto")
