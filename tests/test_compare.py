"""`vidsparse compare`'s pieces on synthetic queries and keys (the full run needs the tiny model and
minutes; the GPU run is in docs/benchmarks.md): calibration reaches the target sparsity, kept mass
is bounded by the token-level selection, reports are written."""

import json
import math

import pytest
import torch

import vidsparse
from vidsparse.tiny import compare as C
from vidsparse.tiny import oracle as O

GRID = (4, 16, 16)  # 1,024 tokens: 8 query x 16 key blocks of 128 x 64


@pytest.fixture(scope="module")
def captured():
    g = torch.Generator().manual_seed(0)
    n = math.prod(GRID)
    # smooth in the grid (neighbours similar), like a video model's queries and keys
    pos = torch.linspace(0, 6.28, n)[:, None] * torch.arange(1, 17)[None]
    base = torch.cat([pos.sin(), pos.cos()], dim=-1)  # (N, 32)
    return [(base + 0.3 * torch.randn(1, 2, n, 32, generator=g), base + 0.3 * torch.randn(1, 2, n, 32, generator=g))
            for _ in range(2)]


@pytest.mark.parametrize("name", ["hybrid", "svg", "xattention", "vmoba"])
def test_calibration_brings_a_method_near_the_target(captured, name):
    variant = C.default_variants([name], math.prod(GRID))[-1]
    value, achieved = C.calibrate(variant, 0.75, captured, GRID, block_q=128, block_k=64, iters=10)
    lo, hi = variant.masker.density_bounds
    assert lo <= value <= hi
    assert abs(achieved - 0.75) < 0.1, f"{name}: {achieved}"
    # the value found is what runs: the config built from it gives the same plans
    again = C._plan_sparsity(variant, value, captured, GRID, 128, 64)
    assert again == pytest.approx(achieved)


def test_kept_mass_is_bounded_by_the_token_level_selection(captured):
    variant = C.default_variants(["hybrid"], math.prod(GRID))[1]  # tiled
    for density in (0.1, 0.3, 1.0):
        mass, bound = C.kept_mass(variant, density, captured, GRID, block_q=128, block_k=64, rows=128)
        assert 0.0 < mass <= bound + 1e-6 <= 1.0 + 1e-6
    mass, bound = C.kept_mass(variant, 1.0, captured, GRID, block_q=128, block_k=64, rows=128)
    assert mass == pytest.approx(1.0) and bound == pytest.approx(1.0)


def test_variants_name_both_hybrid_orders_and_scale_svg2():
    variants = {v.label: v for v in C.default_variants(["hybrid", "svg2"], 4096)}
    assert variants["hybrid/raster"].options == {"token_order": "raster"}
    assert variants["hybrid/tiled"].options == {"token_order": "tiled"}
    assert variants["svg2"].options == {"q_clusters": 37, "k_clusters": 124}
    cfg = variants["hybrid/tiled"].config(0.05)
    assert cfg.options["topk"] == 0.05 and cfg.options["topp"] is None  # Top-k alone sets the density
    with pytest.raises(ValueError, match="unknown masker"):
        C.default_variants(["nope"], 4096)


def test_reports_are_written(tmp_path):
    rows = [dict(label=lab, method="hybrid", target=t, sparsity=t, velocity_error=e, val_loss=e + 0.02,
                 kept_mass=0.5, mass_bound=0.7) for lab, t, e in
            [("a", 0.8, 0.01), ("a", 0.9, 0.03), ("b", 0.8, 0.02), ("b", 0.9, 0.05)]]
    result = {"device": "cpu", "settings": {"clips": 2, "num_t": 2}, "dense": {"val_loss": 0.02}, "rows": rows}
    C._write(result, tmp_path)
    assert json.loads((tmp_path / "compare.json").read_text())["rows"][0]["label"] == "a"
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    table = C.format_table(result)
    assert "a " in table and "0.0300" in table and "dense: val loss 0.0200" in table


# ------------------------------------------------------------------------------ the oracle
def _exact_kept_mass(q, k, plan):
    """Share of the exact attention mass the plan keeps, every query (float64)."""
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return float((p * plan.token_mask()).sum(-1).mean())


def test_oracle_plan_is_the_brute_force_best_blocks():
    import itertools

    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 2, 64, 8, generator=g, dtype=torch.float64) for _ in range(2))
    perm = torch.randperm(64, generator=g)[None, None]
    for count in (1, 2, 3):
        plan = O.best_mass_plan(q, k, count, block_q=16, block_k=16, perm=perm)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        p = p[:, :, perm[0, 0]][:, :, :, perm[0, 0]]  # attention order
        for b, h, i in itertools.product(range(2), range(2), range(4)):
            rows = p[b, h, 16 * i:16 * (i + 1)]
            best = max(itertools.combinations(range(4), count),
                       key=lambda js: sum(float(rows[:, 16 * j:16 * (j + 1)].sum()) for j in js))
            assert plan.mask.dense[b, h, i].nonzero().flatten().tolist() == list(best)
    assert torch.equal(plan.perm, perm)


def test_oracle_block_mass_rows_sum_to_their_queries():
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 3, 100, 8, generator=g) for _ in range(2))  # partial tail blocks
    mass = O.block_mass(q, k, block_q=32, block_k=16, max_elements=3 * 100 * 32)  # one query block per chunk
    torch.testing.assert_close(mass.sum(-1), torch.tensor([32.0, 32, 32, 4]).expand(1, 3, 4))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(mass[0, 1, 3, 6], p[0, 1, 96:, 96:].sum())


def test_oracle_keeps_at_least_every_methods_mass_at_the_same_counts():
    """Row by row at each method's own kept counts and in its own layout, the best-mass blocks keep
    no less exact attention mass than the method's plan (random video-like q, k)."""
    g = torch.Generator().manual_seed(5)
    grid = (4, 8, 8)
    n = math.prod(grid)
    pos = torch.linspace(0, 6.28, n)[:, None] * torch.arange(1, 9)[None]
    base = torch.cat([pos.sin(), pos.cos()], dim=-1)
    q, k = (base + 0.5 * torch.randn(2, 2, n, 16, generator=g, dtype=torch.float64) for _ in range(2))
    options = {"svg2": dict(q_clusters=6, k_clusters=12, iters=3), "vmoba": dict(chunk_2d=(4, 4), chunk_3d=(2, 4, 4))}
    for name in vidsparse.maskers.available():
        plan = vidsparse.maskers.get(name)(q, k, grid=grid, block_q=32, block_k=16, **options.get(name, {}))
        counts = plan.mask.dense.expand(2, 2, -1, -1).sum(-1)
        best = O.best_mass_plan(q, k, counts, block_q=32, block_k=16, perm=plan.perm, k_perm=plan.k_perm)
        assert torch.equal(best.mask.dense.sum(-1), counts)
        assert _exact_kept_mass(q, k, best) >= _exact_kept_mass(q, k, plan) - 1e-12, name


def test_oracle_variant_in_compare(captured):
    """The oracle variants skip the bisection (their count is exact), keep more of the captured
    mass than tiled Top-k at the same count, and are marked as no method."""
    hybrid = C.default_variants(["hybrid"], math.prod(GRID))[1]
    with O.registered():
        tiled = C.oracle_variants(["tiled"])[0]
        value, achieved = C.calibrate(tiled, 0.8, captured, GRID, block_q=128, block_k=64)
        assert achieved == pytest.approx(1 - 3 / 16) and value == pytest.approx(3 / 16)
        assert C._plan_sparsity(tiled, value, captured, GRID, 128, 64) == pytest.approx(achieved)
        mass, bound = C.kept_mass(tiled, value, captured, GRID, block_q=128, block_k=64, rows=1024)
        h_mass, h_bound = C.kept_mass(hybrid, value, captured, GRID, block_q=128, block_k=64, rows=1024)
    assert h_mass - 1e-6 <= mass <= bound + 1e-6 and bound == pytest.approx(h_bound)
    assert tiled.is_oracle and not hybrid.is_oracle
    assert O.ORACLE not in vidsparse.maskers.available()  # registered only inside the context


# ------------------------------------------------------------------------------ block shape
def test_the_block_shape_reaches_every_plan_of_a_run():
    """A run at 64 x 32 blocks (the tiny model, one item): calibration, the patched model and
    the oracle all use them; at equal sparsity the oracle keeps at least the predictor's mass."""
    from vidsparse.tiny.model import load_tiny_wan

    model = load_tiny_wan()
    model.blocks = model.blocks[:1]  # one trained layer is enough here (5x faster)
    variants = C.default_variants(["hybrid"], 4096)[1:] + C.oracle_variants(["tiled"])
    settings = C.Settings(clips=1, num_t=1, samples=0, steps=1, batch_size=1, seed=0, capture_clips=1,
                          block_q=64, block_k=32)
    with torch.no_grad():
        result = C.compare(model, variants, [0.9], settings, device=torch.device("cpu"), progress=False)
    hybrid, best = result["rows"]
    for row in (hybrid, best):
        assert (row["config"]["block_q"], row["config"]["block_k"]) == (64, 32)
        assert abs(row["sparsity"] - 0.9) < 0.03, row
    assert best["sparsity"] == pytest.approx(1 - 13 / 128, abs=1e-6)  # 4,096 / 32 = 128 key blocks per row
    assert best["kept_mass"] >= hybrid["kept_mass"] - 1e-6
    assert "blocks 64x32" in C.format_table(result)


@pytest.mark.parametrize("value", ["48", "8", "x"])
def test_block_flags_take_powers_of_two_from_16(value, capsys):
    with pytest.raises(SystemExit):
        C._parser().parse_args(["--block-q", value])
    assert "--block-q: expected a power of two >= 16" in capsys.readouterr().err
