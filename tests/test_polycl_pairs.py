"""PolyCL pair selection (nnunet_cl.methods.polycl.pairs): strategies S/O/M, fallbacks, triplets, presence, batches."""
import numpy as np
import pytest
import torch

from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.methods.polycl.pairs import (
    normalize_presence,
    patch_organ_presence,
    organ_class_locations,
    presence_from_class_locations,
    sample_patch_batch,
    sample_triplets,
    strategy_masks,
    valid_anchor_mask,
)

# case 0: organ in 2 of 3 patches; case 1: 1 of 3; case 2: organ-free scan; case 3: unlabeled pool (unknown)
CASES = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
PRESENCE = [True, True, False, 1, 0, 0, 0, 0, None, -1]
PRES = np.array([1, 1, 0, 1, 0, 0, 0, 0, -1, -1])
N = len(CASES)


def _pairs(mask):
    return list(zip(*np.nonzero(mask)))


def test_normalize_presence_accepts_bools_ints_none_and_tensors():
    assert normalize_presence(PRESENCE, N).tolist() == PRES.tolist()
    assert normalize_presence(torch.tensor(PRES), N).tolist() == PRES.tolist()
    assert normalize_presence(np.array(PRESENCE, dtype=object), N).tolist() == PRES.tolist()
    assert normalize_presence(None, 3).tolist() == [-1, -1, -1]
    with pytest.raises(ValueError):
        normalize_presence([1, 0], 3)


@pytest.mark.parametrize("strategy", ["S", "O", "M", "s"])
def test_anchor_never_its_own_positive_or_negative_and_masks_disjoint(strategy):
    pos, neg = strategy_masks(CASES, PRESENCE, strategy)
    assert pos.shape == neg.shape == (N, N) and pos.dtype == bool
    assert not pos.diagonal().any() and not neg.diagonal().any()
    assert not (pos & neg).any()


def test_strategy_S_positives_share_case_negatives_never_do():
    pos, neg = strategy_masks(CASES, PRESENCE, "S")
    for i, j in _pairs(pos):
        assert CASES[i] == CASES[j] and i != j
    for i, j in _pairs(neg):
        assert CASES[i] != CASES[j]
    # complete: every other same-case patch is a positive, every other-case patch a negative
    same = CASES[:, None] == CASES[None, :]
    assert (pos == (same & ~np.eye(N, dtype=bool))).all()
    assert (neg == ~same).all()
    # S ignores presence entirely
    pos2, neg2 = strategy_masks(CASES, None, "S")
    assert (pos2 == pos).all() and (neg2 == neg).all()


def test_strategy_O_flags_match_for_labelled_anchors():
    pos, neg = strategy_masks(CASES, PRESENCE, "O")
    known = np.flatnonzero(PRES >= 0)
    for i in known:
        for j in np.flatnonzero(pos[i]):
            assert PRES[j] == PRES[i] and j != i
        for j in np.flatnonzero(neg[i]):
            assert PRES[j] >= 0 and PRES[j] != PRES[i]
        # complete over known patches, across cases (including the anchor's own case)
        expected_pos = {j for j in known if j != i and PRES[j] == PRES[i]}
        assert set(np.flatnonzero(pos[i])) == expected_pos
    # patch 0 (case 0, organ) has patch 3 (case 1, organ) as positive and its own-case patch 2 as negative
    assert pos[0, 3] and neg[0, 2]


def test_strategy_M_same_case_same_presence_and_organ_free_negatives_from_other_cases():
    pos, neg = strategy_masks(CASES, PRESENCE, "M")
    for i in np.flatnonzero(PRES >= 0):
        for j in np.flatnonzero(pos[i]):
            assert CASES[j] == CASES[i] and PRES[j] == PRES[i] and j != i
        for j in np.flatnonzero(neg[i]):
            assert CASES[j] != CASES[i] and PRES[j] == 0
    # other scans' organ patches are neither positive nor negative for anyone labelled
    assert not pos[0, 3] and not neg[0, 3]
    # patch 3 is the only organ patch of case 1: no M positive
    assert not pos[3].any()
    # the organ-free scan (case 2): positives are its own other patch, negatives other scans' organ-free patches
    assert set(np.flatnonzero(pos[6])) == {7}
    assert set(np.flatnonzero(neg[6])) == {2, 4, 5}


@pytest.mark.parametrize("strategy", ["O", "M"])
def test_unknown_presence_falls_back_to_S_and_never_serves_labelled_anchors(strategy):
    pos, neg = strategy_masks(CASES, PRESENCE, strategy)
    s_pos, s_neg = strategy_masks(CASES, PRESENCE, "S")
    unknown = PRES < 0
    # unknown anchors: exactly the S rows
    assert (pos[unknown] == s_pos[unknown]).all()
    assert (neg[unknown] == s_neg[unknown]).all()
    # labelled anchors: unknown patches are never positives or negatives
    assert not pos[~unknown][:, unknown].any()
    assert not neg[~unknown][:, unknown].any()
    # all unknown -> identical to S
    pos_u, neg_u = strategy_masks(CASES, None, strategy)
    assert (pos_u == s_pos).all() and (neg_u == s_neg).all()


def test_scan_without_organ_under_M_without_any_valid_negative_is_not_a_valid_anchor():
    # case 0 has the organ everywhere, case 1 is organ-free; under M case 1's negatives must be organ-free
    # patches of *other* scans, and there are none -> case 1 anchors are skipped, case 0 anchors are fine.
    cases = [0, 0, 1, 1]
    pres = [1, 1, 0, 0]
    pos, neg = strategy_masks(cases, pres, "M")
    valid = valid_anchor_mask(pos, neg)
    assert valid.tolist() == [True, True, False, False]
    a, p, n = sample_triplets(cases, pres, "M", np.random.default_rng(0))
    assert a.tolist() == [0, 1] and p.tolist() == [1, 0]
    assert set(n.tolist()) <= {2, 3}


def test_invalid_strategy():
    with pytest.raises(ValueError):
        strategy_masks(CASES, PRESENCE, "X")


@pytest.mark.parametrize("strategy", ["S", "O", "M"])
@pytest.mark.parametrize("max_tries", [None, 3])
def test_sample_triplets_respects_masks_and_is_deterministic(strategy, max_tries):
    pos, neg = strategy_masks(CASES, PRESENCE, strategy)
    valid = valid_anchor_mask(pos, neg)
    a, p, n = sample_triplets(CASES, PRESENCE, strategy, np.random.default_rng(123), max_tries=max_tries)
    assert a.dtype == p.dtype == n.dtype == np.int64
    assert len(a) == len(p) == len(n) <= N
    assert len(set(a.tolist())) == len(a)  # each anchor at most once
    for i, j, k in zip(a, p, n):
        assert valid[i] and pos[i, j] and neg[i, k] and j != i
    if max_tries is None:  # exact draw: every valid anchor is kept, the others skipped
        assert a.tolist() == np.flatnonzero(valid).tolist()
    again = sample_triplets(CASES, PRESENCE, strategy, np.random.default_rng(123), max_tries=max_tries)
    for x, y in zip((a, p, n), again):
        assert x.tolist() == y.tolist()


def test_sample_triplets_skips_anchors_without_pair_and_varies_with_seed():
    # case 2 has a single patch: no S positive -> skipped
    cases = [0, 0, 1, 1, 2]
    a, _, _ = sample_triplets(cases, None, "S", np.random.default_rng(0))
    assert 4 not in a.tolist() and len(a) == 4
    big = np.repeat(np.arange(8), 4)
    draws = {tuple(sample_triplets(big, None, "S", np.random.default_rng(s))[2].tolist()) for s in range(5)}
    assert len(draws) > 1
    # paper-style rejection with a single try loses anchors but never returns an invalid pair
    a1, p1, n1 = sample_triplets(big, None, "S", np.random.default_rng(0), max_tries=1)
    assert len(a1) < len(big)
    assert all(big[i] == big[j] and big[i] != big[k] for i, j, k in zip(a1, p1, n1))
    with pytest.raises(ValueError):
        sample_triplets(big, None, "S", np.random.default_rng(0), max_tries=0)


def test_patch_organ_presence():
    seg = np.zeros((1, 4, 4, 4), dtype=np.int16)
    seg[0, 0, 0, 0] = -1  # nnU-Net padding never counts
    assert patch_organ_presence(seg) is False
    seg[0, 1, 2, 3] = 2
    assert patch_organ_presence(seg) is True
    assert patch_organ_presence(seg, 2) is True
    assert patch_organ_presence(seg, [1]) is False
    assert patch_organ_presence(torch.from_numpy(seg), (1, 2)) is True


def test_presence_from_class_locations():
    locs = {
        1: np.array([[0, 10, 10, 10], [0, 50, 50, 50]]),
        2: np.array([[0, 5, 5, 5]]),
        (1, 2): np.array([[0, 70, 70, 70]]),
        3: [],  # nnU-Net stores [] for classes absent from the case
    }
    bbox = [[0, 20], [0, 20], [0, 20]]
    assert presence_from_class_locations(locs, bbox, 1)
    assert presence_from_class_locations(locs, bbox, [2])
    assert presence_from_class_locations(locs, bbox, None)
    assert not presence_from_class_locations(locs, bbox, 3)
    # upper bound exclusive, lower inclusive
    assert not presence_from_class_locations(locs, [[0, 10], [0, 20], [0, 20]], 1)
    assert presence_from_class_locations(locs, [[10, 11], [10, 11], [10, 11]], 1)
    # negative lower bounds (padding) work; region keys count when they share a label
    assert presence_from_class_locations(locs, [[60, 80], [60, 80], [60, 80]], 2)
    assert not presence_from_class_locations(locs, [[-10, 4], [-10, 4], [-10, 4]], None)
    assert not presence_from_class_locations({}, bbox, 1)
    assert not presence_from_class_locations(None, bbox, 1)
    with pytest.raises(ValueError):
        presence_from_class_locations(locs, [[0, 20], [0, 20]], 1)
    # with an ignore label nnU-Net adds the annotated area under (-1, *labels): not an organ
    annotated = {0: np.array([[0, 1, 1, 1]]), (-1, 0, 1): np.array([[0, 1, 1, 1]])}
    assert not presence_from_class_locations(annotated, bbox, None)


def test_organ_locations_skip_background_empty_and_annotated_key():
    locs = {0: np.ones((3, 4)), 1: np.ones((2, 4)), 2: np.zeros((0, 4)), (-1, 0, 1, 2): np.ones((5, 4)),
            3: np.ones((1, 4))}
    assert set(organ_class_locations(locs)) == {1, 3}
    assert set(organ_class_locations(locs, [3])) == {3} and set(organ_class_locations(locs, 2)) == set()
    assert organ_class_locations(None) == {}


def test_sample_patch_batch_gives_S_positives_and_negatives():
    cases = [f"case_{i}" for i in range(10)]
    batch = sample_patch_batch(cases, n_cases=4, patches_per_case=3, rng=np.random.default_rng(7))
    assert len(batch) == 12
    assert len(set(batch)) == 4 and all(0 <= c < 10 for c in batch)
    assert all(batch.count(c) == 3 for c in set(batch))
    pos, neg = strategy_masks(batch, None, "S")
    assert valid_anchor_mask(pos, neg).all()
    assert batch == sample_patch_batch(10, 4, 3, np.random.default_rng(7))


def test_sample_patch_batch_with_few_cases_keeps_batch_size():
    batch = sample_patch_batch(3, n_cases=4, patches_per_case=2, rng=np.random.default_rng(0))
    assert len(batch) == 8 and sorted(set(batch)) == [0, 1, 2]
    assert min(batch.count(c) for c in set(batch)) >= 2


@pytest.mark.parametrize("args", [(1, 2, 2), (5, 1, 2), (5, 2, 1)])
def test_sample_patch_batch_errors(args):
    cases, n_cases, ppc = args
    with pytest.raises(NnUNetCLError):
        sample_patch_batch(cases, n_cases, ppc, np.random.default_rng(0))
