"""Tiny random diffusers video pipelines, built offline, for tests (import this module from tests).

Each builder makes a complete pipeline of the real class (text encoder, tokenizer, VAE,
transformer, scheduler) from tiny configs, so that everything vidsparse does with a real
checkpoint (encode prompts and videos, sample, distil, patch) runs on the CPU in about a second:

* :func:`build_wan_pipeline`: ``WanPipeline`` (UMT5 encoder, ``AutoencoderKLWan`` with z_dim 4 and
  per-channel latents_mean / latents_std, ``WanTransformer3DModel``, UniPC flow scheduler);
  ``two_experts=True`` gives a Wan 2.2-style pipeline (``transformer_2`` + ``boundary_ratio``).
* :func:`build_cogvideox_pipeline`: ``CogVideoXPipeline`` (T5 encoder, ``AutoencoderKLCogVideoX``,
  ``CogVideoXTransformer3DModel`` with rotary embeddings, ``CogVideoXDDIMScheduler`` v-prediction).
* :func:`build_hunyuan_pipeline`: ``HunyuanVideoPipeline`` (Llama + CLIP text encoders,
  ``AutoencoderKLHunyuanVideo``, ``HunyuanVideoTransformer3DModel`` with guidance embedding).
* :func:`save_pipeline`: ``save_pretrained`` into a folder (what ``--model`` / ``--pipeline`` take).
* :func:`write_videos`: short mp4 clips of moving squares (imageio), plus a captions file.

Every VAE compresses 8x in space and 4x in time, so ``HEIGHT`` x ``WIDTH`` x ``NUM_FRAMES`` video
gives (C=4, 3, 8, 8) latents, a 3 x 4 x 4 = 48-token grid with patch 2. Tokenizers are word-level
(:func:`word_tokenizer`) over :data:`VOCAB`; unknown words map to ``<unk>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["VOCAB", "HEIGHT", "WIDTH", "NUM_FRAMES", "PROMPTS", "word_tokenizer", "build_wan_pipeline",
           "build_cogvideox_pipeline", "build_hunyuan_pipeline", "build_pipeline", "save_pipeline", "write_videos"]

#: pixel geometry of the test videos (latents: 3 frames of 8 x 8)
HEIGHT, WIDTH, NUM_FRAMES = 64, 64, 9
#: prompts that use the vocabulary
PROMPTS = ["a red square moves left", "a blue circle moves up on a black background",
           "a small green square moves right fast", "a big white circle moves down slow"]
VOCAB = ["<pad>", "</s>", "<unk>", "a", "the", "of", "and", "on", "red", "blue", "green", "white", "black",
         "square", "circle", "moves", "left", "right", "up", "down", "fast", "slow", "small", "big", "background",
         "video", "<|", "|>", "start_header_id", "end_header_id", "eot_id", "user", "system"]
# text encoder width (= the transformers' text_dim / text_embed_dim)
TEXT_DIM = 16


def word_tokenizer(vocab=VOCAB, model_max_length: int = 512):
    """A word-level fast tokenizer (``tokenizers`` WordLevel, whitespace/punctuation split) that
    appends ``</s>`` and pads with ``<pad>``, wrapped as a transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", ids["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def _t5_config(cls, **extra):
    return cls(vocab_size=len(VOCAB), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
               eos_token_id=1, decoder_start_token_id=0, **extra)


def _wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                 out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2,
                                 rope_max_seq_len=64)


def build_wan_pipeline(*, two_experts: bool = False, seed: int = 0):
    """A tiny random ``WanPipeline`` (float32, CPU); Wan 2.2-style with ``two_experts``."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(_t5_config(UMT5Config)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
                           latents_std=[0.9, 1.1, 1.3, 0.7]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    extra = dict(transformer_2=_wan_transformer(seed + 2), boundary_ratio=0.875) if two_experts else {}
    pipe = WanPipeline(tokenizer=word_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=_wan_transformer(seed + 1), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_cogvideox_pipeline(*, seed: int = 0):
    """A tiny random ``CogVideoXPipeline`` (float32, CPU) with rotary positional embeddings."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(_t5_config(T5Config)).eval()
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                 norm_num_groups=4, temporal_compression_ratio=4, sample_height=HEIGHT,
                                 sample_width=WIDTH, scaling_factor=0.7).eval()
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=TEXT_DIM, num_layers=2, sample_width=WIDTH // 8, sample_height=HEIGHT // 8,
        sample_frames=NUM_FRAMES, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
        use_rotary_positional_embeddings=True)
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       snr_shift_scale=3.0, timestep_spacing="trailing", clip_sample=False,
                                       set_alpha_to_one=True, steps_offset=0)
    pipe = CogVideoXPipeline(tokenizer=word_tokenizer(), text_encoder=text_encoder, vae=vae,
                             transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_hunyuan_pipeline(*, seed: int = 0):
    """A tiny random ``HunyuanVideoPipeline`` (float32, CPU) with guidance embedding.

    The word-level tokenizer splits the pipeline's prompt template into 99 tokens, so its crop at
    95 keeps the prompt.
    """
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    llama = LlamaModel(LlamaConfig(vocab_size=len(VOCAB), hidden_size=TEXT_DIM, intermediate_size=32,
                                   num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=512, pad_token_id=0)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=8, pad_token_id=0, bos_token_id=0, eos_token_id=1)).eval()
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4, mid_block_add_attention=False, scaling_factor=0.5).eval()
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=TEXT_DIM, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=word_tokenizer(), transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip,
                                tokenizer_2=word_tokenizer(model_max_length=77))
    pipe.set_progress_bar_config(disable=True)
    return pipe


_BUILDERS = {"wan": build_wan_pipeline, "wan22": lambda **kw: build_wan_pipeline(two_experts=True, **kw),
             "cogvideox": build_cogvideox_pipeline, "hunyuan_video": build_hunyuan_pipeline}


def build_pipeline(name: str, **kwargs):
    """One of "wan", "wan22", "cogvideox", "hunyuan_video"."""
    return _BUILDERS[name](**kwargs)


def save_pipeline(pipe, path) -> Path:
    """``save_pretrained`` (safetensors) into ``path``; returns it."""
    pipe.save_pretrained(Path(path), safe_serialization=True)
    return Path(path)


def _square_clip(rng: np.random.Generator, frames: int, height: int, width: int) -> np.ndarray:
    """(frames, height, width, 3) uint8: a coloured square moving over a plain background."""
    side = max(4, height // 4)
    colour, background = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    y0, x0 = rng.integers(0, height - side), rng.integers(0, width - side)
    dy, dx = rng.integers(-3, 4, 2)
    clip = np.empty((frames, height, width, 3), np.uint8)
    clip[:] = background
    for f in range(frames):
        y, x = int(np.clip(y0 + f * dy, 0, height - side)), int(np.clip(x0 + f * dx, 0, width - side))
        clip[f, y:y + side, x:x + side] = colour
    return clip


def write_videos(folder, count: int = 3, *, frames: int = 12, height: int = 72, width: int = 96,
                 seed: int = 0, captions: bool = True) -> list[Path]:
    """``count`` mp4 files of moving squares (``clip-0.mp4``, ...) in ``folder``; their sizes
    differ from the pipeline's on purpose (resize + centre crop). With ``captions`` a
    ``captions.jsonl`` names every clip but the last (which gets the empty prompt)."""
    import imageio.v3 as iio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"clip-{i}.mp4"
        iio.imwrite(path, _square_clip(rng, frames, height, width), fps=8, codec="libx264", macro_block_size=8)
        paths.append(path)
    if captions:
        import json

        lines = [json.dumps({"video": p.name, "caption": PROMPTS[i % len(PROMPTS)]}) for i, p in enumerate(paths[:-1])]
        (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return paths
