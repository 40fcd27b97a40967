"""Optional post-hoc refinement of a coarse 3-D segmentation with SAM box prompts (PolyCL, METHODS_SPEC §4).

PolyCL's paper refines the fine-tuned model's prediction slice by slice: the bounding box of the coarse
mask on a slice becomes a box prompt for the Segment Anything Model (SAM), and SAM's mask replaces the
coarse one. The authors' repository has no SAM code; this module is our implementation.

Install: ``pip install "nnunet-cl[sam]"`` (segment-anything). Checkpoints are supplied by the user (e.g.
``sam_vit_b_01ec64.pth`` for ``--model_type vit_b``); nothing is ever downloaded. ``segment_anything`` is
imported only inside ``SamBoxRefiner``, so everything else here (box prompts, merging, folder I/O) works
and is tested without it, through the ``MaskRefiner`` protocol.

Conventions:

* Slices are taken along ``axis`` of the numpy array. For an array read with SimpleITK (z, y, x) the
  default ``axis=0`` gives axial slices (y, x).
* Boxes are SAM's XYXY format in pixel indices of the 2-D slice: x = column, y = row, both ends
  inclusive: ``(x0, y0, x1, y1)``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
from os.path import isdir, isfile, join
from typing import Protocol, runtime_checkable

import numpy as np

from nnunet_cl.paths import NnUNetCLError

__all__ = [
    "MaskRefiner",
    "IdentityRefiner",
    "SamBoxRefiner",
    "to_uint8_rgb",
    "boxes_from_mask",
    "refine_volume",
    "prediction_cases",
    "refine_prediction_folder",
    "main_sam_refine",
]

Box = tuple[int, int, int, int]

_SAM_INSTALL = ('segment_anything is not installed. Fix: pip install "nnunet-cl[sam]" '
                "(or pip install segment-anything).")
_KNOWN_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".tif", ".tiff")


@runtime_checkable
class MaskRefiner(Protocol):
    """Anything that turns (2-D image slice, box prompt) into a 2-D mask.

    ``refine_slice`` returns a bool mask of the slice's shape, or None when it has no answer; an empty
    mask counts as "no answer" too (see ``refine_volume``).
    """

    def refine_slice(self, image2d: np.ndarray, box: Box) -> np.ndarray | None: ...


class IdentityRefiner:
    """Refiner that never answers, so ``refine_volume`` returns the coarse mask unchanged (a baseline)."""

    def refine_slice(self, image2d: np.ndarray, box: Box) -> None:
        return None


def to_uint8_rgb(image2d: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Intensity slice -> (H, W, 3) uint8, the input SAM and SAM 2 expect.

    Args:
        image2d: 2-D intensity slice (any dtype).
        window: (low, high) intensities mapped to 0 and 255, e.g. (-160, 240) for the paper's CT window
            (centre 40, width 400). None: the slice's 0.5th-99.5th percentiles, modality-agnostic.
    """
    img = np.asarray(image2d, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {img.shape}")
    if window is None:
        lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    else:
        lo, hi = float(window[0]), float(window[1])
    if hi <= lo:  # constant slice: avoid dividing by zero, give a black image
        scaled = np.zeros_like(img)
    else:
        scaled = (np.clip(img, lo, hi) - lo) / (hi - lo)
    u8 = np.round(scaled * 255.0).astype(np.uint8)
    return np.repeat(u8[:, :, None], 3, axis=2)


def _clip_box(x0: int, y0: int, x1: int, y1: int, margin: int, shape: tuple[int, int]) -> Box:
    """Tight inclusive box grown by ``margin`` pixels and clipped to a slice of ``shape`` (rows, cols)."""
    h, w = shape
    return (max(int(x0) - margin, 0), max(int(y0) - margin, 0),
            min(int(x1) + margin, w - 1), min(int(y1) + margin, h - 1))


def _box_of(mask2d: np.ndarray, margin: int) -> Box:
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    return _clip_box(cols[0], rows[0], cols[-1], rows[-1], margin, mask2d.shape)


def boxes_from_mask(mask3d: np.ndarray, axis: int = 0, margin: int = 5,
                    per_component: bool = False) -> dict[int, Box] | dict[int, list[Box]]:
    """Per-slice SAM box prompts from a coarse 3-D mask.

    Args:
        mask3d: 3-D array; every nonzero voxel is foreground (pass ``mask == label`` for one label).
        axis: slicing axis.
        margin: pixels added on every side of the tight box, then clipped to the slice (a coarse mask
            tends to be slightly too small at the organ border; SAM does better with some context).
        per_component: False -> one box per slice around all its foreground. True -> one box per
            8-connected component of the slice (two kidneys on one slice get two prompts).

    Returns:
        ``{slice_index: (x0, y0, x1, y1)}``, or ``{slice_index: [box, ...]}`` with ``per_component``.
        Slices without foreground are absent.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    fg = np.moveaxis(np.asarray(mask3d) != 0, axis, 0)
    if fg.ndim != 3:
        raise ValueError(f"expected a 3-D mask, got shape {np.asarray(mask3d).shape}")
    boxes: dict = {}
    occupied = np.flatnonzero(fg.reshape(fg.shape[0], -1).any(axis=1))
    if per_component:
        from scipy import ndimage
        eight = np.ones((3, 3), dtype=bool)
    for s in occupied.tolist():
        sl = fg[s]
        if not per_component:
            boxes[s] = _box_of(sl, margin)
            continue
        lab, _ = ndimage.label(sl, structure=eight)
        # find_objects lists components in label order (raster order of first voxel): deterministic boxes
        boxes[s] = [_clip_box(obj[1].start, obj[0].start, obj[1].stop - 1, obj[0].stop - 1, margin, sl.shape)
                    for obj in ndimage.find_objects(lab)]
    return boxes


def _box_region(shape: tuple[int, int], box: Box) -> np.ndarray:
    x0, y0, x1, y1 = box
    region = np.zeros(shape, dtype=bool)
    region[y0:y1 + 1, x0:x1 + 1] = True
    return region


def refine_volume(image3d: np.ndarray, mask3d: np.ndarray, refiner: MaskRefiner, labels=None,
                  axis: int = 0, margin: int = 5, per_component: bool = False,
                  clip_to_box: bool = True) -> np.ndarray:
    """Refine a coarse label volume slice by slice with box prompts and merge the result back.

    For every label (in the order of ``labels``; default all nonzero labels of ``mask3d``, ascending):
    the label's boxes come from ``boxes_from_mask``; on each slice with a box the refiner's masks (one
    per box) are united and written with that label.

    Rules (chosen here; the paper does not say):

    * Slices without a box stay 0 for that label: SAM only refines what the coarse model found, it never
      adds slices.
    * When the refiner returns None or an empty mask for a box, the coarse mask inside that box is kept:
      an empty answer to a box around real coarse foreground is a SAM failure, not evidence of absence.
    * ``clip_to_box``: the refined mask is cut to its box (tight box + margin), so a leak of SAM into a
      neighbouring organ cannot spread beyond the prompt.
    * Labels are written in order and a later label overwrites an earlier one where both claim a voxel;
      with the ascending default, higher labels (often nested structures such as a tumour inside its
      organ) win.

    Args:
        image3d: intensities, same shape as ``mask3d``.
        mask3d: coarse integer label volume (0 = background).
        refiner: a ``MaskRefiner`` (``SamBoxRefiner``, ``IdentityRefiner`` or a fake in tests).
        labels: labels to refine (others are dropped from the output); None = all present.
        axis, margin, per_component: as in ``boxes_from_mask``.
        clip_to_box: see above.

    Returns:
        Refined label volume, same shape and dtype as ``mask3d``.
    """
    image3d = np.asarray(image3d)
    mask3d = np.asarray(mask3d)
    if image3d.shape != mask3d.shape:
        raise ValueError(f"image {image3d.shape} and mask {mask3d.shape} must have the same shape")
    if labels is None:
        labels = [int(v) for v in np.unique(mask3d) if v != 0]
    img = np.moveaxis(image3d, axis, 0)
    coarse = np.moveaxis(mask3d, axis, 0)
    out = np.zeros_like(coarse)
    boxes = {label: boxes_from_mask(coarse == label, axis=0, margin=margin, per_component=per_component)
             for label in labels}
    # slice by slice, all labels of a slice together: SAM encodes each slice once (SamBoxRefiner's cache)
    for s in sorted({s for per_label in boxes.values() for s in per_label}):
        for label in labels:
            if s not in boxes[label]:
                continue
            binary = coarse[s] == label
            box_list = boxes[label][s] if per_component else [boxes[label][s]]
            merged = np.zeros(binary.shape, dtype=bool)
            for box in box_list:
                region = _box_region(merged.shape, box)
                answer = refiner.refine_slice(img[s], box)
                answer = None if answer is None else np.asarray(answer).astype(bool)
                if answer is not None and answer.shape != merged.shape:
                    raise ValueError(f"refiner returned a mask of shape {answer.shape} for a slice of shape "
                                     f"{merged.shape}")
                if answer is not None and clip_to_box:
                    answer = answer & region
                if answer is None or not answer.any():
                    answer = binary & region  # keep the coarse mask (rule 2)
                merged |= answer
            out[s][merged] = label
    return np.moveaxis(out, 0, axis)


def _detect_file_ending(pred_folder: str) -> str:
    dj = join(pred_folder, "dataset.json")
    if isfile(dj):
        import json
        with open(dj) as f:
            ending = json.load(f).get("file_ending")
        if ending:
            return ending
    names = os.listdir(pred_folder)
    for ending in _KNOWN_ENDINGS:
        if any(n.endswith(ending) and not n.startswith(".") for n in names):
            return ending
    raise NnUNetCLError(f"No segmentation files ({', '.join(_KNOWN_ENDINGS)}) found in {pred_folder}. "
                        f"Fix: point -p to an nnU-Net prediction folder, or pass the file ending.")


def prediction_cases(pred_folder: str, image_folder: str, channel: int = 0,
                     file_ending: str | None = None) -> tuple[str, list[str]]:
    """(file ending, cases) of an nnU-Net prediction folder whose images are all in ``image_folder``.

    Raises NnUNetCLError naming the problem and the fix: a missing folder, no predictions, a case without
    its image. Cheap, so the CLI runs it before loading SAM.
    """
    for folder, what in ((pred_folder, "prediction folder (-p)"), (image_folder, "image folder (-i)")):
        if not isdir(folder):
            raise NnUNetCLError(f"The {what} {folder} does not exist.")
    ending = file_ending or _detect_file_ending(pred_folder)
    cases = sorted(n[: -len(ending)] for n in os.listdir(pred_folder)
                   if n.endswith(ending) and not n.startswith("."))
    if not cases:
        raise NnUNetCLError(f"No '*{ending}' predictions in {pred_folder}.")
    missing = [c for c in cases if not isfile(join(image_folder, f"{c}_{channel:04d}{ending}"))]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise NnUNetCLError(
            f"No image for {len(missing)} prediction(s) ({shown}): "
            f"expected {join(image_folder, missing[0] + f'_{channel:04d}{ending}')}. Fix: pass the folder with the "
            f"raw images (nnU-Net naming CASE_XXXX{ending}) as -i, or choose the channel.")
    return ending, cases


def refine_prediction_folder(pred_folder: str, image_folder: str, out_folder: str, refiner: MaskRefiner,
                             labels=None, axis: int = 0, margin: int = 5, per_component: bool = False,
                             clip_to_box: bool = True, channel: int = 0,
                             file_ending: str | None = None) -> list[str]:
    """Refine every prediction in an nnU-Net prediction folder and write an nnU-Net-style folder.

    ``pred_folder`` holds ``CASE<ending>`` files (nnUNetv2_predict output); the image of each case is
    ``image_folder/CASE_{channel:04d}<ending>`` (nnU-Net raw naming). Output files keep the prediction's
    name, pixel type and geometry (origin, spacing, direction copied with SimpleITK), and the folder's
    ``*.json`` files (dataset.json, plans.json, ...) are copied so nnU-Net's evaluation tools still work.

    Args:
        file_ending: e.g. ".nii.gz"; None = ``file_ending`` of pred_folder/dataset.json, else the first
            known ending present.
        other args: as in ``refine_volume``.

    Returns:
        The written file paths, sorted by case.
    """
    import SimpleITK as sitk

    ending, cases = prediction_cases(pred_folder, image_folder, channel, file_ending)
    os.makedirs(out_folder, exist_ok=True)
    written = []
    for case in cases:
        pred_img = sitk.ReadImage(join(pred_folder, case + ending))
        image = sitk.GetArrayFromImage(sitk.ReadImage(join(image_folder, f"{case}_{channel:04d}{ending}")))
        pred = sitk.GetArrayFromImage(pred_img)
        if image.shape != pred.shape:
            raise NnUNetCLError(f"{case}: image shape {image.shape} differs from prediction shape {pred.shape}. "
                                f"Fix: use the images the predictions were made from.")
        refined = refine_volume(image, pred, refiner, labels=labels, axis=axis, margin=margin,
                                per_component=per_component, clip_to_box=clip_to_box)
        out_img = sitk.GetImageFromArray(refined)
        out_img.CopyInformation(pred_img)
        path = join(out_folder, case + ending)
        sitk.WriteImage(out_img, path, True)
        written.append(path)
    for name in os.listdir(pred_folder):
        if name.endswith(".json") and os.path.abspath(pred_folder) != os.path.abspath(out_folder):
            shutil.copy(join(pred_folder, name), join(out_folder, name))
    return written


def _require_sam(checkpoint: str | None):
    """Import segment_anything and check the checkpoint, reporting every problem in one message."""
    problems = []
    module = None
    try:
        import segment_anything as module  # noqa: F401  (lazy: optional extra)
    except ImportError:
        problems.append(_SAM_INSTALL)
    if not checkpoint:
        problems.append("No SAM checkpoint given. Fix: download one yourself (e.g. sam_vit_b_01ec64.pth, see the "
                        "segment-anything README) and pass its path (-ckpt PATH).")
    elif not isfile(checkpoint):
        problems.append(f"The SAM checkpoint {checkpoint} does not exist. Fix: pass the path of a downloaded "
                        f"SAM checkpoint (-ckpt PATH).")
    if problems:
        raise NnUNetCLError(" ".join(problems))
    return module


class SamBoxRefiner:
    """``MaskRefiner`` backed by segment_anything's ``SamPredictor`` with one box prompt per call.

    Args:
        checkpoint: path of a SAM checkpoint (ViT-B/L/H), supplied by the user.
        model_type: key of ``segment_anything.sam_model_registry`` matching the checkpoint
            ("vit_b", "vit_l", "vit_h").
        device: torch device string.
        window: intensity window for ``to_uint8_rgb`` (None: per-slice percentiles; (-160, 240) is
            the paper's CT window).
        multimask_output: ask SAM for three masks and keep the best-scoring one (default: one mask,
            SAM's recommendation for unambiguous box prompts).

    The image embedding (the expensive step) is cached: consecutive calls on the same slice, e.g.
    several boxes or labels, encode it once.
    """

    def __init__(self, checkpoint: str, model_type: str = "vit_b", device: str = "cpu",
                 window: tuple[float, float] | None = None, multimask_output: bool = False):
        sam_module = _require_sam(checkpoint)
        import torch

        registry = sam_module.sam_model_registry
        if model_type not in registry:
            raise NnUNetCLError(f"Unknown SAM model_type {model_type!r}; choose one of {sorted(registry)} "
                                f"matching the checkpoint.")
        # Build without weights and load them ourselves: segment_anything's own torch.load has no
        # map_location, which fails for GPU-saved checkpoints on a CPU-only machine.
        model = registry[model_type](checkpoint=None)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise NnUNetCLError(f"The checkpoint {checkpoint} does not fit model_type {model_type!r}. Fix: pass the "
                                f"model type of the checkpoint (sam_vit_b_* -> vit_b, sam_vit_l_* -> vit_l, "
                                f"sam_vit_h_* -> vit_h).") from e
        model.to(device)
        model.eval()
        self.predictor = sam_module.SamPredictor(model)
        self.window = window
        self.multimask_output = multimask_output
        self._image_key = None

    def refine_slice(self, image2d: np.ndarray, box: Box) -> np.ndarray | None:
        image2d = np.ascontiguousarray(image2d)
        key = (image2d.shape, str(image2d.dtype), hashlib.sha1(image2d.tobytes()).hexdigest())
        if key != self._image_key:
            self.predictor.set_image(to_uint8_rgb(image2d, self.window))
            self._image_key = key
        masks, scores, _ = self.predictor.predict(box=np.asarray(box, dtype=np.float32),
                                                  multimask_output=self.multimask_output)
        if masks is None or len(masks) == 0:
            return None
        best = int(np.argmax(np.asarray(scores))) if scores is not None and len(scores) else 0
        return np.asarray(masks[best]).astype(bool)


def main_sam_refine(argv: list[str] | None = None) -> None:
    """``nnUNetv2_cl_sam_refine``: refine an nnU-Net prediction folder with SAM box prompts."""
    p = argparse.ArgumentParser(
        prog="nnUNetv2_cl_sam_refine",
        description="Refine nnU-Net predictions slice by slice with SAM box prompts (PolyCL post-processing). "
                    "Needs pip install \"nnunet-cl[sam]\" and a SAM checkpoint you downloaded yourself.")
    p.add_argument("-i", required=True, help="folder with the raw images (CASE_0000<ending>)")
    p.add_argument("-p", required=True, help="nnU-Net prediction folder (CASE<ending>)")
    p.add_argument("-o", required=True, help="output folder (same file names as -p)")
    p.add_argument("-ckpt", required=True, help="SAM checkpoint, e.g. sam_vit_b_01ec64.pth")
    p.add_argument("--model_type", default="vit_b", help="vit_b, vit_l or vit_h, matching -ckpt (default vit_b)")
    p.add_argument("--margin", type=int, default=5, help="box margin in pixels (default 5)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="labels to refine (default: all)")
    p.add_argument("--axis", type=int, default=0, help="slicing axis of the (z, y, x) array (default 0: axial)")
    p.add_argument("--per_component", action="store_true", help="one box per connected component per slice")
    p.add_argument("--no_clip_to_box", action="store_true", help="keep SAM's mask outside the box prompt")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="intensity window, e.g. -160 240 for CT (default: per-slice percentiles)")
    p.add_argument("--channel", type=int, default=0, help="image channel to use (default 0)")
    p.add_argument("-device", default="cpu", help="torch device (default cpu)")
    args = p.parse_args(argv)
    try:
        prediction_cases(args.p, args.i, args.channel)  # bad input fails here, before SAM is loaded
        refiner = SamBoxRefiner(args.ckpt, model_type=args.model_type, device=args.device,
                                window=tuple(args.window) if args.window else None)
        written = refine_prediction_folder(args.p, args.i, args.o, refiner, labels=args.labels, axis=args.axis,
                                           margin=args.margin, per_component=args.per_component,
                                           clip_to_box=not args.no_clip_to_box, channel=args.channel)
    except NnUNetCLError as e:
        raise SystemExit(f"nnUNetv2_cl_sam_refine: error: {e}")
    print(f"Refined {len(written)} case(s) into {args.o}")
