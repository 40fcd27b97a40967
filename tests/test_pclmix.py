"""PCLMix's pieces (nnunet_cl.methods.pclmix), its scribble conversion and its trainer's step, on CPU."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from nnunet_cl.methods.pclmix import (UNCERTAIN, ClassQueue, UpsampleAddDecoder, anchors_per_class, box_mask,
                                      box_masks, certainty_labels, class_means, count_class_pairs, entropy, mix,
                                      mix_partners, queue_pixel_contrast, sample_class_anchors,
                                      uncertainty_threshold)
from nnunet_cl.paths import NnUNetCLError


# ------------------------------------------------------------------------------------------------- the mix
def test_the_3d_mix_is_exactly_m_a_plus_one_minus_m_b_with_the_box_fraction_near_its_setting():
    g = [torch.Generator().manual_seed(i) for i in range(400)]
    masks = box_masks((400, 20, 48, 40), 0.2, g)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    fractions = masks.flatten(1).mean(1)
    assert abs(float(fractions.mean()) - 0.2) < 0.01 and float(fractions.min()) > 0.15 and float(fractions.max()) < 0.26
    # one box: the 1s fill an axis-aligned box exactly
    m = masks[0, 0]
    idx = torch.nonzero(m)
    lo, hi = idx.min(0).values, idx.max(0).values
    assert int(m.sum()) == int(torch.prod(hi - lo + 1))
    a, b = torch.randn(3, 2, 20, 48, 40), torch.randn(3, 2, 20, 48, 40)
    mixed = mix(a, b, masks[:3])
    assert torch.equal(mixed, masks[:3] * a + (1 - masks[:3]) * b)
    la, lb = torch.randint(0, 4, (3, 1, 20, 48, 40)), torch.randint(0, 4, (3, 1, 20, 48, 40))
    lm = mix(la, lb, masks[:3])  # label maps stay integers, exactly one or the other
    assert lm.dtype == la.dtype and torch.equal(lm, torch.where(masks[:3].bool(), la, lb))


def test_box_masks_per_sample_do_not_depend_on_the_rest_of_the_batch():
    one = box_masks((1, 8, 9, 10), 0.2, [torch.Generator().manual_seed(7)])
    four = box_masks((4, 8, 9, 10), 0.2, [torch.Generator().manual_seed(s) for s in (1, 2, 7, 3)])
    assert torch.equal(one[0], four[2])
    assert box_mask((12, 12), 0.25, torch.Generator().manual_seed(0)).sum() > 0  # 2-D as well


def test_mix_partners_never_pair_an_image_with_itself_and_stay_within_groups():
    for n in range(2, 9):
        p = mix_partners(n)
        assert sorted(p.tolist()) == list(range(n)) and all(p[i] != i for i in range(n))
    assert mix_partners(4).tolist() == [1, 0, 3, 2]  # two ranks of 2 pair as one process of 4
    with pytest.raises(ValueError):
        mix_partners(1)


# ----------------------------------------------------------------------------------------- uncertainty
def test_the_uncertainty_mask_grows_as_the_threshold_drops():
    logits = torch.randn(2, 4, 6, 7, 8) * 2
    probs = torch.softmax(logits, 1)
    scribbles = torch.full((2, 6, 7, 8), 4)
    uncertain = [int((certainty_labels(probs, scribbles, t, ignore_label=4) == UNCERTAIN).sum())
                 for t in (1.3, 1.0, 0.7, 0.4, 0.1)]
    assert uncertain == sorted(uncertain) and uncertain[-1] > uncertain[0]
    assert torch.allclose(entropy(torch.full((1, 4, 2), 0.25)), torch.full((1, 2), math.log(4)), atol=1e-4)


def test_scribbles_overwrite_the_pseudo_label_and_the_threshold_ramps_to_ln_c():
    probs = torch.softmax(torch.zeros(1, 4, 3, 3, 3), 1)  # uniform: every voxel uncertain
    scribbles = torch.full((1, 1, 3, 3, 3), 4)
    scribbles[0, 0, 1, 1, 1] = 2
    labels = certainty_labels(probs, scribbles, threshold=0.5, ignore_label=4)
    assert labels[0, 1, 1, 1] == 2 and int((labels == UNCERTAIN).sum()) == 26
    assert uncertainty_threshold(0, 100, 4) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(4))
    assert uncertainty_threshold(100, 100, 4) == pytest.approx(math.log(4))
    assert uncertainty_threshold(100, 100, 4, paper_ln2=True) == pytest.approx(math.log(2))


# --------------------------------------------------------------------------------------------- anchors
def test_anchors_are_capped_never_ignored_and_hard_exactly_where_label_and_prediction_differ():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 4, (2, 2000), generator=g)
    predictions = torch.randint(0, 4, (2, 2000), generator=g)
    pairs = count_class_pairs(labels)
    assert pairs == 8
    n_view = anchors_per_class(pairs, 1024, 100)
    assert n_view == 100
    b, v, c, hard = sample_class_anchors(labels, predictions, n_view,
                                         generators=[torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.equal(labels[b, v], c) and (c >= 0).all()  # never an uncertain voxel
    assert torch.equal(hard, predictions[b, v] != c)  # hard anchors exactly where the prediction disagrees
    for bi in range(2):
        for ci in range(4):
            sel = (b == bi) & (c == ci)
            assert int(sel.sum()) == n_view and int(hard[sel].sum()) == n_view // 2  # half hard, half easy
    assert len(set(zip(b.tolist(), v.tolist()))) == b.numel()  # distinct voxels
    assert anchors_per_class(40, 1024, 100) == 25  # the batch cap binds before the class cap


def test_a_class_short_of_hard_anchors_takes_easy_ones_and_a_small_class_gives_what_it_has():
    labels = torch.tensor([[1] * 50 + [2] * 3 + [0] * 10])
    predictions = torch.tensor([[1] * 48 + [0] * 2 + [2] * 3 + [0] * 10])
    b, v, c, hard = sample_class_anchors(labels, predictions, 20)
    ones = c == 1
    assert int(ones.sum()) == 20 and int(hard[ones].sum()) == 2  # only 2 hard voxels exist
    assert int((c == 2).sum()) == 3


# ------------------------------------------------------------------------------------- memory and loss
def test_the_memory_wraps_fifo_per_class_and_round_trips_through_a_state_dict():
    q = ClassQueue([1, 2], size=3, dim=4)
    rows = F.normalize(torch.randn(5, 4), dim=1)
    q.push(rows, torch.tensor([1, 1, 2, 1, 1]))  # four rows of class 1 into 3 slots
    z, lab = q.keys()
    assert lab.tolist() == [1, 1, 1, 2]
    assert torch.allclose(z[:3], rows[[1, 3, 4]]) and torch.allclose(z[3], rows[2])  # the oldest class-1 row gone
    other = ClassQueue([1, 2], size=3, dim=4)
    other.load_state_dict(q.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.keys(), q.keys()))


def test_class_means_are_normalised_means_of_each_class_present():
    emb = torch.randn(2, 3, 10)
    labels = torch.tensor([[0] * 4 + [1] * 6, [2] * 5 + [-1] * 5])
    rows, classes = class_means(emb, labels, [1, 2])
    assert classes.tolist() == [1, 2]
    assert torch.allclose(rows[0], F.normalize(emb[0, :, 4:].mean(1), dim=0))
    assert torch.allclose(rows[1], F.normalize(emb[1, :, :5].mean(1), dim=0))


def test_the_contrast_is_lower_for_class_clustered_embeddings_than_for_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    labels = torch.randint(0, 4, (200,), generator=g)
    clustered = F.normalize(centres[labels] + 0.1 * torch.randn(200, 16, generator=g), dim=1)
    key_labels = torch.arange(1, 4).repeat_interleave(10)
    keys = F.normalize(centres[key_labels] + 0.1 * torch.randn(30, 16, generator=g), dim=1)
    clustered_loss = queue_pixel_contrast(clustered, labels, keys, key_labels)
    shuffled_loss = queue_pixel_contrast(clustered, labels[torch.randperm(200, generator=g)], keys, key_labels)
    assert float(clustered_loss) < float(shuffled_loss) - 1.0


def test_the_contrast_matches_its_formula_and_leaves_out_classes_without_keys():
    a = F.normalize(torch.randn(3, 5), dim=1)
    keys = F.normalize(torch.randn(4, 5), dim=1)
    key_labels = torch.tensor([1, 1, 2, 2])
    labels = torch.tensor([1, 0, 3])  # class 3 has no key: left out
    tau = 0.07
    s = a @ keys.t() / tau
    l1 = -torch.stack([s[0, p] - torch.log(torch.exp(s[0, p]) + torch.exp(s[0, 2:]).sum()) for p in (0, 1)]).mean()
    l0 = torch.log(1 + torch.exp(s[1]).sum())  # background: an implicit positive of similarity 0
    per = queue_pixel_contrast(a, labels, keys, key_labels, tau, tau, reduction="none")
    assert torch.allclose(per, torch.stack([l1, l0, torch.tensor(0.0)]), atol=1e-5)
    assert torch.allclose(queue_pixel_contrast(a, labels, keys, key_labels, tau, tau), (l1 + l0) / 2, atol=1e-5)


def test_the_second_decoder_is_heterogeneous_and_cheaper_than_the_stock_one():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    net = PlainConvUNet(1, 4, (8, 16, 32, 64), torch.nn.Conv3d, 3, (1, 2, 2, 2), 2, 3, 2, conv_bias=True,
                        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=torch.nn.LeakyReLU, deep_supervision=True)
    enc = net.encoder
    dec = UpsampleAddDecoder(enc.output_channels, 3, enc.conv_op, enc.norm_op, enc.norm_op_kwargs, enc.nonlin)
    skips = enc(torch.randn(2, 1, 16, 24, 16))
    out = dec(skips)
    assert out.shape == (2, 3, 16, 24, 16)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(dec) < 0.5 * n(net.decoder)
    assert not any(isinstance(m, torch.nn.ConvTranspose3d) for m in dec.modules())
    # stopping one stage above full resolution: full-resolution logits, no convolution at full resolution
    shallow = UpsampleAddDecoder(enc.output_channels, 3, enc.conv_op, enc.norm_op, enc.norm_op_kwargs, enc.nonlin,
                                 output_stage=1)
    assert shallow(skips).shape == (2, 3, 16, 24, 16) and len(shallow.stages) == len(dec.stages) - 1
    assert shallow.seg.in_channels == dec.stages[1][0].out_channels
    with pytest.raises(ValueError, match="output_stage"):
        UpsampleAddDecoder(enc.output_channels, 3, output_stage=3)


# ------------------------------------------------------------------------------------------- scribbles
def _write(arr, path, spacing=(1.5, 1.5, 10.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def _scribble_dataset(root, n_patients=5, break_case=None, drop_class=None):
    for sub in ("imagesTr", "scribblesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for p in range(1, n_patients + 1):
        for f in (1, 12):
            case = f"patient{p:03d}_frame{f:02d}"
            dense = rng.integers(0, 4, (4, 12, 10)).astype(np.uint8)
            scribble = np.full_like(dense, 4)
            scribble[:, 5, :] = dense[:, 5, :]
            if drop_class is not None:
                scribble[scribble == drop_class] = 4
            _write(rng.random((4, 12, 10)).astype(np.float32), root / "imagesTr" / f"{case}_0000.nii.gz")
            _write(dense, root / "labelsTr" / f"{case}.nii.gz")
            _write(scribble, root / "scribblesTr" / f"{case}.nii.gz",
                   spacing=(1.0, 1.5, 10.0) if case == break_case else (1.5, 1.5, 10.0))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "cineMRI"},
                                                   "labels": {"background": 0, "RV": 1, "MYO": 2, "LV": 3},
                                                   "numTraining": 2 * n_patients, "file_ending": ".nii.gz"}))


def test_scribbles_become_nnunets_ignore_label_with_splits_by_patient(tmp_path, nnunet_env):
    from nnunet_cl.methods.pclmix.scribbles import convert_scribbles
    _scribble_dataset(tmp_path / "src")
    out = convert_scribbles(str(tmp_path / "src"), 961, "Scrib", progress=False)
    spec = json.loads((nnunet_env["nnUNet_raw"] / "Dataset961_Scrib" / "dataset.json").read_text())
    assert spec["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3, "ignore": 4} and spec["numTraining"] == 10
    src = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "src/scribblesTr/patient002_frame12.nii.gz")))
    got = sitk.GetArrayFromImage(sitk.ReadImage(f"{out}/labelsTr/patient002_frame12.nii.gz"))
    assert np.array_equal(src, got)  # 4 = unannotated is already the highest value: kept
    assert (tmp_path / "src/labelsTr/patient002_frame12.nii.gz").exists()
    dense = sitk.GetArrayFromImage(sitk.ReadImage(f"{out}/labelsTr_dense/patient002_frame12.nii.gz"))
    assert dense.max() <= 3
    splits = json.loads((nnunet_env["nnUNet_preprocessed"] / "Dataset961_Scrib" / "splits_final.json").read_text())
    assert len(splits) == 5
    for s in splits:
        patients_train = {c[:10] for c in s["train"]}
        assert not patients_train & {c[:10] for c in s["val"]}  # the two frames of a patient stay together
    dense_out = convert_scribbles(str(tmp_path / "src"), 962, "ScribDense", labels="dense", progress=False)
    assert "ignore" not in json.loads(open(f"{dense_out}/dataset.json").read())["labels"]
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(f"{dense_out}/labelsTr/patient002_frame12.nii.gz")),
                          dense)
    with pytest.raises(NnUNetCLError, match="already holds Dataset961_Scrib"):
        convert_scribbles(str(tmp_path / "src"), 961, "Again", progress=False)


def test_another_unannotated_value_is_moved_to_the_highest_label(tmp_path, nnunet_env):
    from nnunet_cl.methods.pclmix.scribbles import convert_scribbles
    _scribble_dataset(tmp_path / "src")
    for f in (tmp_path / "src/scribblesTr").iterdir():
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        _write(np.where(arr == 4, 255, arr).astype(np.uint8), f)
    out = convert_scribbles(str(tmp_path / "src"), 963, "Scrib255", unannotated=255, progress=False)
    got = sitk.GetArrayFromImage(sitk.ReadImage(f"{out}/labelsTr/patient001_frame01.nii.gz"))
    assert set(np.unique(got).tolist()) <= {0, 1, 2, 3, 4} and (got == 4).mean() > 0.8


@pytest.mark.parametrize("problem,match", [({"break_case": "patient003_frame12"}, "patient003_frame12 does not match"),
                                           ({"drop_class": 2}, "MYO have no scribble"),
                                           ({"group": r"^(case\d+)"}, "do not match --group")])
def test_bad_scribbles_are_refused_with_the_fix_and_nothing_written(tmp_path, nnunet_env, problem, match):
    from nnunet_cl.methods.pclmix.scribbles import DEFAULT_GROUP, convert_scribbles
    problem = dict(problem)
    group = problem.pop("group", DEFAULT_GROUP)
    _scribble_dataset(tmp_path / "src", **problem)
    with pytest.raises(NnUNetCLError, match=match) as e:
        convert_scribbles(str(tmp_path / "src"), 964, "Bad", group=group, progress=False)
    assert "Fix:" in str(e.value)
    assert list(nnunet_env["nnUNet_raw"].iterdir()) == []


# ------------------------------------------------------------------------------------ the trainer's step
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1, "other": 2, "ignore": 3},
                "numTraining": 4, "file_ending": ".nii.gz"}


@pytest.fixture
def pclmix_trainer(nnunet_env):
    from helpers import fake_preprocessed_folder, tiny_plans
    from nnunet_cl_trainers import nnUNetTrainerPCLMix
    fake_preprocessed_folder(nnunet_env, "Dataset997_Tiny")

    def make(**attrs):
        trainer = nnUNetTrainerPCLMix(tiny_plans(), "3d_fullres", 0, dict(DATASET_JSON), torch.device("cpu"))
        for k, v in {"training_seed": 0, "contrast_start_iteration": 0, "queue_size": 8,
                     "finetune_iterations_per_epoch": 10, "finetune_epochs": 2, **attrs}.items():
            setattr(trainer, k, v)
        trainer.initialize()
        return trainer
    return make


def _scribbled_batch(trainer, seed=0):
    """Two blob classes, annotated only on a few slices (3 = ignore elsewhere), as nnU-Net's targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool3d(torch.randn((2, 1, 16, 16, 16), generator=g), 5, 1, 2) * 5
    dense = (x > 0.3).float() + (x < -0.3).float() * 2
    scribbles = torch.full_like(dense, 3.0)
    scribbles[:, :, ::4] = dense[:, :, ::4]
    scales = trainer._get_deep_supervision_scales()
    target = [torch.nn.functional.interpolate(scribbles, scale_factor=tuple(s), mode="nearest") for s in scales]
    return {"data": x + 0.1 * torch.randn(x.shape, generator=g), "target": target}


def _copy(batch):
    return {k: (v.clone() if torch.is_tensor(v) else [t.clone() for t in v]) for k, v in batch.items()}


def test_the_step_mixes_and_feeds_clean_and_mixed_patches_in_one_batch(pclmix_trainer):
    trainer = pclmix_trainer()
    batch = _scribbled_batch(trainer)
    data, target = trainer.step_inputs(batch)
    m, p = batch["mask"], batch["partner"]
    assert data.shape[0] == 4 and torch.equal(data[:2], batch["data"])
    assert torch.equal(data[2:], m * batch["data"] + (1 - m) * batch["data"][p])
    assert torch.equal(target[0][2:], torch.where(m.bool(), batch["target"][0], batch["target"][0][p]))
    assert all(t.shape[0] == 4 for t in target)


def test_the_mix_pseudo_label_takes_the_box_from_one_decoder_and_the_rest_from_the_other(pclmix_trainer):
    """Each decoder's softmax is made to say one class everywhere (stock decoder: class 1, second decoder: class 2,
    through their output biases); then the box must be one decoder's class and the rest the other's, per the coin."""
    trainer = pclmix_trainer()
    net, aux = trainer.unwrapped_network, trainer.cl_modules["aux_decoder"]
    with torch.no_grad():
        for seg in net.decoder.seg_layers:
            seg.weight.zero_()
            seg.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
        aux.seg.weight.zero_()
        aux.seg.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
    captured = {}
    original = F.cross_entropy

    def spy(logits, target, *args, **kwargs):
        if "ignore_index" not in kwargs:  # the mix term's calls (nnU-Net's partial CE passes its ignore index)
            captured.setdefault("pseudo", target)
        return original(logits, target, *args, **kwargs)
    batch = _scribbled_batch(trainer)
    data, target = trainer.step_inputs(batch)
    output, features = trainer.forward_features(data, encoder=trainer.feature_request["encoder"])
    import nnunet_cl_trainers.pclmix as module
    module.F.cross_entropy = spy
    try:
        trainer.auxiliary_losses(batch, output, features)
    finally:
        module.F.cross_entropy = original
    pseudo, box = captured["pseudo"], batch["mask"][:, 0].bool()
    for j, coin in enumerate(batch["coin"].tolist()):
        inside, outside = (1, 2) if coin else (2, 1)  # coin: the stock decoder fills the box
        assert (pseudo[j][box[j]] == inside).all() and (pseudo[j][~box[j]] == outside).all()
    assert set(batch["coin"].tolist()) <= {True, False}


def test_steps_lower_the_loss_fill_the_memory_and_keep_the_extra_modules_out_of_the_network(pclmix_trainer):
    trainer = pclmix_trainer()
    assert not any(k.startswith(("aux_decoder", "head", "memory")) for k in trainer.network.state_dict())
    batch = _scribbled_batch(trainer)
    outs = [trainer.train_step(_copy(batch)) for _ in range(10)]
    losses = [float(o["loss"]) for o in outs]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.1, losses
    for term in trainer.loss_terms:
        assert all(math.isfinite(float(o[f"cl_{term}"])) for o in outs)
    keys, key_labels = trainer.cl_modules["memory"].keys()
    assert set(key_labels.tolist()) <= {1, 2} and keys.shape[0] > 0
    assert torch.allclose(keys.norm(dim=1), torch.ones(keys.shape[0]), atol=1e-4)
    assert float(outs[-1]["cl_contrast"]) > 0  # the contrast ran once the memory held keys


def test_unannotated_voxels_give_no_gradient_to_the_partial_loss(pclmix_trainer):
    trainer = pclmix_trainer()
    logits = torch.randn(2, 3, 16, 16, 16, requires_grad=True)
    target = torch.full((2, 1, 16, 16, 16), 3.0)
    target[:, :, 4:8] = 1.0
    trainer.aux_loss(logits, target).backward()
    assert logits.grad[:, :, :4].abs().max() == 0 and logits.grad[:, :, 8:].abs().max() == 0
    assert logits.grad[:, :, 4:8].abs().max() > 0


def test_no_contrast_before_its_start_iteration(pclmix_trainer):
    trainer = pclmix_trainer(contrast_start_iteration=1000)
    out = trainer.train_step(_scribbled_batch(trainer))
    assert float(out["cl_contrast"]) == 0.0
    assert trainer.cl_modules["memory"].keys()[0].shape[0] > 0  # the memory fills from the first step


@pytest.mark.parametrize("attrs", [{"mix_fraction": 1.5}, {"temperature": 0}, {"max_anchors": 0},
                                   {"contrast_weight": -1.0}])
def test_bad_settings_are_refused_at_set_up_with_the_fix(pclmix_trainer, attrs):
    with pytest.raises(NnUNetCLError, match="Fix:"):
        pclmix_trainer(**attrs)
