"""Shared fixtures: the real datasets beside the project, and throw-away nnU-Net folders."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip that says why."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (they live beside the project as ../shared/data)")
    return SHARED_DATA


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Fresh nnUNet_raw / nnUNet_preprocessed / nnUNet_results folders in tmp_path, exported."""
    paths = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        p = tmp_path / name
        p.mkdir()
        monkeypatch.setenv(name, str(p))
        paths[name] = p
    return paths
