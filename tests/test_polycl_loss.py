"""PolyCL losses (nnunet_cl.methods.polycl.loss): hand computation, ordering, equivalence with masked_supcon."""
import math

import numpy as np
import pytest
import torch

from nnunet_cl.losses.masked_supcon import masked_supcon
from nnunet_cl.methods.polycl.loss import DEFAULT_TEMPERATURE, polycl_infonce_loss, polycl_masks, polycl_triplet_loss
from nnunet_cl.methods.polycl.pairs import sample_triplets, strategy_masks, valid_anchor_mask

CASES = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
PRESENCE = [1, 1, 0, 1, 0, 0, 0, 0, -1, -1]


def _cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def test_triplet_loss_equals_hand_computation():
    a = [[1.0, 0.0, 0.0], [0.5, 1.0, -1.0]]
    p = [[0.8, 0.6, 0.0], [0.0, 2.0, 0.0]]
    n = [[0.0, 0.0, 3.0], [-1.0, 0.2, 0.3]]
    tau = 0.2
    expected = 0.0
    for ai, pi, ni in zip(a, p, n):
        ep = math.exp(_cos(ai, pi) / tau)
        en = math.exp(_cos(ai, ni) / tau)
        expected += -math.log(ep / (ep + en))
    expected /= len(a)
    got = polycl_triplet_loss(torch.tensor(a), torch.tensor(p), torch.tensor(n), temperature=tau)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_triplet_loss_lower_for_correct_pairs_than_swapped():
    g = torch.Generator().manual_seed(0)
    z_a = torch.randn(32, 64, generator=g)
    z_p = z_a + 0.2 * torch.randn(32, 64, generator=g)
    z_n = torch.randn(32, 64, generator=g)
    correct = polycl_triplet_loss(z_a, z_p, z_n)
    swapped = polycl_triplet_loss(z_a, z_n, z_p)
    assert correct < swapped - 1.0


def test_triplet_loss_is_finite_for_extreme_similarities_and_half_inputs():
    z = torch.tensor([[1.0, 0.0]])
    far = polycl_triplet_loss(z, -z, z, temperature=0.01)  # exp(+-200) would overflow in fp32 if naive
    assert torch.isfinite(far) and far.item() == pytest.approx(200.0, rel=1e-4)
    half = polycl_triplet_loss(z.half(), z.half(), -z.half())
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_triplet_loss_empty_batch_is_graph_attached_zero():
    z = torch.zeros(0, 8, requires_grad=True)
    loss = polycl_triplet_loss(z, z, z)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_triplet_loss_rejects_bad_input():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError):
        polycl_triplet_loss(z, z, z, temperature=0.0)
    with pytest.raises(ValueError):
        polycl_triplet_loss(z, z[:3], z)


def test_repository_euclidean_variant_has_an_inverted_sign():
    """Regression note (METHODS_SPEC §4): the repo's Euclidean loss (1 - sigmoid(d_pos)) + sigmoid(d_neg) falls
    when the positive moves *away* from the anchor; ours rises. We do not port it; this documents why."""
    def repo_euclidean(a, p, n):  # written from the spec's formula
        return (1 - torch.sigmoid((p - a).norm(dim=1))) + torch.sigmoid((n - a).norm(dim=1))

    a = torch.tensor([[1.0, 0.0]])
    n = torch.tensor([[-1.0, 0.0]])
    p_close = torch.tensor([[0.9, 0.1]])
    p_far = torch.tensor([[0.0, 1.0]])
    assert repo_euclidean(a, p_far, n) < repo_euclidean(a, p_close, n)  # inverted: rewards far positives
    assert polycl_triplet_loss(a, p_far, n) > polycl_triplet_loss(a, p_close, n)  # ours: correct direction


@pytest.mark.parametrize("strategy", ["S", "O", "M"])
@pytest.mark.parametrize("mode", ["pos_vs_negs", "supcon"])
def test_infonce_equals_masked_supcon_on_the_strategy_masks(strategy, mode):
    z = torch.randn(len(CASES), 16, generator=torch.Generator().manual_seed(1))
    pos, neg = strategy_masks(CASES, PRESENCE, strategy)
    valid = valid_anchor_mask(pos, neg)
    pos_t = torch.from_numpy(pos & valid[:, None])
    expected = masked_supcon(z, pos_t, temperature=0.2, neg_mask=torch.from_numpy(neg), mode=mode)
    got = polycl_infonce_loss(z, CASES, PRESENCE, strategy, temperature=0.2, mode=mode)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # masks helper returns torch bool tensors with invalid anchors cleared
    mp, mn = polycl_masks(CASES, PRESENCE, strategy)
    assert mp.dtype == torch.bool and (mp == pos_t).all() and (mn == torch.from_numpy(neg)).all()


def test_infonce_with_one_positive_and_one_negative_is_the_triplet_loss():
    # M with cases [0,0,1], presence [1,1,0]: anchors 0 and 1 each have exactly one positive and one negative,
    # anchor 2 has no positive (skipped): the many-negatives form reduces to the paper's loss.
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    cases, pres = [0, 0, 1], [1, 1, 0]
    infonce = polycl_infonce_loss(z, cases, pres, "M", temperature=0.1)
    a, p, n = sample_triplets(cases, pres, "M", np.random.default_rng(0))
    assert a.tolist() == [0, 1] and p.tolist() == [1, 0] and n.tolist() == [2, 2]
    triplet = polycl_triplet_loss(z[a], z[p], z[n], temperature=0.1)
    assert infonce.item() == pytest.approx(triplet.item(), rel=1e-6)


def test_infonce_lower_for_case_clustered_embeddings_than_shuffled():
    g = torch.Generator().manual_seed(3)
    cases = np.repeat(np.arange(6), 3)
    centres = torch.randn(6, 32, generator=g)
    z = centres[torch.from_numpy(cases)] + 0.2 * torch.randn(len(cases), 32, generator=g)
    correct = polycl_infonce_loss(z, cases, None, "S")
    shuffled = polycl_infonce_loss(z, np.random.default_rng(0).permutation(cases), None, "S")
    assert correct < shuffled - 1.0


def test_infonce_without_valid_anchor_is_graph_attached_zero():
    z = torch.randn(4, 8, requires_grad=True)
    loss = polycl_infonce_loss(z, [0, 0, 0, 0], None, "S")  # one case: no negatives anywhere
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(z.grad).all() and (z.grad == 0).all()


def test_infonce_gradient_flows():
    z = torch.randn(len(CASES), 8, requires_grad=True)
    polycl_infonce_loss(z, torch.from_numpy(CASES), PRESENCE, "O").backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_default_temperature_is_the_shared_cores():
    """Both PolyCL forms default to the temperature of masked_supcon, so methods compare at one temperature."""
    import inspect
    defaults = {f.__name__: inspect.signature(f).parameters["temperature"].default
                for f in (masked_supcon, polycl_triplet_loss, polycl_infonce_loss)}
    assert set(defaults.values()) == {DEFAULT_TEMPERATURE}, defaults
