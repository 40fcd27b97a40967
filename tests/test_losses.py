"""masked_supcon / info_nce_two_views against pytorch-metric-learning, a hand-written loop, and properties."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_cl.losses import info_nce_two_views, labels_to_pos_mask, masked_supcon

def _random_masks(n: int, p_pos: float, gen: torch.Generator, p_neg: float | None = None):
    eye = torch.eye(n, dtype=torch.bool)
    pos = (torch.rand(n, n, generator=gen) < p_pos) & ~eye
    neg = ~pos & ~eye
    if p_neg is not None:  # leave some pairs in neither set
        neg &= torch.rand(n, n, generator=gen) < p_neg
    return pos, neg


def _pml_losses():
    """pytorch-metric-learning (in the `test` extra) as the reference; only the tests that compare with it skip."""
    return pytest.importorskip("pytorch_metric_learning.losses")


def _pml_supcon(z, pos, neg, tau):
    pml_losses = _pml_losses()
    a1, p = torch.where(pos)
    a2, n = torch.where(neg)
    return pml_losses.SupConLoss(temperature=tau)(z, indices_tuple=(a1, p, a2, n))


def _reference_rows(z, pos, neg, tau, mode, keys=None):
    """Per-anchor loss by explicit loops in float64: {row: l_i} for rows with a positive."""
    a = F.normalize(z.detach().double(), dim=1)
    k = a if keys is None else F.normalize(keys.detach().double(), dim=1)
    s = (a @ k.T / tau).tolist()
    n, m = pos.shape
    out = {}
    for i in range(n):
        allowed = [j for j in range(m) if keys is not None or j != i]
        P = [j for j in allowed if pos[i, j]]
        if not P:
            continue
        N = [j for j in allowed if (neg is None or neg[i, j]) and not pos[i, j]]
        terms = []
        for p in P:
            if mode == "supcon":
                denom = sum(math.exp(s[i][a_]) for a_ in P + N)
            else:
                denom = math.exp(s[i][p]) + sum(math.exp(s[i][q]) for q in N)
            terms.append(-math.log(math.exp(s[i][p]) / denom))
        out[i] = sum(terms) / len(terms)
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_matches_pml_supcon_random_masks(seed, tau):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(24, 16, generator=gen)
    pos, neg = _random_masks(24, 0.15, gen)
    pos[[1, 2]] = False  # rows without positives: pml's AvgNonZeroReducer drops them too
    neg = ~pos & ~torch.eye(24, dtype=torch.bool)
    ours = masked_supcon(z, pos, temperature=tau)
    ours_explicit_neg = masked_supcon(z, pos, temperature=tau, neg_mask=neg)
    ref = _pml_supcon(z, pos, neg, tau)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_explicit_neg, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_matches_pml_with_partial_negative_mask(seed):
    """Pairs in neither mask are dropped from the denominator, as in pml's indices_tuple."""
    gen = torch.Generator().manual_seed(100 + seed)
    z = torch.randn(20, 8, generator=gen)
    pos, neg = _random_masks(20, 0.2, gen, p_neg=0.5)
    torch.testing.assert_close(
        masked_supcon(z, pos, neg_mask=neg), _pml_supcon(z, pos, neg, 0.1), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("b", [1, 4, 16])
def test_info_nce_matches_pml_and_handwritten_ntxent(b):
    gen = torch.Generator().manual_seed(b)
    z1, z2 = torch.randn(b, 32, generator=gen), torch.randn(b, 32, generator=gen)
    ours = info_nce_two_views(z1, z2, temperature=0.1)
    labels = torch.arange(b).repeat(2)
    ref = _pml_losses().SupConLoss(temperature=0.1)(torch.cat([z1, z2]), labels)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # NT-Xent as cross-entropy over the (2B, 2B-1) logits without the diagonal (lightly's formulation)
    u = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = u @ u.T / 0.1
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    torch.testing.assert_close(ours, F.cross_entropy(logits, target), atol=1e-5, rtol=1e-5)


def test_info_nce_gather_without_process_group_is_plain():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    assert torch.equal(info_nce_two_views(z1, z2, gather=True), info_nce_two_views(z1, z2))


@pytest.mark.parametrize("mode", ["supcon", "pos_vs_negs"])
def test_permutation_invariance(mode):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(30, 12, generator=gen)
    pos, neg = _random_masks(30, 0.2, gen, p_neg=0.7)
    perm = torch.randperm(30, generator=gen)
    a = masked_supcon(z, pos, neg_mask=neg, mode=mode)
    b = masked_supcon(z[perm], pos[perm][:, perm], neg_mask=neg[perm][:, perm], mode=mode)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["supcon", "pos_vs_negs"])
@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_fp16_input_is_finite_and_close_to_fp32(mode, tau):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(40, 64, generator=gen)
    pos, _ = _random_masks(40, 0.2, gen)
    zh = z.half().requires_grad_()
    loss_h = masked_supcon(zh, pos, temperature=tau, mode=mode)
    loss_f = masked_supcon(zh.detach().float(), pos, temperature=tau, mode=mode)
    assert loss_h.dtype == torch.float32 and torch.isfinite(loss_h)
    torch.testing.assert_close(loss_h, loss_f, atol=1e-4, rtol=1e-4)
    loss_h.backward()
    assert zh.grad.dtype == torch.float16 and torch.isfinite(zh.grad).all()


def test_autocast_does_not_downcast():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(32, 16, generator=gen)
    pos, _ = _random_masks(32, 0.2, gen)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = masked_supcon(z, pos)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, masked_supcon(z, pos), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["supcon", "pos_vs_negs"])
def test_rows_without_positives_are_excluded(mode):
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(16, 8, generator=gen, requires_grad=True)
    pos, _ = _random_masks(16, 0.3, gen)
    pos[[0, 5, 9]] = False  # three anchors without positives (they still serve as keys)
    loss = masked_supcon(z, pos, mode=mode)
    rows = _reference_rows(z, pos, None, 0.1, mode)
    assert set(rows).isdisjoint({0, 5, 9}) and len(rows) > 0
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(sum(rows.values()) / len(rows), rel=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("mode", ["supcon", "pos_vs_negs"])
@pytest.mark.parametrize("use_keys", [False, True])
def test_no_positive_at_all_gives_connected_zero(mode, use_keys):
    z = torch.randn(10, 8, requires_grad=True)
    keys = torch.randn(7, 8, requires_grad=True) if use_keys else None
    pos = torch.zeros(10, 7 if use_keys else 10, dtype=torch.bool)
    if not use_keys:
        pos.fill_diagonal_(True)  # the diagonal alone is not a positive
    loss = masked_supcon(z, pos, mode=mode, keys=keys)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_degenerate_shapes_are_finite():
    z = torch.randn(0, 8, requires_grad=True)
    loss = masked_supcon(z, torch.zeros(0, 0, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    # single anchor, no negatives: pos_vs_negs gives -log(e^s / e^s) = 0, supcon likewise
    z = torch.randn(2, 4, requires_grad=True)
    pos = torch.ones(2, 2, dtype=torch.bool)
    for mode in ("supcon", "pos_vs_negs"):
        loss = masked_supcon(z, pos, mode=mode)
        loss.backward()
        assert loss.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(z.grad).all()


def test_gradient_flows_only_to_inputs_that_require_it():
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(12, 8, generator=gen, requires_grad=True)
    keys = torch.randn(20, 8, generator=gen)  # e.g. a detached memory queue
    pos = torch.rand(12, 20, generator=gen) < 0.3
    masked_supcon(z, pos, keys=keys).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and torch.isfinite(z.grad).all()
    assert keys.grad is None
    keys.requires_grad_()
    z2 = z.detach()
    masked_supcon(z2, pos, keys=keys).backward()
    assert keys.grad is not None and keys.grad.abs().sum() > 0 and z2.grad is None


@pytest.mark.parametrize("mode", ["supcon", "pos_vs_negs"])
def test_gradcheck_float64(mode):
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    pos, neg = _random_masks(6, 0.4, gen, p_neg=0.8)
    assert torch.autograd.gradcheck(lambda x: masked_supcon(x, pos, neg_mask=neg, mode=mode, temperature=0.5), (z,))


def test_correct_clusters_beat_shuffled_labels():
    """8 clusters x 64 points in 64-d with noise 0.2 (spec §8: observed 5.13 vs 7.47)."""
    gen = torch.Generator().manual_seed(9)
    centres = F.normalize(torch.randn(8, 64, generator=gen), dim=1)
    labels = torch.arange(8).repeat_interleave(64)
    z = centres[labels] + 0.2 * torch.randn(512, 64, generator=gen)
    shuffled = labels[torch.randperm(512, generator=gen)]
    good = masked_supcon(z, labels_to_pos_mask(labels))
    bad = masked_supcon(z, labels_to_pos_mask(shuffled))
    assert good < bad - 1.0, (good.item(), bad.item())
    good_pn = masked_supcon(z, labels_to_pos_mask(labels), mode="pos_vs_negs")
    bad_pn = masked_supcon(z, labels_to_pos_mask(shuffled), mode="pos_vs_negs")
    assert good_pn < bad_pn - 1.0, (good_pn.item(), bad_pn.item())


def test_pos_vs_negs_tiny_example_against_loop():
    z = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.1], [0.6, -0.8]])
    pos = torch.tensor(
        [
            [0, 1, 0, 0, 1],
            [1, 0, 0, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    neg = ~pos & ~torch.eye(5, dtype=torch.bool)
    neg[0, 2] = False  # an ignored pair
    for tau in (0.07, 0.5):
        rows = _reference_rows(z, pos, neg, tau, "pos_vs_negs")
        expected = sum(rows.values()) / len(rows)
        assert masked_supcon(z, pos, temperature=tau, neg_mask=neg, mode="pos_vs_negs").item() == pytest.approx(
            expected, rel=1e-5
        )
        # a pair in neither set is not a negative: default negatives include it, so the loss differs
        rows_all = _reference_rows(z, pos, None, tau, "pos_vs_negs")
        assert masked_supcon(z, pos, temperature=tau, mode="pos_vs_negs").item() == pytest.approx(
            sum(rows_all.values()) / len(rows_all), rel=1e-5
        )


def test_supcon_against_loop_and_base_temperature():
    gen = torch.Generator().manual_seed(10)
    z = torch.randn(9, 5, generator=gen)
    pos, neg = _random_masks(9, 0.3, gen, p_neg=0.6)
    rows = _reference_rows(z, pos, neg, 0.2, "supcon")
    expected = sum(rows.values()) / len(rows)
    assert masked_supcon(z, pos, temperature=0.2, neg_mask=neg).item() == pytest.approx(expected, rel=1e-5)
    scaled = masked_supcon(z, pos, temperature=0.2, base_temperature=0.07, neg_mask=neg)
    assert scaled.item() == pytest.approx(expected * 0.2 / 0.07, rel=1e-5)


@pytest.mark.parametrize("mode", ["supcon", "pos_vs_negs"])
def test_keys_mode_equals_full_computation(mode):
    gen = torch.Generator().manual_seed(11)
    n, m = 10, 14
    z = torch.randn(n, 8, generator=gen)
    keys = torch.randn(m, 8, generator=gen)
    pos = torch.rand(n, m, generator=gen) < 0.25
    neg = ~pos & (torch.rand(n, m, generator=gen) < 0.8)
    ours = masked_supcon(z, pos, neg_mask=neg, keys=keys, mode=mode)
    # the same thing as one (n+m)-point problem: key rows have no positives, anchor-anchor pairs ignored
    full_pos = torch.zeros(n + m, n + m, dtype=torch.bool)
    full_neg = torch.zeros(n + m, n + m, dtype=torch.bool)
    full_pos[:n, n:] = pos
    full_neg[:n, n:] = neg
    full = masked_supcon(torch.cat([z, keys]), full_pos, neg_mask=full_neg, mode=mode)
    torch.testing.assert_close(ours, full, atol=1e-6, rtol=1e-6)
    rows = _reference_rows(z, pos, neg, 0.1, mode, keys=keys)
    assert ours.item() == pytest.approx(sum(rows.values()) / len(rows), rel=1e-5)
    # keys = z itself with the self pairs removed by hand reproduces the no-keys call
    sq_pos, _ = _random_masks(n, 0.3, gen)
    eye = torch.eye(n, dtype=torch.bool)
    torch.testing.assert_close(
        masked_supcon(z, sq_pos, keys=z, neg_mask=~sq_pos & ~eye, mode=mode),
        masked_supcon(z, sq_pos, mode=mode),
        atol=1e-6,
        rtol=1e-6,
    )


def test_labels_to_pos_mask():
    a = torch.tensor([0, 1, 0, 2])
    mask = labels_to_pos_mask(a)
    assert mask.dtype == torch.bool and torch.equal(mask, mask.T) and mask.diagonal().all()
    assert mask.sum() == 6
    rect = labels_to_pos_mask(a, torch.tensor([2, 0]))
    assert torch.equal(rect, torch.tensor([[0, 1], [0, 0], [0, 1], [1, 0]], dtype=torch.bool))
    with pytest.raises(ValueError):
        labels_to_pos_mask(a[None])


def test_input_validation():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"pos_mask must be \(4, 4\)"):
        masked_supcon(z, torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mode must be one of"):
        masked_supcon(z, torch.zeros(4, 4, dtype=torch.bool), mode="nope")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        masked_supcon(z, torch.zeros(4, 4, dtype=torch.bool), temperature=0.0)
    with pytest.raises(ValueError, match=r"keys must be \(M, 3\)"):
        masked_supcon(z, torch.zeros(4, 6, dtype=torch.bool), keys=torch.randn(6, 2))
    with pytest.raises(ValueError, match="z1 and z2 must both be"):
        info_nce_two_views(torch.randn(4, 3), torch.randn(5, 3))


def test_chunked_computation_matches_one_block():
    """Row blocks (recomputed in backward) give the same loss and gradients as one block."""
    gen = torch.Generator().manual_seed(3)
    z0 = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (50,), generator=gen)
    neg = torch.rand(50, 50, generator=gen) > 0.3
    for mode in ("supcon", "pos_vs_negs"):
        results = []
        for chunk in (1 << 22, 7 * 50):  # one block / blocks of 7 rows
            z = z0.clone().requires_grad_(True)
            loss = masked_supcon(z, labels_to_pos_mask(labels), neg_mask=neg, mode=mode, chunk_elements=chunk)
            loss.backward()
            results.append((loss.detach(), z.grad))
        assert torch.allclose(results[0][0], results[1][0], atol=1e-12)
        assert torch.allclose(results[0][1], results[1][1], atol=1e-12)


@pytest.mark.parametrize("mode", ["supcon", "pos_vs_negs"])
@pytest.mark.parametrize("use_keys", [False, True])
def test_labels_give_the_same_loss_and_gradients_as_the_mask(mode, use_keys):
    """Positives from labels (built per block, no N x M mask) equal the explicit mask, in blocks of 7 rows."""
    gen = torch.Generator().manual_seed(5)
    z0 = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (40,), generator=gen)
    keys = torch.randn(30, 8, generator=gen, dtype=torch.float64) if use_keys else None
    key_labels = torch.randint(0, 4, (30,), generator=gen) if use_keys else None
    mask = labels_to_pos_mask(labels, key_labels)
    results = []
    for kwargs in ({"pos_mask": mask}, {"labels": labels, "key_labels": key_labels}):
        z = z0.clone().requires_grad_(True)
        loss = masked_supcon(z, mode=mode, keys=keys, chunk_elements=7 * mask.shape[1], **kwargs)
        loss.backward()
        results.append((loss.detach(), z.grad))
    assert results[0][0] > 0
    assert torch.allclose(results[0][0], results[1][0], atol=1e-12)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-12)


def test_labels_input_validation():
    z, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="exactly one"):
        masked_supcon(z)
    with pytest.raises(ValueError, match="exactly one"):
        masked_supcon(z, labels_to_pos_mask(labels), labels=labels)
    with pytest.raises(ValueError, match="key_labels"):
        masked_supcon(z, labels=labels, keys=torch.randn(6, 3))
    with pytest.raises(ValueError, match="labels must be"):
        masked_supcon(z, labels=labels[:3])
