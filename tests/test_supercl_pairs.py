"""SuperCL's pair generation and losses (nnunet_cl.methods.supercl.pairs / .losses), plain torch on CPU."""
import pytest
import torch

from nnunet_cl.methods.supercl.losses import ilcp_loss, masked_rows_loss
from nnunet_cl.methods.supercl.pairs import average_supervoxel_map, component_mask, grid_labels, position_mask
from nnunet_cl.queues import FifoQueue


def _blocks(b=2, side=16, block=4) -> torch.Tensor:
    """(b, side, side, side) ids of block^3 cubes, 1-based; image i gets ids offset by 1000 * i."""
    k = torch.arange(side) // block
    n = side // block
    ids = 1 + k[:, None, None] * n * n + k[None, :, None] * n + k[None, None, :]
    return torch.stack([ids + 1000 * i for i in range(b)])


def test_grid_labels_reads_the_centres_of_the_feature_voxels():
    labels = torch.arange(16).view(1, 4, 4)
    assert grid_labels(labels, (2, 2)).tolist() == [[[0, 2], [8, 10]]]  # a stride-2 conv's voxel j sees 2j
    # mirrored along the last axis and back: feature voxel j is centred on 2j + 1 there
    assert grid_labels(labels, (2, 2), torch.tensor([[False, True]])).tolist() == [[[1, 3], [9, 11]]]
    with pytest.raises(ValueError, match="does not divide"):
        grid_labels(labels, (3, 2))


@pytest.mark.parametrize("stride", [2, 4])
def test_grid_labels_follow_nnunets_downsampling_in_both_views(stride):
    """A voxel's value read by strided, padded 3^3 convolutions (nnU-Net's downsampling, here with only the
    centre tap) equals the label grid_labels gives, for a plain view and for a view mirrored and mirrored back."""
    from nnunet_cl.views import flip_view, unflip
    conv = torch.nn.Conv3d(1, 1, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1, 1] = 1.0

    def features(x):
        for _ in range(stride // 2):
            x = conv(x)
        return x

    labels = torch.randperm(3 * 16 ** 3).view(3, 16, 16, 16)
    x = labels[:, None].double()
    conv.double()
    grid = (16 // stride,) * 3
    with torch.no_grad():
        assert torch.equal(features(x)[:, 0].long(), grid_labels(labels, grid))
        flipped, flips = flip_view(x, None, torch.Generator().manual_seed(stride), p=0.5)
        assert bool(flips.any()) and not bool(flips.all())
        assert torch.equal(unflip(features(flipped), flips)[:, 0].long(), grid_labels(labels, grid, flips))


def test_asp_returns_piecewise_constant_features_in_mean_mode():
    labels = _blocks(2, 8, 4)
    per_label = torch.randn(3000)
    features = per_label[labels].unsqueeze(1).repeat(1, 5, 1, 1, 1)  # every channel the same piecewise constant
    asp = average_supervoxel_map(features, labels, "mean")
    torch.testing.assert_close(asp, per_label[labels])


def test_asp_area_mode_divides_by_the_whole_map():
    labels = torch.tensor([[[1, 1, 2, 2]]])  # (1, 1, 4)
    feats = torch.tensor([[[2.0, 4.0, 6.0, 10.0]]])
    assert average_supervoxel_map(feats, labels, "mean").tolist() == [[[3.0, 3.0, 8.0, 8.0]]]
    assert average_supervoxel_map(feats, labels, "area").tolist() == [[[1.5, 1.5, 4.0, 4.0]]]
    with pytest.raises(ValueError, match="mode"):
        average_supervoxel_map(feats, labels, "median")


def test_asp_averages_within_each_image_separately():
    labels = torch.ones(2, 4, 4, dtype=torch.long)  # the same id in both images
    feats = torch.stack([torch.zeros(4, 4), torch.ones(4, 4)])
    assert average_supervoxel_map(feats, labels).tolist() == feats.tolist()


def _clusters(n_per=4, centres=3, dim=32, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, dim, generator=g) * 5
    x = c.repeat_interleave(n_per, 0) + spread * torch.randn(centres * n_per, dim, generator=g)
    return x, torch.arange(centres).repeat_interleave(n_per)


def test_ccl_mask_is_an_equivalence_and_keeps_clusters_apart():
    x, cluster = _clusters()
    sample = torch.arange(x.shape[0]) // 2  # nodes (2i, 2i+1) are the two views of sample i
    mask = component_mask(x, sample)
    assert torch.equal(mask, mask.T) and bool(mask.diagonal().all())
    assert bool((mask.float() @ mask.float() > 0).eq(mask).all())  # transitive
    assert bool(mask[sample[:, None] == sample[None, :]].all())  # both views of an image are positives
    same = cluster[:, None] == cluster[None, :]
    assert not bool(mask[~same].any())  # well-separated clusters never join


def test_ccl_joins_views_even_when_they_are_far_apart():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.99, 0.05], [0.05, 0.99]])
    sample = torch.tensor([0, 0, 1, 1])  # sample 0's views point in orthogonal directions
    mask = component_mask(x, sample)
    assert bool(mask.all())  # node 0 - node 2 by similarity, 1 - 3 likewise, 0 - 1 and 2 - 3 as views


def test_ccl_other_samples_only_searches_other_samples():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    sample = torch.tensor([0, 0, 1, 1])
    assert not bool(component_mask(x, sample)[0, 2])  # each node's own other view is its top-1
    assert bool(component_mask(x, sample, other_samples_only=True).all())  # forced to look elsewhere
    with pytest.raises(ValueError, match="sample index"):
        component_mask(x, other_samples_only=True)


def test_ccl_over_samples_keeps_clusters_apart_and_components_small():
    x, cluster = _clusters()
    sample = torch.arange(x.shape[0]) // 2
    mask = component_mask(x, sample, other_samples_only=True)
    assert torch.equal(mask, mask.T) and bool((mask.float() @ mask.float() > 0).eq(mask).all())
    assert bool(mask[sample[:, None] == sample[None, :]].all())
    assert not bool(mask[cluster[:, None] != cluster[None, :]].any())
    # near-copies of the two views of 64 unrelated samples: every sample has another sample as positive, and no
    # giant component (linking each view to another sample's node instead joined all of them)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=g)
    views = base.repeat_interleave(2, 0) + 0.01 * torch.randn(128, 32, generator=g)
    mask = component_mask(views, torch.arange(128) // 2, other_samples_only=True)
    sizes = mask.sum(1)
    assert int(sizes.min()) >= 4 and int(sizes.max()) <= 32, sizes.unique()


def test_position_mask():
    p = torch.tensor([0.0, 0.05, 0.5, 0.58])
    assert position_mask(p, 0.1).tolist() == [[True, True, False, False], [True, True, False, False],
                                               [False, False, True, True], [False, False, True, True]]


def _aligned_views(labels, dim=16, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    proto = torch.randn(int(labels.max()) + 1, dim, generator=g)
    f = proto[labels].movedim(-1, 1)  # (B, dim, *S): voxels of one supervoxel share a prototype
    return f + noise * torch.randn(f.shape, generator=g), f + noise * torch.randn(f.shape, generator=g)


def test_ilcp_is_lower_for_the_true_supervoxels_than_for_shuffled_ones():
    labels = _blocks(2, 16, 4)
    f1, f2 = _aligned_views(labels)
    true = ilcp_loss(f1, f2, labels, n_labels=32, per_label=8, generator=torch.Generator().manual_seed(1))
    shuffled_ids = labels.flatten()[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(2))]
    shuffled = ilcp_loss(f1, f2, shuffled_ids.view_as(labels), n_labels=32, per_label=8,
                         generator=torch.Generator().manual_seed(1))
    assert float(true) < 0.5 * float(shuffled), (float(true), float(shuffled))


def test_ilcp_reads_view_2_with_its_own_labels():
    """View 2's features follow a map shifted by 2 voxels (a mirrored view's offset): with that map as labels2 the
    loss is lower than when view 1's labels are used for both."""
    labels = _blocks(2, 16, 4)
    shifted = torch.roll(labels, 2, dims=3)
    f1, _ = _aligned_views(labels)
    _, f2 = _aligned_views(shifted)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    own = ilcp_loss(f1, f2, labels, n_labels=32, per_label=8, generator=g(), labels2=shifted)
    same = ilcp_loss(f1, f2, labels, n_labels=32, per_label=8, generator=g())
    assert float(own) < 0.8 * float(same), (float(own), float(same))


def test_ilcp_never_samples_outside_the_body_and_caps_per_supervoxel(monkeypatch):
    import nnunet_cl.methods.supercl.losses as losses
    seen = []
    original = losses.masked_supcon

    def spy(z, labels=None, **kwargs):
        seen.append(labels)
        return original(z, labels=labels, **kwargs)

    monkeypatch.setattr(losses, "masked_supcon", spy)
    labels = _blocks(1, 16, 4)
    labels[:, :8] = 0  # half the patch outside the body
    f1, f2 = _aligned_views(labels)
    ilcp_loss(f1, f2, labels, n_labels=5, per_label=3, generator=torch.Generator().manual_seed(0))
    y = seen[0]
    assert bool((y != 0).all())
    ids, counts = torch.unique(y, return_counts=True)
    assert len(ids) == 5 and bool((counts == 2 * 3).all())  # 5 supervoxels, 3 voxels each, in both views


def test_ilcp_without_any_supervoxel_is_a_zero_on_the_graph():
    f1 = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    loss = ilcp_loss(f1, f1 * 2, torch.zeros(1, 4, 4, 4, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and f1.grad is not None


def test_masked_rows_loss_excludes_the_anchor_own_key():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(6, 8, generator=g)
    pos = torch.zeros(2, 6, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    anchor_key = torch.tensor([0, 1])
    loss = masked_rows_loss(keys[:2], keys, pos | torch.eye(2, 6, dtype=torch.bool), anchor_key, 0.5, None)
    z = torch.nn.functional.normalize(keys, dim=1)
    s = z[:2] @ z.T / 0.5
    own = torch.eye(2, 6, dtype=torch.bool)
    logits = s.masked_fill(own, -float("inf"))
    expected = -(logits[[0, 1], [1, 0]] - torch.logsumexp(logits, 1)).mean()
    torch.testing.assert_close(loss, expected)


def test_fifo_queue_wraps_and_round_trips_through_a_state_dict():
    q = FifoQueue(4, z=((2,), torch.float32), sample=((), torch.long))
    q.push(z=torch.ones(3, 2), sample=torch.tensor([0, 1, 2]))
    q.push(z=2 * torch.ones(3, 2), sample=torch.tensor([3, 4, 5]))
    assert q.items()["sample"].tolist() == [2, 3, 4, 5] and int(q.pushed) == 6  # oldest first, FIFO
    q.push(z=torch.zeros(6, 2), sample=torch.arange(10, 16))  # more than it holds: the newest rows
    assert q.items()["sample"].tolist() == [12, 13, 14, 15]
    again = FifoQueue(4, z=((2,), torch.float32), sample=((), torch.long))
    again.load_state_dict(q.state_dict())
    assert again.items()["sample"].tolist() == [12, 13, 14, 15] and int(again.pushed) == 12
    with pytest.raises(ValueError, match="fields"):
        q.push(z=torch.zeros(1, 2))
