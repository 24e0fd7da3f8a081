"""Sparse attention under diffusers' context parallelism (vidsparse.integrations.context_parallel).

The pieces are checked in this process (token routes, the LSE merge, the pooled hybrid rows, the
degree errors); the whole path runs on 2 and 4 gloo processes (torch.multiprocessing spawn): each
builds the same tiny Wan, records the single-process patched outputs, enables diffusers' context
parallelism and checks that every rank's output equals them. Workers write their measurements to
JSON; the assertions are made here. Joins have a deadline and a failing rank fails the test.

Two CPU shims live in the workers only: diffusers' ``enable_parallelism`` takes ``rank %
torch.accelerator.device_count()``, which is 0 without an accelerator (the count is set to 1), and
its "anything" modes gather uneven output chunks with one ``all_gather``, which gloo refuses for
uneven sizes (NCCL takes them): that gather is replaced by a padded one.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import vidsparse  # noqa: E402
from vidsparse import BlockMask, SparseConfig  # noqa: E402
from vidsparse.integrations import context_parallel as cp  # noqa: E402
from vidsparse.maskers.hybrid import block_mean  # noqa: E402
from vidsparse.maskers.token_order import token_permutation  # noqa: E402

TOL = 1e-5
SMALL = dict(block_q=16, block_k=32, backend="reference")  # tiny sequences: small blocks, really sparse masks


# ------------------------------------------------------------------------------ in-process pieces
def test_split_sizes_and_attention_bounds():
    assert cp.split_sizes(245, 2) == [123, 122] and cp.split_sizes(240, 4) == [60] * 4
    assert cp.attention_bounds(240, 2, 32) == [0, 128, 240]  # 8 blocks of 32 (the last partial): 4 + 4
    bounds = cp.attention_bounds(75600, 8, 128)  # Wan 720p on 8 ranks: 591 blocks of 128
    runs = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == 75600 and all(b % 128 == 0 for b in bounds[:-1])
    assert max(runs) - min(runs) <= 128 and sum(runs) == 75600


def _emulate_exchange(chunks, tables):
    """What all_to_all_single does, for P ranks in one process: rank j receives, from every rank i
    in rank order, the rows i sends to j."""
    sends = [x.reshape(-1, x.shape[-1]).index_select(0, t.send_rows).split(t.send_counts)
             for x, t in zip(chunks, tables)]
    return [torch.cat([sends[i][j] for i in range(len(chunks))]) for j in range(len(chunks))]


def test_routes_move_tokens_into_attention_order_and_back():
    b, h, n, d, parts = 2, 3, 50, 4, 3
    x = torch.randn(b, n, h, d)
    perm = torch.stack([torch.stack([torch.randperm(n) for _ in range(h)]) for _ in range(b)])  # per (b, h)
    caller = [0, 17, 34, 50]  # uneven caller chunks
    bounds = cp.attention_bounds(n, parts, 16)
    tables = [cp.routes(perm, b, h, caller, bounds, r, "cpu") for r in range(parts)]
    chunks = [x[:, caller[r]:caller[r + 1]] for r in range(parts)]
    received = _emulate_exchange(chunks, tables)
    want = torch.gather(x.transpose(1, 2), 2, perm[..., None].expand(-1, -1, -1, d))  # (B, H, N, D) attention order
    back = []
    for r, (t, rows) in enumerate(zip(tables, received)):
        got = torch.empty(b * h * t.length, d).index_copy_(0, t.recv_rows, rows).view(b, h, t.length, d)
        assert torch.equal(got, want[:, :, bounds[r]:bounds[r + 1]])
        back.append(got.reshape(-1, d).index_select(0, t.recv_rows).split(t.recv_counts))
    for r, t in enumerate(tables):  # the way back: rank r gets its rows in the order it sent them
        rows = torch.cat([back[j][r] for j in range(parts)])
        out = torch.empty(b * (caller[r + 1] - caller[r]) * h, d).index_copy_(0, t.send_rows, rows)
        assert torch.equal(out.view_as(chunks[r]), chunks[r])


def test_merge_partial_equals_attention_over_all_keys():
    q, k, v = (torch.randn(1, 2, 48, 8) for _ in range(3))
    dense = torch.rand(1, 2, 3, 3) < 0.5
    dense[0, 0, 1] = False  # a query block that keeps nothing in any chunk
    dense[0, 1, :, 0] = False  # a chunk that one head never keeps
    mask = BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=48, k_len=48)
    want, want_lse = vidsparse.block_sparse_attention(q, k, v, mask, return_lse=True, backend="reference")
    o, lse = torch.zeros(1, 2, 48, 8), torch.full((1, 2, 48), float("-inf"))
    for lo in (0, 16, 32):
        part = BlockMask.from_dense(dense[..., lo // 16:lo // 16 + 1], block_q=16, block_k=16, q_len=48, k_len=16)
        o_p, lse_p = vidsparse.block_sparse_attention(q, k[:, :, lo:lo + 16], v[:, :, lo:lo + 16], part,
                                                      return_lse=True, backend="reference")
        o, lse = cp.merge_partial(o, lse, o_p, lse_p)
    assert (o - want).abs().max() <= TOL and torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    assert (lse - want_lse)[~torch.isneginf(lse)].abs().max() <= TOL


@pytest.mark.parametrize("opts", [
    dict(topk=0.3, topp=None, token_order="raster"),
    dict(topk=torch.tensor([0.1, 0.4, 0.2]), topp=0.3, token_order="tiled"),
    dict(topk=0.1, topp=None, token_order="tiled", keep_sink=True, keep_diagonal=True),
])
def test_hybrid_rows_from_pooled_blocks_equal_the_masker(opts):
    grid, bq, bk = (3, 6, 8), 16, 32
    n = math.prod(grid)
    q, k = torch.randn(2, 3, n, 8), torch.randn(2, 3, n, 8)
    masker = vidsparse.maskers.get("hybrid")
    plan = masker(q, k, grid=grid, block_q=bq, block_k=bk, **opts)
    order = token_permutation(opts["token_order"], grid, bq, None, "cpu")
    qa, ka = (t if order is None else t.index_select(2, order) for t in (q, k))
    full = masker.check_options(opts, 3)
    lo, hi = 32, 112  # a run of whole blocks, as one ring rank holds
    rows = cp.hybrid_rows(block_mean(qa[:, :, lo:hi], bq), block_mean(ka, bk), first_block=lo // bq, tokens=n,
                          block_q=bq, block_k=bk, topk=full["topk"], topp=full["topp"],
                          keep_sink=full["keep_sink"], keep_diagonal=full["keep_diagonal"])
    assert torch.equal(rows, plan.mask.dense[:, :, lo // bq:hi // bq])


def _fake_parallel(model, **degrees):
    """diffusers' config objects as enable_parallelism would record them (no mesh: the pre-hook's
    checks run before anything distributed)."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(**degrees))


def _tiny_wan(heads=4, layers=2, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers, rope_max_seq_len=64,
    ).eval()


def _wan_inputs(frames=5, height=12, width=16, seed=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, frames, height, width, generator=g), torch.randn(1, 12, 32, generator=g)


@pytest.mark.parametrize("degrees, heads, size, match", [
    (dict(ulysses_degree=3), 4, (12, 16), "ulysses_degree=3.*attention heads \\(4\\)"),
    (dict(ring_degree=2), 4, (14, 14), "over 2 ranks.*245 tokens"),
    (dict(ring_degree=4, ring_anything=True), 4, (4, 4), "ring_degree=4.*4 blocks of 32.*20 tokens"),
    (dict(ulysses_degree=8, ulysses_anything=True), 4, (12, 16), "ulysses_degree=8.*4 attention heads"),
])
def test_degree_errors_before_any_work(degrees, heads, size, match):
    model = _tiny_wan(heads=heads, layers=1)
    vidsparse.patch(model, SparseConfig(**SMALL))
    _fake_parallel(model, **degrees)
    x, ehs = _wan_inputs(height=size[0], width=size[1])
    with pytest.raises(ValueError, match=match):
        model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=ehs)


def test_models_without_a_cp_plan_are_refused():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(1)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=1, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    ).eval()
    vidsparse.patch(model, SparseConfig(**SMALL))
    _fake_parallel(model, ulysses_degree=2)
    x, ehs = torch.randn(1, 3, 4, 16, 16), torch.randn(1, 8, 32)
    with pytest.raises(NotImplementedError, match="no context-parallel plan .* for CogVideoXTransformer3DModel"):
        model(hidden_states=x, encoder_hidden_states=ehs, timestep=torch.tensor([500]))


def test_hunyuan_processor_handed_a_parallel_config_is_refused():
    # what enable_parallelism does with a caller's own cp_plan: every processor gets the config
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    torch.manual_seed(2)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=False, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
    ).eval()
    vidsparse.patch(model, SparseConfig(**SMALL))
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    for block in (model.transformer_blocks[0], model.single_transformer_blocks[0]):
        block.attn.processor._parallel_config = config
    inputs = dict(hidden_states=torch.randn(1, 4, 5, 16, 16), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 7, 32), encoder_attention_mask=torch.ones(1, 7, dtype=torch.bool),
                  pooled_projections=torch.randn(1, 16))
    with pytest.raises(NotImplementedError, match="no context-parallel plan .* for HunyuanVideoTransformer3DModel"):
        model(**inputs)


# ------------------------------------------------------------------------------- spawned runs
def _configs(heads: int) -> dict[str, SparseConfig]:
    """One config per registered masker (really sparse on the tiny model), and the variants."""
    per_head = torch.linspace(0.15, 0.45, heads)
    return {
        "hybrid": SparseConfig(topk=0.3, topp=None, **SMALL),  # token_order "auto": tiled inside a model
        "hybrid_raster_per_head": SparseConfig(topk=per_head, topp=0.3, token_order="raster",
                                               layer_options={1: {"topk": 0.2}}, **SMALL),
        "hybrid_priors": SparseConfig(topk=0.15, topp=None, token_order="tiled", keep_sink=True, keep_diagonal=True,
                                      window=(0, 1, 1), **SMALL),
        "svg": SparseConfig(method="svg", budget=0.3, **SMALL),
        "svg2": SparseConfig(method="svg2", q_clusters=6, k_clusters=10, top_p=0.6, **SMALL),
        "xattention": SparseConfig(method="xattention", threshold=0.5, **SMALL),
        "radial": SparseConfig(method="radial", dense_frames=0, decay=0.5, **SMALL),
        "vmoba": SparseConfig(method="vmoba", topk=0.3, chunk_2d=(2, 4), chunk_3d=(2, 2, 4), **SMALL),
        "dense_steps": SparseConfig(topk=0.3, topp=None, dense_steps=1, **SMALL),
    }


class _Model:
    """A tiny Wan with fixed inputs; ``run(t)`` is one forward (return_dict=False: diffusers' CP
    output hook needs a tensor)."""

    def __init__(self, heads=4, size=(12, 16)):
        self.model = _tiny_wan(heads=heads)
        self.x, self.ehs = _wan_inputs(height=size[0], width=size[1])

    def run(self, t: float) -> torch.Tensor:
        out = self.model(hidden_states=self.x, timestep=torch.tensor([t]), encoder_hidden_states=self.ehs,
                         return_dict=False)[0]
        return out


STEPS = (900.0, 800.0)  # two steps: warm masker state, and dense_steps=1 runs the first dense


def _patched_runs(m: _Model, cfg: SparseConfig):
    """Outputs of the STEPS, the statistics records and the callback's calls."""
    calls = []
    vidsparse.patch(m.model, cfg.replace(collect_stats=True))
    vidsparse.set_mask_callback(m.model, lambda info, plan: calls.append(
        {"cp": info.get("cp"), "layer": info["layer"], "shape": list(plan.mask.shape)}))
    outs = [m.run(t) for t in STEPS]
    records = [{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in r.items()
                if k not in ("mask_ms", "attn_ms")} for r in vidsparse.unpatch(m.model).records]
    return outs, records, calls


def _compare_configs(m: _Model, configs: dict, cp_config) -> dict:
    """Single-process runs, then the same under ``cp_config``: max differences and what was recorded."""
    with torch.no_grad():
        ref = {name: _patched_runs(m, cfg) for name, cfg in configs.items()}
        temporal = _svg_temporal_heads(m, configs["svg"]) if "svg" in configs else None
        m.model.enable_parallelism(config=cp_config)
        got = {name: _patched_runs(m, cfg) for name, cfg in configs.items()}
    out = {"temporal_heads": temporal}
    for name in configs:
        (r_outs, r_recs, _), (c_outs, c_recs, c_calls) = ref[name], got[name]
        out[name] = {"diff": max((a - b).abs().max().item() for a, b in zip(r_outs, c_outs)),
                     "ref_records": r_recs, "records": c_recs, "calls": c_calls}
    return out


def _svg_temporal_heads(m: _Model, cfg: SparseConfig) -> int:
    """How many (layer, head) pairs svg labels temporal (position-major order: a permutation that
    crosses every sequence chunk)."""
    vidsparse.patch(m.model, cfg)
    m.run(STEPS[0])
    count = sum(int(blk.attn1.processor.vidsparse_layer.masker_state["kinds"].sum()) for blk in m.model.blocks)
    vidsparse.unpatch(m.model)
    return count


def _ulysses_gradients(cp_config) -> float:
    """Largest difference of the parameter gradients (summed over ranks) from one process's."""
    import torch.distributed as dist

    m = _Model()
    w = torch.randn(1, 4, 5, 12, 16, generator=torch.Generator().manual_seed(3))
    vidsparse.patch(m.model, SparseConfig(topk=0.3, topp=None, **SMALL))
    (m.run(500.0) * w).sum().backward()
    ref = {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}
    m.model.zero_grad(set_to_none=True)
    m.model.enable_parallelism(config=cp_config)
    (m.run(500.0) * w).sum().backward()
    worst = 0.0
    for name, p in m.model.named_parameters():
        if name in ref:
            dist.all_reduce(p.grad)  # each rank holds the gradient of its tokens
            worst = max(worst, ((p.grad - ref[name]).abs().max() / ref[name].abs().max().clamp(min=1)).item())
    return worst


def _patch_before_enable(cp_config) -> dict:
    """patch, then enable_parallelism; unpatch hands the parallel settings back to the stock processors."""
    m = _Model()
    with torch.no_grad():
        stock = m.run(500.0)
        cfg = SparseConfig(topk=0.3, topp=None, **SMALL)
        vidsparse.patch(m.model, cfg)
        ref = m.run(500.0)
        m.model.enable_parallelism(config=cp_config)
        sparse = m.run(500.0)
        vidsparse.unpatch(m.model)
        back = m.run(500.0)
    return {"sparse": (sparse - ref).abs().max().item(), "stock_after_unpatch": (back - stock).abs().max().item()}


def _ring_refuses_gradients(cp_config) -> str:
    """The ring runs forward only: a forward that needs gradients is refused (before any exchange)."""
    m = _Model()
    vidsparse.patch(m.model, SparseConfig(topk=0.3, topp=None, **SMALL))
    m.model.enable_parallelism(config=cp_config)
    try:
        m.run(500.0)
    except NotImplementedError as exc:
        return str(exc)
    return "no error"


def _scenario_two(rank: int) -> dict:
    """Ulysses and ring on 2 processes: every masker, the variants, the "anything" modes."""
    from diffusers import ContextParallelConfig

    out = {"ulysses": _compare_configs(_Model(), _configs(4), ContextParallelConfig(ulysses_degree=2)),
           "ring": _compare_configs(_Model(), _configs(4), ContextParallelConfig(ring_degree=2))}
    odd = {k: _configs(4)[k] for k in ("hybrid", "svg2")}  # 245 tokens: uneven chunks
    out["ulysses_anything"] = _compare_configs(_Model(heads=3, size=(14, 14)), {k: _configs(3)[k] for k in odd},
                                               ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
    out["ring_anything"] = _compare_configs(_Model(size=(14, 14)), odd,
                                            ContextParallelConfig(ring_degree=2, ring_anything=True))
    out["ulysses_gradients"] = _ulysses_gradients(ContextParallelConfig(ulysses_degree=2))
    out["patch_before_enable"] = _patch_before_enable(ContextParallelConfig(ulysses_degree=2))
    out["ring_gradients"] = _ring_refuses_gradients(ContextParallelConfig(ring_degree=2))
    return out


def _scenario_four(rank: int) -> dict:
    """Both degrees on 4 processes: Ulysses inside pairs, the ring over the two pairs."""
    from diffusers import ContextParallelConfig

    configs = {k: _configs(4)[k] for k in ("hybrid", "svg2", "dense_steps")}
    return {"ulysses+ring": _compare_configs(_Model(), configs, ContextParallelConfig(ring_degree=2, ulysses_degree=2))}


_SCENARIOS = {"two": _scenario_two, "four": _scenario_four}


def _padded_gather_anything(tensor, dim, group):
    """diffusers' uneven output gather, padded to equal sizes for gloo."""
    import torch.distributed as dist
    from diffusers.hooks.context_parallel import gather_size_by_comm

    sizes = gather_size_by_comm(tensor.shape[dim], group)
    shape = list(tensor.shape)
    shape[dim] = max(sizes) - tensor.shape[dim]
    padded = torch.cat([tensor, tensor.new_zeros(shape)], dim).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim)


def _worker(rank: int, world: int, port: int, scenario: str, out_dir: str) -> None:
    import torch.distributed as dist
    import diffusers.hooks.context_parallel as diffusers_cp

    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1  # enable_parallelism takes rank % device_count
    diffusers_cp._all_gather_anything = _padded_gather_anything
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    result = _SCENARIOS[scenario](rank)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(scenario: str, world: int, tmp_path: Path, timeout: float = 240.0) -> list[dict]:
    """Run a scenario on ``world`` processes; every rank's JSON result, or the failing rank's error."""
    import multiprocessing

    import torch.multiprocessing as mp

    # forkserver: one fresh process imports torch, diffusers and vidsparse once, the ranks fork from it
    multiprocessing.get_context("forkserver").set_forkserver_preload([__name__, "vidsparse.integrations.diffusers"])
    ctx = mp.start_processes(_worker, args=(world, _free_port(), scenario, str(tmp_path)), nprocs=world,
                             join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException when a rank fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"context-parallel scenario {scenario!r} did not finish in {timeout:.0f} s")
    return [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(world)]


def _check_equal_outputs(results: list[dict], mode: str, names) -> None:
    for rank, res in enumerate(results):
        for name in names:
            diff = res[mode][name]["diff"]
            assert diff <= TOL, f"{mode} {name} rank {rank}: max difference {diff:.3g} from one process"


def _check_really_sparse(results: list[dict], mode: str, names) -> None:
    for name in names:
        sparse = [r["sparsity"] for r in results[0][mode][name]["ref_records"] if not r["dense"]]
        assert sparse and min(sparse) > 0.05, f"{name}: the single-process masks are not sparse ({sparse})"


def _check_ulysses_records(results: list[dict], names) -> None:
    """Each rank records its heads; in rank order they are one process's heads."""
    for name in names:
        ref = [r for r in results[0]["ulysses"][name]["ref_records"] if not r["dense"]]
        per_rank = [[r for r in res["ulysses"][name]["records"] if not r["dense"]] for res in results]
        assert all(len(recs) == len(ref) for recs in per_rank)
        for i, rec in enumerate(ref):
            heads = [h for recs in per_rank for h in recs[i]["head_sparsity"]]
            assert [recs[i]["cp_heads"] for recs in per_rank] == [[0, 2], [2, 4]]
            assert all(recs[i]["cp"] == "ulysses" and recs[i]["heads"] == 2 for recs in per_rank)
            assert heads == pytest.approx(rec["head_sparsity"], abs=1e-6), name


def _check_ring_records(results: list[dict], names) -> None:
    """Each rank records its query blocks' rows; weighted by their count they are one process's mask."""
    blocks = lambda r: math.ceil(r["q_len"] / r["block_q"])  # noqa: E731
    for name in names:
        ref = [r for r in results[0]["ring"][name]["ref_records"] if not r["dense"]]
        per_rank = [[r for r in res["ring"][name]["records"] if not r["dense"]] for res in results]
        for i, rec in enumerate(ref):
            kept = sum((1 - recs[i]["sparsity"]) * blocks(recs[i]) for recs in per_rank)
            assert kept == pytest.approx((1 - rec["sparsity"]) * blocks(rec), rel=1e-6), name
            assert [recs[i]["cp_queries"] for recs in per_rank] == [[0, 128], [128, 240]]
            assert all(recs[i]["k_len"] == rec["k_len"] == 240 for recs in per_rank)


def test_two_processes_ulysses_and_ring_equal_one_process(tmp_path):
    results = _spawn("two", 2, tmp_path)
    names = list(_configs(4))
    assert {c.method for c in _configs(4).values()} >= set(vidsparse.maskers.available())
    for mode in ("ulysses", "ring"):  # every masker, raster and tiled, per-head options, dense_steps
        _check_equal_outputs(results, mode, names)
        _check_really_sparse(results, mode, names)
    assert results[0]["ulysses"]["temporal_heads"] > 0  # svg orders some heads position-major
    _check_equal_outputs(results, "ulysses_anything", ["hybrid", "svg2"])  # 3 heads, 245 tokens
    _check_equal_outputs(results, "ring_anything", ["hybrid", "svg2"])  # 245 tokens
    _check_ulysses_records(results, ["hybrid_raster_per_head", "svg2"])
    _check_ring_records(results, ["hybrid", "hybrid_raster_per_head", "svg2", "radial"])
    for res in results:
        calls = res["ring"]["svg2"]["calls"]
        assert len(calls) == 2 * len(STEPS) and all(c["cp"] == "ring" for c in calls)
        dense = [r for r in res["ring"]["dense_steps"]["records"] if r["dense"]]
        assert len(dense) == 2  # the first step's two layers ran dense (vidsparse's ring, every block kept)
        assert res["ulysses_gradients"] <= TOL, "Ulysses parameter gradients differ from one process's"
        assert res["patch_before_enable"]["sparse"] <= TOL
        assert res["patch_before_enable"]["stock_after_unpatch"] <= TOL
        assert "ring context parallelism runs forward only" in res["ring_gradients"]


def test_four_processes_ulysses_and_ring_together(tmp_path):
    results = _spawn("four", 4, tmp_path)
    _check_equal_outputs(results, "ulysses+ring", ["hybrid", "svg2", "dense_steps"])
    spans = []
    for res in results:
        rec = next(r for r in res["ulysses+ring"]["hybrid"]["records"] if not r["dense"])
        assert rec["cp"] == "ulysses+ring" and rec["heads"] == 2
        spans.append((rec["cp_heads"], rec["cp_queries"]))
    assert spans == [([0, 2], [0, 128]), ([2, 4], [0, 128]), ([0, 2], [128, 240]), ([2, 4], [128, 240])]
