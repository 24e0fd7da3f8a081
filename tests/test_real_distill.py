"""Velocity distillation on real diffusers pipelines (tiny random ones, CPU): model families, the
latents format, `vidsparse encode`, the --prompts teacher cache, resume, and bad inputs."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("imageio")

from tiny_pipelines import HEIGHT, NUM_FRAMES, PROMPTS, WIDTH, build_pipeline, save_pipeline, write_videos  # noqa: E402

import vidsparse  # noqa: E402
from vidsparse import SparseConfig  # noqa: E402
from vidsparse.training.distill_cli import main as distill_main  # noqa: E402
from vidsparse.training.encode import main as encode_main  # noqa: E402
from vidsparse.training.families import CogVideoXFamily, HunyuanVideoFamily, WanFamily, resolve_model  # noqa: E402
from vidsparse.training.latents import LatentsSource  # noqa: E402
from vidsparse.training.loop import list_checkpoints  # noqa: E402

GEOMETRY = ["--height", str(HEIGHT), "--width", str(WIDTH), "--num-frames", str(NUM_FRAMES)]
SPARSE = ["--topk", "0.5", "--topp", "none", "--block-q", "16", "--block-k", "16", "--backend", "reference"]
TRAIN = ["--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0", "--log-every", "1",
         "--ckpt-every", "1", "--timesteps", "uniform", "--device", "cpu", "--no-progress", *SPARSE]
FAMILY_OF = {"wan": WanFamily, "wan22": WanFamily, "cogvideox": CogVideoXFamily, "hunyuan_video": HunyuanVideoFamily}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny tensors: intra-op threads only contend with the other test worker
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Saved pipelines, a prompts file and a video folder (3 clips, one corrupt, one too short)."""
    root = tmp_path_factory.mktemp("real")
    pipes = {name: save_pipeline(build_pipeline(name), root / name) for name in FAMILY_OF}
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:3]) + "\n")
    videos = root / "videos"
    write_videos(videos, 3)
    write_videos(root / "short", 1, frames=5, captions=False)[0].rename(videos / "short.mp4")
    (videos / "broken.mp4").write_bytes(b"this is not a video" * 20)
    return {"root": root, "pipes": pipes, "prompts": root / "prompts.txt", "videos": videos}


def _encode(work, name, out=None, *extra):
    out = out or work["root"] / f"latents-{name}"
    if not (out / "manifest.json").is_file():
        assert encode_main(["--pipeline", str(work["pipes"][name]), "--videos", str(work["videos"]), "--captions",
                            str(work["videos"] / "captions.jsonl"), "--out", str(out), *GEOMETRY, "--shard-size", "2",
                            "--batch-size", "2", "--no-progress", *extra]) == 0
    return out


def _distill(work, name, out, *data):
    return distill_main(["--model", str(work["pipes"][name]), *data, "--out", str(out), *TRAIN])


def _prompts_args(work, cache=None):
    return ["--prompts", str(work["prompts"]), "--cache", str(cache or work["root"] / "cache"), "--teacher-steps", "2",
            *GEOMETRY]


def _final(out):
    return torch.load(list_checkpoints(out)[-1], map_location="cpu", weights_only=True)["model"]


def _log(out):
    return [{k: r[k] for k in ("step", "loss", "vd_loss", "grad_norm")}
            for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines())]


# ------------------------------------------------------------------------------------ pipelines
@pytest.mark.parametrize("name", ["wan", "wan22", "cogvideox", "hunyuan_video"])
def test_tiny_pipeline_builds_saves_reloads_and_samples(work, name):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(work["pipes"][name])
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPTS[:1], height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="latent").frames
    assert type(pipe).__name__ == type(build_pipeline(name)).__name__
    assert out.shape[0] == 1 and out.numel() == 4 * 3 * 8 * 8 and torch.isfinite(out).all()


# ------------------------------------------------------------------------ family conventions
@pytest.mark.parametrize("family_cls, shift", [(WanFamily, 3.0), (HunyuanVideoFamily, 7.0)])
def test_flow_families_match_flow_match_euler(family_cls, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from vidsparse.training.flow import shift_time

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    family = family_cls(dict(sched.config))
    assert family.shift == shift
    unshifted = [0.93, 0.71, 0.4, 0.12]
    sched.set_timesteps(sigmas=unshifted)
    torch.testing.assert_close(shift_time(torch.tensor(unshifted), family.shift), sched.sigmas[:-1], rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    for i, timestep in enumerate(sched.timesteps):
        t = sched.sigmas[i].expand(2)
        torch.testing.assert_close(family.timestep(t), timestep.expand(2), rtol=1e-6, atol=1e-3)
        x_t = family.noisy(x0, noise, t)
        torch.testing.assert_close(x_t, sched.scale_noise(x0, timestep.expand(2), noise), rtol=1e-6, atol=1e-6)
        # the exact target stepped by the scheduler lands on the next noise level of the same path
        sched._step_index = i
        stepped = sched.step(family.target(x0, noise, t), timestep, x_t).prev_sample
        torch.testing.assert_close(stepped, family.noisy(x0, noise, sched.sigmas[i + 1].expand(2)), rtol=1e-5, atol=1e-5)


def test_wan_family_reads_the_unipc_flow_shift(work):
    spec = resolve_model(work["pipes"]["wan"])
    assert isinstance(spec.family, WanFamily) and spec.family.shift == 3.0 and spec.family.t_range == (0.0, 1.0)
    assert WanFamily().shift == 1.0  # no scheduler (the tiny model): no shift


def test_cogvideox_family_matches_its_ddim_scheduler(work):
    from diffusers import DiffusionPipeline

    sched = DiffusionPipeline.from_pretrained(work["pipes"]["cogvideox"]).scheduler
    family = CogVideoXFamily(dict(sched.config))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 4, 3, 8, 8, generator=g), torch.randn(5, 4, 3, 8, 8, generator=g)
    t = torch.tensor([1e-5, 0.2503, 0.5, 0.90625, 1 - 1e-5])
    steps = family.timestep(t)
    assert steps.dtype == torch.int64 and steps.tolist() == [0, 250, 500, 906, 999]
    torch.testing.assert_close(family.noisy(x0, noise, t), sched.add_noise(x0, noise, steps), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(family.target(x0, noise, t), sched.get_velocity(x0, noise, steps), rtol=1e-6, atol=1e-6)


def test_cogvideox_forward_is_the_pipelines_call(work):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(work["pipes"]["cogvideox"])
    family = resolve_model(work["pipes"]["cogvideox"]).family
    g = torch.Generator().manual_seed(2)
    x_t, text = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 226, 16, generator=g)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ours = family.forward(pipe.transformer, x_t, t, {"encoder_hidden_states": text})
        rotary = pipe._prepare_rotary_positional_embeddings(HEIGHT, WIDTH, 3, torch.device("cpu"))
        theirs = pipe.transformer(hidden_states=x_t.permute(0, 2, 1, 3, 4), encoder_hidden_states=text,
                                  timestep=torch.tensor([300, 800]), image_rotary_emb=rotary).sample
    torch.testing.assert_close(ours, theirs.permute(0, 2, 1, 3, 4), rtol=0, atol=0)


def test_hunyuan_forward_passes_its_guidance(work):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(work["pipes"]["hunyuan_video"])
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(1, 4, 3, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "pooled_projections": torch.randn(1, 8, generator=g),
            "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]])}
    t = torch.tensor([0.4])
    with torch.no_grad():
        ours = [HunyuanVideoFamily(guidance=gs).forward(pipe.transformer, x_t, t, cond) for gs in (None, 3.5)]
        theirs = pipe.transformer(hidden_states=x_t, timestep=torch.tensor([400.0]), guidance=torch.tensor([3500.0]),
                                  **cond).sample
    torch.testing.assert_close(ours[1], theirs, rtol=0, atol=0)
    assert not torch.equal(ours[0], ours[1])  # default 6.0 is another input


@pytest.mark.parametrize("name", ["wan", "hunyuan_video", "cogvideox"])
def test_vae_normalisation_is_what_the_pipeline_decodes(work, name):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
    from diffusers.models.autoencoders.vae import DecoderOutput

    pipe = DiffusionPipeline.from_pretrained(work["pipes"][name])
    pipe.set_progress_bar_config(disable=True)
    family = resolve_model(work["pipes"][name]).family
    z = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    seen = []
    pipe.vae.decode = lambda latents, *a, **k: seen.append(latents) or DecoderOutput(torch.zeros(1, 3, NUM_FRAMES, HEIGHT, WIDTH))
    latents = family.normalise(pipe.vae.config, z)
    if name == "cogvideox":
        pipe.decode_latents(latents.permute(0, 2, 1, 3, 4))  # the pipeline's own layout
    else:  # a zero-velocity transformer leaves the latents unchanged through Euler steps, then they are decoded
        pipe.scheduler = FlowMatchEulerDiscreteScheduler()
        torch.nn.init.zeros_(pipe.transformer.proj_out.weight)
        torch.nn.init.zeros_(pipe.transformer.proj_out.bias)
        pipe(prompt=PROMPTS[:1], latents=latents, height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES,
             num_inference_steps=2, output_type="pt")
    torch.testing.assert_close(seen[0], z, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- encode
def test_encode_videos_skips_counts_and_matches_a_direct_encoding(work):
    from diffusers import DiffusionPipeline

    from vidsparse.training.encode import read_frames, to_pixels

    out = _encode(work, "wan")
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert manifest["complete"] and manifest["count"] == 3 and manifest["family"] == "wan"
    assert manifest["latent_shape"] == [4, 3, 8, 8] and manifest["conditions"]["encoder_hidden_states"]["shape"] == [512, 16]
    assert {s["video"]: s["reason"].split(" ")[0] for s in skipped} == {"broken.mp4": "unreadable", "short.mp4": "too"}
    assert "5 frames, needs 9" in next(s["reason"] for s in skipped if s["video"] == "short.mp4")
    shards = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    # item 0 (clip-0.mp4, in shard 0 with the skipped broken.mp4) against the pipeline's VAE and text encoder
    pipe = DiffusionPipeline.from_pretrained(work["pipes"]["wan"])
    pixels = to_pixels(read_frames(work["videos"] / "clip-0.mp4", NUM_FRAMES), HEIGHT, WIDTH)[None]
    with torch.no_grad():
        z = pipe.vae.encode(pixels).latent_dist.mode()
        text, _ = pipe.encode_prompt(PROMPTS[0], do_classifier_free_guidance=False, max_sequence_length=512)
    mean, std = (torch.tensor(pipe.vae.config[k]).view(1, 4, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    item = LatentsSource(out).item(0)
    torch.testing.assert_close(item["latents"], ((z - mean) / std)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(item["encoder_hidden_states"], text[0], rtol=1e-5, atol=1e-5)


def test_encode_resumes_after_the_last_complete_shard(work, capsys):
    out = _encode(work, "wan", work["root"] / "resume")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*")}
    capsys.readouterr()
    (out / "shard-00001.safetensors").unlink()
    (out / "manifest.json").write_text(json.dumps({**json.loads((out / "manifest.json").read_text()), "complete": False}))
    assert encode_main(["--pipeline", str(work["pipes"]["wan"]), "--videos", str(work["videos"]), "--captions",
                        str(work["videos"] / "captions.jsonl"), "--out", str(out), *GEOMETRY, "--shard-size", "2",
                        "--batch-size", "2", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["encoded"], summary["skipped"], summary["uncaptioned"], summary["complete"]) == (3, 2, 1, True)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*")}
    assert after.keys() == before.keys()
    for name in ("shard-00000.safetensors", "shard-00002.safetensors"):
        assert after[name][0] == before[name][0]  # not rewritten
    assert after["shard-00001.safetensors"][1] == before["shard-00001.safetensors"][1]  # re-made identically


def test_captions_formats_and_pixels(tmp_path):
    import numpy as np

    from vidsparse.training.encode import read_captions, to_pixels

    (tmp_path / "c.tsv").write_text("a.mp4\ta red square\n\nb\ta blue circle\n")
    (tmp_path / "c.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n')
    assert read_captions(tmp_path / "c.tsv") == {"a.mp4": "a red square", "b": "a blue circle"}
    assert read_captions(tmp_path / "c.jsonl") == {"a.mp4": "x"}
    (tmp_path / "bad.txt").write_text("a.mp4 without a tab\n")
    with pytest.raises(ValueError, match="--captions .*line 1"):
        read_captions(tmp_path / "bad.txt")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    exact = to_pixels(frames, 16, 24)
    torch.testing.assert_close(exact, torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1)
    # wider than the target: the height fits, the centre columns are kept
    torch.testing.assert_close(to_pixels(frames, 16, 8), exact[..., 8:16])


# ------------------------------------------------------------------------------ latents source
def test_latents_source_order_is_a_seeded_permutation_per_epoch(work):
    src = LatentsSource(_encode(work, "wan"), seed=5)
    n, cpu = len(src), torch.device("cpu")
    epoch = torch.cat([src.batch(i, 1, cpu)[0] for i in range(n)])
    items = torch.stack([src.item(i)["latents"] for i in range(n)])
    matches = [int(torch.nonzero((items == row).flatten(1).all(1)).item()) for row in epoch]
    assert sorted(matches) == list(range(n))  # every item once per epoch
    x_a, c_a = src.batch(1, 4, cpu)
    x_b, c_b = zip(src.batch(1, 2, cpu), src.batch(3, 2, cpu))
    torch.testing.assert_close(x_a, torch.cat(x_b), rtol=0, atol=0)  # item i does not depend on the batch
    torch.testing.assert_close(c_a["encoder_hidden_states"], torch.cat([c["encoder_hidden_states"] for c in c_b]))
    orders = {tuple(LatentsSource(src.folder, seed=s)._order(e).tolist()) for s in range(4) for e in range(2)}
    assert len(orders) > 1


# ----------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("name", ["wan", "cogvideox", "hunyuan_video"])
def test_distil_from_prompts_and_from_latents_then_sample_the_student(work, name, capsys):
    from diffusers import DiffusionPipeline

    out_p, out_l = work["root"] / f"run-prompts-{name}", work["root"] / f"run-latents-{name}"
    assert _distill(work, name, out_p, *_prompts_args(work)) == 0
    assert _distill(work, name, out_l, "--latents", str(_encode(work, name))) == 0
    for out in (out_p, out_l):
        log = _log(out)
        assert [r["step"] for r in log] == [1, 2, 3] and all(r["vd_loss"] > 0 for r in log)
    pipe = DiffusionPipeline.from_pretrained(work["pipes"][name])
    pipe.set_progress_bar_config(disable=True)
    teacher = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    student = type(pipe.transformer).from_pretrained(out_p / "student", dtype=torch.float32)
    assert any(not torch.allclose(student.state_dict()[k], v, atol=1e-3) for k, v in teacher.items())
    pipe.transformer = student
    vidsparse.patch(pipe, SparseConfig.load(out_p / "student"))
    video = pipe(prompt=PROMPTS[:1], height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES, num_inference_steps=2,
                 output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    assert torch.isfinite(video).all() and video.numel() == 4 * 3 * 8 * 8


def test_teacher_cache_is_reused_without_loading_the_pipeline(work, monkeypatch, capsys):
    import diffusers

    cache = work["root"] / "cache-reuse"
    assert _distill(work, "wan", work["root"] / "reuse-1", *_prompts_args(work, cache)) == 0
    assert "sampling 3 of 3 prompts" in capsys.readouterr().err
    [folder] = cache.iterdir()
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was loaded again")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    assert _distill(work, "wan", work["root"] / "reuse-2", *_prompts_args(work, cache)) == 0
    assert f"reusing {folder}" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert _log(work["root"] / "reuse-1") == _log(work["root"] / "reuse-2")


def test_stop_and_resume_is_exact(work):
    straight, split = work["root"] / "straight", work["root"] / "split"
    args = _prompts_args(work)
    assert _distill(work, "wan", straight, *args) == 0
    assert distill_main(["--model", str(work["pipes"]["wan"]), *args, "--out", str(split), *TRAIN, "--steps", "2"]) == 0
    assert _distill(work, "wan", split, *args, "--resume") == 0
    a, b = _final(straight), _final(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _log(straight) == _log(split)


def test_wan22_low_expert_trains_transformer_2_on_low_noise_only(work, monkeypatch):
    from diffusers import DiffusionPipeline

    seen = []
    original = WanFamily.timestep
    monkeypatch.setattr(WanFamily, "timestep", lambda self, t: seen.append(t.clone()) or original(self, t))
    out = work["root"] / "expert-low"
    args = ["--expert", "low", *_prompts_args(work), "--timesteps", "uniform", "--t-shift", "1"]
    assert distill_main(["--model", str(work["pipes"]["wan22"]), *args, "--out", str(out), *TRAIN, "--lr", "1e-9"]) == 0
    pipe = DiffusionPipeline.from_pretrained(work["pipes"]["wan22"])
    student = type(pipe.transformer).from_pretrained(out / "student", dtype=torch.float32).state_dict()
    low, high = pipe.transformer_2.state_dict(), pipe.transformer.state_dict()
    assert all(torch.allclose(student[k], v, atol=2e-3) for k, v in low.items())  # fp16 export of transformer_2
    assert any(not torch.allclose(student[k], v, atol=2e-3) for k, v in high.items())
    training = torch.cat(seen)  # 3 steps x (student, teacher) x 2 items; the teacher's sampling calls the pipeline
    assert len(seen) == 6 and training.max() < 0.875 and training.min() > 0


# ---------------------------------------------------------------------------------- bad input
def _refused(argv, capsys, *needles):
    with pytest.raises(SystemExit) as exc:
        distill_main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_inputs_name_the_flag_before_any_work(work, capsys, tmp_path):
    from diffusers import WanTransformer3DModel

    never = tmp_path / "never"
    base = ["--out", str(never), *TRAIN]
    transformer = work["pipes"]["wan"] / "transformer"
    _refused(["--model", str(transformer), *base], capsys, "--latents", str(transformer))
    _refused(["--model", str(work["pipes"]["wan"]), *base], capsys, "--latents", "--prompts")
    _refused(["--model", str(transformer), "--latents", str(_encode(work, "cogvideox")), *base], capsys,
             "--latents", "CogVideoXTransformer3DModel", "WanTransformer3DModel")
    wide = tmp_path / "wide"
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=8,
                          out_channels=8, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=1).save_pretrained(wide)
    _refused(["--model", str(wide), "--latents", str(_encode(work, "wan")), *base], capsys, "--latents", "4 channels", "takes 8")
    (tmp_path / "empty.txt").write_text("\n  \n")
    _refused(["--model", str(work["pipes"]["wan"]), "--prompts", str(tmp_path / "empty.txt"), *base], capsys,
             "--prompts", "no prompts")
    _refused(["--model", str(transformer), *_prompts_args(work), *base], capsys, "--prompts", "pipeline folder")
    _refused(["--model", str(work["pipes"]["wan"]), *_prompts_args(work), "--height", "60", *base], capsys,
             "--height 60", "multiple of 16")
    _refused(["--model", str(work["pipes"]["wan"]), *_prompts_args(work), "--num-frames", "8", *base], capsys,
             "--num-frames 8", "4k + 1")
    _refused(["--model", str(work["pipes"]["wan"]), *_prompts_args(work), "--expert", "low", *base], capsys,
             "--expert low", "two-expert")
    _refused(["--model", str(work["pipes"]["wan"]), *_prompts_args(work), "--latents", str(_encode(work, "wan")), *base],
             capsys, "--latents", "--prompts")
    assert not never.exists()
    rc = encode_main(["--pipeline", str(work["pipes"]["wan"]), "--videos", str(tmp_path / "nowhere"), "--out", str(never)])
    assert rc == 2 and f"--videos {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    rc = encode_main(["--pipeline", str(transformer), "--videos", str(work["videos"]), "--out", str(never)])
    assert rc == 2 and "--pipeline" in capsys.readouterr().err
    assert not never.exists()


def test_encode_refuses_an_output_made_differently(work, capsys):
    out = _encode(work, "wan")
    rc = encode_main(["--pipeline", str(work["pipes"]["wan"]), "--videos", str(work["videos"]), "--out", str(out),
                      "--height", "32", "--width", "32", "--num-frames", str(NUM_FRAMES), "--shard-size", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--out {out}" in err and "made differently" in err and "height" in err


def test_prompts_file_formats(tmp_path):
    from vidsparse.training.prompts import read_prompts

    (tmp_path / "p.txt").write_text('a red square\n\n{"prompt": "a blue circle"}\n  a green square  \n')
    assert read_prompts(tmp_path / "p.txt") == ["a red square", "a blue circle", "a green square"]
    (tmp_path / "bad.txt").write_text('ok\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="--prompts .*line 2"):
        read_prompts(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="--prompts .*no such file"):
        read_prompts(tmp_path / "missing.txt")


def test_distill_loss_uses_the_family_target(work):
    """The diffusion term of a CogVideoX run is the v-prediction target, not the flow one."""
    from diffusers import DiffusionPipeline

    from vidsparse.training.distill import distill_loss, make_student_teacher

    pipe = DiffusionPipeline.from_pretrained(work["pipes"]["cogvideox"])
    family = resolve_model(work["pipes"]["cogvideox"]).family
    student, teacher = make_student_teacher(copy.deepcopy(pipe.transformer), SparseConfig(topk=0.5, topp=None, block_q=16,
                                                                                         block_k=16, backend="reference"))
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    cond, t = {"encoder_hidden_states": torch.randn(2, 226, 16, generator=g)}, torch.tensor([0.25, 0.75])
    with torch.no_grad():
        loss, vd = distill_loss(student, teacher, x0, cond, noise, t, diffusion_weight=1.0, distill_weight=0.0, family=family)
        v = family.forward(student, family.noisy(x0, noise, t), t, cond)
    expected = torch.nn.functional.mse_loss(v, pipe.scheduler.get_velocity(x0, noise, family.timestep(t)))
    assert torch.isnan(vd) and float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # everything above ran offline



def test_teacher_cache_sampled_by_two_ranks_equals_one_process(work, tmp_path, monkeypatch):
    """Two ranks (threads meeting at a barrier in place of the process group) share the sampling."""
    import threading

    from diffusers import DiffusionPipeline

    from vidsparse.training import prompts as prompts_module
    from vidsparse.training.prompts import TeacherSettings, teacher_cache

    spec = resolve_model(work["pipes"]["wan"])
    settings = TeacherSettings(steps=2, height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES)
    barrier, errors, lock = threading.Barrier(2, timeout=60), [], threading.Lock()
    monkeypatch.setattr(prompts_module, "_barrier", lambda world: barrier.wait())
    load = DiffusionPipeline.from_pretrained.__func__

    def load_one_at_a_time(cls, *args, **kwargs):  # from_pretrained is not thread-safe (separate processes in real use)
        with lock:
            return load(cls, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(load_one_at_a_time))

    def rank(r):
        try:
            teacher_cache(spec, PROMPTS[:3], settings, cache_root=tmp_path / "two", rank=r, world=2, progress=False,
                          shard_size=1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    monkeypatch.undo()
    one = teacher_cache(spec, PROMPTS[:3], settings, cache_root=tmp_path / "one", progress=False, shard_size=1)
    [two] = (tmp_path / "two").iterdir()
    assert two.name == one.name and json.loads((two / "manifest.json").read_text())["count"] == 3
    a, b = LatentsSource(one), LatentsSource(two)
    for i in range(3):
        for k, v in a.item(i).items():
            assert torch.equal(v, b.item(i)[k]), (i, k)
