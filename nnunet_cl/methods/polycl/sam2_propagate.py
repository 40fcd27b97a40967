"""Optional label-efficient volume annotation: propagate one annotated slice through a scan with SAM 2.

PolyCL's paper uses SAM 2's *video* predictor on CT: the slices of a scan are the frames of a video, one
slice is annotated, and SAM 2 tracks the object through the stack. The authors' repository has no SAM
code; this module is our implementation.

Install: ``pip install "nnunet-cl[sam]"`` (sam2). Checkpoint (e.g. ``sam2.1_hiera_tiny.pt``) and config
(the matching config name inside the sam2 package, e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``) are
supplied by the user; nothing is downloaded. ``sam2`` is imported only inside ``Sam2Propagator``;
``propagate_from_slice`` works with any ``SlicePropagator`` and is tested with a fake.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterable
from os.path import isfile, join
from typing import Protocol, runtime_checkable

import numpy as np

from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.methods.polycl.sam_refine import to_uint8_rgb

__all__ = ["SlicePropagator", "Sam2Propagator", "propagate_from_slice", "load_slice_mask", "main_sam2_propagate"]

_SAM2_INSTALL = 'sam2 is not installed. Fix: pip install "nnunet-cl[sam]" (or pip install sam2).'


@runtime_checkable
class SlicePropagator(Protocol):
    """A video-style mask tracker over the slices of a volume (SAM 2's video predictor or a fake).

    Call order used by ``propagate_from_slice``: ``set_frames`` once, ``add_mask`` once per object, then
    ``propagate`` forward and backward from the annotated frame.
    """

    def set_frames(self, frames: np.ndarray) -> None:
        """(n_frames, H, W) intensities; starts a new tracking session (drops earlier prompts)."""

    def add_mask(self, frame_index: int, obj_id: int, mask: np.ndarray) -> None:
        """Bool (H, W) mask of object ``obj_id`` on frame ``frame_index``."""

    def propagate(self, start_index: int, reverse: bool) -> Iterable[tuple[int, dict[int, np.ndarray]]]:
        """Yield ``(frame_index, {obj_id: bool mask})`` from ``start_index`` to the end (or to 0 if reverse)."""


def propagate_from_slice(volume3d: np.ndarray, slice_index: int, slice_mask: np.ndarray,
                         propagator: SlicePropagator, axis: int = 0) -> np.ndarray:
    """Label volume from one annotated slice, tracked through the scan.

    Order (as SAM 2's examples do for a prompt in the middle of a video): first forward from
    ``slice_index`` to the last slice, then backward from ``slice_index`` to slice 0, in one session so
    the backward pass has the annotation in memory. Frames behind the direction of a pass are ignored.

    Every nonzero label of ``slice_mask`` is one object (obj_id = label). The annotated slice keeps
    ``slice_mask`` exactly, whatever the tracker returns for it. Where two objects claim a voxel the
    higher label wins (the same rule as ``sam_refine.refine_volume``).

    Args:
        volume3d: 3-D intensities.
        slice_index: index of the annotated slice along ``axis``.
        slice_mask: 2-D integer (or bool) mask of that slice, shape = the slice's shape.
        propagator: a ``SlicePropagator`` (``Sam2Propagator`` or a fake).
        axis: slicing axis (0 = axial for SimpleITK (z, y, x) arrays).

    Returns:
        Integer label volume of ``volume3d``'s shape (dtype of ``slice_mask``, uint8 for bool masks).
    """
    volume3d = np.asarray(volume3d)
    if volume3d.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume3d.shape}")
    frames = np.moveaxis(volume3d, axis, 0)
    n = frames.shape[0]
    if not 0 <= slice_index < n:
        raise NnUNetCLError(f"--slice {slice_index} is outside the volume (0..{n - 1} along axis {axis}).")
    slice_mask = np.asarray(slice_mask)
    if slice_mask.dtype == bool:
        slice_mask = slice_mask.astype(np.uint8)
    if slice_mask.shape != frames.shape[1:]:
        raise NnUNetCLError(f"The slice mask has shape {slice_mask.shape} but slices along axis {axis} have shape "
                            f"{frames.shape[1:]}. Fix: pass the mask of one slice of this image (or check --axis).")
    labels = [int(v) for v in np.unique(slice_mask) if v != 0]
    if not labels:
        raise NnUNetCLError(f"The mask of slice {slice_index} is empty: nothing to propagate. "
                            f"Fix: annotate the object on that slice (or pass the right --slice).")

    propagator.set_frames(frames)
    for label in labels:
        propagator.add_mask(slice_index, label, slice_mask == label)

    out = np.zeros(frames.shape, dtype=slice_mask.dtype)

    def write(idx: int, masks: dict[int, np.ndarray]) -> None:
        for obj_id in sorted(masks):  # ascending, so higher labels overwrite
            out[idx][np.asarray(masks[obj_id]).astype(bool)] = obj_id

    if slice_index < n - 1:
        for idx, masks in propagator.propagate(slice_index, reverse=False):
            if idx > slice_index:
                write(int(idx), masks)
    if slice_index > 0:
        for idx, masks in propagator.propagate(slice_index, reverse=True):
            if idx < slice_index:
                write(int(idx), masks)
    out[slice_index] = slice_mask
    return np.moveaxis(out, 0, axis)


def _require_sam2(checkpoint: str | None, config: str | None):
    """Import sam2's builder and check checkpoint and config, reporting every problem in one message."""
    problems = []
    build = None
    try:
        from sam2.build_sam import build_sam2_video_predictor as build  # lazy: optional extra
    except ImportError:
        problems.append(_SAM2_INSTALL)
    if not checkpoint:
        problems.append("No SAM 2 checkpoint given. Fix: download one yourself (e.g. sam2.1_hiera_tiny.pt, see the "
                        "sam2 README) and pass its path (-ckpt PATH).")
    elif not isfile(checkpoint):
        problems.append(f"The SAM 2 checkpoint {checkpoint} does not exist. Fix: pass the path of a downloaded "
                        f"SAM 2 checkpoint (-ckpt PATH).")
    if not config:
        problems.append("No SAM 2 config given. Fix: pass the config matching the checkpoint, e.g. "
                        "-cfg configs/sam2.1/sam2.1_hiera_t.yaml for sam2.1_hiera_tiny.pt.")
    if problems:
        raise NnUNetCLError(" ".join(problems))
    return build


class Sam2Propagator:
    """``SlicePropagator`` backed by SAM 2's video predictor.

    SAM 2 reads a video as a folder of JPEG frames named by their index (``00000.jpg`` ...), so
    ``set_frames`` writes the slices there as uint8 RGB into a temporary folder, removed by ``close``
    (or when the object is garbage-collected).

    Args:
        checkpoint: SAM 2 / 2.1 checkpoint path (user-supplied).
        config: config name inside the sam2 package matching the checkpoint,
            e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``.
        device: torch device string.
        window: intensity window (low, high), e.g. (-160, 240) for CT. None: the 0.5th-99.5th
            percentiles of the *whole volume*: one window for all frames, because per-frame contrast
            changes would look like appearance changes to the tracker.
    """

    def __init__(self, checkpoint: str, config: str, device: str = "cpu",
                 window: tuple[float, float] | None = None):
        build = _require_sam2(checkpoint, config)
        try:
            self.predictor = build(config, checkpoint, device=device)
        except Exception as e:  # hydra / state-dict errors are cryptic; say what usually causes them
            raise NnUNetCLError(
                f"SAM 2 could not be built from config {config!r} and checkpoint {checkpoint} ({type(e).__name__}: "
                f"{e}). Fix: -cfg must be a config name inside the sam2 package (e.g. "
                f"configs/sam2.1/sam2.1_hiera_t.yaml) that matches the checkpoint.") from e
        self.window = window
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._state = None

    def set_frames(self, frames: np.ndarray) -> None:
        from PIL import Image

        self.close()
        frames = np.asarray(frames)
        window = self.window
        if window is None:
            lo, hi = np.percentile(frames, [0.5, 99.5])
            window = (float(lo), float(hi))
        self._tmp = tempfile.TemporaryDirectory(prefix="nnunet_cl_sam2_")
        for i, frame in enumerate(frames):
            Image.fromarray(to_uint8_rgb(frame, window)).save(join(self._tmp.name, f"{i:05d}.jpg"), quality=95)
        self._state = self.predictor.init_state(video_path=self._tmp.name)

    def add_mask(self, frame_index: int, obj_id: int, mask: np.ndarray) -> None:
        if self._state is None:
            raise RuntimeError("call set_frames before add_mask")
        self.predictor.add_new_mask(inference_state=self._state, frame_idx=int(frame_index), obj_id=int(obj_id),
                                    mask=np.asarray(mask).astype(bool))

    def propagate(self, start_index: int, reverse: bool) -> Iterable[tuple[int, dict[int, np.ndarray]]]:
        if self._state is None:
            raise RuntimeError("call set_frames before propagate")
        for frame_idx, obj_ids, mask_logits in self.predictor.propagate_in_video(
                self._state, start_frame_idx=int(start_index), reverse=bool(reverse)):
            logits = mask_logits.detach().float().cpu().numpy() if hasattr(mask_logits, "detach") \
                else np.asarray(mask_logits, dtype=np.float32)
            # logits are (n_obj, 1, H, W) at the frames' resolution; > 0 is SAM 2's own threshold
            yield int(frame_idx), {int(o): logits[k, 0] > 0 for k, o in enumerate(obj_ids)}

    def close(self) -> None:
        if self._state is not None and hasattr(self.predictor, "reset_state"):
            self.predictor.reset_state(self._state)
        self._state = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_slice_mask(path: str, image_shape: tuple[int, ...], slice_index: int, axis: int = 0) -> np.ndarray:
    """The annotated slice's 2-D mask from a file.

    Accepted: a ``.npy`` array or any SimpleITK-readable label file that is either 2-D (the slice
    itself), 3-D with a single slice, or 3-D of the image's shape (then slice ``slice_index`` along
    ``axis`` is taken, so a full label volume with one annotated slice works too).
    """
    if not isfile(path):
        raise NnUNetCLError(f"The slice label file {path} does not exist.")
    if path.endswith(".npy"):
        arr = np.load(path)
    else:
        import SimpleITK as sitk
        img = sitk.ReadImage(path)
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise NnUNetCLError(f"{path} has {img.GetNumberOfComponentsPerPixel()} components per pixel; "
                                f"a label file must be single-channel integer labels.")
        arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 3 and tuple(arr.shape) == tuple(image_shape):
        return np.take(arr, slice_index, axis=axis)
    if arr.ndim == 3 and 1 in arr.shape:
        arr = arr.squeeze(axis=arr.shape.index(1))
    if arr.ndim != 2:
        raise NnUNetCLError(f"{path} has shape {arr.shape}: expected one 2-D slice or a volume of the image's "
                            f"shape {tuple(image_shape)}.")
    return arr


def main_sam2_propagate(argv: list[str] | None = None) -> None:
    """``nnUNetv2_cl_sam2_propagate``: label a whole scan from one annotated slice with SAM 2."""
    import SimpleITK as sitk

    p = argparse.ArgumentParser(
        prog="nnUNetv2_cl_sam2_propagate",
        description="Propagate one annotated slice through a 3-D image with SAM 2's video predictor "
                    "(slices = frames). Needs pip install \"nnunet-cl[sam]\" and a SAM 2 checkpoint you "
                    "downloaded yourself.")
    p.add_argument("-i", required=True, help="the 3-D image (e.g. CASE_0000.nii.gz)")
    p.add_argument("-s", required=True, help="label file of the annotated slice (2-D, or a volume of the "
                                             "image's shape of which --slice is used; .npy accepted)")
    p.add_argument("--slice", type=int, required=True, help="index of the annotated slice along --axis")
    p.add_argument("-o", required=True, help="output label file (geometry copied from -i)")
    p.add_argument("-ckpt", required=True, help="SAM 2 checkpoint, e.g. sam2.1_hiera_tiny.pt")
    p.add_argument("-cfg", required=True, help="SAM 2 config name, e.g. configs/sam2.1/sam2.1_hiera_t.yaml")
    p.add_argument("--axis", type=int, default=0, help="slicing axis of the (z, y, x) array (default 0: axial)")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="intensity window, e.g. -160 240 for CT (default: volume percentiles)")
    p.add_argument("-device", default="cpu", help="torch device (default cpu)")
    args = p.parse_args(argv)
    try:
        _propagate_file(args, sitk)
    except NnUNetCLError as e:
        raise SystemExit(f"nnUNetv2_cl_sam2_propagate: error: {e}")


def _propagate_file(args, sitk) -> None:
    if not isfile(args.i):
        raise NnUNetCLError(f"The image {args.i} does not exist.")
    image = sitk.ReadImage(args.i)
    volume = sitk.GetArrayFromImage(image)
    if volume.ndim != 3:
        raise NnUNetCLError(f"{args.i} is not a single-channel 3-D image (array shape {volume.shape}).")
    if not -volume.ndim <= args.axis < volume.ndim:
        raise NnUNetCLError(f"--axis {args.axis} is not an axis of {args.i} (array shape {volume.shape}, z y x). "
                            f"Fix: --axis 0, 1 or 2.")
    if not 0 <= args.slice < volume.shape[args.axis]:
        raise NnUNetCLError(f"--slice {args.slice} along --axis {args.axis} is outside {args.i} (array shape "
                            f"{volume.shape}). Fix: a slice index from 0 to {volume.shape[args.axis % 3] - 1}.")
    slice_mask = load_slice_mask(args.s, volume.shape, args.slice, args.axis)
    propagator = Sam2Propagator(args.ckpt, args.cfg, device=args.device,
                                window=tuple(args.window) if args.window else None)
    try:
        labels = propagate_from_slice(volume, args.slice, slice_mask, propagator, axis=args.axis)
    finally:
        propagator.close()
    out = sitk.GetImageFromArray(labels.astype(np.uint8 if labels.max() < 256 else np.uint16))
    out.CopyInformation(image)
    os.makedirs(os.path.dirname(os.path.abspath(args.o)), exist_ok=True)
    sitk.WriteImage(out, args.o, True)
    print(f"Wrote {args.o} ({int((labels > 0).sum())} labelled voxels)")
