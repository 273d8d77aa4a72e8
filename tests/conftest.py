"""Shared fixtures: the real data folder (skips when absent) and seeded generators."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# The real research data lives beside the repository, never inside it (see ../shared/data/README.md).
SHARED_DATA = Path(os.environ.get("RETRBENCH_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under the shared real-data folder, skipping the test with a reason when absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (set RETRBENCH_SHARED_DATA to the shared/data folder)")
    return p


@pytest.fixture
def shared_data() -> Path:
    return shared_path()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep every test's caches and data out of the user's home (session-wide, so that
    module-scoped fixtures see the same roots as the tests)."""
    root = tmp_path_factory.getbasetemp() / "retrbench-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETRBENCH_CACHE", str(root))
        mp.setenv("RETRBENCH_DATA", str(root / "data"))
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_backbone_tests(request: pytest.FixtureRequest):
    """Backbone tests run small inputs: one intra-op thread is fast there, and immune to
    busy-waiting on a loaded machine. (A conftest.py in tests/backbones would shadow this
    module for ``from conftest import shared_path``.)"""
    if request.path.parent.name != "backbones":
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
