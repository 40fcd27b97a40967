"""SepaReg losses, EMA, heads, k-means and expert blocks."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_cl.methods.separeg.clustering import expert_blocks, kmeans_regions
from nnunet_cl.methods.separeg.losses import (byol_loss, distill_cosine_loss, distill_kl_loss, ema_update, mlp_head,
                                      simsiam_loss)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny problems: one thread is faster, and much faster on a busy shared machine."""
    from threadpoolctl import threadpool_limits
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):          # also scikit-learn's OpenMP/BLAS
        yield
    torch.set_num_threads(n)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ------------------------------------------------------------------------------------------- SimSiam / BYOL
def test_simsiam_range_minimum_and_maximum(gen):
    for _ in range(5):
        p1, p2, z1, z2 = (torch.randn(16, 32, generator=gen) for _ in range(4))
        v = simsiam_loss(p1, p2, z1, z2).item()
        assert -1.0 <= v <= 1.0
    z = torch.randn(16, 32, generator=gen)
    assert simsiam_loss(z, z, z, z).item() == pytest.approx(-1.0, abs=1e-6)           # identical views
    assert simsiam_loss(3 * z, 2 * z, z, z).item() == pytest.approx(-1.0, abs=1e-6)   # scale-free
    assert simsiam_loss(-z, -z, z, z).item() == pytest.approx(1.0, abs=1e-6)
    p = torch.randn(16, 32, generator=gen)
    assert simsiam_loss(z, z, z, z) < simsiam_loss(p, p, z, z)


def test_byol_range_minimum_and_maximum(gen):
    for _ in range(5):
        p1, p2, z1, z2 = (torch.randn(16, 32, generator=gen) for _ in range(4))
        v = byol_loss(p1, p2, z1, z2).item()
        assert 0.0 <= v <= 4.0
    z = torch.randn(16, 32, generator=gen)
    assert byol_loss(z, z, z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(-z, -z, z, z).item() == pytest.approx(4.0, abs=1e-5)
    # symmetrised: view 1's prediction is compared with view 2's target and vice versa
    z1, z2 = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    assert byol_loss(z2, z1, z1, z2).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(z1, z2, z1, z2).item() > 0.1


def test_stop_gradient_on_targets(gen):
    p1, p2, z1, z2 = (torch.randn(4, 8, generator=gen, requires_grad=True) for _ in range(4))
    for loss in (simsiam_loss, byol_loss):
        for t in (p1, p2, z1, z2):
            t.grad = None
        loss(p1, p2, z1, z2).backward()
        assert p1.grad is not None and p2.grad is not None
        assert z1.grad is None and z2.grad is None


# ------------------------------------------------------------------------------------------- distillation
def test_distillation_losses_zero_when_student_equals_expert(gen):
    x = torch.randn(8, 64, generator=gen)
    assert distill_cosine_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_kl_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_kl_loss(x, x + 3.0).item() == pytest.approx(0.0, abs=1e-5)   # softmax is shift-invariant
    y = torch.randn(8, 64, generator=gen)
    c, k = distill_cosine_loss(x, y).item(), distill_kl_loss(x, y, temperature=0.1).item()
    assert 0.0 < c <= 4.0 and k > 0.0
    # feature maps are flattened after the batch dimension
    f = torch.randn(4, 8, 3, 3, 3, generator=gen)
    assert distill_kl_loss(f, f).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_gradient_reaches_only_the_student(gen):
    s = torch.randn(4, 16, generator=gen, requires_grad=True)
    e = torch.randn(4, 16, generator=gen, requires_grad=True)
    (distill_cosine_loss(s, e) + distill_kl_loss(s, e)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert e.grad is None


def test_distill_kl_matches_definition(gen):
    s, e, t = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen), 0.5
    pe, ps = torch.softmax(e / t, 1), torch.softmax(s / t, 1)
    expect = (pe * (pe.log() - ps.log())).sum(1).mean()
    assert distill_kl_loss(s, e, temperature=t).item() == pytest.approx(expect.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------- EMA and heads
def test_ema_update_follows_the_momentum_formula():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    student(torch.randn(16, 4))                       # give BN non-trivial running statistics
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
        teacher[1].running_mean.fill_(5.0)
    before = [p.clone() for p in teacher.parameters()]
    rm_t, rm_s = teacher[1].running_mean.clone(), student[1].running_mean.clone()
    m = 0.9
    ema_update(teacher, student, m)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, m * b + (1 - m) * s)
    torch.testing.assert_close(teacher[1].running_mean, m * rm_t + (1 - m) * rm_s)
    assert teacher[1].num_batches_tracked == student[1].num_batches_tracked
    assert all(not p.requires_grad or p.grad is None for p in teacher.parameters())
    ema_update(teacher, student, 0.0)                 # m = 0 copies the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)
    with pytest.raises(ValueError):
        ema_update(teacher, student, 1.5)


def test_mlp_head_shapes():
    head = mlp_head(16, 32, 8)
    assert isinstance(head, nn.Sequential)
    assert any(isinstance(m, nn.BatchNorm1d) for m in head)
    assert head(torch.randn(4, 16)).shape == (4, 8)
    plain = mlp_head(16, 32, 8, bn=False, num_layers=3)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain)
    assert sum(isinstance(m, nn.Linear) for m in plain) == 3


def test_few_simsiam_steps_lower_the_loss():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 16, 3, stride=2, padding=1),
                            nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten())
    projector, predictor = mlp_head(16, 32, 16), mlp_head(16, 8, 16)
    x = torch.rand(8, 1, 12, 12, 12)
    v1 = x + 0.1 * torch.randn_like(x)                 # two fixed "augmented" views of one batch
    v2 = torch.flip(x, dims=[-1]) + 0.1 * torch.randn_like(x)
    params = [*encoder.parameters(), *projector.parameters(), *predictor.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)

    def step():
        z1, z2 = projector(encoder(v1)), projector(encoder(v2))
        loss = simsiam_loss(predictor(z1), predictor(z2), z1, z2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    losses = [step() for _ in range(15)]
    assert all(np.isfinite(losses))
    assert min(losses[-3:]) < losses[0] - 0.05, losses


# ------------------------------------------------------------------------------------------- clustering
def _blobs(n_per=20, k=4, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 5
    x = np.concatenate([c + 0.1 * rng.normal(size=(n_per, d)) for c in centres])
    truth = np.repeat(np.arange(k), n_per)
    perm = rng.permutation(x.shape[0])
    return x[perm], truth[perm]


def test_kmeans_stable_under_seed_and_recovers_blobs():
    x, truth = _blobs()
    a1, c1 = kmeans_regions(x, 4, seed=3)
    a2, c2 = kmeans_regions(x, 4, seed=3)
    assert np.array_equal(a1, a2) and np.allclose(c1, c2)
    assert a1[0] == 0 and c1.shape == (4, 8)                # ids by first occurrence
    # same partition as the truth (up to renaming)
    pairs = set(zip(a1.tolist(), truth.tolist()))
    assert len(pairs) == 4
    a3, _ = kmeans_regions(x, 4, seed=11)                   # another seed: same partition on clean blobs
    assert np.array_equal(a1, a3)


def test_kmeans_reduces_k_when_there_are_too_few_regions():
    x = np.random.default_rng(0).normal(size=(3, 5))
    with pytest.warns(RuntimeWarning, match="using k=3"):
        a, c = kmeans_regions(x, 8, seed=0)
    assert sorted(a.tolist()) == [0, 1, 2] and c.shape == (3, 5)


def test_expert_blocks_come_from_one_cluster_each():
    assign = np.array([0] * 23 + [1] * 5 + [2] * 40)
    rng_assign = np.random.default_rng(1).permutation(assign)
    blocks = list(expert_blocks(rng_assign, 8, np.random.default_rng(0)))
    assert all(len(b) == 8 for b in blocks)
    assert all(np.unique(rng_assign[b]).size == 1 for b in blocks)
    assert set(np.concatenate(blocks).tolist()) == set(range(assign.size))   # every region seen
    per_cluster = np.bincount([rng_assign[b[0]] for b in blocks])
    assert per_cluster.tolist() == [3, 1, 5]                                 # ceil(23/8), ceil(5/8), 40/8
    again = list(expert_blocks(rng_assign, 8, np.random.default_rng(0)))
    assert all(np.array_equal(a, b) for a, b in zip(blocks, again))
    short = list(expert_blocks(rng_assign, 8, 0, pad=False))
    assert sorted(np.concatenate(short).tolist()) == list(range(assign.size))
    balanced = list(expert_blocks(rng_assign, 8, 0, blocks_per_cluster=2))
    assert np.bincount([rng_assign[b[0]] for b in balanced]).tolist() == [2, 2, 2]
    assert all(np.unique(rng_assign[b]).size == 1 and len(b) == 8 for b in balanced)
