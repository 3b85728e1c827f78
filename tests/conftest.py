"""Shared fixtures.

Real data (``@pytest.mark.real_data`` tests) is read from ``$FEWSHOT_NSL_DATA``,
defaulting to the ``shared/data`` folder beside the repository; those tests
are skipped when it is absent. Nothing of it is ever copied into the repo.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fewshot_nsl.data.roots import CACHE_ENV, DATA_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REAL_DATA = REPO_ROOT.parent / "shared" / "data"


def _real_data_path() -> Path:
    return Path(os.environ[DATA_ENV]).expanduser() if os.environ.get(DATA_ENV) else DEFAULT_REAL_DATA


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real data folder (holding ``omniglot/``, ``miniimagenet/``); skips the test when absent."""
    root = _real_data_path()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set {DATA_ENV})")
    return root


@pytest.fixture(scope="session")
def real_omniglot_root(real_data_root: Path) -> Path:
    """``real_data_root``, skipping the test when it has no ``omniglot/``."""
    if not (real_data_root / "omniglot" / "images_background.npz").is_file():
        pytest.skip(f"no Omniglot in {real_data_root}")
    return real_data_root


@pytest.fixture(scope="session")
def real_miniimagenet_root(real_data_root: Path) -> Path:
    """``real_data_root``, skipping the test when it has no ``miniimagenet/``."""
    if not (real_data_root / "miniimagenet").is_dir():
        pytest.skip(f"no Mini-ImageNet in {real_data_root}")
    return real_data_root


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decode/resize cache for the whole test session, so real data is decoded once per run."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache folder for one test, also set as ``$FEWSHOT_NSL_CACHE``."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder
