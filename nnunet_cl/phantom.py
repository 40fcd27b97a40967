"""Synthetic CT-like phantoms for the demo and for fast tests.

Everything here is **synthetic**: geometric shapes painted with plausible Hounsfield units, no patient
data and no anatomy beyond a cartoon of an abdominal slab. Use it to exercise code paths (data
conversion, planning, training loops, view generation), never to report segmentation quality.

A phantom is an elliptical body (soft tissue, +40 HU, with a thin fat rim) in air (-1000 HU), a
vertebral body (about 700 HU, unlabelled) and three labelled organs whose position, size and
orientation vary with the seed:

===== ========= ===========================================================
label name      appearance
===== ========= ===========================================================
1     liver     large ellipsoid on the patient's right, about 80 HU
2     kidney    a pair of small ellipsoids beside the spine, about 150 HU
3     spleen    small ellipsoid on the patient's left, about 110 HU
4     tumour    optional small sphere inside the liver, 20-35 HU hypodense
===== ========= ===========================================================

On top come a slight blur (partial volume), a smooth multiplicative inhomogeneity of the attenuation
(about +-2 %, i.e. +-20 HU in tissue) and Gaussian noise (sigma 20 HU by default).

Arrays are numpy in (z, y, x) order and spacings are given as (z, y, x) in mm. The world frame is
LPS with identity direction (x towards the patient's left, y posterior, z superior), which is what
SimpleITK writes by default.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "tumour": 4}

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
BONE_HU = 700.0


def _rotation(rng: np.random.Generator, max_inplane_deg: float, max_tilt_deg: float) -> np.ndarray:
    """Random rotation matrix acting on (z, y, x) vectors: mostly in-plane, with a small tilt."""
    a, b, c = np.deg2rad([rng.uniform(-max_inplane_deg, max_inplane_deg),
                          rng.uniform(-max_tilt_deg, max_tilt_deg),
                          rng.uniform(-max_tilt_deg, max_tilt_deg)])
    # rotation about z (acts on y, x), then about y (acts on z, x), then about x (acts on z, y)
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, -np.sin(b)], [0, 1, 0], [np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid(grid, centre, semi_axes, rotation) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid; grid is the (z, y, x) open mesh in mm."""
    d = [g - c for g, c in zip(grid, centre)]
    r = 0.0
    for k in range(3):
        # coordinate along the ellipsoid's k-th axis; broadcasting keeps this cheap
        q = rotation[0, k] * d[0] + rotation[1, k] * d[1] + rotation[2, k] * d[2]
        r = r + (q / semi_axes[k]) ** 2
    return r <= 1.0


def make_phantom(shape=(48, 64, 64), spacing=(2.5, 1.5, 1.5), seed=0, with_tumour=True,
                 noise_std=20.0):
    """Make one synthetic CT-like volume and its label map.

    Parameters
    ----------
    shape : tuple of 3 ints
        Array shape (z, y, x). The anatomy scales with the field of view ``shape * spacing``.
    spacing : tuple of 3 floats
        Voxel size in mm, (z, y, x).
    seed : int
        Seed of the numpy random generator. The same seed gives the same phantom; different seeds
        give different organ poses, sizes, intensities and noise.
    with_tumour : bool
        Add a hypodense spherical tumour (label 4) fully inside the liver.
    noise_std : float
        Standard deviation of the additive Gaussian noise, in HU.

    Returns
    -------
    image : ndarray of float32, shape ``shape``
        Intensities in HU (air about -1000).
    label : ndarray of uint8, shape ``shape``
        0 background, 1 liver, 2 kidney (both), 3 spleen, 4 tumour (only if ``with_tumour``).
        Every organ label is present.
    """
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, dtype=float)
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError(f"shape and spacing must have 3 entries (z, y, x), got {shape} and {tuple(spacing)}")
    rng = np.random.default_rng(seed)

    # centred open mesh in mm; all sizes below are fractions of the field of view, so the phantom
    # looks the same at any resolution
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    grid = [((g - (n - 1) / 2.0) * s).astype(np.float32) for g, n, s in zip(grid, shape, spacing)]
    gz, gy, gx = grid
    half_z, half_y, half_x = np.asarray(shape) * spacing / 2.0

    image = np.full(shape, AIR_HU, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)

    # body: elliptical cylinder, wider than deep, slowly changing girth along z
    cy, cx = rng.uniform(-0.03, 0.03, 2) * (half_y, half_x)
    ay, ax = half_y * rng.uniform(0.62, 0.74), half_x * rng.uniform(0.80, 0.90)
    girth = 1.0 + 0.06 * np.sin(gz / half_z * rng.uniform(1.0, 2.0) + rng.uniform(0, 2 * np.pi))
    body_r = ((gy - cy) / (ay * girth)) ** 2 + ((gx - cx) / (ax * girth)) ** 2
    body = body_r <= 1.0
    fat = rng.uniform(0.06, 0.10)  # rim thickness as a fraction of the semi-axes
    inner = body_r <= (1.0 - fat) ** 2
    image[body] = FAT_HU
    image[inner] = SOFT_TISSUE_HU

    # vertebral body: posterior midline cylinder; unlabelled, as it is not a target here
    spine = (((gy - (cy + 0.62 * ay)) / (0.16 * ay)) ** 2 + ((gx - cx) / (0.13 * ax)) ** 2 <= 1.0)
    spine = np.broadcast_to(spine, shape) & inner
    image[spine] = BONE_HU + rng.uniform(-50, 50)

    def organ_centre(u, v, w, jitter):
        """(z, y, x) in mm from body-relative coordinates (u: left-right, v: ant-post, w: inf-sup)."""
        u, v, w = np.asarray((u, v, w)) + rng.uniform(-jitter, jitter, 3)
        return np.array([w * half_z, cy + v * ay, cx + u * ax])

    def scaled(sz, sy, sx):
        return np.array([sz * half_z, sy * ay, sx * ax]) * rng.uniform(0.85, 1.15, 3)

    # organs: (label, HU, centre, semi-axes, rotation); later ones overwrite earlier ones where they
    # touch, which keeps image and label consistent. Organ HU sit at least 2 noise sigmas above the
    # 40 HU soft tissue (a little brighter than unenhanced CT) so a short demo training can see them.
    organs = [(LABELS["liver"], 80.0 + rng.uniform(-5, 5),
               organ_centre(-0.35, -0.05, 0.25, 0.08), scaled(0.50, 0.60, 0.50), _rotation(rng, 20, 8))]
    kidney_hu = 150.0 + rng.uniform(-15, 15)
    for side in (-1, 1):
        rot = _rotation(rng, 10, 8)
        # kidneys point their upper poles medially; mirror the base angle between sides
        base = np.deg2rad(25.0 * side)
        rz = np.array([[1, 0, 0], [0, np.cos(base), -np.sin(base)], [0, np.sin(base), np.cos(base)]])
        organs.append((LABELS["kidney"], kidney_hu, organ_centre(0.38 * side, 0.42, -0.15, 0.05),
                       scaled(0.35, 0.22, 0.15), rz @ rot))
    organs.append((LABELS["spleen"], 110.0 + rng.uniform(-8, 8),
                   organ_centre(0.55, 0.15, 0.20, 0.06), scaled(0.25, 0.28, 0.16), _rotation(rng, 30, 8)))

    for lab, hu, centre, axes, rot in organs:
        mask = _ellipsoid(grid, centre, axes, rot) & inner
        if not mask.any():
            # only on very coarse grids: keep the promise that every organ is present
            idx = tuple(int(np.clip(round(c / s + (n - 1) / 2.0), 0, n - 1))
                        for c, s, n in zip(centre, spacing, shape))
            mask = np.zeros(shape, dtype=bool)
            mask[idx] = True
        image[mask] = hu
        label[mask] = lab

    if with_tumour:
        liver = label == LABELS["liver"]
        # distance (mm) to the nearest non-liver voxel: a sphere of radius r around a voxel whose
        # distance exceeds r + one voxel lies inside the liver with a rim of liver all around it
        dist = ndimage.distance_transform_edt(liver, sampling=spacing)
        radius = max(rng.uniform(0.25, 0.40) * min(organs[0][3]), 1.2 * spacing.max())
        candidates = np.flatnonzero(dist > radius + spacing.max())
        if candidates.size == 0:
            # small liver on a coarse grid: shrink the tumour to fit at the deepest point
            radius = max(float(dist.max()) - spacing.max(), 0.0) * 0.9
            candidates = np.flatnonzero(dist == dist.max())
        centre_idx = np.unravel_index(rng.choice(candidates), shape)
        centre = [float(grid[k].reshape(-1)[centre_idx[k]]) for k in range(3)]
        tumour = np.zeros(shape, dtype=bool)
        if radius > 0:
            tumour = _ellipsoid(grid, centre, (radius, radius, radius), np.eye(3)) & liver
        if not tumour.any():
            tumour = np.zeros(shape, dtype=bool)
            tumour[centre_idx] = True
        image[tumour] = image[tumour] - rng.uniform(20, 35)
        label[tumour] = LABELS["tumour"]

    # partial volume: the scanner's point spread blurs edges (less across the thick slices)
    image = ndimage.gaussian_filter(image, sigma=(0.3, 0.5, 0.5), mode="nearest")

    # smooth inhomogeneity acts on attenuation (HU + 1000), so air stays near -1000 while tissue
    # drifts by about +-20 HU, as with beam hardening
    field = 1.0
    for _ in range(3):
        k = rng.uniform(0.3, 1.2, 3) * np.pi / np.array([half_z, half_y, half_x])
        phase = rng.uniform(0, 2 * np.pi, 3)
        field = field + (0.02 / 3) * (np.cos(k[0] * gz + phase[0]) * np.cos(k[1] * gy + phase[1])
                                      * np.cos(k[2] * gx + phase[2]))
    image = (image - AIR_HU) * field + AIR_HU

    image += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_std)
    return image.astype(np.float32, copy=False), label


def _write(array: np.ndarray, spacing, path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    # SimpleITK orders spacing as (x, y, z), the reverse of the numpy axes
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(img, str(path), useCompression=True)


def write_phantom_dataset(raw_folder, dataset_id=990, name="Phantom", num_labeled=8, num_unlabeled=0,
                          unlabeled_folder=None, num_test=0, shape=(48, 64, 64), spacing=(2.5, 1.5, 1.5),
                          seed=0, with_tumour=True, overwrite=False):
    """Write phantoms as an nnU-Net v2 raw dataset.

    Layout written::

        raw_folder/Dataset{dataset_id:03d}_{name}/
            dataset.json
            imagesTr/case_000_0000.nii.gz ...   labelsTr/case_000.nii.gz ...
            imagesTs/case_008_0000.nii.gz ...   labelsTs/case_008.nii.gz ...   (only if num_test > 0)
        unlabeled_folder/phantom_unlabeled_000.nii.gz ...                     (only if num_unlabeled > 0)

    Parameters
    ----------
    raw_folder : str or Path
        Parent folder, normally ``$nnUNet_raw``. Created if missing.
    dataset_id, name : int, str
        Dataset id (1-999) and name, giving ``Dataset{id:03d}_{name}``.
    num_labeled : int
        Training cases with labels (imagesTr/labelsTr); ``numTraining`` in dataset.json.
    num_unlabeled : int
        Extra image-only phantoms written to ``unlabeled_folder`` (single-channel .nii.gz, no
        ``_0000`` suffix), e.g. for a pretraining pool.
    unlabeled_folder : str or Path or None
        Where the unlabelled images go; required when ``num_unlabeled > 0``.
    num_test : int
        Held-out cases written to imagesTs/ with their labels in labelsTs/.
    shape, spacing, with_tumour
        Passed to :func:`make_phantom`.
    seed : int
        Case ``k`` (counting training, then test, then unlabelled phantoms) uses
        ``make_phantom(seed=seed + k)``, so every phantom differs and each file can be regenerated.
    overwrite : bool
        Replace an existing dataset folder of the same name. Without it an existing folder is an error,
        because stale cases would contradict ``numTraining``.

    Returns
    -------
    Path
        The dataset folder.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be in 1..999, got {dataset_id}")
    if num_unlabeled > 0 and unlabeled_folder is None:
        raise ValueError("num_unlabeled > 0 needs unlabeled_folder (where the image-only phantoms go)")
    raw_folder = Path(raw_folder)
    raw_folder.mkdir(parents=True, exist_ok=True)
    folder = raw_folder / f"Dataset{int(dataset_id):03d}_{name}"

    # nnU-Net resolves ids by prefix, so another name with the same id would make `-d ID` ambiguous
    clashes = [p.name for p in raw_folder.glob(f"Dataset{int(dataset_id):03d}_*") if p != folder]
    if clashes:
        raise FileExistsError(f"{raw_folder} already holds {clashes} with id {dataset_id}. "
                              f"Fix: choose another dataset_id or remove that folder.")
    if folder.exists():
        if not overwrite:
            raise FileExistsError(f"{folder} exists. Fix: pass overwrite=True or choose another dataset_id.")
        shutil.rmtree(folder)

    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if num_test > 0 else ()):
        (folder / sub).mkdir(parents=True)

    k = 0
    for split, count in (("Tr", num_labeled), ("Ts", num_test)):
        for _ in range(count):
            image, label = make_phantom(shape, spacing, seed=seed + k, with_tumour=with_tumour)
            _write(image, spacing, folder / f"images{split}" / f"case_{k:03d}_0000.nii.gz")
            _write(label, spacing, folder / f"labels{split}" / f"case_{k:03d}.nii.gz")
            k += 1
    if num_unlabeled > 0:
        unlabeled_folder = Path(unlabeled_folder)
        unlabeled_folder.mkdir(parents=True, exist_ok=True)
        for i in range(num_unlabeled):
            image, _ = make_phantom(shape, spacing, seed=seed + k, with_tumour=with_tumour)
            _write(image, spacing, unlabeled_folder / f"phantom_unlabeled_{i:03d}.nii.gz")
            k += 1

    labels = dict(LABELS) if with_tumour else {n: v for n, v in LABELS.items() if n != "tumour"}
    dataset_json = {
        "name": name,
        "description": "Synthetic CT-like phantoms from nnunet_cl.phantom (not patient data).",
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": int(num_labeled),
        "file_ending": ".nii.gz",
        "licence": "synthetic, no restrictions",
    }
    with open(folder / "dataset.json", "w") as f:
        json.dump(dataset_json, f, indent=4)
    return folder
