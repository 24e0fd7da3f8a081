"""`vidsparse compare`'s pieces on synthetic queries and keys (the full run needs the tiny model and
minutes; the GPU run is in docs/benchmarks.md): calibration reaches the target sparsity, kept mass
is bounded by the token-level selection, reports are written."""

import json
import math

import pytest
import torch

from vidsparse.tiny import compare as C

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
