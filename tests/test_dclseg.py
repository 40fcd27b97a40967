"""DCL-Seg's pieces (nnunet_cl.methods.dclseg) and its trainer's step, on CPU.

The learned positive differs from x after a maximisation step and keeps its edges (edge-map correlation > 0.9, on
a real MRI patch), and stays in x's range; the contrast is lower for class-clustered features; boundary sampling
draws within the stated distance and never an ignored voxel; a few trainer steps lower the loss.
"""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_cl.methods.dclseg import (SHIFTS, STRUCTURE_WEIGHT, AppearanceGenerator, apply_shift, boundary_mask,
                                      clamp_to_range,
                                      edge_correlation, local_ncc, sample_anchors, structure_penalty,
                                      two_view_supcon)

EDGE_BOUND = 0.9  # METHODS_SPEC §6: edge-map correlation of x and x+ above 0.9


@pytest.fixture(scope="module")
def mri_patch(shared_data):
    """A z-scored 32^3 patch of a real MSD Hippocampus MRI (its labels beside it), as (1, 1, 32, 32, 32)."""
    import SimpleITK as sitk
    folder = shared_data / "Task04_Hippocampus"
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr/hippocampus_003.nii.gz")))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr/hippocampus_003.nii.gz")))
    c = [int(v) for v in np.argwhere(label > 0).mean(0)]
    box = tuple(slice(max(0, ci - 16), max(0, ci - 16) + 32) for ci in c)
    x, y = image[box].astype(np.float32), label[box].astype(np.int64)
    pad = [(0, 32 - n) for n in x.shape]
    x, y = np.pad(x, pad, mode="edge"), np.pad(y, pad)
    x = (x - x.mean()) / x.std()
    return torch.from_numpy(x)[None, None], torch.from_numpy(y)[None]


# ------------------------------------------------------------------------------------------- generator
def test_the_generator_starts_as_the_identity_and_keeps_the_range():
    x = torch.randn(3, 2, 8, 10, 12)
    gen = AppearanceGenerator(channels=2)
    assert torch.equal(gen(x), x)
    for p in gen.parameters():  # far from the identity: every output still inside each sample's channel range
        torch.nn.init.normal_(p, std=3.0)
    y = gen(x)
    lo, hi = x.amin(dim=(2, 3, 4), keepdim=True), x.amax(dim=(2, 3, 4), keepdim=True)
    assert y.shape == x.shape and (y >= lo).all() and (y <= hi).all()
    assert not torch.allclose(y, x)
    assert AppearanceGenerator(channels=1, spatial_dims=2)(torch.randn(2, 1, 9, 7)).shape == (2, 1, 9, 7)


def test_clamp_to_range_is_per_sample_and_channel():
    x = torch.stack([torch.linspace(0, 1, 8), torch.linspace(-5, 5, 8)]).view(1, 2, 8)
    y = clamp_to_range(torch.full_like(x, 3.0), x)
    assert y[0, 0].eq(1).all() and y[0, 1].eq(3).all()


def _network(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.InstanceNorm3d(8),
                               torch.nn.LeakyReLU(), torch.nn.Conv3d(8, 8, 3, padding=1))


def _contrast(net, x, xp, labels, gen_rng):
    b_idx, v_idx, _ = sample_anchors(labels, 256, generator=gen_rng)
    f1, f2 = net(x).flatten(2), net(xp).flatten(2)
    return two_view_supcon(f1[b_idx, :, v_idx], f2[b_idx, :, v_idx], labels.flatten(1)[b_idx, v_idx])


def test_maximisation_steps_make_a_harder_positive_that_keeps_the_edges(mri_patch):
    """The generator alone (network fixed) ascends contrast - STRUCTURE_WEIGHT * structure penalty for 100 steps:
    the contrast rises, x+ moves away from x, and the edges stay (correlation > EDGE_BOUND; measured 0.933) inside
    x's range."""
    x, labels = mri_patch
    net = _network()
    for p in net.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    gen = AppearanceGenerator(channels=1)
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    code = torch.randn(1, gen.code_dim)
    before = float(_contrast(net, x, gen(x, code), labels, torch.Generator().manual_seed(0)))
    for step in range(100):
        xp = gen(x, code)
        objective = -_contrast(net, x, xp, labels, torch.Generator().manual_seed(step)) + \
            STRUCTURE_WEIGHT * structure_penalty(x, xp)
        opt.zero_grad()
        objective.backward()
        opt.step()
        if step == 0:
            assert (gen(x, code) - x).abs().max() > 1e-4  # one step already moves x+ away from x
    xp = gen(x, code).detach()
    after = float(_contrast(net, x, xp, labels, torch.Generator().manual_seed(0)))
    assert after > before + 0.02, (before, after)  # measured: 9.184 -> 9.236
    assert (xp - x).abs().mean() > 0.1  # measured: 0.26 (x z-scored)
    assert float(edge_correlation(x, xp)) > EDGE_BOUND
    assert xp.min() >= x.min() and xp.max() <= x.max()


# ------------------------------------------------------------------------------------------- structure
def test_local_ncc_is_one_for_an_affine_change_and_lower_for_moved_structure(mri_patch):
    x, _ = mri_patch
    assert float(local_ncc(x, 2.5 * x - 1).mean()) > 0.99
    assert float(structure_penalty(x, 2.5 * x - 1)) < 0.01
    moved = torch.roll(x, shifts=3, dims=2)
    assert float(local_ncc(x, moved).mean()) < 0.6
    assert float(edge_correlation(x, 0.5 * x + 3)) > 0.999 > float(edge_correlation(x, moved))


# ------------------------------------------------------------------------------------------- boundary sampling
def test_boundary_mask_is_within_the_distance_of_another_label():
    labels = torch.zeros(1, 20, 20, 20, dtype=torch.long)
    labels[0, 5:15, 6:14, 4:12] = 1
    labels[0, 8:11, 8:11, 6:9] = 2
    for d in (1, 2):
        mask = boundary_mask(labels, d)[0].numpy()
        lab = labels[0].numpy()
        expected = np.zeros_like(mask)
        for value in np.unique(lab):  # voxels whose chessboard distance to another label is <= d
            other = lab != value
            dist = ndimage.distance_transform_cdt(~other, metric="chessboard")
            expected |= (lab == value) & (dist <= d)
        assert np.array_equal(mask, expected), d


def test_anchor_sampling_oversamples_boundaries_and_never_draws_ignored_voxels():
    labels = torch.zeros(2, 24, 24, 24, dtype=torch.long)
    labels[:, 6:18, 6:18, 6:18] = 1
    labels[:, :, :, :4] = 9  # the ignore label
    b_idx, v_idx, edge = sample_anchors(labels, 200, boundary_fraction=0.5, distance=2, ignore_label=9,
                                        generator=torch.Generator().manual_seed(0))
    flat = labels.flatten(1)[b_idx, v_idx]
    assert (flat != 9).all()
    assert len(b_idx) == 400 and int(edge.sum()) == 200
    pairs = set(zip(b_idx.tolist(), v_idx.tolist()))
    assert len(pairs) == 400  # distinct voxels
    # boundary draws: within 2 voxels (chessboard) of the other class, and the rest are not
    lab = labels[0].numpy()
    dist_to_other = np.where(lab == 1, ndimage.distance_transform_cdt(lab == 1, metric="chessboard"),
                             ndimage.distance_transform_cdt(lab != 1, metric="chessboard"))
    near = dist_to_other.reshape(-1)[v_idx[b_idx == 0].numpy()] <= 2
    assert near[edge[b_idx == 0].numpy()].all() and not near[~edge[b_idx == 0].numpy()].any()
    # uniform sampling would put fewer anchors there: the boundary holds 31% of the labelled voxels, not 50%
    share = boundary_mask(labels, 2, ignore_label=9).sum() / (labels != 9).sum()
    assert 0.25 < float(share) < 0.35


def test_a_sample_short_of_boundary_voxels_takes_more_inside():
    labels = torch.zeros(1, 10, 10, 10, dtype=torch.long)
    b_idx, v_idx, edge = sample_anchors(labels, 50, boundary_fraction=0.9)
    assert len(v_idx) == 50 and not edge.any()


# ------------------------------------------------------------------------------------------- contrast
def test_the_contrast_is_lower_for_class_clustered_features():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (120,), generator=g)
    centres = torch.randn(3, 16, generator=g) * 4
    clustered = centres[labels] + 0.3 * torch.randn(120, 16, generator=g)
    clustered2 = centres[labels] + 0.3 * torch.randn(120, 16, generator=g)
    random1, random2 = torch.randn(120, 16, generator=g), torch.randn(120, 16, generator=g)
    assert float(two_view_supcon(clustered, clustered2, labels)) < float(two_view_supcon(random1, random2, labels)) - 1


# ------------------------------------------------------------------------------------------- shifts
def test_intensity_shifts_keep_shape_and_do_what_they_say():
    rng = np.random.default_rng(0)
    x = rng.uniform(10, 110, (12, 14, 16)).astype(np.float32)
    for kind, strengths in SHIFTS.items():
        for s in strengths:
            y = apply_shift(x, kind, s, np.random.default_rng(1))
            assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
    gamma = apply_shift(x, "gamma", 2.0, rng)
    assert np.isclose(gamma.min(), x.min()) and np.isclose(gamma.max(), x.max()) and gamma.mean() < x.mean()
    ratio = apply_shift(x, "bias", 0.4, rng) / x
    assert ratio.min() >= math.exp(-0.4) - 1e-5 and ratio.max() <= math.exp(0.4) + 1e-5 and ratio.std() > 0.01
    contrast = apply_shift(x, "contrast", 3.0, rng)
    assert contrast.min() >= x.min() and contrast.max() <= x.max() and contrast.std() > x.std()
    noise = apply_shift(x, "noise", 0.1, rng) - x
    assert abs(noise.std() - 0.1 * x.std()) < 0.01 * x.std()
    with pytest.raises(ValueError, match="unknown shift"):
        apply_shift(x, "blur", 1.0, rng)


# ------------------------------------------------------------------------------------------- the trainer's step
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}


@pytest.fixture
def dclseg_trainer(nnunet_env):
    from helpers import fake_preprocessed_folder, tiny_plans
    from nnunet_cl_trainers import nnUNetTrainerDCLSeg
    fake_preprocessed_folder(nnunet_env, "Dataset997_Tiny")

    def make(**attrs):
        trainer = nnUNetTrainerDCLSeg(tiny_plans(), "3d_fullres", 0, dict(DATASET_JSON), torch.device("cpu"))
        for k, v in {"training_seed": 0, "anchors_per_sample": 64, **attrs}.items():
            setattr(trainer, k, v)
        trainer.initialize()
        return trainer
    return make


def _labeled_batch(trainer, seed=0):
    """Blobs brighter than the background, and nnU-Net's deep-supervision targets of them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool3d(torch.randn((2, 1, 16, 16, 16), generator=g), 5, 1, 2) * 5
    y = (x > 0.3).float()
    scales = trainer._get_deep_supervision_scales()
    target = [torch.nn.functional.interpolate(y, scale_factor=tuple(s), mode="nearest") for s in scales]
    return {"data": x + 0.1 * torch.randn(x.shape, generator=g), "target": target}


def test_steps_lower_the_loss_and_the_generator_trains_with_its_own_optimiser(dclseg_trainer):
    trainer = dclseg_trainer()
    gen = trainer.cl_modules["generator"]
    in_sgd = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_sgd for p in gen.parameters())  # the generator is the extra optimiser's alone
    assert all(id(p) in in_sgd for p in trainer.cl_modules["head"].parameters())
    assert set(trainer.extra_optimizers) == {"generator"}
    before = [p.detach().clone() for p in gen.parameters()]
    batch = _labeled_batch(trainer)
    outs = [trainer.train_step({k: (v.clone() if torch.is_tensor(v) else [t.clone() for t in v])
                                for k, v in batch.items()}) for _ in range(8)]
    losses = [float(o["loss"]) for o in outs]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.1, losses
    assert all(math.isfinite(float(o["cl_contrast"])) and float(o["cl_structure"]) >= 0 for o in outs)
    assert any(not torch.equal(a, b) for a, b in zip(before, gen.parameters()))


def test_the_network_sees_the_image_and_its_positive_in_one_batch(dclseg_trainer):
    trainer = dclseg_trainer()
    batch = _labeled_batch(trainer)
    data, target = trainer.step_inputs(batch)
    assert data.shape[0] == 4 and all(t.shape[0] == 4 for t in target)
    assert torch.equal(data[:2], batch["data"]) and torch.equal(target[0][2:], batch["target"][0])
    assert batch["positive_input"].is_leaf and torch.equal(data[2:], batch["positive_input"])  # x+ detached
    assert batch["positive"].grad_fn is not None  # the generator's output, which the ascent term reaches


@pytest.mark.parametrize("attrs", [{"anchors_per_sample": 1}, {"boundary_fraction": 1.5}, {"structure_window": 4},
                                   {"temperature": 0}, {"contrast_weight": -1.0}])
def test_bad_settings_are_refused_at_set_up_with_the_fix(dclseg_trainer, attrs):
    from nnunet_cl.paths import NnUNetCLError
    with pytest.raises(NnUNetCLError, match="Fix:"):
        dclseg_trainer(**attrs)


def test_the_generator_gets_the_gradient_of_its_objective_and_nothing_else(dclseg_trainer):
    """The trainer's one backward gives the generator exactly grad_phi(lambda * P(x, x+) - SupCon), recomputed here
    without the detach trick (x+ not detached, the same draws): the sign, and no leak of nnU-Net's loss."""
    from nnunet_cl.methods.dclseg import sample_anchors as anchors
    trainer = dclseg_trainer()
    gen, head = trainer.cl_modules["generator"], trainer.cl_modules["head"]
    for p in gen.parameters():  # away from the zero start, so that every parameter has a gradient
        torch.nn.init.normal_(p, std=0.1)
    batch = _labeled_batch(trainer)
    state = trainer._step_rng.get_state()
    loss, _ = trainer.step_losses({k: (v.clone() if torch.is_tensor(v) else [t.clone() for t in v])
                                   for k, v in batch.items()})
    loss.backward()
    ours = [p.grad.clone() for p in gen.parameters()]
    trainer._step_rng.set_state(state)  # the same draws, in the same order as the step
    x = batch["data"]
    generators = trainer.sample_generators(x.shape[0])
    code = torch.cat([torch.randn(1, trainer.generator_code_dim, generator=g) for g in generators])
    positive = gen(x, code)
    _, features = trainer.forward_features(torch.cat([x, positive]), decoder=(-1,), with_output=False)
    labels = batch["target"][0][:, 0].long()
    b_idx, v_idx, _ = anchors(labels, trainer.anchors_per_sample, trainer.boundary_fraction,
                              trainer.boundary_distance, None, generators)
    flat = features["dec-1"].flatten(2)
    contrast = two_view_supcon(head(flat[b_idx, :, v_idx]), head(flat[b_idx + 2, :, v_idx]),
                               labels.flatten(1)[b_idx, v_idx], trainer.temperature)
    objective = trainer.structure_weight * structure_penalty(x, positive, trainer.structure_window) - contrast
    expected = torch.autograd.grad(objective, list(gen.parameters()))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(float(b.abs().max()) > 1e-6 for b in expected)
