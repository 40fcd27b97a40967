"""Checks a scan must pass before it enters the pool, beyond what SimpleITK notices.

SimpleITK reads a truncated `.nii.gz` or a `.nii` shorter than its header says as a zero-filled volume, and
its NIfTI reader turns NaN and inf into 0, so a broken file would become a plausible-looking pool case. These
checks look at the file itself (gzip stream, NIfTI header against the data size, raw voxel values) and at the
geometry (spacing, field of view, the size after resampling to each configuration's spacing). Each returns a
short reason, or None when the scan is fine; reasons that come from the file start with 'unreadable:'.
"""
from __future__ import annotations

import gzip
import os
import zlib
from typing import NamedTuple

import numpy as np

_CHUNK = 1 << 22  # 4 MiB: full decompression without holding the file twice in memory
_GIB = 1024 ** 3


class ScanLimits(NamedTuple):
    """Bounds a scan's geometry must respect; the defaults accept real CT and MRI (see docs/reliability.md).

    Spacing: 0.01 mm (micro-CT) to 20 mm (thick MRI slices are at most ~10 mm) per axis. Field of view:
    2000 mm per axis (a whole-body CT is under 2 m). Resampled size: 8 GiB for the float32 array nnU-Net's
    preprocessor builds at the target spacing (a 512 x 512 x 1000 CT is about 1 GiB).
    """
    min_spacing: float = 0.01
    max_spacing: float = 20.0
    max_extent_mm: float = 2000.0
    max_resampled_gib: float = 8.0


def gzip_size(path: str) -> tuple[int | None, str | None]:
    """(decompressed size, None), or (None, reason) when the gzip stream is truncated or corrupt.

    The whole stream is decompressed in chunks, so a missing end or a bad CRC (both checked only at the end
    of the stream) is caught.
    """
    size = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                size += len(chunk)
    except EOFError:
        return None, ("unreadable: truncated gzip stream (the end-of-stream marker is missing): the file was cut "
                      "off while copying or writing. Fix: copy or export it again")
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        what = "not a gzip file" if "Not a gzipped file" in str(e) else f"corrupt gzip data ({e})"
        return None, f"unreadable: {what}, although it is named .gz. Fix: copy or export it again"
    return size, None


def _nifti_reason(path: str, data_bytes: int) -> str | None:
    """The NIfTI header against the data size (`data_bytes`: file or decompressed size), then raw values."""
    import nibabel as nib
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several types for a file that is not NIfTI at all
        return (f"unreadable: not a NIfTI file ({' '.join(str(e).split())[:150]}). Fix: convert it to NIfTI, or "
                f"rename it with the ending of its real format")
    header = img.header
    dims = tuple(int(d) for d in img.shape)
    bytes_per_voxel = int(header["bitpix"]) // 8
    # vox_offset may be 0 in a single file; the data then starts after the header (348 + 4 or 540 + 4 bytes)
    offset = max(int(header["vox_offset"]), header.sizeof_hdr + 4)
    needed = offset + int(np.prod(dims, dtype=np.int64)) * bytes_per_voxel
    if data_bytes < needed:
        return (f"unreadable: data shorter than its NIfTI header says: shape {dims} x {bytes_per_voxel} byte(s) "
                f"per voxel + offset {offset} needs {needed} bytes, the file holds {data_bytes} (truncated). "
                f"Fix: copy or export it again")
    if header.get_data_dtype().kind in "fc":  # integer voxels cannot be NaN or inf
        values = np.asanyarray(img.dataobj)
        n_nan, n_inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        if n_nan or n_inf:
            share = "all" if n_nan + n_inf == values.size else f"{n_nan + n_inf} of {values.size}"
            return (f"NaN/inf values: {share} voxels are not finite ({n_nan} NaN, {n_inf} inf; SimpleITK would "
                    f"read them as 0). Fix: repair the export that wrote the file")
    return None


def check_file(path: str) -> str | None:
    """Why this image file cannot be read faithfully (empty, broken gzip, NIfTI shorter than its header,
    non-finite NIfTI voxels), or None."""
    if not os.path.exists(path):
        return "unreadable: file not found (moved or deleted since it was listed). Fix: restore it"
    if os.path.isdir(path):
        return "unreadable: a folder named like an image file. Fix: rename it, or move the scans out of it"
    size = os.path.getsize(path)
    if size == 0:
        return "unreadable: empty file (0 bytes). Fix: copy or export it again"
    lower = path.lower()
    if lower.endswith(".gz"):
        size, reason = gzip_size(path)
        if reason:
            return reason
    if lower.endswith((".nii", ".nii.gz")):
        return _nifti_reason(path, size)
    return None


def check_geometry(shape, spacing, limits: ScanLimits) -> str | None:
    """Spacing per axis and field of view (shape x spacing) within `limits`; shape and spacing are z, y, x."""
    spacing = [float(s) for s in spacing]
    shown = " x ".join(f"{s:g}" for s in spacing)
    if not all(limits.min_spacing <= s <= limits.max_spacing for s in spacing):
        return (f"implausible spacing {shown} mm (z, y, x): accepted is {limits.min_spacing:g} to "
                f"{limits.max_spacing:g} mm per axis. Fix: correct the header's spacing, or widen the bounds "
                f"with --min_spacing / --max_spacing if it is right")
    extent = [n * s for n, s in zip(shape, spacing)]
    if max(extent) > limits.max_extent_mm:
        return (f"implausible field of view {' x '.join(f'{e:.0f}' for e in extent)} mm (shape x spacing): more "
                f"than {limits.max_extent_mm:g} mm. Fix: correct the header's spacing, or raise --max_extent")
    return None


def resampled_size_reason(shape, spacing, transpose_forward, target_spacing, num_channels: int,
                          limits: ScanLimits, configuration: str) -> str | None:
    """Refuse a scan whose float32 array at the configuration's target spacing would exceed the memory limit.

    shape and spacing are the image's (z, y, x); the target spacing is in the plans' transposed order. The
    estimate is before cropping to nonzero, so it is an upper bound.
    """
    shape_t = [shape[i] for i in transpose_forward]
    spacing_t = [spacing[i] for i in transpose_forward]
    new_shape = [max(1, int(round(n * s / t))) for n, s, t in zip(shape_t, spacing_t, target_spacing)]
    gib = float(np.prod(new_shape, dtype=np.float64)) * num_channels * 4 / _GIB
    if gib > limits.max_resampled_gib:
        return (f"too large after resampling: at {configuration}'s spacing {list(target_spacing)} mm the volume "
                f"would be {' x '.join(map(str, new_shape))} voxels x {num_channels} channel(s), about {gib:.3g} "
                f"GiB as float32 (limit {limits.max_resampled_gib:g} GiB). Fix: check the header's spacing, or "
                f"raise --max_memory_gb if the machine has the RAM")
    return None


def _is_ct(name: str) -> bool:
    return name.strip().lower() == "ct"


def _is_mr(name: str) -> bool:
    n = name.strip().lower()
    return n in ("mr", "mri", "flair", "adc", "dwi", "pd", "swi") or n.startswith(("t1", "t2", "mr"))


def modality_warning(dicom_modality: str | None, channel_names: dict) -> str | None:
    """A CT series in a dataset whose channels are MRI (or the reverse): worth a warning, not a refusal."""
    if not dicom_modality:
        return None
    names = [str(v) for v in channel_names.values()]
    modality = dicom_modality.strip().upper()
    if modality == "CT" and names and not any(_is_ct(n) for n in names) and any(_is_mr(n) for n in names):
        expected = "MRI"
    elif modality == "MR" and any(_is_ct(n) for n in names):
        expected = "CT"
    else:
        return None
    return (f"modality mismatch: the DICOM series is {modality}, the dataset is {expected} (dataset.json "
            f"channel_names: {', '.join(names)}); added anyway, normalised with the dataset's {expected} scheme. Fix: remove it from "
            f"the pool (pool.json) if it was not meant for this dataset")


def dicom_modality(first_slice: str) -> str | None:
    """The Modality tag (0008,0060) of a DICOM file, or None when it has none."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(first_slice)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else None
