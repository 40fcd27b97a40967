"""Find and read unlabeled volumes (NIfTI, NRRD, MHA/MHD, DICOM series) in nnU-Net's SimpleITKIO format.

`read_sitk_images` returns exactly what `nnunetv2.imageio.simpleitk_reader_writer.SimpleITKIO.read_images`
returns (data (C, z, y, x) float32; properties {'sitk_stuff': {spacing, origin, direction}, 'spacing': the
SimpleITK spacing reversed to z, y, x}), so nnU-Net's preprocessor handles spacing and transposition the way
it does for the labeled dataset. On top of SimpleITKIO it reads DICOM series, uncompressed `.nii` and `.mhd`,
treats vector pixels as channels, and raises `ValueError` with a short reason instead of printing.
"""
import os
import re
from os.path import abspath, basename, join, relpath

import numpy as np
import SimpleITK as sitk

#: File endings read as one volume each. `.raw`/`.zraw` are the data halves of `.mhd` headers.
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".gipl.gz")
_COMPANION_ENDINGS = (".raw", ".zraw", ".raw.gz")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def image_stem(fname: str) -> str:
    """File name without its image ending ('ct_01.nii.gz' -> 'ct_01')."""
    name = basename(fname)
    for ending in sorted(IMAGE_ENDINGS, key=len, reverse=True):
        if name.lower().endswith(ending):
            return name[:-len(ending)]
    return name


def _is_image_file(fname: str) -> bool:
    return basename(fname).lower().endswith(IMAGE_ENDINGS)


def _dicom_series(folder: str) -> list[tuple[str, list[str]]]:
    """(series UID, sorted slice files) for every series GDCM finds directly in `folder`."""
    reader = sitk.ImageSeriesReader
    out = []
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns "No Series were found" for every plain folder
    try:
        for uid in reader.GetGDCMSeriesIDs(folder) or ():
            files = list(reader.GetGDCMSeriesFileNames(folder, uid))
            if files:
                out.append((uid, files))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    return out


def find_sources(input_folder: str, num_channels: int = 1) -> tuple[list[dict], list[dict]]:
    """Every volume below `input_folder`, one dict per future pool case, plus files that are not images.

    A source is {'key': unique string (absolute path, '<folder>#<series UID>' for folders holding several
    DICOM series), 'name': path relative to input_folder (for reports), 'stem': name for the case id,
    'kind': 'file' | 'dicom' | 'channels', 'files': files read in channel order, 'series_uid': or None}.

    Image files are found by ending (IMAGE_ENDINGS). Folders are searched recursively; a folder counts as a
    DICOM series when SimpleITK's ImageSeriesReader (GDCM) finds a series in it, which is only tried for
    folders holding files that are not image files. For multi-channel datasets, files named like nnU-Net's
    raw images (`case_0000.nii.gz`, `case_0001.nii.gz`, ...) are grouped into one case when every channel
    0..num_channels-1 is there; anything else is one case per file (4D files carry their channels).

    Returns (sources, not_images) where not_images are {'name', 'reason'} for files that could not be
    interpreted as images: `.dcm` files outside any readable series and folders named like image files
    (`x.nii.gz/`) that hold no DICOM series are reported, other files ignored.
    """
    input_folder = abspath(input_folder)
    sources, not_images = [], []
    image_named_folders = []
    for folder, dirs, files in os.walk(input_folder):
        dirs.sort()
        image_named_folders += [join(folder, d) for d in dirs if _is_image_file(d)]
        files = sorted(f for f in files if not f.startswith("."))
        rel_folder = relpath(folder, input_folder)
        image_files = [f for f in files if _is_image_file(f)]
        other_files = [f for f in files if not _is_image_file(f) and not f.lower().endswith(_COMPANION_ENDINGS)]

        if other_files:
            series = _dicom_series(folder)
            in_series = set()
            folder_stem = basename(input_folder) if rel_folder == "." else rel_folder.replace(os.sep, "_")
            for i, (uid, slice_files) in enumerate(series):
                in_series |= {basename(f) for f in slice_files}
                several = len(series) > 1
                sources.append({
                    "key": folder + (f"#{uid}" if several else ""),
                    "name": ((rel_folder if rel_folder != "." else basename(input_folder))
                             + (f"#{uid}" if several else "")),
                    "stem": folder_stem + (f"_s{i}" if several else ""),
                    "kind": "dicom", "files": [abspath(f) for f in slice_files], "series_uid": uid,
                })
            for f in other_files:
                if f not in in_series and f.lower().endswith(".dcm"):
                    not_images.append({"name": join(rel_folder, f) if rel_folder != "." else f,
                                       "reason": "unreadable: .dcm file that is not part of any readable DICOM series"})

        grouped = set()
        if num_channels > 1:
            by_case: dict[str, dict[int, str]] = {}
            for f in image_files:
                m = _CHANNEL_SUFFIX.match(image_stem(f))
                if m:
                    by_case.setdefault(m["case"], {})[int(m["channel"])] = f
            for case, channels in sorted(by_case.items()):
                if sorted(channels) == list(range(num_channels)):
                    files_in_order = [join(folder, channels[c]) for c in range(num_channels)]
                    grouped |= set(channels.values())
                    sources.append({
                        "key": abspath(files_in_order[0]),
                        "name": join(rel_folder, case) if rel_folder != "." else case,
                        "stem": case, "kind": "channels", "files": files_in_order, "series_uid": None,
                    })
        for f in image_files:
            if f in grouped:
                continue
            stem = image_stem(f)
            if num_channels == 1 and stem.endswith("_0000"):
                stem = stem[:-5]  # nnU-Net raw naming: the channel suffix is not part of the case name
            sources.append({
                "key": abspath(join(folder, f)),
                "name": join(rel_folder, f) if rel_folder != "." else f,
                "stem": stem, "kind": "file", "files": [abspath(join(folder, f))], "series_uid": None,
            })
    for d in image_named_folders:  # e.g. an archive unpacked into a folder that kept the file's name
        if not any(s["kind"] == "dicom" and s["key"].split("#")[0] == d for s in sources):
            not_images.append({"name": relpath(d, input_folder) + os.sep,
                               "reason": "unreadable: a folder named like an image file, holding no DICOM series. "
                                         "Fix: rename it, or move the scan out of it"})
    return sources, not_images


def _read_sitk(source: dict) -> list[sitk.Image]:
    if source["kind"] == "dicom":
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(source["files"])
        return [reader.Execute()]
    return [sitk.ReadImage(f) for f in source["files"]]


def _to_nnunet(itk_image: sitk.Image) -> tuple[np.ndarray, list[float]]:
    """Array with a leading channel axis and the z, y, x spacing, following SimpleITKIO.read_images."""
    spacing = itk_image.GetSpacing()
    npy = sitk.GetArrayFromImage(itk_image)
    if itk_image.GetNumberOfComponentsPerPixel() > 1:
        npy = np.moveaxis(npy, -1, 0)  # vector pixels are channels; SimpleITKIO would misread them as 4D
        spatial_ndim = npy.ndim - 1
        if spatial_ndim == 2:
            npy = npy[:, None]
            nn_spacing = (max(spacing) * 999, *spacing[::-1])
        elif spatial_ndim == 3:
            nn_spacing = spacing[::-1]
        else:
            raise ValueError(f"vector image with {spatial_ndim} spatial dimensions")
    elif npy.ndim == 2:
        npy = npy[None, None]
        nn_spacing = (max(spacing) * 999, *spacing[::-1])
    elif npy.ndim == 3:
        npy = npy[None]
        nn_spacing = spacing[::-1]
    elif npy.ndim == 4:
        nn_spacing = spacing[::-1][1:]  # 4D: the first array axis holds the channels
    else:
        raise ValueError(f"unexpected number of dimensions: {npy.ndim}")
    return npy, list(np.abs(nn_spacing))


def read_sitk_images(source: dict) -> tuple[np.ndarray, dict]:
    """Read a source from `find_sources` with SimpleITK, returning what SimpleITKIO.read_images returns.

    Raises ValueError (shapes or spacings of channel files differ, unsupported dimensionality) or
    RuntimeError (SimpleITK cannot read a file).
    """
    images, spacings, origins, directions, nn_spacings = [], [], [], [], []
    for itk_image in _read_sitk(source):
        npy, nn_spacing = _to_nnunet(itk_image)
        images.append(npy)
        spacings.append(itk_image.GetSpacing())
        origins.append(itk_image.GetOrigin())
        directions.append(itk_image.GetDirection())
        nn_spacings.append(nn_spacing)
    if len({i.shape[1:] for i in images}) > 1:
        raise ValueError(f"channel files have different shapes: {[i.shape[1:] for i in images]}")
    if not all(np.allclose(s, spacings[0]) for s in spacings):
        raise ValueError(f"channel files have different spacings: {spacings}")
    properties = {
        "sitk_stuff": {"spacing": spacings[0], "origin": origins[0], "direction": directions[0]},
        "spacing": nn_spacings[0],
    }
    return np.vstack(images, dtype=np.float32, casting="unsafe"), properties


def read_source(source: dict, reader_writer_class=None) -> tuple[np.ndarray, dict]:
    """Read a source like the labeled dataset's own reader would.

    When the plans name a reader other than SimpleITKIO (e.g. NibabelIOWithReorient) and it supports the
    file ending, that reader is used so pool cases get the same orientation handling as the labeled cases;
    DICOM series and every other case go through `read_sitk_images` (SimpleITKIO's format).
    """
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    if (reader_writer_class is not None and reader_writer_class is not SimpleITKIO and source["kind"] != "dicom"
            and all(f.lower().endswith(tuple(reader_writer_class.supported_file_endings)) for f in source["files"])):
        return reader_writer_class().read_images(source["files"])
    return read_sitk_images(source)


def check_volume(data: np.ndarray, properties: dict, num_channels: int) -> str | None:
    """Why this volume cannot be a pool case of a 3D dataset with `num_channels` channels, or None if it can."""
    if data.size == 0:
        return f"empty: zero-size image (shape {tuple(data.shape[1:])})"
    if data.shape[0] != num_channels:
        return (f"wrong channel count: the image has {data.shape[0]} channel(s) (4D files count their 4th "
                f"dimension as channels), the dataset expects {num_channels} (dataset.json channel_names)")
    if len(properties.get("sitk_stuff", {}).get("spacing", (0, 0, 0))) == 2:
        return f"2D image (shape {tuple(data.shape[2:])}), the dataset is 3D"
    if min(data.shape[1:]) <= 1:
        return f"2D image: a spatial dimension has size 1 (shape {tuple(data.shape[1:])}), the dataset is 3D"
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int(data.size - np.count_nonzero(finite))
        return f"NaN/inf values: {n_bad} non-finite voxel(s)"
    for c in range(data.shape[0]):
        lo, hi = float(data[c].min()), float(data[c].max())
        if lo == hi:
            return f"empty: channel {c} is constant (all voxels {lo:g})"
    return None
