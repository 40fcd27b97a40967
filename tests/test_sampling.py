"""Voxel samplers: bounded counts, masks and ignore labels respected, deterministic under a seed."""
import pytest
import torch

from nnunet_cl.sampling import gather_voxels, sample_voxels, stratified_sample


def _features(b=2, c=3, shape=(6, 7, 5), seed=0):
    return torch.randn(b, c, *shape, generator=torch.Generator().manual_seed(seed))


def test_sample_voxels_counts_and_gathered_values():
    f = _features()
    s = sample_voxels(f, 50, generator=torch.Generator().manual_seed(1))
    assert s.feats.shape == (100, 3) and s.batch_idx.shape == s.voxel_idx.shape == (100,)
    assert torch.equal(torch.bincount(s.batch_idx), torch.tensor([50, 50]))
    for b in range(2):
        vox = s.voxel_idx[s.batch_idx == b]
        assert vox.unique().numel() == vox.numel()  # without replacement
        assert vox.min() >= 0 and vox.max() < 6 * 7 * 5
    # features are those at the returned positions: unravel the flat index by hand
    z, rem = s.voxel_idx // (7 * 5), s.voxel_idx % (7 * 5)
    y, x = rem // 5, rem % 5
    expected = f[s.batch_idx, :, z, y, x]
    assert torch.equal(s.feats, expected)


def test_sample_voxels_n_larger_than_volume_takes_all():
    f = _features(b=1, shape=(2, 3, 2))
    s = sample_voxels(f, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.voxel_idx, torch.arange(12))


def test_sample_voxels_respects_mask_and_bounds():
    f = _features()
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(2, 6, 7, 5, generator=gen) < 0.2
    mask[1] = False
    mask[1, 0, 0, :3] = True  # sample 1 has only 3 allowed voxels
    s = sample_voxels(f, 20, generator=gen, mask=mask)
    counts = torch.bincount(s.batch_idx, minlength=2)
    assert counts[0] == min(20, int(mask[0].sum())) and counts[1] == 3
    assert gather_voxels(mask, s.batch_idx, s.voxel_idx).all()
    # channel-first mask (B, 1, *spatial) is accepted too
    s2 = sample_voxels(f, 20, generator=torch.Generator().manual_seed(2), mask=mask[:, None])
    assert gather_voxels(mask, s2.batch_idx, s2.voxel_idx).all()
    # an empty mask yields nothing and no error
    empty = sample_voxels(f, 20, mask=torch.zeros(2, 6, 7, 5, dtype=torch.bool))
    assert empty.feats.shape == (0, 3)


def test_sample_voxels_deterministic_under_seed_and_keeps_grad():
    f = _features().requires_grad_()
    a = sample_voxels(f, 30, generator=torch.Generator().manual_seed(7))
    b = sample_voxels(f, 30, generator=torch.Generator().manual_seed(7))
    c = sample_voxels(f, 30, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.voxel_idx, b.voxel_idx) and torch.equal(a.feats, b.feats)
    assert not torch.equal(a.voxel_idx, c.voxel_idx)
    a.feats.sum().backward()
    assert f.grad.sum() == a.feats.numel()  # gradient only at the sampled positions, once each


def test_sample_voxels_rejects_bad_mask():
    with pytest.raises(ValueError):
        sample_voxels(_features(), 4, mask=torch.ones(2, 6, 7, dtype=torch.bool))


def test_gather_voxels_labels():
    labels = torch.arange(2 * 3 * 4).view(2, 3, 4)
    got = gather_voxels(labels, torch.tensor([0, 1, 1]), torch.tensor([5, 0, 11]))
    assert torch.equal(got, torch.tensor([5, 12, 23]))


def _labels(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # very unequal label sizes: 0 -> 500 voxels, 1 -> 100, 2 -> 10, 3 -> 2, plus 50 ignored (-1)
    labels = torch.cat([torch.full((n,), lab) for lab, n in [(0, 500), (1, 100), (2, 10), (3, 2), (-1, 50)]])
    return labels[torch.randperm(labels.numel(), generator=gen)]


def test_stratified_per_label_cap_and_ignore():
    labels = _labels()
    idx = stratified_sample(labels, max_per_label=20, generator=torch.Generator().manual_seed(0), ignore_index=-1)
    assert idx.unique().numel() == idx.numel() and torch.equal(idx, idx.sort().values)
    counts = {int(k): int(v) for k, v in zip(*labels[idx].unique(return_counts=True))}
    assert counts == {0: 20, 1: 20, 2: 10, 3: 2}  # cap, cap, all, all; never the ignore label


def test_stratified_total_budget_is_shared_evenly():
    labels = _labels()
    idx = stratified_sample(labels, max_per_label=100, n_total=40, generator=torch.Generator().manual_seed(1),
                            ignore_index=-1)
    assert idx.numel() == 40
    counts = torch.bincount(labels[idx], minlength=4).tolist()
    # water-filling: the two small labels are taken whole, the remaining 28 split 14/14
    assert counts == [14, 14, 10, 2]


def test_stratified_deterministic_and_bounded():
    labels = _labels(3)
    kw = dict(max_per_label=7, n_total=19)
    a = stratified_sample(labels, generator=torch.Generator().manual_seed(5), **kw)
    b = stratified_sample(labels, generator=torch.Generator().manual_seed(5), **kw)
    c = stratified_sample(labels, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.numel() == 19 and torch.bincount(labels[a] + 1).max() <= 7
    assert stratified_sample(labels, max_per_label=0).numel() == 0
    assert stratified_sample(torch.full((5,), -1), 3, ignore_index=-1).numel() == 0
    with pytest.raises(ValueError):
        stratified_sample(labels.view(-1, 2), 3)
