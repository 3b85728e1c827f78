"""Download Mini-ImageNet when online: the pickle caches most few-shot code bases use.

The three ``mini-imagenet-cache-{train,validation,test}.pkl`` files (84x84 RGB,
Ravi & Larochelle's split, 600 images per class) are the distribution that
learn2learn's ``MiniImagenet`` fetches, from the Google Drive files named in
``DRIVE_IDS`` (github.com/learnables/learn2learn, vision/datasets/mini_imagenet.py).
torchvision's ``download_file_from_google_drive`` does the transfer (it handles
Drive's large-file confirmation). Each file is written under a ``.part`` name,
checked with the restricted unpickler (``safe_pickle``: nothing but plain data,
a crafted file runs nothing) and only then renamed into place, so an
interrupted or hostile download never looks like data.

``fetch`` is a parameter so that tests exercise everything but the network.
"""

from __future__ import annotations

import http.client
import os
from collections.abc import Callable
from pathlib import Path

from fewshot_nsl.data.miniimagenet import SPLITS, find_split, pickle_cache_path, read_pickle_cache
from fewshot_nsl.errors import UserError

DRIVE_IDS = {
    "train": "1I3itTXpXxGV68olxM5roceUMG8itH9Xj",
    "val": "1KY5e491bkLFqJDp0-UWou3463Mo8AOco",
    "test": "1wpmY-hmiJUUlRBkO9ZDCXAcIpHEFdOhD",
}
ACCEPTED = (
    "<split>/<wnid>/*.jpg folders, images/ plus the Ravi split CSVs, or mini-imagenet-cache-{train,validation,test}.pkl"
)
Fetch = Callable[[str, Path], None]  # (Google Drive file id, destination file)


def google_drive_fetch(file_id: str, destination: Path) -> None:
    from torchvision.datasets.utils import download_file_from_google_drive

    download_file_from_google_drive(file_id, destination.parent, destination.name)


def has_every_split(folder: Path) -> bool:
    """Whether ``folder`` already holds train, val and test in some readable layout."""
    return all(find_split(folder, split) is not None or pickle_cache_path(folder, split).is_file() for split in SPLITS)


def _fetch_checked(fetch: Fetch, split: str, partial: Path) -> None:
    try:
        fetch(DRIVE_IDS[split], partial)
    except (OSError, RuntimeError, ValueError, http.client.HTTPException) as exc:
        raise UserError(
            f"cannot download Mini-ImageNet's {split} split ({type(exc).__name__}: {exc}); without network, put a "
            f"copy in one of the accepted formats ({ACCEPTED}) and run `fewshot-nsl data prepare miniimagenet "
            f"--source DIR`, or point --data-root / FEWSHOT_NSL_DATA at the folder holding miniimagenet/"
        ) from None
    try:
        read_pickle_cache(partial, image_size=84)  # refuses anything but plain data, and malformed caches
    except UserError as refused:
        raise UserError(f"the downloaded {split} file was refused and deleted: {refused}") from None


def download_miniimagenet(data_root: Path, fetch: Fetch = google_drive_fetch) -> Path:
    """Fetch the missing pickle caches into ``<data_root>/miniimagenet``; returns that folder."""
    folder = Path(data_root).expanduser() / "miniimagenet"
    if has_every_split(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        target = pickle_cache_path(folder, split)
        if target.is_file() or find_split(folder, split) is not None:
            continue
        partial = target.with_name(target.name + ".part")
        try:
            _fetch_checked(fetch, split, partial)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, target)
    return folder
