"""Patterns parse and give masks of exactly the promised shape and count."""
import pytest
import torch

from sparseq.prune.patterns import (Pattern, count_pruned, global_masks_from_scores,
                                    mask_from_scores, parse_pattern)


def test_parse_pattern_forms():
    assert parse_pattern("unstructured") == Pattern("unstructured")
    assert parse_pattern("2:4") == Pattern("n:m", n=2, m=4)
    assert parse_pattern(" 4:8 ").fixed_sparsity == 0.5
    assert parse_pattern((4, 8)) == Pattern("block", block=(4, 8))
    assert parse_pattern([1, 16]).block == (1, 16)


@pytest.mark.parametrize("bad", ["random", "2:2", "0:4", "3:", (0, 4), (2, 2, 2), (2.0, 4), (True, 4)])
def test_parse_pattern_rejects_malformed(bad):
    with pytest.raises(ValueError):
        parse_pattern(bad)


def test_parse_pattern_rejects_other_types():
    with pytest.raises(TypeError, match="sparsity pattern must be"):
        parse_pattern(4)


def test_unstructured_mask_has_exact_count_and_keeps_the_highest_scores():
    scores = torch.arange(20.0).reshape(4, 5)
    keep = mask_from_scores(scores, 0.35, "unstructured")
    assert int((~keep).sum()) == 7
    assert torch.equal(~keep.flatten(), torch.arange(20) < 7)


def test_ties_are_broken_by_position():
    keep = mask_from_scores(torch.ones(2, 4), 0.5)
    assert torch.equal(keep, torch.tensor([[False] * 4, [True] * 4]))
    per_row = mask_from_scores(torch.ones(2, 4), 0.5, per_row=True)
    assert torch.equal(per_row, torch.tensor([[False, False, True, True]] * 2))


def test_per_row_masks_prune_each_row_alike():
    torch.manual_seed(0)
    keep = mask_from_scores(torch.rand(6, 10), 0.3, per_row=True)
    assert ((~keep).sum(dim=1) == 3).all()


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_n_m_masks_keep_n_of_every_group(pattern, n, m):
    torch.manual_seed(0)
    scores = torch.rand(5, 3 * m)
    keep = mask_from_scores(scores, None, pattern)
    groups_keep = keep.reshape(5, 3, m)
    assert (groups_keep.sum(-1) == n).all()
    groups_scores = scores.reshape(5, 3, m)
    # Every kept score in a group is at least every pruned score of that group.
    kept_min = torch.where(groups_keep, groups_scores, torch.inf).amin(-1)
    pruned_max = torch.where(groups_keep, -torch.inf, groups_scores).amax(-1)
    assert (kept_min >= pruned_max).all()


def test_n_m_sparsity_argument_must_match():
    assert mask_from_scores(torch.rand(2, 8), 0.5, "2:4").sum() == 8
    with pytest.raises(ValueError, match="fixes the sparsity at 0.5"):
        mask_from_scores(torch.rand(2, 8), 0.7, "2:4")


def test_n_m_needs_m_to_divide_the_input_dimension():
    with pytest.raises(ValueError, match="layer 'enc.fc'.*multiple of 4.*6 inputs"):
        mask_from_scores(torch.rand(3, 6), None, "2:4", name="enc.fc")


def test_block_mask_zeroes_whole_blocks_by_mean_score():
    scores = torch.zeros(4, 6)
    scores[:2, :3] = 10.0  # block (0, 0) highest
    scores[2:, 3:] = 5.0   # block (1, 1) next
    scores[2:, :3] = 1.0   # block (1, 0)
    keep = mask_from_scores(scores, 0.5, (2, 3))
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[:2, :3] = True
    expected[2:, 3:] = True
    assert torch.equal(keep, expected)


def test_ragged_block_masks_are_scored_by_mean_and_reach_the_nearest_count():
    # 5x5 in 2x2 blocks: a 3x3 grid whose right column and bottom row are ragged (2 elements,
    # the corner 1). Each block gets one score; the edge blocks score lowest.
    block_score = torch.tensor([[5.0, 6.0, 0.2], [7.0, 8.0, 0.3], [0.4, 0.5, 0.1]])
    scores = block_score.repeat_interleave(2, 0).repeat_interleave(2, 1)[:5, :5]
    keep = mask_from_scores(scores, 0.4, (2, 2))
    # Target 10 zeros; zeroing blocks lowest first gives 1, 3, 5, 7, 9, then 13: 9 is nearest.
    expected = torch.ones(5, 5, dtype=torch.bool)
    expected[4, :] = False
    expected[:, 4] = False
    assert torch.equal(keep, expected)


def test_block_larger_than_weight_is_refused():
    with pytest.raises(ValueError, match="layer 'w': block \\(8, 2\\) is larger than the weight"):
        mask_from_scores(torch.rand(4, 4), 0.5, (8, 2), name="w")


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_range_is_refused(sparsity):
    with pytest.raises(ValueError, match="sparsity must be in \\[0, 1\\)"):
        mask_from_scores(torch.rand(4, 4), sparsity)


def test_sparsity_of_wrong_type_or_missing_is_refused():
    with pytest.raises(TypeError, match="sparsity must be a number"):
        mask_from_scores(torch.rand(4, 4), "0.5")
    with pytest.raises(ValueError, match="sparsity in \\[0, 1\\) is required"):
        mask_from_scores(torch.rand(4, 4), None)


def test_global_masks_rank_layers_together():
    scores = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([[0.5, 5.0]])}
    masks = global_masks_from_scores(scores, 0.5, "unstructured")
    assert torch.equal(masks["a"], torch.tensor([[False, False], [True, True]]))
    assert torch.equal(masks["b"], torch.tensor([[False, True]]))
    assert count_pruned(0.5, 6) == 3


def test_global_block_masks_rank_blocks_of_all_layers():
    scores = {"a": torch.tensor([[1.0, 1.0], [9.0, 9.0]]), "b": torch.tensor([[2.0, 2.0], [0.0, 0.0]])}
    masks = global_masks_from_scores(scores, 0.5, (1, 2))
    assert torch.equal(masks["a"], torch.tensor([[False, False], [True, True]]))
    assert torch.equal(masks["b"], torch.tensor([[True, True], [False, False]]))


def test_conv_shaped_scores_are_seen_as_matrices():
    torch.manual_seed(0)
    scores = torch.rand(4, 2, 2, 2)  # in*kh*kw = 8
    keep = mask_from_scores(scores, None, "2:4")
    assert keep.shape == scores.shape
    assert (keep.reshape(4, 2, 4).sum(-1) == 2).all()
