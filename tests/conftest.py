"""Shared fixtures.

Real data (``@pytest.mark.real_data`` tests) is read from ``$FEWSHOT_NSL_DATA``,
defaulting to the ``shared/data`` folder beside the repository. When it is
absent those tests FAIL, saying where they looked: a CI without data must not
pass with them silently skipped. Set ``FEWSHOT_NSL_SKIP_REAL_DATA=1`` to skip
them on purpose (the skip reason then says so). Nothing of the data is ever
copied into the repo.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fewshot_nsl.data.roots import CACHE_ENV, DATA_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REAL_DATA = REPO_ROOT.parent / "shared" / "data"


SKIP_ENV = "FEWSHOT_NSL_SKIP_REAL_DATA"


def _missing(what: str) -> None:
    """Fail (or skip, when explicitly allowed) a test whose real data is absent."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{what} ({SKIP_ENV}=1)")
    pytest.fail(f"{what}: set {DATA_ENV} to the data folder, or {SKIP_ENV}=1 to skip real-data tests on purpose")


def _real_data_path() -> Path:
    return Path(os.environ[DATA_ENV]).expanduser() if os.environ.get(DATA_ENV) else DEFAULT_REAL_DATA


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real data folder (holding ``omniglot/``, ``miniimagenet/``)."""
    root = _real_data_path()
    if not root.is_dir():
        _missing(f"real data not found at {root}")
    return root


@pytest.fixture(scope="session")
def real_omniglot_root(real_data_root: Path) -> Path:
    """``real_data_root``, which must hold ``omniglot/``."""
    if not (real_data_root / "omniglot" / "images_background.npz").is_file():
        _missing(f"no Omniglot in {real_data_root}")
    return real_data_root


@pytest.fixture(scope="session")
def real_miniimagenet_root(real_data_root: Path) -> Path:
    """``real_data_root``, which must hold ``miniimagenet/``."""
    if not (real_data_root / "miniimagenet").is_dir():
        _missing(f"no Mini-ImageNet in {real_data_root}")
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
