"""vidsparse.patch / unpatch / stats on tiny, randomly initialised diffusers video transformers.

All models are built offline from tiny configs and run in fp32 on the CPU. The sparse runs use
the exact reference backend (backend="reference") so the suite does not depend on which GPU
backend exists; one test runs backend="auto".
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import vidsparse  # noqa: E402
from vidsparse import SparseConfig  # noqa: E402
from vidsparse.maskers import token_order as tiling  # noqa: E402
from vidsparse.plan import invert_perm  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5
REF = dict(backend="reference")
SMALL = dict(block_q=16, block_k=32, **REF)  # tiny sequences: small blocks so masks are really sparse
DENSE = dict(topk=1.0, topp=1.0, **SMALL)


# ----------------------------------------------------------------------------- tiny models
def _tiny_wan(num_layers=2, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=num_layers, rope_max_seq_len=64,
    ).eval()


def _tiny_cog():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(1)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True,
    ).eval()


def _tiny_hunyuan():
    # rope_axes_dim must sum to attention_head_dim (each axis even); guidance_embeds=False drops
    # the guidance input; 1 dual-stream + 1 single-stream block covers both attention paths.
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(2)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=False, text_embed_dim=32, pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
    ).eval()


class Case:
    """A tiny model with fixed inputs; ``run(t)`` is one forward at timestep t."""

    def __init__(self, name, model, inputs, n_video, n_text, layers):
        self.name, self.model, self.inputs = name, model, inputs
        self.n_video, self.n_text, self.layers = n_video, n_text, layers

    @torch.no_grad()
    def run(self, t=500.0):
        return self.model(**self.inputs(t)).sample


def _wan_case():
    g = torch.Generator().manual_seed(10)
    x, ehs = torch.randn(1, 4, 5, 16, 16, generator=g), torch.randn(1, 12, 32, generator=g)
    inputs = lambda t: dict(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=ehs)  # noqa: E731
    return Case("wan", _tiny_wan(), inputs, n_video=5 * 8 * 8, n_text=0, layers=2)


def _cog_case():
    g = torch.Generator().manual_seed(11)
    x, ehs = torch.randn(1, 3, 4, 16, 16, generator=g), torch.randn(1, 8, 32, generator=g)
    n_video = 3 * 8 * 8
    angles = torch.rand(n_video, 8, generator=g) * 6.28
    rope = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))  # (S, D)
    inputs = lambda t: dict(  # noqa: E731
        hidden_states=x, encoder_hidden_states=ehs, timestep=torch.tensor([int(t)]), image_rotary_emb=rope
    )
    return Case("cogvideox", _tiny_cog(), inputs, n_video=n_video, n_text=8, layers=2)


def _hunyuan_case():
    # batch 2 with different text padding: exercises the per-length key dropping
    g = torch.Generator().manual_seed(12)
    x, ehs = torch.randn(2, 4, 5, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 6:] = False
    pooled = torch.randn(2, 16, generator=g)
    inputs = lambda t: dict(  # noqa: E731
        hidden_states=x, timestep=torch.tensor([t, t]), encoder_hidden_states=ehs,
        encoder_attention_mask=mask, pooled_projections=pooled,
    )
    return Case("hunyuan_video", _tiny_hunyuan(), inputs, n_video=320, n_text=7, layers=2)


_BUILDERS = {"wan": _wan_case, "cogvideox": _cog_case, "hunyuan_video": _hunyuan_case}


@pytest.fixture(scope="module")
def cases():
    built = {name: fn() for name, fn in _BUILDERS.items()}
    built_ref = {name: c.run() for name, c in built.items()}
    return built, built_ref


@pytest.fixture(autouse=True)
def _restore_diffusers_backend():
    """No test may leave diffusers' process-wide attention backend changed."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    assert _AttentionBackendRegistry._active_backend == before


@contextlib.contextmanager
def patched(target, **cfg):
    vidsparse.patch(target, SparseConfig(**cfg))
    try:
        yield
    finally:
        vidsparse.unpatch(target)


def _processors(model):
    return dict(model.attn_processors)


ARCHS = list(_BUILDERS)


# ----------------------------------------------------------------------- equality with stock
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("order", ["raster", "tiled"])
def test_dense_settings_reproduce_stock(cases, arch, order):
    case, ref = cases[0][arch], cases[1][arch]
    with patched(case.model, token_order=order, **DENSE):
        out = case.run()
    assert (out - ref).abs().max().item() <= TOL


def test_default_block_shape_and_auto_backend_reproduce_stock(cases):
    case, ref = cases[0]["wan"], cases[1]["wan"]
    with patched(case.model, topk=1.0, topp=1.0):  # 128 x 64 blocks, backend="auto"
        out = case.run()
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the Triton kernels in the CPU interpreter",
)
def test_triton_backend_inside_the_processor(cases):
    # the processor hands (B, S, H, D) views (layout="bnhd") to the real kernel
    pytest.importorskip("triton")
    case, ref = cases[0]["wan"], cases[1]["wan"]
    with patched(case.model, topk=1.0, topp=1.0, backend="triton"):
        assert (case.run() - ref).abs().max().item() <= TOL
    sparse = dict(topk=0.3, topp=None, block_q=32, block_k=32)
    with patched(case.model, backend="triton", **sparse):
        out_triton = case.run()
    with patched(case.model, backend="reference", **sparse):
        out_ref = case.run()
    assert (out_triton - out_ref).abs().max().item() <= TOL


def test_fused_cogvideox_projections_reproduce_stock():
    case = _cog_case()
    case.model.fuse_qkv_projections()
    ref = case.run()
    from diffusers.models.attention_processor import FusedCogVideoXAttnProcessor2_0

    assert isinstance(case.model.transformer_blocks[0].attn1.processor, FusedCogVideoXAttnProcessor2_0)
    with patched(case.model, **DENSE):
        assert (case.run() - ref).abs().max().item() <= TOL


# ------------------------------------------------------------------------- sparse behaviour
def _expected_sparsity(case, topk, key_len=None):
    """Block sparsity of the composed mask when n_video is a multiple of both block sizes."""
    bq, bk = SMALL["block_q"], SMALL["block_k"]
    assert case.n_video % bq == 0 and case.n_video % bk == 0
    q_len = case.n_video + case.n_text
    k_len = key_len or q_len
    rq, rk = case.n_video // bq, case.n_video // bk
    kept_per_row = max(1, math.floor(topk * rk + 1e-6))
    return rq * (rk - kept_per_row) / (math.ceil(q_len / bq) * math.ceil(k_len / bk))


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_changes_output_and_reports_sparsity(cases, arch):
    case, ref = cases[0][arch], cases[1][arch]
    topk = 0.34 if arch == "cogvideox" else 0.2
    with patched(case.model, topk=topk, topp=None, collect_stats=True, **SMALL):
        out = case.run()
        records = vidsparse.stats(case.model).records
    assert (out - ref).abs().max().item() > 1e-3
    assert torch.isfinite(out).all()
    assert len(records) == case.layers * (2 if arch == "hunyuan_video" else 1)  # hunyuan: 2 key lengths
    n_k = math.floor(topk * (case.n_video // SMALL["block_k"]) + 1e-6)
    for rec in records:
        assert rec["dense"] is False and rec["step"] == 0 and rec["call"] == 0
        assert rec["n_video"] == case.n_video and rec["n_text"] == case.n_text
        assert rec["sparsity"] == pytest.approx(_expected_sparsity(case, topk, rec["k_len"]), abs=1e-6)
        assert rec["video_sparsity"] == pytest.approx(1 - n_k / (case.n_video // SMALL["block_k"]), abs=1e-6)
        assert len(rec["head_sparsity"]) == 2
        assert rec["mask_ms"] >= 0 and rec["attn_ms"] > 0
    if arch == "hunyuan_video":  # padded text keys are dropped: 320 video + 5 or 6 valid text keys
        assert sorted(r["k_len"] for r in records) == [325, 325, 326, 326]


@pytest.mark.parametrize("arch", ["cogvideox", "hunyuan_video"])
@pytest.mark.parametrize("order", ["raster", "tiled"])
def test_text_tokens_always_kept(cases, arch, order):
    case = cases[0][arch]
    seen = []

    def callback(info, plan):
        seen.append((info, plan))

    with patched(case.model, topk=0.1, topp=None, token_order=order, **SMALL):
        vidsparse.integrations.set_mask_callback(case.model, callback)
        case.run()
    assert len(seen) >= case.layers
    for info, plan in seen:
        n_video = info["n_video"]
        tok = plan.mask.token_mask()  # (B, H, Lq, Lk) in attention order [video; text]
        assert tok[:, :, n_video:, :].all(), "text queries must attend to every key"
        assert tok[:, :, :, n_video:].all(), "every query must attend to all (valid) text keys"
        assert not tok[:, :, :n_video, :n_video].all(), "the video part must be sparse"
        assert info["video_plan"].sparsity() > 0.5
        if plan.perm is not None:  # the text is last in attention order
            perm = plan.perm[0, 0].tolist()
            text_pos = range(0, case.n_text) if arch == "cogvideox" else range(n_video, n_video + case.n_text)
            assert perm[n_video:] == list(text_pos)


def test_per_layer_and_per_head_fractions(cases):
    case = cases[0]["wan"]
    with patched(case.model, topp=None, layer_options={0: {"topk": 1.0}, 1: {"topk": 0.2}}, collect_stats=True, **SMALL):
        case.run()
        by_layer = {r["layer"]: r for r in vidsparse.stats(case.model).records}
    assert by_layer[0]["sparsity"] == 0.0
    assert by_layer[1]["sparsity"] == pytest.approx(0.8)

    with patched(case.model, topk=0.2, layer_options={1: {"topk": torch.tensor([1.0, 0.5])}}, topp=None,
                 collect_stats=True, **SMALL):
        case.run()
        by_layer = {r["layer"]: r for r in vidsparse.stats(case.model).records}
    assert by_layer[0]["head_sparsity"] == pytest.approx([0.8, 0.8])
    assert by_layer[1]["head_sparsity"] == pytest.approx([0.0, 0.5])


def test_gradients_flow_through_sparse_attention():
    case = _wan_case()
    params = list(case.model.blocks[0].attn1.to_q.parameters())
    with patched(case.model, topk=0.3, topp=None, **SMALL):
        out = case.model(**case.inputs(500.0)).sample
        out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# ------------------------------------------------------------------- warm-up and dense layers
def test_dense_steps_equal_stock_then_sparse(cases):
    case = cases[0]["wan"]
    ref_900, ref_800 = case.run(900.0), case.run(800.0)
    with patched(case.model, topk=0.2, topp=None, dense_steps=1, collect_stats=True, **SMALL):
        out_900 = case.run(900.0)  # step 0: dense (stock processor path, bit-exact)
        out_800 = case.run(800.0)  # step 1: sparse
        records = vidsparse.stats(case.model).records
    assert torch.equal(out_900, ref_900)
    assert (out_800 - ref_800).abs().max().item() > 1e-3
    assert [(r["step"], r["dense"]) for r in records] == [(0, True), (0, True), (1, False), (1, False)]


def test_dense_layers_keep_original_processors(cases):
    case = cases[0]["wan"]
    before = _processors(case.model)
    layers_seen = set()
    with patched(case.model, topk=0.2, topp=None, dense_layers=[0], **SMALL):
        vidsparse.integrations.set_mask_callback(case.model, lambda info, mask: layers_seen.add(info["layer"]))
        assert case.model.blocks[0].attn1.processor is before["blocks.0.attn1.processor"]
        assert case.model.blocks[1].attn1.processor is not before["blocks.1.attn1.processor"]
        case.run()
    assert layers_seen == {1}


def test_dense_layers_all_equal_stock_exactly(cases):
    case, ref = cases[0]["hunyuan_video"], cases[1]["hunyuan_video"]
    with patched(case.model, topk=0.1, topp=None, dense_layers=(0, 1), **SMALL):
        assert torch.equal(case.run(), ref)


# ------------------------------------------------------------------------- install / remove
@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_restores_exact_processors_and_output(cases, arch):
    case, ref = cases[0][arch], cases[1][arch]
    before = _processors(case.model)
    hooks_before = dict(case.model._forward_pre_hooks)
    vidsparse.patch(case.model, SparseConfig(topk=0.2, topp=None, **SMALL))
    during = _processors(case.model)
    changed = {k for k in before if during[k] is not before[k]}
    if arch == "wan":  # self-attention only; cross-attention untouched
        assert changed == {f"blocks.{i}.attn1.processor" for i in range(case.layers)}
    elif arch == "cogvideox":
        assert changed == {f"transformer_blocks.{i}.attn1.processor" for i in range(case.layers)}
    else:  # joint attentions only; the text refiner is untouched
        assert changed == {"transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor"}
    assert vidsparse.integrations.is_patched(case.model)
    vidsparse.unpatch(case.model)
    after = _processors(case.model)
    assert all(after[k] is before[k] for k in before)
    assert dict(case.model._forward_pre_hooks) == hooks_before
    assert not vidsparse.integrations.is_patched(case.model)
    assert torch.equal(case.run(), ref)


def test_process_wide_attention_backend_unchanged(cases):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    case = cases[0]["wan"]
    active = _AttentionBackendRegistry.get_active_backend()[0]
    backends = {k: getattr(p, "_attention_backend", None) for k, p in case.model.attn_processors.items()}
    with patched(case.model, topk=0.2, topp=None, **SMALL):
        case.run()
        assert _AttentionBackendRegistry.get_active_backend()[0] == active
    assert _AttentionBackendRegistry.get_active_backend()[0] == active
    assert {k: getattr(p, "_attention_backend", None) for k, p in case.model.attn_processors.items()} == backends


def test_patch_errors(cases):
    case = cases[0]["wan"]
    with pytest.raises(TypeError, match="supports"):
        vidsparse.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not patched"):
        vidsparse.unpatch(case.model)
    with pytest.raises(ValueError, match="SparseConfig.dense_layers"):
        vidsparse.patch(case.model, SparseConfig(dense_layers=[5]))
    with pytest.raises(ValueError, match=r"SparseConfig.layer_options \[2\] out of range"):
        vidsparse.patch(case.model, SparseConfig(layer_options={2: {"topk": 0.1}}))
    with pytest.raises(ValueError, match=r"SparseConfig \(layer 0\): topp as a tensor must have shape \(H,\) = \(2,\)"):
        vidsparse.patch(case.model, SparseConfig(topp=torch.tensor([0.1, 0.2, 0.3])))
    assert not vidsparse.integrations.is_patched(case.model)  # failed patches changed nothing
    with patched(case.model, **DENSE):
        with pytest.raises(RuntimeError, match="already patched"):
            vidsparse.patch(case.model)
    # a processor that is not the stock one is not silently replaced
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class Custom(WanAttnProcessor):
        pass

    model = _tiny_wan(num_layers=1)
    model.blocks[0].attn1.set_processor(Custom())
    with pytest.raises(TypeError, match="Custom"):
        vidsparse.patch(model)


# ------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(topk=1.5), "SparseConfig.options: topk"),
        (dict(topk=0.0), "SparseConfig.options: topk"),
        (dict(topp=-0.1), "SparseConfig.options: topp"),
        (dict(topk="0.1"), "SparseConfig.options: topk"),
        (dict(layer_options={1: {"topk": 2.0}}), r"SparseConfig.layer_options\[1\]: topk"),
        (dict(layer_options={"x": {"topk": 0.1}}), "SparseConfig.layer_options keys"),
        (dict(topk=torch.tensor([[0.1, 1.2]])), "SparseConfig.options: topk"),
        (dict(topk=None, topp=None), "SparseConfig.options: .*topk and topp"),
        (dict(method="nope"), "SparseConfig.method: unknown masker 'nope'"),
        (dict(bogus=1), "SparseConfig.options: masker 'hybrid': unknown option 'bogus'"),
        (dict(block_q=100), "SparseConfig.block_q"),
        (dict(block_k=8), "SparseConfig.block_k"),
        (dict(keep_sink=1), "SparseConfig.options: .*'keep_sink'"),
        (dict(keep_diagonal="yes"), "SparseConfig.options: .*'keep_diagonal'"),
        (dict(dense_steps=-1), "SparseConfig.dense_steps"),
        (dict(dense_steps=1.5), "SparseConfig.dense_steps"),
        (dict(dense_layers=[-1]), "SparseConfig.dense_layers"),
        (dict(dense_layers=3), "SparseConfig.dense_layers"),
        (dict(token_order="zigzag"), "SparseConfig.options: .*'token_order'"),
        (dict(token_order="raster", tile=(2, 8, 8)), "SparseConfig.options: .*'tile' only applies"),
        (dict(token_order="tiled", tile=(2, 0, 8)), "SparseConfig.options: .*'tile'"),
        (dict(backend="cuda"), "SparseConfig.backend"),
        (dict(collect_stats=None), "SparseConfig.collect_stats"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises((TypeError, ValueError), match=field):
        SparseConfig(**kwargs)


def test_config_normalisation_round_trip_and_files(tmp_path):
    cfg = SparseConfig(topk=0.1, topp=None, dense_layers={3, 1}, token_order="tiled", tile=[1, 4, 4],
                       layer_options={1: {"topk": torch.tensor([0.2, 0.3])}})
    assert cfg.dense_layers == (1, 3) and cfg.options["tile"] == (1, 4, 4)
    assert cfg.resolved_options(1, 2)["topk"].tolist() == pytest.approx([0.2, 0.3])
    assert cfg.resolved_options(0, 2)["topk"] == 0.1
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["options"]["topk"] == 0.1 and data["options"]["topp"] is None
    assert SparseConfig.from_dict(data) == cfg
    assert SparseConfig.load(cfg.save(tmp_path)) == cfg and SparseConfig.load(tmp_path) == cfg
    with pytest.raises(AttributeError):
        cfg.method = "x"  # frozen: validated once
    assert cfg.replace(topk=0.5).options["topk"] == 0.5
    assert cfg.replace(backend="gather").backend == "gather"
    with pytest.raises(ValueError, match="unknown keys"):
        SparseConfig.from_dict({**data, "extra": 1})
    with pytest.raises(FileNotFoundError, match="sparse_config.json"):
        SparseConfig.load(tmp_path / "missing")


def test_import_vidsparse_does_not_import_diffusers():
    code = (
        "import sys, vidsparse; from vidsparse import SparseConfig; SparseConfig(topk=0.1); "
        "assert 'diffusers' not in sys.modules, 'diffusers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------- tiling
@pytest.mark.parametrize("grid", [(5, 8, 8), (3, 5, 6), (21, 30, 52), (1, 1, 7)])
@pytest.mark.parametrize("tile", [(2, 2, 4), (1, 4, 4), (4, 4, 8), (3, 1, 5)])
def test_tiled_order_is_a_permutation_with_exact_inverse(grid, tile):
    perm = tiling.tiled_order(grid, tile)
    n = math.prod(grid)
    assert torch.equal(perm.sort().values, torch.arange(n))
    inv = invert_perm(perm)
    x = torch.randn(2, n, 3)
    assert torch.equal(x.index_select(1, perm).index_select(1, inv), x)
    # the full tiles come first, each one contiguous and compact
    t, h, w = (perm // (grid[1] * grid[2]), (perm // grid[2]) % grid[1], perm % grid[2])
    vol = math.prod(tile)
    full = math.prod(g // s for g, s in zip(grid, tile))
    for i in range(full):
        sl = slice(i * vol, (i + 1) * vol)
        for coord, size in zip((t, h, w), tile):
            assert coord[sl].max() - coord[sl].min() == size - 1


def test_default_tile_shape():
    assert tiling.choose_tile_shape((21, 30, 52), 128) == (4, 4, 8)
    assert tiling.choose_tile_shape((21, 45, 80), 128) == (4, 4, 8)
    assert math.prod(tiling.choose_tile_shape((5, 8, 8), 16)) == 16


def test_explicit_tile_shape_is_used_and_exact(cases):
    case, ref = cases[0]["wan"], cases[1]["wan"]
    perms = []
    with patched(case.model, token_order="tiled", tile=(1, 4, 4), **DENSE):
        vidsparse.integrations.set_mask_callback(case.model, lambda info, plan: perms.append(plan.perm))
        out = case.run()
    assert (out - ref).abs().max().item() <= TOL
    assert len(perms) == case.layers
    assert all(torch.equal(p[0, 0], tiling.tiled_order((5, 8, 8), (1, 4, 4))) for p in perms)


def test_calling_forward_directly_is_reported(cases):
    # the pre-hook (grid, step) only runs for model(...): tiled order and warm-up say so
    case = cases[0]["wan"]
    for cfg in (dict(token_order="tiled"), dict(dense_steps=1)):
        with patched(case.model, **cfg, **DENSE):
            with pytest.raises(RuntimeError, match="model.forward"):
                with torch.no_grad():
                    case.model.forward(**case.inputs(500.0))


# -------------------------------------------------------------- pipeline and step tracking
def _tiny_pipeline(two_experts=False):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    extra = dict(transformer_2=_tiny_wan(seed=5), boundary_ratio=0.6) if two_experts else {}
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, transformer=_tiny_wan(), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, steps, guidance, output_type="latent"):
    g = torch.Generator().manual_seed(0)
    return pipe(
        prompt_embeds=torch.randn(1, 12, 32, generator=g), negative_prompt_embeds=torch.randn(1, 12, 32, generator=g),
        height=32, width=32, num_frames=9, num_inference_steps=steps, guidance_scale=guidance,
        generator=g, output_type=output_type,
    ).frames


def test_pipeline_end_to_end_counts_steps():
    pipe = _tiny_pipeline()
    ref = _generate(pipe, 3, 5.0, output_type="pt")
    with patched(pipe, topk=0.5, topp=None, dense_steps=1, collect_stats=True, **SMALL):
        out = _generate(pipe, 3, 5.0, output_type="pt")  # CFG: two transformer calls per step
        _generate(pipe, 2, 1.0)  # a second generation, without CFG, restarts the count
        records = vidsparse.stats(pipe).records
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    gen0 = [r for r in records if r["generation"] == 0]
    gen1 = [r for r in records if r["generation"] == 1]
    assert len(gen0) == 3 * 2 * 2 and len(gen1) == 2 * 1 * 2  # steps x calls per step x layers
    assert sorted({(r["step"], r["call"]) for r in gen0}) == [(s, c) for s in range(3) for c in range(2)]
    assert sorted({(r["step"], r["call"]) for r in gen1}) == [(0, 0), (1, 0)]
    assert all(r["dense"] == (r["step"] == 0) for r in records)  # dense_steps=1 in both generations
    timesteps = [r["timestep"] for r in gen0 if r["layer"] == 0 and r["call"] == 0]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 3


def test_wan22_two_experts_share_the_step_counter(tmp_path):
    pipe = _tiny_pipeline(two_experts=True)
    before = {name: _processors(getattr(pipe, name)) for name in ("transformer", "transformer_2")}
    with patched(pipe, topk=0.5, topp=None, collect_stats=True, **SMALL):
        assert vidsparse.integrations.is_patched(pipe.transformer_2)
        _generate(pipe, 4, 5.0)
        st = vidsparse.stats(pipe)
        records = st.records
        st.to_json(tmp_path / "stats.json", config=SparseConfig(topk=0.5, topp=None))
    for name in before:
        assert all(_processors(getattr(pipe, name))[k] is p for k, p in before[name].items())
    models = {(r["step"], r["model"]) for r in records}
    steps = sorted({s for s, _ in models})
    assert steps == [0, 1, 2, 3]
    assert {m for _, m in models} == {"transformer", "transformer_2"}
    # the high-noise expert runs the first steps, the low-noise one the rest
    first_t2 = min(s for s, m in models if m == "transformer_2")
    assert all(m == "transformer" for s, m in models if s < first_t2)
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert len(saved["records"]) == len(records) and saved["summary"]["sparse_calls"] == len(records)
    assert saved["config"]["options"]["topk"] == 0.5


def test_reset_steps_and_stats_clear(cases):
    case = cases[0]["wan"]
    with patched(case.model, topk=0.2, topp=None, collect_stats=True, **SMALL):
        case.run(900.0)
        case.run(800.0)
        vidsparse.integrations.reset_steps(case.model)
        case.run(700.0)
        st = vidsparse.stats(case.model)
        assert [(r["generation"], r["step"]) for r in st.records[::2]] == [(0, 0), (0, 1), (1, 0)]
        st.clear()
        assert len(vidsparse.stats(case.model)) == 0


# --------------------------------------------------------------------------------- benchmark
def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_wan_step", REPO / "benchmarks" / "bench_wan_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--smoke", "--warmup", "0", "--repeats", "1", "--backend", "reference", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    variants = [r["variant"] for r in saved["rows"]]
    assert variants == ["dense-cudnn", "dense-flash2", "vidsparse-90", "vidsparse-95"]
    assert all("error" not in r and r["step_ms"] > 0 for r in saved["rows"])
    assert saved["rows"][2]["sparsity"] == pytest.approx(0.9)
    # the full-size configs use WanTransformer3DModel's real parameter names
    from diffusers import WanTransformer3DModel

    for cfg in (bench.WAN_2_1_1_3B, bench.WAN_2_1_14B):
        bench._check_config_names(WanTransformer3DModel, cfg)
