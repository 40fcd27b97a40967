"""Optional SAM / SAM 2 plumbing (nnunet_cl.methods.polycl.sam_refine, sam2_propagate) with fake predictors.

No weights are needed or downloaded. Two groups at the end:
- the real segment_anything and sam2 packages (the `sam` extra, part of the `test` extra) with randomly
  initialised weights saved as checkpoints: the CLIs run through the packages' real APIs, so an API mismatch
  fails here. Random weights say nothing about mask quality; the tests check what the plumbing guarantees;
- real checkpoints, only when NNUNET_CL_SAM_CHECKPOINT / NNUNET_CL_SAM2_CHECKPOINT (+ NNUNET_CL_SAM2_CONFIG)
  name them: mask quality on a synthetic disc.
"""
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.methods.polycl.sam2_propagate import (
    Sam2Propagator,
    SlicePropagator,
    load_slice_mask,
    main_sam2_propagate,
    propagate_from_slice,
)
from nnunet_cl.methods.polycl.sam_refine import (
    IdentityRefiner,
    MaskRefiner,
    SamBoxRefiner,
    boxes_from_mask,
    main_sam_refine,
    refine_prediction_folder,
    refine_volume,
    to_uint8_rgb,
)


# ----------------------------------------------------------------------------------------------- fakes
def _fill_box(shape, box):
    x0, y0, x1, y1 = box
    m = np.zeros(shape, dtype=bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    return m


class BoxFillRefiner:
    """Fake MaskRefiner: answers with the whole box filled and records its calls."""

    def __init__(self):
        self.calls = []

    def refine_slice(self, image2d, box):
        self.calls.append((image2d.copy(), tuple(box)))
        return _fill_box(image2d.shape, box)


class ConstantRefiner:
    def __init__(self, answer):
        self.answer = answer

    def refine_slice(self, image2d, box):
        return None if self.answer is None else np.full(image2d.shape, self.answer, dtype=bool)


class RecordingPropagator:
    """Fake SlicePropagator: records the call order; every propagated frame gets the prompt mask
    shifted by one pixel per frame of distance, so the output shows which pass wrote which slice."""

    def __init__(self):
        self.calls = []
        self.prompts = {}

    def set_frames(self, frames):
        self.calls.append(("set_frames", frames.shape))
        self.n = frames.shape[0]

    def add_mask(self, frame_index, obj_id, mask):
        self.calls.append(("add_mask", frame_index, obj_id))
        self.prompts[obj_id] = (frame_index, np.asarray(mask, dtype=bool))

    def propagate(self, start_index, reverse):
        self.calls.append(("propagate", start_index, reverse))
        order = range(start_index, -1, -1) if reverse else range(start_index, self.n)
        for idx in order:
            out = {}
            for obj_id, (f, m) in self.prompts.items():
                # the start frame is answered with garbage on purpose: the annotation must win there
                out[obj_id] = np.ones_like(m) if idx == start_index else np.roll(m, abs(idx - f), axis=1)
            yield idx, out


# ----------------------------------------------------------------------------------------- box prompts
def test_boxes_from_mask_margin_clipping_and_empty_slices():
    mask = np.zeros((6, 20, 30), dtype=np.uint8)
    mask[1, 5:8, 10:15] = 1          # interior: margin applies fully
    mask[3, 0:2, 27:30] = 3          # touches the top/right border: clipped
    boxes = boxes_from_mask(mask, axis=0, margin=2)
    assert set(boxes) == {1, 3}      # empty slices 0, 2, 4, 5 are skipped
    assert boxes[1] == (8, 3, 16, 9)  # (x0, y0, x1, y1): cols 10..14, rows 5..7, +-2
    assert boxes[3] == (25, 0, 29, 3)
    assert boxes_from_mask(mask, margin=0)[1] == (10, 5, 14, 7)
    assert boxes_from_mask(np.zeros((3, 4, 4)), margin=5) == {}
    with pytest.raises(ValueError):
        boxes_from_mask(mask, margin=-1)


def test_boxes_from_mask_other_axes_and_components():
    mask = np.zeros((10, 12, 14), dtype=bool)
    mask[2:4, 3:6, 7] = True
    b2 = boxes_from_mask(mask, axis=2, margin=1)
    assert set(b2) == {7}
    assert b2[7] == (2, 1, 6, 4)  # slice (10, 12): rows = axis 0 (2..3), cols = axis 1 (3..5)
    two = np.zeros((1, 10, 20), dtype=bool)
    two[0, 2:4, 2:4] = True
    two[0, 6:8, 14:18] = True
    comps = boxes_from_mask(two, margin=1, per_component=True)
    assert comps[0] == [(1, 1, 4, 4), (13, 5, 18, 8)]
    assert boxes_from_mask(two, margin=0)[0] == (2, 2, 17, 7)


def test_to_uint8_rgb():
    img = np.array([[-1000.0, 40.0], [240.0, 3000.0]])
    rgb = to_uint8_rgb(img, window=(-160, 240))
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[1, 1, 0] == 255 and rgb[1, 0, 0] == 255 and rgb[0, 1, 0] == 128
    assert (to_uint8_rgb(np.full((3, 3), 7.0)) == 0).all()


# -------------------------------------------------------------------------------------- volume merging
def _coarse():
    mask = np.zeros((5, 16, 16), dtype=np.uint8)
    mask[1, 4:8, 4:8] = 1
    mask[2, 5:7, 5:7] = 1
    mask[2, 10:12, 10:12] = 2
    return mask


def test_refine_volume_merges_slice_masks_per_label():
    mask = _coarse()
    image = np.random.default_rng(0).normal(size=mask.shape)
    refiner = BoxFillRefiner()
    out = refine_volume(image, mask, refiner, margin=1)
    assert out.shape == mask.shape and out.dtype == mask.dtype
    assert isinstance(refiner, MaskRefiner)
    # slices without a box stay zero
    assert not out[0].any() and not out[3].any() and not out[4].any()
    # label 1 on slice 1: the box (cols/rows 3..8) filled
    assert (out[1] == np.where(_fill_box((16, 16), (3, 3, 8, 8)), 1, 0)).all()
    assert (out[2][9:13, 9:13] == 2).all() and (out[2][4:8, 4:8] == 1).all()
    # the refiner saw the right image slices, labels in ascending order
    assert [box for _, box in refiner.calls] == [(3, 3, 8, 8), (4, 4, 7, 7), (9, 9, 12, 12)]
    assert np.array_equal(refiner.calls[0][0], image[1])


def test_refine_volume_fallbacks_and_options():
    mask = _coarse()
    image = np.zeros(mask.shape)
    # no answer, or an empty answer -> coarse kept exactly
    assert np.array_equal(refine_volume(image, mask, IdentityRefiner()), mask)
    assert np.array_equal(refine_volume(image, mask, ConstantRefiner(False)), mask)
    # an everywhere-answer is clipped to the box unless clip_to_box=False
    clipped = refine_volume(image, mask, ConstantRefiner(True), labels=[1], margin=0)
    assert np.array_equal(clipped, np.where(mask == 1, 1, 0).astype(mask.dtype))
    unclipped = refine_volume(image, mask, ConstantRefiner(True), labels=[1, 2], clip_to_box=False)
    assert (unclipped[2] == 2).all()  # later label overwrites earlier
    assert (unclipped[1] == 1).all() and not unclipped[0].any()
    # labels subset drops the others; axis != 0 gives the same result transposed
    only2 = refine_volume(image, mask, BoxFillRefiner(), labels=[2], margin=0)
    assert set(np.unique(only2)) == {0, 2}
    t = np.moveaxis(mask, 0, 2)
    out_t = refine_volume(np.moveaxis(image, 0, 2), t, BoxFillRefiner(), axis=2, margin=1)
    assert np.array_equal(np.moveaxis(out_t, 2, 0), refine_volume(image, mask, BoxFillRefiner(), margin=1))


def test_refine_volume_rejects_wrong_shapes():
    mask = _coarse()
    with pytest.raises(ValueError):
        refine_volume(np.zeros((5, 16, 15)), mask, IdentityRefiner())

    class Bad:
        def refine_slice(self, image2d, box):
            return np.ones((3, 3), dtype=bool)

    with pytest.raises(ValueError):
        refine_volume(np.zeros(mask.shape), mask, Bad())


# -------------------------------------------------------------------------------- folder round trip
def _write(arr, path, spacing=(0.8, 0.7, 2.5), origin=(10.0, -5.0, 3.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))
    return img


def _make_folders(tmp_path):
    images, preds = tmp_path / "imagesTs", tmp_path / "pred"
    images.mkdir()
    preds.mkdir()
    for k, case in enumerate(["case_a", "case_b"]):
        _write(np.random.default_rng(k).normal(size=(5, 16, 16)).astype(np.float32), images / f"{case}_0000.nii.gz")
        _write(_coarse(), preds / f"{case}.nii.gz")
    (preds / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {"background": 0}}))
    (preds / "plans.json").write_text("{}")
    return images, preds


def test_refine_prediction_folder_round_trip_keeps_names_and_geometry(tmp_path):
    images, preds = _make_folders(tmp_path)
    out = tmp_path / "refined"
    written = refine_prediction_folder(str(preds), str(images), str(out), BoxFillRefiner(), margin=1)
    assert [os.path.basename(w) for w in written] == ["case_a.nii.gz", "case_b.nii.gz"]
    assert (out / "dataset.json").is_file() and (out / "plans.json").is_file()
    for case in ("case_a", "case_b"):
        ref = sitk.ReadImage(str(preds / f"{case}.nii.gz"))
        got = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert got.GetSpacing() == pytest.approx(ref.GetSpacing())
        assert got.GetOrigin() == pytest.approx(ref.GetOrigin())
        assert got.GetDirection() == pytest.approx(ref.GetDirection())
        assert got.GetPixelID() == ref.GetPixelID()
        expected = refine_volume(np.zeros((5, 16, 16)), _coarse(), BoxFillRefiner(), margin=1)
        assert np.array_equal(sitk.GetArrayFromImage(got), expected)


def test_refine_prediction_folder_clear_errors(tmp_path):
    images, preds = _make_folders(tmp_path)
    os.remove(images / "case_b_0000.nii.gz")
    with pytest.raises(NnUNetCLError, match="case_b"):
        refine_prediction_folder(str(preds), str(images), str(tmp_path / "o"), IdentityRefiner())
    with pytest.raises(NnUNetCLError, match="does not exist"):
        refine_prediction_folder(str(tmp_path / "nope"), str(images), str(tmp_path / "o"), IdentityRefiner())


# -------------------------------------------------------------- SamBoxRefiner with a fake segment_anything
class _FakeSamPredictor:
    instances = []

    def __init__(self, model):
        self.model = model
        self.set_image_calls = 0
        self.images = []
        _FakeSamPredictor.instances.append(self)

    def set_image(self, image):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        self.set_image_calls += 1
        self.images.append(image)

    def predict(self, box=None, multimask_output=False):
        h, w = self.images[-1].shape[:2]
        return _fill_box((h, w), [int(v) for v in box])[None], np.array([0.9]), None


@pytest.fixture
def fake_segment_anything(monkeypatch, tmp_path):
    mod = types.ModuleType("segment_anything")
    mod.sam_model_registry = {"vit_b": lambda checkpoint=None: torch.nn.Linear(2, 2),
                              "vit_h": lambda checkpoint=None: torch.nn.Linear(3, 3)}
    mod.SamPredictor = _FakeSamPredictor
    monkeypatch.setitem(sys.modules, "segment_anything", mod)
    ckpt = tmp_path / "sam_fake.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), ckpt)
    _FakeSamPredictor.instances.clear()
    return ckpt


def test_sam_box_refiner_plumbing_with_fake_module(fake_segment_anything):
    refiner = SamBoxRefiner(str(fake_segment_anything), model_type="vit_b", window=(0, 1))
    img = np.random.default_rng(0).random((12, 10))
    m1 = refiner.refine_slice(img, (1, 2, 3, 4))
    m2 = refiner.refine_slice(img.copy(), (5, 5, 6, 6))  # same slice content: embedding reused
    assert m1.dtype == bool and m1.shape == (12, 10) and m1.sum() == 9 and m2.sum() == 4
    pred = _FakeSamPredictor.instances[-1]
    assert pred.set_image_calls == 1
    refiner.refine_slice(img + 1, (1, 2, 3, 4))
    assert pred.set_image_calls == 2


def test_sam_box_refiner_errors(fake_segment_anything, tmp_path):
    with pytest.raises(NnUNetCLError, match="vit_b"):
        SamBoxRefiner(str(fake_segment_anything), model_type="vit_h")  # checkpoint does not fit the type
    with pytest.raises(NnUNetCLError, match="Unknown SAM model_type"):
        SamBoxRefiner(str(fake_segment_anything), model_type="vit_x")
    with pytest.raises(NnUNetCLError, match="does not exist"):
        SamBoxRefiner(str(tmp_path / "missing.pth"))


def test_missing_segment_anything_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # makes `import segment_anything` fail
    with pytest.raises(NnUNetCLError) as e:
        SamBoxRefiner(str(tmp_path / "missing.pth"))
    msg = str(e.value)
    assert 'pip install "nnunet-cl[sam]"' in msg and "segment_anything is not installed" in msg
    assert "missing.pth does not exist" in msg  # both problems in one message


def test_cli_sam_refine_end_to_end_with_fake_module(fake_segment_anything, tmp_path, capsys):
    images, preds = _make_folders(tmp_path)
    out = tmp_path / "cli_out"
    main_sam_refine(["-i", str(images), "-p", str(preds), "-o", str(out), "-ckpt", str(fake_segment_anything),
                     "--margin", "1", "--window", "-1", "1"])
    assert "Refined 2 case(s)" in capsys.readouterr().out
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_a.nii.gz")))
    assert np.array_equal(got, refine_volume(np.zeros((5, 16, 16)), _coarse(), BoxFillRefiner(), margin=1))


def test_refine_volume_visits_each_slice_once_for_all_labels():
    """Labels 1 and 2 share slice 2: all its prompts come together, so SAM encodes the slice once."""
    refiner = BoxFillRefiner()
    image = np.random.default_rng(0).normal(size=(5, 16, 16))
    refine_volume(image, _coarse(), refiner, margin=0)
    slices = [int(np.flatnonzero([np.array_equal(c[0], image[k]) for k in range(5)])[0]) for c in refiner.calls]
    assert slices == [1, 2, 2]  # slice-major; label 1's then label 2's box on slice 2


def test_cli_sam_refine_checks_input_before_loading_sam(monkeypatch, tmp_path):
    """A wrong folder is reported in one line (no traceback) even where SAM is not installed."""
    monkeypatch.setitem(sys.modules, "segment_anything", None)
    images, preds = _make_folders(tmp_path)
    with pytest.raises(SystemExit) as e:
        main_sam_refine(["-i", str(tmp_path / "nope"), "-p", str(preds), "-o", str(tmp_path / "o"),
                         "-ckpt", "x.pth"])
    msg = str(e.value)
    assert msg.startswith("nnUNetv2_cl_sam_refine: error: The image folder (-i)") and "\n" not in msg
    with pytest.raises(SystemExit, match="segment_anything is not installed"):  # good input: then the extra
        main_sam_refine(["-i", str(images), "-p", str(preds), "-o", str(tmp_path / "o"), "-ckpt", "x.pth"])


def test_cli_sam2_propagate_one_line_errors(tmp_path):
    vol = np.zeros((6, 8, 10), dtype=np.float32)
    _write(vol, tmp_path / "img_0000.nii.gz")
    args = ["-s", str(tmp_path / "lab.npy"), "-o", str(tmp_path / "o.nii.gz"), "-ckpt", "x.pt", "-cfg", "c.yaml"]
    with pytest.raises(SystemExit, match="^nnUNetv2_cl_sam2_propagate: error: The image .* does not exist"):
        main_sam2_propagate(["-i", str(tmp_path / "missing.nii.gz"), "--slice", "0"] + args)
    with pytest.raises(SystemExit, match="--slice 6 along --axis 0 is outside"):
        main_sam2_propagate(["-i", str(tmp_path / "img_0000.nii.gz"), "--slice", "6"] + args)
    with pytest.raises(SystemExit, match=r"--axis 3 is not an axis of .* Fix: --axis 0, 1 or 2"):
        main_sam2_propagate(["-i", str(tmp_path / "img_0000.nii.gz"), "--slice", "0", "--axis", "3"] + args)


# ------------------------------------------------------------------------------------ SAM 2 propagation
def test_propagation_order_forward_then_backward_and_output_volume():
    vol = np.random.default_rng(0).normal(size=(7, 8, 9))
    slice_mask = np.zeros((8, 9), dtype=np.uint8)
    slice_mask[2:4, 1:3] = 1
    prop = RecordingPropagator()
    assert isinstance(prop, SlicePropagator)
    out = propagate_from_slice(vol, 3, slice_mask, prop)
    assert prop.calls == [("set_frames", (7, 8, 9)), ("add_mask", 3, 1),
                          ("propagate", 3, False), ("propagate", 3, True)]
    assert out.shape == vol.shape and out.dtype == np.uint8
    assert np.array_equal(out[3], slice_mask)  # annotated slice kept despite the fake's answer there
    for idx in range(7):
        if idx != 3:
            assert np.array_equal(out[idx], np.roll(slice_mask, abs(idx - 3), axis=1))


def test_propagation_edges_multilabel_and_axis():
    vol = np.zeros((4, 6, 5))
    m = np.zeros((4, 6), dtype=np.int16)  # slices along axis 2 have shape (4, 6)
    m[0, 0] = 1
    m[1, 1] = 2
    prop = RecordingPropagator()
    out = propagate_from_slice(vol, 0, m, prop, axis=2)
    assert [c for c in prop.calls if c[0] == "propagate"] == [("propagate", 0, False)]  # nothing before slice 0
    assert [c for c in prop.calls if c[0] == "add_mask"] == [("add_mask", 0, 1), ("add_mask", 0, 2)]
    assert out.shape == vol.shape and out.dtype == np.int16
    assert np.array_equal(out[:, :, 0], m) and set(np.unique(out)) == {0, 1, 2}
    prop2 = RecordingPropagator()
    propagate_from_slice(vol, 4, m, prop2, axis=2)
    assert [c for c in prop2.calls if c[0] == "propagate"] == [("propagate", 4, True)]
    bool_out = propagate_from_slice(vol, 1, m > 0, RecordingPropagator(), axis=2)
    assert bool_out.dtype == np.uint8


def test_propagation_clear_errors():
    vol = np.zeros((4, 6, 5))
    with pytest.raises(NnUNetCLError, match="empty"):
        propagate_from_slice(vol, 1, np.zeros((6, 5)), RecordingPropagator())
    with pytest.raises(NnUNetCLError, match="outside"):
        propagate_from_slice(vol, 4, np.ones((6, 5)), RecordingPropagator())
    with pytest.raises(NnUNetCLError, match="shape"):
        propagate_from_slice(vol, 1, np.ones((5, 6)), RecordingPropagator())


def test_load_slice_mask_variants(tmp_path):
    full = np.zeros((4, 6, 5), dtype=np.uint8)
    full[2, 1, 1] = 3
    _write(full, tmp_path / "full.nii.gz")
    np.save(tmp_path / "s.npy", full[2])
    assert np.array_equal(load_slice_mask(str(tmp_path / "full.nii.gz"), full.shape, 2), full[2])
    assert np.array_equal(load_slice_mask(str(tmp_path / "s.npy"), full.shape, 2), full[2])
    sitk.WriteImage(sitk.GetImageFromArray(full[2:3]), str(tmp_path / "one.nii.gz"))
    assert np.array_equal(load_slice_mask(str(tmp_path / "one.nii.gz"), full.shape, 2), full[2])
    with pytest.raises(NnUNetCLError):
        load_slice_mask(str(tmp_path / "missing.nii.gz"), full.shape, 2)


class _FakeVideoPredictor:
    """Stands in for sam2's video predictor: checks the JPEG folder and answers with logits tensors."""

    def __init__(self):
        self.calls = []

    def init_state(self, video_path):
        names = sorted(os.listdir(video_path))
        from PIL import Image
        first = Image.open(os.path.join(video_path, names[0]))
        self.calls.append(("init_state", names, first.mode, first.size))
        self.video_path = video_path
        return {"n": len(names), "hw": first.size[::-1], "masks": {}}

    def add_new_mask(self, inference_state, frame_idx, obj_id, mask):
        self.calls.append(("add_new_mask", frame_idx, obj_id))
        inference_state["masks"][obj_id] = mask

    def propagate_in_video(self, inference_state, start_frame_idx=None, reverse=False):
        self.calls.append(("propagate_in_video", start_frame_idx, reverse))
        order = range(start_frame_idx, -1, -1) if reverse else range(start_frame_idx, inference_state["n"])
        ids = sorted(inference_state["masks"])
        for idx in order:
            logits = torch.stack([torch.from_numpy(inference_state["masks"][o]).float()[None] * 20 - 10 for o in ids])
            yield idx, ids, logits

    def reset_state(self, inference_state):
        self.calls.append(("reset_state",))


@pytest.fixture
def fake_sam2(monkeypatch, tmp_path):
    predictors = []

    def build(config, ckpt, device="cuda"):
        if config == "bad.yaml":
            raise RuntimeError("hydra could not find it")
        predictors.append(_FakeVideoPredictor())
        return predictors[-1]

    pkg = types.ModuleType("sam2")
    sub = types.ModuleType("sam2.build_sam")
    sub.build_sam2_video_predictor = build
    pkg.build_sam = sub
    monkeypatch.setitem(sys.modules, "sam2", pkg)
    monkeypatch.setitem(sys.modules, "sam2.build_sam", sub)
    ckpt = tmp_path / "sam2_fake.pt"
    ckpt.write_bytes(b"not a real checkpoint")
    return ckpt, predictors


def test_sam2_propagator_writes_jpeg_frames_and_cleans_up(fake_sam2):
    ckpt, predictors = fake_sam2
    vol = np.random.default_rng(0).normal(size=(12, 8, 10))
    m = np.zeros((8, 10), dtype=np.uint8)
    m[2:5, 3:6] = 2
    with Sam2Propagator(str(ckpt), "configs/sam2.1/sam2.1_hiera_t.yaml") as prop:
        out = propagate_from_slice(vol, 5, m, prop)
        tmp = predictors[0].video_path
        assert os.path.isdir(tmp)
    assert not os.path.exists(tmp)
    calls = predictors[0].calls
    init = calls[0]
    assert init[1] == [f"{i:05d}.jpg" for i in range(12)] and init[2] == "RGB" and init[3] == (10, 8)
    assert [c for c in calls if c[0] == "propagate_in_video"] == [("propagate_in_video", 5, False),
                                                                 ("propagate_in_video", 5, True)]
    assert calls[-1] == ("reset_state",)
    assert all(np.array_equal(out[i], m) for i in range(12))


def test_sam2_missing_module_and_bad_config_errors(monkeypatch, fake_sam2, tmp_path):
    ckpt, _ = fake_sam2
    with pytest.raises(NnUNetCLError, match="config name inside the sam2 package"):
        Sam2Propagator(str(ckpt), "bad.yaml")
    with pytest.raises(NnUNetCLError, match="No SAM 2 config"):
        Sam2Propagator(str(ckpt), "")
    monkeypatch.setitem(sys.modules, "sam2", None)
    monkeypatch.setitem(sys.modules, "sam2.build_sam", None)
    with pytest.raises(NnUNetCLError) as e:
        Sam2Propagator(str(tmp_path / "nope.pt"), "configs/sam2.1/sam2.1_hiera_t.yaml")
    assert 'pip install "nnunet-cl[sam]"' in str(e.value) and "nope.pt does not exist" in str(e.value)


def test_cli_sam2_propagate_end_to_end_with_fake_module(fake_sam2, tmp_path, capsys):
    ckpt, _ = fake_sam2
    vol = np.random.default_rng(1).normal(size=(6, 8, 10)).astype(np.float32)
    ref = _write(vol, tmp_path / "img_0000.nii.gz")
    lab = np.zeros((6, 8, 10), dtype=np.uint8)
    lab[2, 1:4, 1:4] = 1
    _write(lab, tmp_path / "lab.nii.gz")
    out = tmp_path / "o" / "img.nii.gz"
    main_sam2_propagate(["-i", str(tmp_path / "img_0000.nii.gz"), "-s", str(tmp_path / "lab.nii.gz"),
                         "--slice", "2", "-o", str(out), "-ckpt", str(ckpt), "-cfg", "configs/x.yaml"])
    assert "Wrote" in capsys.readouterr().out
    got = sitk.ReadImage(str(out))
    assert got.GetSpacing() == pytest.approx(ref.GetSpacing()) and got.GetOrigin() == pytest.approx(ref.GetOrigin())
    arr = sitk.GetArrayFromImage(got)
    assert all(np.array_equal(arr[i], lab[2]) for i in range(6))


# ------------------------------------------------------------------------ real packages, random weights
_NO_SAM = importlib.util.find_spec("segment_anything") is None
_NO_SAM2 = importlib.util.find_spec("sam2") is None


@pytest.mark.skipif(_NO_SAM, reason="segment_anything not installed: pip install 'nnunet-cl[sam]' (or [test])")
def test_cli_sam_refine_through_real_segment_anything(tmp_path, capsys):
    from segment_anything import sam_model_registry
    torch.manual_seed(0)
    ckpt = tmp_path / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), ckpt)
    images, preds = tmp_path / "images", tmp_path / "pred"
    images.mkdir()
    preds.mkdir()
    coarse = np.zeros((3, 48, 40), dtype=np.uint8)
    coarse[1, 10:20, 8:16] = 1
    coarse[1, 30:36, 25:33] = 2  # two labels on one slice
    _write(np.random.default_rng(0).normal(size=coarse.shape).astype(np.float32), images / "ct_0000.nii.gz")
    _write(coarse, preds / "ct.nii.gz")
    out = tmp_path / "refined"
    main_sam_refine(["-i", str(images), "-p", str(preds), "-o", str(out), "-ckpt", str(ckpt), "--margin", "2"])
    assert "Refined 1 case(s)" in capsys.readouterr().out
    ref, got_img = sitk.ReadImage(str(preds / "ct.nii.gz")), sitk.ReadImage(str(out / "ct.nii.gz"))
    got = sitk.GetArrayFromImage(got_img)
    assert got.shape == coarse.shape and got_img.GetSpacing() == pytest.approx(ref.GetSpacing())
    assert not got[0].any() and not got[2].any()  # slices without a box stay empty
    assert set(np.unique(got)) <= {0, 1, 2}
    # clip_to_box (the default): each label only inside its box (coarse box + margin 2)
    assert not got[1][(got[1] == 1) & ~_box_mask(coarse[1] == 1, 2)].any()
    assert not got[1][(got[1] == 2) & ~_box_mask(coarse[1] == 2, 2)].any()


def _box_mask(mask2d, margin):
    ys, xs = np.nonzero(mask2d)
    box = np.zeros_like(mask2d, dtype=bool)
    box[max(ys.min() - margin, 0):ys.max() + margin + 1, max(xs.min() - margin, 0):xs.max() + margin + 1] = True
    return box


@pytest.mark.skipif(_NO_SAM2, reason="sam2 not installed: pip install 'nnunet-cl[sam]' (or [test])")
def test_cli_sam2_propagate_through_real_sam2(tmp_path, capsys):
    from sam2.build_sam import build_sam2_video_predictor
    torch.manual_seed(0)
    cfg = "configs/sam2.1/sam2.1_hiera_t.yaml"
    ckpt = tmp_path / "sam2.1_hiera_t_random.pt"
    torch.save({"model": build_sam2_video_predictor(cfg, None, device="cpu").state_dict()}, ckpt)
    volume = np.random.default_rng(0).normal(size=(4, 40, 48)).astype(np.float32)
    annotated = np.zeros((40, 48), dtype=np.uint8)
    annotated[10:20, 10:22] = 1
    annotated[25:30, 30:40] = 2
    _write(volume, tmp_path / "ct_0000.nii.gz")
    _write(annotated[None], tmp_path / "slice.nii.gz")  # a 1-slice volume holding the annotation
    out = tmp_path / "label.nii.gz"
    main_sam2_propagate(["-i", str(tmp_path / "ct_0000.nii.gz"), "-s", str(tmp_path / "slice.nii.gz"),
                         "--slice", "1", "-o", str(out), "-ckpt", str(ckpt), "-cfg", cfg])
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert got.shape == volume.shape and got.dtype == np.uint8
    assert np.array_equal(got[1], annotated)  # the annotated slice is kept as given
    assert set(np.unique(got)) <= {0, 1, 2}   # other frames hold only the annotated objects' labels


# ------------------------------------------------------------------------ real checkpoints (opt-in)
_SAM_CKPT = os.environ.get("NNUNET_CL_SAM_CHECKPOINT")
_SAM2_CKPT = os.environ.get("NNUNET_CL_SAM2_CHECKPOINT")
_SAM2_CFG = os.environ.get("NNUNET_CL_SAM2_CONFIG")


def _disc_volume(n=5, size=128, radius=30):
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 < radius ** 2
    vol = np.where(disc[None], 200.0, -100.0).repeat(n, axis=0)
    return vol, disc


@pytest.mark.skipif(not _SAM_CKPT or importlib.util.find_spec("segment_anything") is None,
                    reason="real SAM test: set NNUNET_CL_SAM_CHECKPOINT to a downloaded SAM checkpoint "
                           "(NNUNET_CL_SAM_MODEL_TYPE, default vit_b) and pip install 'nnunet-cl[sam]'")
def test_real_sam_refines_a_disc():
    vol, disc = _disc_volume(n=1)
    refiner = SamBoxRefiner(_SAM_CKPT, model_type=os.environ.get("NNUNET_CL_SAM_MODEL_TYPE", "vit_b"))
    coarse = np.zeros(vol.shape, dtype=np.uint8)
    coarse[0, 44:84, 44:84] = 1  # a square inside the disc
    out = refine_volume(vol, coarse, refiner, margin=12)
    inter = np.logical_and(out[0] > 0, disc).sum()
    assert inter / np.logical_or(out[0] > 0, disc).sum() > 0.7


@pytest.mark.skipif(not (_SAM2_CKPT and _SAM2_CFG) or importlib.util.find_spec("sam2") is None,
                    reason="real SAM 2 test: set NNUNET_CL_SAM2_CHECKPOINT and NNUNET_CL_SAM2_CONFIG (e.g. "
                           "configs/sam2.1/sam2.1_hiera_t.yaml) and pip install 'nnunet-cl[sam]'")
def test_real_sam2_propagates_a_cylinder():
    vol, disc = _disc_volume(n=5)
    with Sam2Propagator(_SAM2_CKPT, _SAM2_CFG) as prop:
        out = propagate_from_slice(vol, 2, disc.astype(np.uint8), prop)
    for i in (0, 1, 3, 4):
        inter = np.logical_and(out[i] > 0, disc).sum()
        assert inter / np.logical_or(out[i] > 0, disc).sum() > 0.7
