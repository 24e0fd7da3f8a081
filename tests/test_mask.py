"""BlockMask: constructors, the two views and their round trips, accounting, helpers, errors.

Expected values are computed here with plain Python loops over the block map, never by the
code under test.
"""

import pytest
import torch

from vidsparse import BlockMask


def _rand_map(b, h, nqb, nkb, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, nqb, nkb, generator=g) < density


def _rows_of(dense):
    """{(b, h, i): sorted kept key blocks} from a dense map, by loops."""
    b, h, nqb, nkb = dense.shape
    return {
        (bi, hi, i): [j for j in range(nkb) if dense[bi, hi, i, j]]
        for bi in range(b) for hi in range(h) for i in range(nqb)
    }


def _assert_table_matches(mask, dense):
    idx, cnt = mask.kv_indices, mask.kv_counts
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    for (b, h, i), kept in _rows_of(dense).items():
        assert cnt[b, h, i].item() == len(kept)
        assert idx[b, h, i, : len(kept)].tolist() == kept


# ------------------------------------------------------------------------------ constructors
def test_from_dense_4d_builds_index_table():
    dense = _rand_map(2, 3, 4, 7, seed=1)
    m = BlockMask.from_dense(dense, block_q=32, block_k=16, q_len=100, k_len=100)
    assert m.shape == (2, 3, 4, 7)
    assert (m.num_q_blocks, m.num_k_blocks) == (4, 7)
    assert torch.equal(m.dense, dense)
    _assert_table_matches(m, dense)


def test_from_dense_2d_broadcasts_to_one_batch_and_head():
    dense = _rand_map(1, 1, 3, 5, seed=2)[0, 0]
    m = BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=40, k_len=80)
    assert m.shape == (1, 1, 3, 5)
    assert torch.equal(m.dense[0, 0], dense)


def test_from_indices_normalises_unsorted_and_duplicate_entries():
    # width 4 over 5 key blocks; entries past the count are garbage (even out of range)
    idx = torch.tensor([[[[3, 1, 3, -7], [4, 0, 2, 99], [2, 2, 2, 2]]]], dtype=torch.int64)
    cnt = torch.tensor([[[3, 3, 4]]], dtype=torch.int64)
    m = BlockMask.from_indices(idx, cnt, block_q=16, block_k=16, q_len=48, k_len=80)
    expected = torch.zeros(1, 1, 3, 5, dtype=torch.bool)
    for i, row in enumerate(idx[0, 0].tolist()):
        for j in row[: cnt[0, 0, i]]:
            expected[0, 0, i, j] = True
    assert torch.equal(m.dense, expected)
    assert m.kv_counts[0, 0].tolist() == [2, 3, 1]  # duplicates removed
    assert m.kv_indices[0, 0, 0, :2].tolist() == [1, 3]
    assert m.kv_indices[0, 0, 1, :3].tolist() == [0, 2, 4]
    assert m.kv_indices[0, 0, 2, :1].tolist() == [2]


def test_full_keeps_every_block():
    m = BlockMask.full(block_q=32, block_k=16, q_len=70, k_len=33, batch=2, heads=3)
    assert m.shape == (2, 3, 3, 3)
    assert bool(m.dense.all())
    assert m.kv_counts.unique().tolist() == [3]
    assert m.sparsity() == 0.0 and m.sparsity(token_weighted=True) == 0.0
    assert m.device == torch.device("cpu")


# --------------------------------------------------------------------------------- round trips
def test_dense_to_indices_to_dense_round_trip():
    dense = _rand_map(2, 2, 5, 9, density=0.3, seed=3)
    dense[0, 0, 0] = False  # an empty row survives the trip
    m = BlockMask.from_dense(dense, block_q=16, block_k=32, q_len=80, k_len=280)
    back = BlockMask.from_indices(m.kv_indices, m.kv_counts, block_q=16, block_k=32, q_len=80, k_len=280)
    assert torch.equal(back.dense, dense)
    assert torch.equal(back.kv_counts, m.kv_counts)
    assert back.kv_counts[0, 0, 0].item() == 0


def test_transposed_table_lists_query_blocks_per_key_block():
    dense = _rand_map(2, 1, 6, 4, density=0.4, seed=4)
    m = BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=96, k_len=64)
    assert m.q_indices.shape == (2, 1, 4, 6) and m.q_counts.shape == (2, 1, 4)
    for b in range(2):
        for j in range(4):
            kept = [i for i in range(6) if dense[b, 0, i, j]]
            assert m.q_counts[b, 0, j].item() == len(kept)
            assert m.q_indices[b, 0, j, : len(kept)].tolist() == kept


def test_counts_equal_row_sums():
    dense = _rand_map(1, 2, 3, 11, density=0.6, seed=5)
    m = BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=48, k_len=176)
    expected = [[[sum(bool(x) for x in row) for row in head] for head in batch] for batch in dense.tolist()]
    assert m.kv_counts.tolist() == expected


# ---------------------------------------------------------------------------------- sparsity
def test_sparsity_by_hand_with_tail_blocks():
    # 40 tokens in blocks of 32: sizes (32, 8) on both axes. Keep only block (0, 0).
    dense = torch.tensor([[True, False], [False, False]])
    m = BlockMask.from_dense(dense, block_q=32, block_k=32, q_len=40, k_len=40)
    assert m.sparsity() == pytest.approx(0.75)  # 1 of 4 block pairs
    assert m.sparsity(token_weighted=True) == pytest.approx(1 - 32 * 32 / (40 * 40))  # 0.36
    assert m.density() == pytest.approx(0.25)
    assert m.density(token_weighted=True) == pytest.approx(0.64)


def test_sparsity_random_against_token_count():
    b, h, q_len, k_len, bq, bk = 2, 3, 150, 90, 32, 16
    dense = _rand_map(b, h, 5, 6, density=0.45, seed=6)
    m = BlockMask.from_dense(dense, block_q=bq, block_k=bk, q_len=q_len, k_len=k_len)
    kept_pairs = sum(bool(x) for x in dense.flatten().tolist())
    assert m.sparsity() == pytest.approx(1 - kept_pairs / dense.numel(), abs=1e-6)
    # token level: expand each block to its real size, count kept score entries per (b, h)
    qs = [min(bq, q_len - i * bq) for i in range(5)]
    ks = [min(bk, k_len - j * bk) for j in range(6)]
    per_bh = []
    for bi in range(b):
        for hi in range(h):
            kept = sum(qs[i] * ks[j] for i in range(5) for j in range(6) if dense[bi, hi, i, j])
            per_bh.append(kept / (q_len * k_len))
    assert m.sparsity(token_weighted=True) == pytest.approx(1 - sum(per_bh) / len(per_bh), abs=1e-6)
    per_head = m.per_head_sparsity()
    for bi in range(b):
        for hi in range(h):
            assert per_head[bi, hi].item() == pytest.approx(1 - dense[bi, hi].float().mean().item())


# ------------------------------------------------------------------------ broadcasting, tokens
def test_expand_broadcasts_and_rejects_incompatible():
    dense = _rand_map(1, 1, 2, 3, seed=7)
    m = BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=32, k_len=48)
    e = m.expand(2, 4)
    assert e.shape == (2, 4, 2, 3)
    for b in range(2):
        for h in range(4):
            assert torch.equal(e.dense[b, h], dense[0, 0])
    _assert_table_matches(e, e.dense)
    assert m.expand(1, 1) is m
    m2 = BlockMask.from_dense(_rand_map(2, 1, 2, 3, seed=8), block_q=16, block_k=16, q_len=32, k_len=48)
    with pytest.raises(ValueError, match=r"batch=2, heads=1 cannot broadcast to \(3, 1\)"):
        m2.expand(3, 1)


def test_token_mask_matches_block_lookup():
    dense = _rand_map(2, 1, 3, 4, seed=9)
    m = BlockMask.from_dense(dense, block_q=16, block_k=32, q_len=40, k_len=100)
    tm = m.token_mask()
    assert tm.shape == (2, 1, 40, 100) and tm.dtype == torch.bool
    for b in range(2):
        for r in range(40):
            for c in range(100):
                assert tm[b, 0, r, c].item() == dense[b, 0, r // 16, c // 32].item()
    assert torch.equal(m.token_mask(slice(17, 35)), tm[:, :, 17:35])


def test_to_device_keeps_the_map():
    dense = _rand_map(1, 2, 2, 2, seed=10)
    m = BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=20, k_len=30).to("cpu")
    assert torch.equal(m.dense, dense) and (m.q_len, m.k_len) == (20, 30)


# ----------------------------------------------------------------------------- render / repr
def test_render_draws_one_head():
    dense = torch.tensor([[[[True, False, True], [False, False, True]]], [[[False, True, False], [True, True, True]]]])
    m = BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=32, k_len=48)
    assert m.render() == "#.#\n..#"
    assert m.render(batch=1) == ".#.\n###"


def test_render_downsamples_with_any_kept():
    dense = torch.zeros(4, 4, dtype=torch.bool)
    dense[0, 1] = True  # only the top-left 2x2 cell has a kept block
    dense[3, 3] = True  # and the bottom-right one
    m = BlockMask.from_dense(dense, block_q=16, block_k=16, q_len=64, k_len=64)
    assert m.render(max_rows=2, max_cols=2) == "#.\n.#"


def test_repr_reports_shape_and_sparsity():
    dense = torch.tensor([[True, False, False, False], [True, True, False, False]])
    m = BlockMask.from_dense(dense, block_q=32, block_k=16, q_len=50, k_len=64)
    r = repr(m)
    assert "block=(32, 16)" in r and "q_len=50" in r and "k_len=64" in r
    assert "B=1, H=1, NQB=2, NKB=4" in r
    assert "sparsity=0.625" in r  # 5 of 8 pairs skipped


# -------------------------------------------------------------------------- FlexAttention bridge
def test_to_flex_from_flex_round_trip_with_tails():
    dense = _rand_map(2, 3, 3, 5, density=0.5, seed=11)
    m = BlockMask.from_dense(dense, block_q=64, block_k=32, q_len=150, k_len=130)
    fm = m.to_flex()
    assert tuple(fm.BLOCK_SIZE) == (64, 32)
    assert tuple(fm.seq_lengths) == (150, 130)
    assert torch.equal(fm.to_dense().bool(), dense)
    back = BlockMask.from_flex(fm)
    assert (back.block_q, back.block_k, back.q_len, back.k_len) == (64, 32, 150, 130)
    assert torch.equal(back.dense, dense)


def test_to_flex_mask_mod_reproduces_the_token_mask():
    # eager flex_attention applies only mask_mod, so it must say the same as the block map
    dense = _rand_map(2, 1, 2, 3, seed=12)
    m = BlockMask.from_dense(dense, block_q=16, block_k=32, q_len=30, k_len=70)
    mod = m.to_flex().mask_mod
    tm = m.token_mask()
    for b in range(2):
        for h in range(3):  # h beyond the mask's single head broadcasts
            for r in range(0, 30, 3):
                for c in range(0, 70, 7):
                    got = mod(torch.tensor(b), torch.tensor(h), torch.tensor(r), torch.tensor(c))
                    assert bool(got) == bool(tm[b, 0, r, c])


def test_to_flex_pads_a_narrow_table():
    # our own maskers may hand over a table narrower than NKB; FlexAttention reads NKB from its width
    idx = torch.tensor([[[[2], [0]]]], dtype=torch.int32)
    cnt = torch.tensor([[[1, 1]]], dtype=torch.int32)
    m = BlockMask(block_q=16, block_k=16, q_len=32, k_len=64, kv_indices=idx, kv_counts=cnt, _kv_normalised=True)
    fm = m.to_flex()
    expected = torch.tensor([[[[False, False, True, False], [True, False, False, False]]]])
    assert torch.equal(fm.to_dense().bool(), expected)
    # the transposed (query-block) table FlexAttention's backward uses is right too
    assert fm.full_q_num_blocks[0, 0].tolist() == [1, 0, 1, 0]


def test_from_flex_of_a_causal_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    fm = create_block_mask(lambda b, h, q, k: q >= k, None, None, 256, 256, device="cpu", BLOCK_SIZE=(128, 64))
    m = BlockMask.from_flex(fm)
    # block (i, j) holds some causal pair iff its first key precedes its last query
    expected = torch.tensor([[j * 64 <= (i + 1) * 128 - 1 for j in range(4)] for i in range(2)])
    assert torch.equal(m.dense[0, 0], expected)
    assert (m.block_q, m.block_k) == (128, 64)


# -------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [8, 48, 100, 0, -16, 15])
def test_block_size_must_be_power_of_two_at_least_16(bad):
    with pytest.raises(ValueError, match=rf"block_q must be a power of two >= 16, got {bad}"):
        BlockMask.full(block_q=bad, block_k=16, q_len=32, k_len=32)
    with pytest.raises(ValueError, match=rf"block_k must be a power of two >= 16, got {bad}"):
        BlockMask.from_dense(torch.ones(1, 1, dtype=torch.bool), block_q=16, block_k=bad, q_len=16, k_len=16)


@pytest.mark.parametrize("bad", [32.0, True, "32"])
def test_block_size_must_be_int(bad):
    with pytest.raises(TypeError, match="block_q must be an int"):
        BlockMask.full(block_q=bad, block_k=16, q_len=32, k_len=32)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_lengths_must_be_positive_ints(bad):
    with pytest.raises(ValueError, match="k_len must be a positive int"):
        BlockMask.full(block_q=16, block_k=16, q_len=16, k_len=bad)


def test_from_dense_rejects_non_bool_maps():
    probs = torch.softmax(torch.randn(1, 1, 2, 2), -1)  # would silently become all-True
    with pytest.raises(TypeError, match="dense block map must be torch.bool, got torch.float32"):
        BlockMask.from_dense(probs, block_q=16, block_k=16, q_len=32, k_len=32)
    with pytest.raises(TypeError, match="must be torch.bool, got torch.int64"):
        BlockMask.from_dense(torch.ones(2, 2, dtype=torch.long), block_q=16, block_k=16, q_len=32, k_len=32)
    with pytest.raises(TypeError, match="block_map must be a torch.Tensor, got list"):
        BlockMask.from_dense([[True]], block_q=16, block_k=16, q_len=16, k_len=16)


@pytest.mark.parametrize("shape", [(1, 1, 3, 2), (1, 1, 2, 3), (3, 2), (1, 2, 2)])
def test_from_dense_rejects_wrong_shapes(shape):
    with pytest.raises(ValueError, match=r"must have shape \(B, H, 2, 2\) for q_len=32, k_len=20"):
        BlockMask.from_dense(torch.ones(shape, dtype=torch.bool), block_q=16, block_k=16, q_len=32, k_len=20)


def _from_idx(idx, cnt, q_len=32, k_len=48):
    return BlockMask.from_indices(idx, cnt, block_q=16, block_k=16, q_len=q_len, k_len=k_len)


def test_from_indices_errors():
    good_idx = torch.zeros(1, 1, 2, 3, dtype=torch.int32)
    good_cnt = torch.ones(1, 1, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="kv_indices and kv_counts must be integer tensors"):
        _from_idx(good_idx.float(), good_cnt)
    with pytest.raises(TypeError, match="kv_indices and kv_counts must be integer tensors"):
        _from_idx(good_idx, good_cnt.float())
    with pytest.raises(ValueError, match=r"kv_indices must have shape \(B, H, 2, W<= 3\), got \(1, 1, 3, 3\)"):
        _from_idx(torch.zeros(1, 1, 3, 3, dtype=torch.int32), torch.ones(1, 1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"kv_indices must have shape \(B, H, 2, W<= 3\), got \(1, 1, 2, 4\)"):
        _from_idx(torch.zeros(1, 1, 2, 4, dtype=torch.int32), good_cnt)
    with pytest.raises(ValueError, match=r"kv_counts must have shape \(1, 1, 2\), got \(1, 2\)"):
        _from_idx(good_idx, good_cnt[0])
    with pytest.raises(ValueError, match="kv_indices needs kv_counts"):
        BlockMask(block_q=16, block_k=16, q_len=32, k_len=48, kv_indices=good_idx)
    with pytest.raises(ValueError, match="needs either dense or kv_indices"):
        BlockMask(block_q=16, block_k=16, q_len=32, k_len=48)


@pytest.mark.parametrize("bad_index", [3, 7, -1])
def test_from_indices_rejects_out_of_range_indices(bad_index):
    idx = torch.tensor([[[[0, 1, 2], [2, bad_index, 0]]]], dtype=torch.int32)
    cnt = torch.tensor([[[3, 2]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv_indices must lie in \[0, 3\) \(key blocks\)"):
        _from_idx(idx, cnt)


@pytest.mark.parametrize("bad_count", [4, -1])
def test_from_indices_rejects_counts_outside_width(bad_count):
    idx = torch.zeros(1, 1, 2, 3, dtype=torch.int32)
    cnt = torch.tensor([[[1, bad_count]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv_counts must lie in \[0, 3\] \(the width of kv_indices\)"):
        _from_idx(idx, cnt)


def test_padding_past_the_count_is_not_validated():
    idx = torch.tensor([[[[1, -5, 99], [2, 0, 1000]]]], dtype=torch.int32)
    cnt = torch.tensor([[[1, 2]]], dtype=torch.int32)
    m = _from_idx(idx, cnt)
    assert m.dense[0, 0].tolist() == [[False, True, False], [True, False, True]]
