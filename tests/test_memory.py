"""nnunet_cl.memory: the glibc setting the trainers make in initialize()."""
import platform

import pytest

from nnunet_cl.memory import fix_mmap_threshold


def test_user_variable_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_sets_the_threshold_on_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert fix_mmap_threshold(131072) is True
