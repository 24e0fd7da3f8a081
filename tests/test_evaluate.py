"""`vidsparse eval`: validation loss, samples vs dense, and the CLI, on real numbers.

Most tests use a one-layer model on 4 frames of 16x16 (64 tokens = 4 blocks of 16); one test
loads the shipped 16x64x64 model to check it is clearly better than an untrained one.
"""

import json
import math

import pytest
import torch

import vidsparse
from vidsparse import SparseConfig
from vidsparse.cli import main as cli_main
from vidsparse.tiny.data import ShapesConfig, make_batch
from vidsparse.tiny.evaluate import evaluate_variant, sample_videos, validation_loss
from vidsparse.integrations.diffusers import is_patched
from vidsparse.tiny import build_tiny_wan, load_tiny_wan

MINI = dict(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, text_dim=32, freq_dim=32)
DATA = ShapesConfig(frames=4, size=16, text_dim=32)
# keeps 1 of the 4 key blocks of every query block: exactly 75% block sparsity
SPARSE = SparseConfig(topk=0.25, topp=None, block_q=16, block_k=16, backend="reference")
FAST = dict(clips=3, num_t=2, batch_size=4, data=DATA)


def _mini_model(seed=0):
    # the zero-initialised output layer would make every model predict exactly v = 0
    model = build_tiny_wan(seed=seed, **MINI)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.proj_out.weight.copy_(torch.randn(model.proj_out.weight.shape, generator=g) * 0.5)
    return model.eval()


def _processors(model):
    return [blk.attn1.processor for blk in model.blocks]


def test_validation_loss_is_deterministic_dense_and_sparse():
    model = _mini_model()
    dense1, dense2 = validation_loss(model, **FAST), validation_loss(model, **FAST)
    sparse1, sparse2 = validation_loss(model, SPARSE, **FAST), validation_loss(model, SPARSE, **FAST)
    assert dense1 == dense2 and sparse1 == sparse2  # identical numbers, not merely close
    assert list(dense1["per_t"]) == [0.25, 0.75]
    assert dense1["val_loss"] == pytest.approx(sum(dense1["per_t"].values()) / 2, rel=1e-12)
    assert dense1["sparsity"] is None and sparse1["sparsity"] == pytest.approx(0.75)
    assert sparse1["layer_sparsity"] == [pytest.approx(0.75)]
    assert math.isfinite(dense1["val_loss"]) and dense1["val_loss"] > 0
    assert sparse1["val_loss"] != dense1["val_loss"]  # the mask changes the prediction
    # the batch size only regroups the same items
    regrouped = validation_loss(model, **{**FAST, "batch_size": 1})
    assert regrouped["val_loss"] == pytest.approx(dense1["val_loss"], rel=1e-5)
    # another seed gives other clips and noise
    assert validation_loss(model, **FAST, seed=1)["val_loss"] != dense1["val_loss"]


def test_full_topk_topp_equals_dense():
    model = _mini_model()
    dense = validation_loss(model, **FAST)
    full = validation_loss(model, SPARSE.replace(topk=1.0, topp=1.0), **FAST)
    assert full["sparsity"] == 0.0
    assert full["val_loss"] == pytest.approx(dense["val_loss"], rel=1e-5)
    for t in dense["per_t"]:
        assert full["per_t"][t] == pytest.approx(dense["per_t"][t], rel=1e-5)


def test_model_is_unpatched_after_an_error():
    model = _mini_model()
    originals = _processors(model)

    def boom(module, args):
        assert is_patched(model)  # the error happens while the sparse processors are installed
        raise RuntimeError("boom")

    handle = model.blocks[0].register_forward_pre_hook(boom)
    model.train()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            validation_loss(model, SPARSE, **FAST)
        emb = torch.zeros(1, DATA.seq_len, 32)
        with pytest.raises(RuntimeError, match="boom"):
            sample_videos(model, SPARSE, emb, torch.randn(1, 3, 4, 16, 16), steps=2, guidance_scale=1.0, shift=1.0)
    finally:
        handle.remove()
    assert not is_patched(model)
    assert all(a is b for a, b in zip(_processors(model), originals))
    assert model.training  # train/eval mode restored
    # a model patched by the caller is refused rather than silently evaluated as "dense"
    vidsparse.patch(model, SPARSE)
    with pytest.raises(ValueError, match="already patched"):
        validation_loss(model, None, **FAST)
    vidsparse.unpatch(model)


def test_samples_against_dense_reference():
    model = _mini_model()
    cache = {}
    kw = dict(clips=2, num_t=1, samples=2, sample_steps=3, guidance_scale=2.0, shift=3.0, data=DATA, cache=cache)
    dense = evaluate_variant(model, None, **kw)
    assert dense["psnr"] == math.inf and dense["ssim"] == pytest.approx(1.0)
    assert len(cache) == 1
    sparse = evaluate_variant(model, SPARSE, **kw)
    assert len(cache) == 1  # the dense reference samples were reused
    assert 5.0 < sparse["psnr"] < 80.0 and -1.0 < sparse["ssim"] < 1.0
    assert sparse["sparsity"] == pytest.approx(0.75) and sparse["sample_sparsity"] == pytest.approx(0.75)
    assert set(dense) >= {"val_loss", "per_t", "sparsity", "psnr", "ssim", "samples", "seconds"}
    assert dense["samples"] == 2 and dense["seconds"] > 0
    # a different model compared with the first one's dense samples (a distilled student's case)
    other = evaluate_variant(_mini_model(seed=1), None, reference=model, **kw)
    assert math.isfinite(other["psnr"]) and other["ssim"] < 0.999
    # samples are deterministic in the noise and clamped
    emb = make_batch(1, split="val", config=DATA)[1]
    noise = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 4
    a = sample_videos(model, SPARSE, emb, noise, steps=2, guidance_scale=2.0, shift=3.0)
    b = sample_videos(model, SPARSE, emb, noise, steps=2, guidance_scale=2.0, shift=3.0)
    assert a.shape == (1, 3, 4, 16, 16) and torch.equal(a, b)
    assert a.abs().max() <= 1.0 and not is_patched(model)


def test_shape_accuracy_of_samples():
    from vidsparse.tiny.evaluate import single_object_inputs
    from vidsparse.tiny.classifier import single_object

    model = _mini_model()
    kw = dict(clips=1, num_t=1, samples=0, sample_steps=2, guidance_scale=1.0, shift=1.0, data=DATA)
    r = evaluate_variant(model, None, shape_samples=3, **kw)
    assert r["shape_samples"] == 3 and r["shape_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert evaluate_variant(model, None, shape_samples=3, **kw)["shape_accuracy"] == r["shape_accuracy"]
    assert sum(sum(row) for row in r["shape_confusion"]) == 3
    known = [a for a in r["shape_per_shape"].values() if a is not None]
    assert known and all(0.0 <= a <= 1.0 for a in known)
    none = evaluate_variant(model, None, **kw)
    assert none["shape_accuracy"] is None and none["shape_per_shape"] is None and none["shape_confusion"] is None
    cond, emb, noise = single_object_inputs(3, split="val", seed=0, data=DATA, device="cpu")
    assert bool(single_object(cond).all()) and emb.shape[0] == noise.shape[0] == 3
    with pytest.raises(ValueError, match="shape_samples"):
        evaluate_variant(model, None, shape_samples=-1, **kw)

def test_shipped_model_beats_an_untrained_one():
    # full 16x64x64 geometry (4096 tokens); 2 clips at t = 0.5 keep it to one small batch per model
    kw = dict(clips=2, num_t=1, batch_size=2)
    shipped = validation_loss(load_tiny_wan(), **kw)
    fresh = validation_loss(build_tiny_wan(seed=0).eval(), **kw)
    # the untrained model predicts v = 0 (zero output layer): its loss is E[(noise - x0)^2] = 1 + E[x0^2]
    x0 = make_batch(2, split="val")[0]
    assert fresh["val_loss"] == pytest.approx(1 + x0.pow(2).mean().item(), abs=0.02)
    # measured on CPU: shipped 0.026, untrained 1.120 (the model card reports 0.064 over 64 clips x all t)
    assert 0.005 < shipped["val_loss"] < 0.1
    assert shipped["val_loss"] < 0.1 * fresh["val_loss"]


def _save_mini(tmp_path):
    path = tmp_path / "mini"
    _mini_model().save_pretrained(path, safe_serialization=True)
    return path


def test_cli_writes_table_and_json(tmp_path, capsys):
    model_dir = _save_mini(tmp_path)
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(model_dir), "--frames", "4", "--size", "16", "--block-q", "16", "--block-k", "16",
            "--clips", "2", "--num-t", "2", "--samples", "1", "--steps", "2", "--shape-samples", "0",
            "--guidance-interval", "0.2", "0.9", "--eta", "0.5", "--device", "cpu", "--no-progress",
            "--setting", "k25:topk=0.25,topp=none", "--setting", "p50:topk=none,topp=0.5",
            "--json", str(out)]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "Δ vs dense %" in text and "k25" in text and "shape acc" in text
    payload = json.loads(out.read_text())
    assert set(payload) >= {"model", "reference", "device", "versions", "settings", "results"}
    assert payload["model"] == str(model_dir) and payload["device"] == "cpu"
    assert {"torch", "diffusers", "vidsparse"} <= set(payload["versions"])
    assert payload["settings"]["clips"] == 2 and payload["settings"]["reduced_cpu_settings"] == []
    assert payload["settings"]["guidance_interval"] == [0.2, 0.9] and payload["settings"]["eta"] == 0.5
    assert "for t in [0.2, 0.9], eta 0.5" in text
    rows = {r["setting"]: r for r in payload["results"]}
    assert list(rows) == ["dense", "k25", "p50"]  # --setting replaces the default hybrid
    assert [rows[n]["method"] for n in rows] == ["dense", "hybrid", "hybrid"]
    dense, k25 = rows["dense"], rows["k25"]
    assert dense["psnr"] == "inf" and dense["sparsity"] is None and dense["delta_vs_dense_pct"] == 0.0
    opts = k25["sparse_config"]["options"]
    assert opts["topk"] == 0.25 and opts["topp"] is None and k25["sparsity"] == pytest.approx(0.75)
    assert k25["delta_vs_dense_pct"] == pytest.approx(100 * (k25["val_loss"] / dense["val_loss"] - 1))
    assert isinstance(k25["psnr"], float) and set(k25["per_t"]) == {"0.25", "0.75"}
    # the same run again gives the same numbers
    again = tmp_path / "again.json"
    assert cli_main(argv[:-1] + [str(again)]) == 0

    def numbers(path):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in json.loads(path.read_text())["results"]]

    assert numbers(out) == numbers(again)
    # a distilled student's case: another model, compared with the first one's dense samples
    other_dir = tmp_path / "other"
    _mini_model(seed=1).save_pretrained(other_dir, safe_serialization=True)
    third = tmp_path / "third.json"
    assert cli_main(argv[:-6] + ["--model", str(other_dir), "--reference", str(model_dir), "--json", str(third)]) == 0
    payload = json.loads(third.read_text())
    assert payload["reference"] == str(model_dir) and payload["model"] == str(other_dir)
    assert [r["setting"] for r in payload["results"]] == ["dense", "hybrid"]
    assert math.isfinite(payload["results"][0]["psnr"])  # dense student vs dense reference: different models


def _opts(cfg):
    return None if cfg is None else (cfg.resolved_options()["topk"], cfg.resolved_options()["topp"])


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], [("dense", None), ("hybrid", (0.03, 0.1))]),
        (["--topk", "0.05"], [("dense", None), ("hybrid", (0.05, 0.1))]),
        (["--topp", "none"], [("dense", None), ("topk", (0.03, None))]),
        (["--topk", "none", "--topp", "0.3"], [("dense", None), ("topp", (None, 0.3))]),
        # a setting's own options not given take SparseConfig's defaults (topp 0.2)
        (["--setting", "a:topk=0.05,block_q=64", "--topk", "0.1"],
         [("dense", None), ("hybrid", (0.1, 0.1)), ("a", (0.05, 0.2))]),
    ],
)
def test_cli_settings(args, expected):
    from vidsparse.tiny.eval_cli import _parser, _settings
    from vidsparse.tiny.model import default_weights_dir

    parser = _parser()
    settings = _settings(parser.parse_args(args), parser, default_weights_dir())
    assert [(name, _opts(cfg)) for name, cfg in settings] == expected
    assert settings[-1][1].block_q == (64 if "--setting" in args else 128)


def test_cli_setting_takes_any_masker_option_and_config_field():
    from vidsparse.tiny.eval_cli import _parser, _settings
    from vidsparse.tiny.model import default_weights_dir

    parser = _parser()
    args = parser.parse_args(["--block-k", "32", "--setting", "tiled:topk=0.05,topp=none,token_order=tiled,tile=1x2x4",
                              "--setting", "s:method=svg,budget=0.1,dense-steps=2,keep_sink=yes"])
    (_, tiled), (_, svg) = _settings(args, parser, default_weights_dir())[1:]
    assert tiled == SparseConfig(topk=0.05, topp=None, token_order="tiled", tile=(1, 2, 4), block_k=32)
    assert svg == SparseConfig(method="svg", budget=0.1, dense_steps=2, keep_sink=True, block_k=32)


def test_cli_default_setting_comes_from_a_students_sparse_config(tmp_path):
    # a distilled student carries the mask it was trained for (SparseConfig.save); flags still win
    from vidsparse.tiny.eval_cli import _parser, _settings

    saved = SparseConfig(topk=0.03125, topp=0.083, block_q=64, block_k=32, keep_diagonal=True, token_order="tiled")
    saved.save(tmp_path)
    parser = _parser()
    settings = _settings(parser.parse_args(["--model", str(tmp_path)]), parser, tmp_path)
    assert settings[-1] == ("hybrid+diagonal", saved)
    args = parser.parse_args(["--model", str(tmp_path), "--topp", "0.2", "--block-k", "64", "--token-order", "raster"])
    assert _settings(args, parser, tmp_path)[-1][1] == saved.replace(topp=0.2, block_k=64, token_order="raster")
    args = parser.parse_args(["--model", str(tmp_path), "--token-order", "auto"])  # the hybrid masker's default
    assert _settings(args, parser, tmp_path)[-1][1] == saved.replace(token_order="auto")
    # the shipped student's file is in the same format
    from vidsparse.tiny.demo import distilled_dir

    shipped = _settings(parser.parse_args([]), parser, distilled_dir())[-1][1]
    assert shipped == SparseConfig.load(distilled_dir()) and shipped.block_q == 32
    for bad in ("[1, 2]", '{"topk": 0.05}', '{"method": "hybrid", "options": {"keep_diagonal": "false"}}'):
        (tmp_path / "sparse_config.json").write_text(bad)
        with pytest.raises(SystemExit):
            _settings(parser.parse_args(["--model", str(tmp_path)]), parser, tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--setting", "x:topk=0.1,top=0.2"], "unknown key(s) ['top']"),
        (["--setting", "x:topk=1.5"], "must lie in (0, 1]"),
        (["--setting", "x:topk=abc"], "topk: expected a number"),
        (["--setting", "x:topk=0.1,keep_diagonal=maybe"], "keep_diagonal: expected true or false"),
        (["--setting", "x:method=nope"], "unknown masker 'nope'"),
        (["--setting", "justaname"], "expected NAME:key=value"),
        (["--setting", "x:topk=0.1", "--setting", "x:topp=0.2"], "duplicate setting name"),
        (["--topk", "0"], "--topk: must lie in (0, 1]"),
        (["--topk", "none", "--topp", "none"], "leaves no rule"),
        (["--block-q", "100"], "--block-q"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such folder"),
        (["--clips", "0"], "--clips: must be >= 1"),
        (["--shape-samples", "-2"], "--shape-samples: must be >= 0"),
        (["--backend", "cuda"], "SparseConfig.backend must be 'auto' or one of"),
        (["--device", "gpu0"], "--device: device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (["--eta", "-1"], "--eta (default: the model's sampling.json): eta must be in [0, 1]"),
        (["--guidance-interval", "0.9", "0.1"], "guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1"),
    ],
)
def test_cli_bad_arguments(args, message, capsys, monkeypatch):
    monkeypatch.setattr("vidsparse.tiny.model.load_tiny_wan", _no_load)
    with pytest.raises(SystemExit) as exc:
        cli_main(["eval", "--device", "cpu", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _no_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")


def test_api_rejects_bad_inputs():
    model = _mini_model()
    with pytest.raises(ValueError, match="clips"):
        validation_loss(model, clips=0, data=DATA)
    with pytest.raises(ValueError, match="split"):
        validation_loss(model, split="test", data=DATA)
    with pytest.raises(ValueError, match="text_dim"):
        validation_loss(model, data=ShapesConfig(frames=4, size=16))
    with pytest.raises(TypeError, match="SparseConfig"):
        validation_loss(model, {"topk": 0.1}, data=DATA)
