"""Bad scans are named and skipped, the pool survives a SIGKILL and damaged files: nnUNetv2_cl_add_unlabeled.

Reuses test_pool's planned 5-case dataset (its own instance: this module damages the pool on purpose).
"""
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nnunet_cl.paths import NnUNetCLError
from nnunet_cl.pool import add_unlabeled, format_summary, load_manifest, main_add_unlabeled, pool_case_folder
from nnunet_cl.pool_store import case_problem
from nnunet_cl.scan_checks import ScanLimits

from test_pool import DATASET, _blob, _write, tiny, write_dicom_series  # noqa: F401 (tiny is a fixture)

DI = "nnUNetPlans_3d_fullres"


def _pool(tiny):
    pre = tiny["nnUNet_preprocessed"] / DATASET
    return pre, pool_case_folder(str(pre), DI)


def _whole(tiny, case_id):
    """The case loads with nnU-Net's dataset class and has the shape pool.json records."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    pre, folder = _pool(tiny)
    shape = load_manifest(str(pre))[case_id]["preprocessed"][DI]["shape"]
    assert case_problem(folder, case_id, shape, 1) is None
    data, seg, _, _ = nnUNetDatasetBlosc2(folder, [case_id]).load_case(case_id)
    assert data.shape == (1, *shape) and seg.shape == (1, *shape)
    assert np.isfinite(np.asarray(data[:])).all()


def _truncate(path, keep=0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])


BAD = {"truncated.nii.gz": "truncated gzip stream", "bad_crc.nii.gz": "CRC check failed",
       "short.nii": "data shorter than its NIfTI header", "has_inf.nii.gz": "1 of 7040 voxels are not finite",
       "all_nan.nii.gz": "all voxels are not finite (7040 NaN", "spacing50.nii.gz": "implausible spacing 50 x 50 x 50",
       "fake.nii.gz": "not a gzip file", f"folder.nii.gz{os.sep}": "a folder named like an image file",
       "spacing_tiny.nii.gz": "implausible spacing 1 x 1 x 0.001", "wide.nii.gz": "field of view 2280 x 12 x 12 mm",
       "text.nii.gz": "not a NIfTI file", "empty.nii.gz": "empty file (0 bytes)"}


def test_bad_scans_are_named_and_skipped_good_ones_added(tiny, tmp_path):
    rng = np.random.default_rng(7)
    first = tmp_path / "first"
    first.mkdir()
    _write(_blob(rng, (16, 22, 20)), first / "kept.nii.gz")
    assert add_unlabeled(DATASET, str(first), verbose=False)["added"] == ["pool_kept"]

    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("fine_1.nii.gz", "fine_2.nrrd"):
        _write(_blob(rng, (16, 22, 20)), scans / name)
    _write(_blob(rng, (16, 22, 20)), scans / "truncated.nii.gz")
    _truncate(scans / "truncated.nii.gz")  # SimpleITK reads this zero-filled, without an error
    _write(_blob(rng, (16, 22, 20)), scans / "bad_crc.nii.gz")
    raw = bytearray((scans / "bad_crc.nii.gz").read_bytes())
    raw[-6] ^= 0xFF  # inside the CRC32 of the gzip trailer
    (scans / "bad_crc.nii.gz").write_bytes(bytes(raw))
    _write(_blob(rng, (16, 22, 20)), scans / "short.nii")
    _truncate(scans / "short.nii", 0.7)  # uncompressed, shorter than dims x bytes per voxel
    inf = _blob(rng, (16, 22, 20))
    inf[8, 10, 10] = np.inf  # SimpleITK's NIfTI reader turns it into 0
    _write(inf, scans / "has_inf.nii.gz")
    _write(np.full((16, 22, 20), np.nan, np.float32), scans / "all_nan.nii.gz")
    _write(_blob(rng, (16, 22, 20)), scans / "spacing50.nii.gz", spacing=(50.0, 50.0, 50.0))
    (scans / "fake.nii.gz").write_text("a note saved with the wrong name\n" * 5)
    _write(_blob(rng, (16, 22, 20)), scans / "spacing_tiny.nii.gz", spacing=(0.001, 1.0, 1.0))
    _write(_blob(rng, (120, 12, 12)), scans / "wide.nii.gz", spacing=(1.0, 1.0, 19.0))
    (scans / "text.nii.gz").write_bytes(gzip.compress(b"gzip-compressed, but no image\n" * 5))
    (scans / "empty.nii.gz").write_bytes(b"")
    (scans / "folder.nii.gz").mkdir()
    (scans / "folder.nii.gz" / "readme.txt").write_text("unpacked archive")
    write_dicom_series(_blob(rng, (10, 24, 20), offset=40), scans / "ct_series")  # Modality CT, dataset MRI

    summary = add_unlabeled(DATASET, str(scans), verbose=False)
    assert sorted(summary["added"]) == ["pool_ct_series", "pool_fine_1", "pool_fine_2"]
    assert set(summary["skipped"]) == set(BAD)
    for name, words in BAD.items():
        assert words in summary["skipped"][name], (name, summary["skipped"][name])
        assert "Fix: " in summary["skipped"][name]
    assert list(summary["warnings"]) == ["ct_series"]
    assert "modality mismatch: the DICOM series is CT, the dataset is MRI" in summary["warnings"]["ct_series"]
    report = format_summary(summary)
    assert f"Skipped: {len(BAD)}" in report and "Added with a warning: 1" in report
    assert all(f"  {name}: " in report for name in BAD)
    for case_id in ("pool_kept", "pool_fine_1", "pool_fine_2", "pool_ct_series"):
        _whole(tiny, case_id)  # the earlier case is still there and intact


def test_memory_guard_refuses_before_allocating(tiny, tmp_path, monkeypatch, capsys):
    """The size after resampling is estimated first; above --max_memory_gb the scan is refused with the estimate."""
    scans = tmp_path / "big"
    scans.mkdir()
    rng = np.random.default_rng(8)
    _write(_blob(rng, (16, 22, 20)), scans / "coarse.nii.gz", spacing=(15.0, 15.0, 15.0))
    _write(_blob(rng, (16, 22, 20)), scans / "normal.nii.gz")
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_cl_add_unlabeled", "-d", DATASET, "-i", str(scans), "-np", "1",
                                      "--max_memory_gb", "0.01"])
    main_add_unlabeled()
    out = capsys.readouterr().out
    # 16 x 22 x 20 voxels of 15 mm at the plans' 2 x 1 x 1 mm: 120 x 330 x 300 voxels, 0.04 GiB as float32
    assert ("coarse.nii.gz: too large after resampling: at 3d_fullres's spacing [2.0, 1.0, 1.0] mm the volume would "
            "be 120 x 330 x 300 voxels x 1 channel(s), about 0.0443 GiB as float32 (limit 0.01 GiB)") in out
    assert "Added: 1 (pool_normal)" in out
    with pytest.raises(NnUNetCLError, match="Invalid scan limits.*Fix: "):
        add_unlabeled(DATASET, str(scans), limits=ScanLimits(min_spacing=5.0, max_spacing=1.0), verbose=False)


def test_sigkill_mid_write_then_rerun_completes_the_pool(tiny, tmp_path):
    scans = tmp_path / "kill"
    scans.mkdir()
    rng = np.random.default_rng(9)
    n = 6
    for i in range(n):
        _write(_blob(rng, (40, 64, 60)), scans / f"kill_{i}.nii.gz")
    cmd = ["nnUNetv2_cl_add_unlabeled", "-d", DATASET, "-i", str(scans), "-np", "1"]
    _, folder = _pool(tiny)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # kill as soon as the second case starts writing: the first is done, the second half-written
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if os.path.isdir(folder) and any("kill_1" in f for f in os.listdir(folder)):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-write"

    again = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    ids = [f"pool_kill_{i}" for i in range(n)]
    assert set(ids) <= set(load_manifest(str(_pool(tiny)[0])))
    for case_id in ids:
        _whole(tiny, case_id)
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp_")]


def test_damaged_pool_case_is_rebuilt_or_reported(tiny, tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(10)
    scans = tmp_path / "dmg"
    scans.mkdir()
    for name in ("dmg_a.nii.gz", "dmg_b.nii.gz"):
        _write(_blob(rng, (16, 22, 20)), scans / name)
    add_unlabeled(DATASET, str(scans), verbose=False)
    pre, folder = _pool(tiny)
    _truncate(Path(folder) / "pool_dmg_a.b2nd")
    assert case_problem(folder, "pool_dmg_a", load_manifest(str(pre))["pool_dmg_a"]["preprocessed"][DI]["shape"],
                        1) is not None
    # rebuilt from the source pool.json records, whatever folder this run ingests
    other = tmp_path / "other"
    other.mkdir()
    _write(_blob(rng, (16, 22, 20)), other / "dmg_new.nii.gz")
    summary = add_unlabeled(DATASET, str(other), verbose=False)
    assert summary["repaired"] == ["pool_dmg_a"] and summary["added"] == ["pool_dmg_new"] and not summary["broken"]
    assert "Rebuilt (damaged files in the pool): 1 (pool_dmg_a)" in format_summary(summary)
    _whole(tiny, "pool_dmg_a")

    # damaged and its source gone: the command says the pool is not whole and exits with an error
    _truncate(Path(folder) / "pool_dmg_b_seg.b2nd")
    (scans / "dmg_b.nii.gz").unlink()
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_cl_add_unlabeled", "-d", DATASET, "-i", str(other), "-np", "1"])
    with pytest.raises(SystemExit, match=r"^nnUNetv2_cl_add_unlabeled: error: the pool is not whole: 1 case\(s\) "
                                         r".*pool_dmg_b: pool_dmg_b_seg.b2nd unreadable.*file not found.*Fix: "):
        main_add_unlabeled()
    assert "pool_dmg_b (pool case, from " in capsys.readouterr().out
