"""`vidsparse demo`: the embedded model, dense vs sparse, end to end on the CPU at a small clip size.

The clips are 4 frames of 32x32 (256 tokens, 2 x 4 mask blocks of 128 x 64) so a run takes
seconds; the default 16 x 64 x 64 run is timed by hand (README, docs/demo.md).
"""

from __future__ import annotations

import json
import math
import shutil

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from vidsparse import SparseConfig
from vidsparse.tiny import demo
from vidsparse.tiny.demo_media import write_videos
from vidsparse.cli import main
from vidsparse.tiny.data import describe, sample_conditions
from vidsparse.tiny.model import default_weights_dir, load_sampling_defaults, load_tiny_wan

SMALL = ["--frames", "4", "--size", "32", "--device", "cpu", "--no-progress"]

RESULT_KEYS = {
    "model", "distilled", "device", "dtype", "backend", "samples", "steps", "guidance_scale", "guidance_interval",
    "eta", "shift", "seed",
    "frames", "size", "tokens", "reduced_for_cpu", "sparse_config", "captions", "sparsity", "sparsity_per_layer",
    "attention_s", "sampling_s", "psnr_db", "ssim", "psnr_db_mean", "ssim_mean", "mask", "video", "files",
    "total_s", "labels", "sparse_config_why",
}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One run with the CPU defaults (no --samples / --steps) at the small clip size."""
    out = tmp_path_factory.mktemp("demo")
    res = demo.run(SMALL + ["--out", str(out), "--layer", "1", "--head", "2"])
    return out, res


def test_default_cpu_run_writes_every_file(default_run, capsys):
    out, res = default_run
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk) == RESULT_KEYS
    # CPU defaults: fewer samples and steps than the GPU run, and it says so
    assert on_disk["reduced_for_cpu"] == {
        "samples": {"default": demo.GPU_SAMPLES, "used": demo.CPU_SAMPLES},
        "steps": {"default": 40, "used": demo.CPU_STEPS},
    }
    assert on_disk["samples"] == 1 and on_disk["steps"] == demo.CPU_STEPS and on_disk["backend"] == "gather"
    # the other sampler settings are the shipped model's sampling.json
    sampling = load_sampling_defaults()
    assert on_disk["guidance_scale"] == sampling["guidance_scale"] and on_disk["shift"] == sampling["shift"]
    assert tuple(on_disk["guidance_interval"]) == sampling["guidance_interval"] and on_disk["eta"] == sampling["eta"]
    assert on_disk["tokens"] == 4 * 8 * 8 and on_disk["device"] == "cpu"
    assert on_disk["captions"] == describe(sample_conditions(1, seed=0, split="val"))
    # 256 tokens = 2 query x 4 key blocks: the svg default keeps its heads' own frame(s) / positions
    assert 0.0 <= on_disk["sparsity"] < 1.0
    assert on_disk["sparse_config"]["method"] == demo.DEMO_CONFIG["method"] == "svg"
    assert on_disk["sparse_config"]["options"]["budget"] == demo.DEMO_CONFIG["budget"]
    assert "not SparseConfig's default" in on_disk["sparse_config_why"]  # the demo says why it differs
    assert set(on_disk["sparsity_per_layer"]) == {"0", "1", "2", "3", "4"}
    # sparse attention on a toy-sized clip does change the frames, but not into noise
    psnr = on_disk["psnr_db"][0]
    assert isinstance(psnr, float) and math.isfinite(psnr) and 5.0 < psnr < 60.0
    assert on_disk["psnr_db_mean"] == pytest.approx(psnr) and 0.0 < on_disk["ssim"][0] < 1.0
    assert on_disk["attention_s"]["dense"] > 0 and on_disk["attention_s"]["sparse"] > 0
    assert on_disk["sampling_s"]["dense"] > 0 and on_disk["sampling_s"]["sparse"] > 0

    # the PSNR is the one of the returned videos
    dense, sparse = res["videos"]["dense"], res["videos"]["sparse"]
    assert dense.shape == sparse.shape == (1, 3, 4, 32, 32)
    assert dense.abs().max() <= 1 and sparse.abs().max() <= 1
    mse = (dense - sparse).pow(2).mean()
    assert psnr == pytest.approx(float(10 * torch.log10(4 / mse)), abs=1e-3)

    # videos: 4 frames each, labelled panels 4x upscaled, dimensions multiples of 16
    video = on_disk["video"]
    assert video["frames"] == 4 and video["upscale"] == 4
    assert video["height"] % 16 == 0 and video["width"] % 16 == 0 and video["width"] >= 2 * 32 * 4
    with imageio.get_reader(out / "side_by_side.mp4") as reader:  # len(reader) is inf: iterate
        assert reader.count_frames() == 4
        mp4 = np.stack([frame for frame in reader])
    assert mp4.shape == (4, video["height"], video["width"], 3)
    gif = np.stack(list(iio.imiter(out / "side_by_side.gif")))
    assert gif.shape[:3] == (4, video["height"], video["width"])
    # the dense panel of the GIF holds the dense frame 0, upscaled (GIF palettes are lossy)
    panel = gif[0, 8 + 22: 8 + 22 + 128, 8: 8 + 128, :3].astype(np.float32)
    want = ((dense[0, :, 0].permute(1, 2, 0).numpy() + 1) * 127.5).repeat(4, 0).repeat(4, 1)
    assert np.abs(panel - want).mean() < 12

    # the mask PNG of the chosen layer and head, with its kept fraction
    assert on_disk["mask"]["path"] == "mask_layer1_head2.png"
    assert (out / "mask_layer1_head2.png").stat().st_size > 5000
    assert on_disk["mask"]["layer"] == 1 and on_disk["mask"]["head"] == 2
    assert on_disk["mask"]["step"] == demo.CPU_STEPS - 1
    kept = on_disk["mask"]["kept_fraction"]
    assert len(on_disk["mask"]["kept_fraction_by_step"]) == demo.CPU_STEPS
    # 2 x 4 blocks, each query block keeps at least one key block (Top-k's minimum)
    assert kept * 8 == round(kept * 8) and 2 / 8 <= kept <= 1 and on_disk["mask"]["sparsity"] == 1 - kept
    assert (out / "frames.png").stat().st_size > 5000
    assert set(on_disk["files"]) == {"side_by_side.mp4", "side_by_side.gif", "frames.png",
                                     "mask_layer1_head2.png", "results.json"}


def test_dense_config_on_the_sparse_side_matches_dense(tmp_path):
    """topk = topp = 1 keeps every block: the two sides agree up to float rounding (same noise,
    same conditions), so the comparison is aligned."""
    res = demo.run(SMALL + ["--out", str(tmp_path), "--samples", "2", "--steps", "2", "--topk", "1", "--topp", "1"])
    assert res["sparsity"] == 0.0 and res["reduced_for_cpu"] == {}
    assert len(res["psnr_db"]) == 2 and len(res["captions"]) == 2
    for p in res["psnr_db"]:
        assert p == "inf" or p > 60.0
    assert res["ssim_mean"] > 0.999


def test_distilled_uses_the_student_on_the_sparse_side_only(tmp_path, default_run):
    _, base = default_run
    # the student is a copy of the shipped model: the same numbers as the plain run
    copy = tmp_path / "student_copy"
    shutil.copytree(default_weights_dir(), copy)
    res = demo.run(SMALL + ["--out", str(tmp_path / "a"), "--layer", "1", "--head", "2",
                            "--distilled-path", str(copy)])
    assert res["distilled"] == str(copy) and res["labels"]["sparse"].startswith("distilled vidsparse ")
    assert base["labels"]["sparse"].startswith("vidsparse ") and base["labels"]["dense"] == "dense attention"
    assert torch.equal(res["videos"]["dense"], base["videos"]["dense"])
    assert torch.equal(res["videos"]["sparse"], base["videos"]["sparse"])

    # a different student (output projection zeroed: it predicts v = 0, so it returns its noise)
    # changes the sparse side only; its sparse_config.json sets the sparse side's defaults
    student = load_tiny_wan(default_weights_dir())
    with torch.no_grad():
        student.proj_out.weight.zero_()
        student.proj_out.bias.zero_()
    other = tmp_path / "student_zero"
    student.save_pretrained(other)
    SparseConfig(topk=0.25, topp=0.5).save(other)
    res = demo.run(SMALL + ["--out", str(tmp_path / "b"), "--steps", "2", "--distilled",
                            "--distilled-path", str(other)])
    assert res["sparse_config"]["options"]["topk"] == 0.25 and res["sparse_config"]["options"]["topp"] == 0.5
    noise = torch.randn((1, 3, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(res["videos"]["sparse"], noise.clamp(-1, 1))
    base_dense = demo.run(SMALL + ["--out", str(tmp_path / "c"), "--steps", "2"])["videos"]["dense"]
    assert torch.equal(res["videos"]["dense"], base_dense)


def test_distilled_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "distilled_dir", lambda: tmp_path / "tiny_wan_distilled")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--distilled", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--distilled" in err and "tiny_wan_distilled" in err and "not shipped" in err
    with pytest.raises(SystemExit):
        main(["demo", "--distilled-path", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert "--distilled-path" in err and "no such directory" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["demo", "--distilled-path", str(tmp_path / "empty")])
    assert "no diffusers checkpoint" in capsys.readouterr().err


def test_synthetic_demo_writes_mask_and_summary(tmp_path, capsys):
    """The model-free demo (moved here from test_cli.py, now behind --synthetic)."""
    out = tmp_path / "demo"
    assert main(["demo", "--synthetic", "--frames", "2", "--height", "8", "--width", "16", "--heads", "2",
                 "--head-dim", "32", "--block-q", "32", "--block-k", "16", "--topk", "0.1", "--topp", "0.3",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "demo.json").read_text())
    dense, hybrid, rand = summary["rows"]
    assert dense["rel_err"] == 0.0 and 0.0 < hybrid["sparsity"] < 1.0
    # on this local structure the predicted mask must beat a random mask of the same density
    assert hybrid["rel_err"] < rand["rel_err"]
    assert (out / "mask_head0.png").stat().st_size > 1000
    assert "vidsparse hybrid mask" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--topk", "0"], "--topk"),
        (["--topk", "1.5"], "--topk"),
        (["--topp", "abc"], "--topp"),
        (["--topk", "none", "--topp", "none"], "--topk and --topp"),
        (["--samples", "0"], "--samples"),
        (["--steps", "-2"], "--steps"),
        (["--steps", "two"], "--steps"),
        (["--block-q", "100"], "--block-q"),
        (["--seed", "-1"], "--seed"),
        (["--device", "tpu"], "--device"),
        (["--frames", "0"], "--frames"),
        (["--height", "8"], "--height"),  # synthetic-only
        (["--synthetic", "--model", "x"], "--model"),
        (["--synthetic", "--steps", "3"], "--steps"),
        (["--synthetic", "--keep-diagonal"], "--keep-diagonal"),
        (["--model", "/no/such/model"], "--model"),
        (["--size", "30"], "--size"),
        (["--layer", "5"], "--layer"),
        (["--head", "4"], "--head"),
        (["--guidance-scale", "nan"], "--guidance-scale"),
        (["--eta", "1.5"], "--eta"),
        (["--guidance-interval", "0.8", "0.2"], "--guidance-interval"),
        (["--guidance-interval", "0.2"], "--guidance-interval"),
        (["--synthetic", "--eta", "0.5"], "--eta"),
    ],
)
def test_bad_flags_are_argparse_errors_naming_the_flag(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", *argv, "--device", "cpu", "--out", str(tmp_path)] if "--device" not in argv
             else ["demo", *argv, "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err, err
    assert not (tmp_path / "results.json").exists()


def test_model_must_be_a_pixel_space_wan_transformer(tmp_path, capsys):
    bad = tmp_path / "latent"
    bad.mkdir()
    cfg = json.loads((default_weights_dir() / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "in_channels": 16, "out_channels": 16}))
    shutil.copy(default_weights_dir() / "diffusion_pytorch_model.safetensors", bad)
    with pytest.raises(SystemExit):
        main(["demo", "--model", str(bad)])
    assert "in_channels=16" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_sparse_side_settings_from_the_student_and_the_flags(tmp_path):
    # the shipped student's sparse_config.json (SparseConfig.save) sets the mask; the flags change it
    parser = demo.build_parser()
    shipped = demo.distilled_dir()
    saved = SparseConfig.load(shipped)
    cfg, why = demo._sparse_config(parser.parse_args(["--distilled"]), parser, shipped)
    assert cfg == saved.replace(collect_stats=True) and "distilled with" in why
    opts = saved.resolved_options()
    other = "raster" if opts["token_order"] == "tiled" else "tiled"
    cfg, why = demo._sparse_config(parser.parse_args(["--token-order", other, "--topp", "0.3"]), parser, shipped)
    assert cfg == saved.replace(token_order=other, topp=0.3, collect_stats=True) and why == "the flags"
    cfg, _ = demo._sparse_config(parser.parse_args(["--token-order", "auto", "--topp", "0.3"]), parser, shipped)
    assert cfg == saved.replace(token_order="auto", topp=0.3, collect_stats=True)  # the hybrid masker's default
    assert "auto" in parser.format_help()
    cfg, why = demo._sparse_config(parser.parse_args([]), parser, None)
    assert cfg == SparseConfig("svg", {"budget": demo.DEMO_CONFIG["budget"]}, collect_stats=True)
    assert "80%" in why and "compare" in why
    cfg, _ = demo._sparse_config(parser.parse_args(["--topk", "0.05"]), parser, None)  # hybrid from here
    assert cfg == SparseConfig(topk=0.05, topp=demo.DEMO_TOPP, collect_stats=True)
    cfg, _ = demo._sparse_config(parser.parse_args(["--keep-sink"]), parser, None)
    assert cfg.resolved_options()["keep_sink"] is True
    (tmp_path / "sparse_config.json").write_text("not json")
    with pytest.raises(SystemExit):
        demo._sparse_config(parser.parse_args(["--distilled-path", str(tmp_path)]), parser, tmp_path)


def test_videos_without_imageio_ffmpeg_write_the_gif_and_warn(tmp_path, monkeypatch, capsys):
    """Without imageio-ffmpeg the mp4 is skipped with a warning (imageio would otherwise pass
    ".mp4" to an unrelated plugin and fail); the GIF still holds every frame."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "imageio_ffmpeg" else real_find_spec(name, *a))
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 16, 24, 3), dtype=np.uint8)
    mp4, gif = write_videos(frames, tmp_path)
    assert mp4 is None and not (tmp_path / "side_by_side.mp4").exists()
    assert "imageio-ffmpeg is not installed" in capsys.readouterr().err
    back = np.stack(list(iio.imiter(gif)))
    assert back.shape[0] == 3 and back.shape[1:3] == (16, 24)
