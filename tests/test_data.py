"""The synthetic shapes dataset: determinism, splits, value ranges, conditioning, embedding, captions."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidsparse.tiny.data import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    SPLIT_VOCAB,
    Conditions,
    ShapesConfig,
    conditions_from_text,
    describe,
    embed,
    make_batch,
    render,
    sample_conditions,
)
from vidsparse.tiny import data as shapes_mod

SMALL = ShapesConfig(frames=4, size=16, text_dim=32)


def test_same_seed_gives_identical_clips():
    v1, e1, c1 = make_batch(6, seed=3, split="train", start=10, config=SMALL)
    v2, e2, c2 = make_batch(6, seed=3, split="train", start=10, config=SMALL)
    assert torch.equal(v1, v2) and torch.equal(e1, e2)
    for f in ("shape", "colour", "motion", "background", "key"):
        assert torch.equal(getattr(c1, f), getattr(c2, f))


def test_clip_does_not_depend_on_its_batch():
    # counter-based randomness: clip i is the same whether drawn alone or inside a bigger batch
    big, _, _ = make_batch(8, seed=1, start=0, config=SMALL)
    part, _, _ = make_batch(3, seed=1, start=4, config=SMALL)
    assert torch.equal(big[4:7], part)


def test_seeds_and_splits_give_different_clips():
    base, _, cb = make_batch(8, seed=0, split="train", config=SMALL)
    other_seed, _, _ = make_batch(8, seed=1, split="train", config=SMALL)
    val, _, cv = make_batch(8, seed=0, split="val", config=SMALL)
    assert not torch.equal(base, other_seed)
    assert not torch.equal(base, val)
    # disjoint key streams: no train key among the first val keys
    train_keys = {tuple(k) for k in sample_conditions(2000, seed=0, split="train").key.tolist()}
    val_keys = {tuple(k) for k in sample_conditions(2000, seed=0, split="val").key.tolist()}
    assert not train_keys & val_keys


def test_shapes_dtype_and_range():
    cfg = ShapesConfig()
    video, emb, cond = make_batch(3, config=cfg)
    assert video.shape == (3, 3, 16, 64, 64) and video.dtype == torch.float32
    assert emb.shape == (3, cfg.seq_len, cfg.text_dim) == (3, 7, 128)
    assert torch.isfinite(video).all()
    assert video.min() >= -1 and video.max() <= 1
    assert video.std() > 0.1  # not blank
    # things move: consecutive frames differ
    assert (video[:, :, 1:] - video[:, :, :-1]).abs().mean() > 1e-3
    small, _, _ = make_batch(2, config=SMALL)
    assert small.shape == (2, 3, 4, 16, 16)


def _with(cond: Conditions, **changes) -> Conditions:
    return dataclasses.replace(cond, **changes)


def test_each_attribute_changes_the_rendering():
    cond = conditions_from_text(["red disc bouncing, blue square orbiting, striped background"], config=SMALL)
    base = render(cond, config=SMALL)
    variants = {
        "shape": _with(cond, shape=torch.tensor([[2, 1]])),
        "colour": _with(cond, colour=torch.tensor([[3, 2]])),
        "motion": _with(cond, motion=torch.tensor([[1, 1]])),
        "background": _with(cond, background=torch.tensor([3])),
        "absent object": _with(cond, shape=torch.tensor([[0, -1]]), colour=torch.tensor([[0, -1]]), motion=torch.tensor([[0, -1]])),
        "key": _with(cond, key=cond.key + 1),
    }
    for name, variant in variants.items():
        assert (render(variant, config=SMALL) - base).abs().max() > 0.1, name


def test_object_colour_is_rendered():
    cond = conditions_from_text("red disc bouncing, gradient background")
    video = render(cond)  # (1, 3, T, H, W)
    r, g, b = video[0]
    redness = r - torch.maximum(g, b)
    assert redness.amax() > 1.0  # saturated red pixels exist; the muted backgrounds never get there
    background_only = render(_with(cond, shape=torch.tensor([[-1, -1]]), colour=torch.tensor([[-1, -1]]), motion=torch.tensor([[-1, -1]])))
    bo_r, bo_g, bo_b = background_only[0]
    assert (bo_r - torch.maximum(bo_g, bo_b)).amax() < 0.6


def test_attribute_distribution_per_split():
    n = 3000
    for split in ("train", "val", "shifted"):
        c = sample_conditions(n, seed=0, split=split)
        vocab = SPLIT_VOCAB[split]
        present = c.shape >= 0
        assert present[:, 0].all()  # at least one object
        counts = c.num_objects.bincount(minlength=3)
        assert counts[1] > n / 3 and counts[2] > n / 3
        assert set(c.shape[present].tolist()) == set(vocab["shape"])
        assert set(c.colour[present].tolist()) == set(vocab["colour"])
        assert set(c.motion[present].tolist()) == set(vocab["motion"])
        assert set(c.background.tolist()) == set(vocab["background"])
        two = present[:, 1]
        assert (c.colour[two, 0] != c.colour[two, 1]).all()  # objects of a clip differ in colour
        assert (c.shape[~present] == -1).all() and (c.colour[~present] == -1).all()


def test_shifted_split_is_a_distribution_shift():
    for kind in ("colour", "motion", "background"):
        assert not set(SPLIT_VOCAB["train"][kind]) & set(SPLIT_VOCAB["shifted"][kind]), kind
    assert SPLIT_VOCAB["train"]["shape"] == SPLIT_VOCAB["shifted"]["shape"]
    # the pixel statistics move too: mean hue of object pixels differs between the palettes
    train, _, _ = make_batch(64, split="train", config=SMALL)
    shifted, _, _ = make_batch(64, split="shifted", config=SMALL)
    assert not torch.allclose(train.mean((0, 2, 3, 4)), shifted.mean((0, 2, 3, 4)), atol=0.02)


def test_embedding_tokens():
    cfg = SMALL
    cond = conditions_from_text(
        ["red disc bouncing, blue square orbiting, striped background", "red disc bouncing, striped background"], config=cfg
    )
    emb = embed(cond, config=cfg)
    assert emb.shape == (2, 7, 32) and emb.dtype == torch.float32
    assert torch.equal(emb[0, :4], emb[1, :4])  # same background and first object
    assert (emb[1, 4:] == 0).all() and (emb[0, 4:] != 0).any()  # absent object -> zero padding
    # a token carries its position: the same attribute in another slot embeds differently
    swapped = dataclasses.replace(cond[0], shape=torch.tensor([[1, 0]]), colour=torch.tensor([[2, 0]]), motion=torch.tensor([[1, 0]]))
    assert not torch.equal(embed(swapped, config=cfg)[0, 1:4], emb[0, 4:7])
    # fixed vectors: independent of the call, of the batch and of the dataset seed
    assert torch.equal(embed(cond, config=cfg), emb)
    assert embed(cond, config=cfg, dtype=torch.float16).dtype == torch.float16
    assert not torch.equal(embed(cond, config=cfg.replace(embed_seed=1)), emb)


def test_describe_and_parse_round_trip():
    cond = sample_conditions(50, seed=5, split="shifted")
    text = describe(cond)
    back = conditions_from_text(text)
    for f in ("shape", "colour", "motion", "background"):
        assert torch.equal(getattr(back, f), getattr(cond, f)), f
    assert describe(conditions_from_text("Red Disc Bouncing,  checkered background")) == ["red disc bouncing, checkered background"]
    assert text[0].endswith(" background")


@pytest.mark.parametrize(
    "text, word",
    [
        ("red disc bouncing", "background"),
        ("red blob bouncing, striped background", "blob"),
        ("ochre disc bouncing, striped background", "ochre"),
        ("red disc flying, striped background", "flying"),
        ("red disc bouncing, plaid background", "plaid"),
        ("red disc, striped background", "red disc"),
        ("red disc bouncing, blue disc bouncing, green disc bouncing, striped background", "1..2 objects"),
    ],
)
def test_parse_errors_name_the_problem(text, word):
    with pytest.raises(ValueError, match=word):
        conditions_from_text(text)


def test_argument_errors():
    with pytest.raises(ValueError, match="split"):
        sample_conditions(2, split="test")
    with pytest.raises(ValueError, match="n must"):
        sample_conditions(0)
    with pytest.raises(ValueError, match="seed"):
        sample_conditions(2, seed=-1)
    with pytest.raises(ValueError, match="start"):
        sample_conditions(2, start=-3)
    with pytest.raises(ValueError, match="max_objects"):
        render(sample_conditions(2), config=ShapesConfig(max_objects=3))
    with pytest.raises(ValueError, match="frames"):
        ShapesConfig(frames=0)
    with pytest.raises(ValueError, match="max_objects"):
        ShapesConfig(max_objects=7)
    good = sample_conditions(2)
    with pytest.raises(ValueError, match="out of range"):
        dataclasses.replace(good, shape=torch.full_like(good.shape, 9))
    with pytest.raises(ValueError, match="out of range"):  # colour missing for a present object
        dataclasses.replace(good, colour=torch.full_like(good.colour, -1))
    with pytest.raises(ValueError, match="key"):
        Conditions(*(torch.zeros(2, 2, dtype=torch.long) for _ in range(3)), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


def test_vocabulary_is_consistent():
    assert len(shapes_mod.PATHS) == len(MOTIONS) and len(shapes_mod._BACKGROUND_FNS) == len(BACKGROUNDS)
    assert len(SHAPES) == 4 and len(COLOURS) == 14
    for split, vocab in SPLIT_VOCAB.items():
        assert max(vocab["colour"]) < len(COLOURS) and max(vocab["motion"]) < len(MOTIONS), split


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_hash_multiply_is_exact_mod_2_32(x, c):
    # the split multiply must equal true 32-bit wrap-around, with no int64 overflow on any device
    assert int(shapes_mod._mul32(torch.tensor([x]), c)[0]) == (x * c) % 2**32
    assert shapes_mod._mul32(x, c) == (x * c) % 2**32


def test_hash_uniforms_look_uniform():
    keys = shapes_mod._clip_keys(0, 1, torch.arange(4096))
    u = shapes_mod._uniform(keys, 7, 16)
    assert u.min() >= 0 and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.003
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    assert (hist - 1 / 16).abs().max() < 0.01
    assert abs(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1]) < 0.05
