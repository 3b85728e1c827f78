"""Mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) split.

``<data-root>/miniimagenet`` may hold either usual on-disk layout; per split the
first one found is used:

* folders: ``<split>/<wnid>/<file>.jpg`` (what ``../shared/data/miniimagenet``
  holds; there ``train/`` has only 300 of the 600 images per class: whatever
  is present is read, and ``describe_miniimagenet`` reports the counts);
* csv: one flat ``images/`` folder plus the Ravi split files
  ``splits/ravi/<split>.csv`` or ``<split>.csv`` (rows ``filename,label``).
  Every listed image must be present;
* pickle caches as distributed for learn2learn and others:
  ``mini-imagenet-cache-{train,validation,test}.pkl``, each a dict with
  ``image_data`` (uint8 N x 84 x 84 x 3) and ``class_dict`` (class -> list of
  indices), read with a restricted unpickler that refuses anything but plain
  data (``fewshot_nsl.data.safe_pickle``): unpickling an untrusted file could
  otherwise run code.

Classes are the wnids, sorted; images of a class are sorted by file name, so
the same images give the same ``ImageClassSet`` in either layout. Images are
decoded to RGB uint8 and resized (plain bilinear resize of both sides, as the
84x84 Mini-ImageNet files were made) only when not already
``image_size`` x ``image_size``. The result is cached. Normalisation uses the
ImageNet channel mean and std.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode

from fewshot_nsl.data.dataset import ImageClassSet
from fewshot_nsl.data.image_folder import image_files, iter_decoded, resize_square, visible_subfolders
from fewshot_nsl.data.safe_pickle import load_plain_pickle
from fewshot_nsl.data.tensor_cache import cached, source_key
from fewshot_nsl.errors import UserError

SPLITS = ("train", "val", "test")
RAVI_CLASSES = {"train": 64, "val": 16, "test": 20}
RAVI_IMAGES_PER_CLASS = 600
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_VERSION = "miniimagenet-v1"


@dataclass(frozen=True)
class SplitListing:
    """The files of one split, found without decoding anything."""

    split: str
    layout: str  # "folders" or "csv"
    source: Path  # the split folder, or the csv file
    class_names: tuple[str, ...]
    files: tuple[tuple[Path, ...], ...]  # per class, sorted by file name

    @property
    def num_images(self) -> int:
        return sum(len(f) for f in self.files)

    def summary(self) -> str:
        """E.g. ``train: 64 classes, 19200 images (300 per class; the full split has 600) from ...``."""
        sizes = sorted({len(f) for f in self.files})
        per_class = f"{sizes[0]} per class" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]} per class"
        if sizes != [RAVI_IMAGES_PER_CLASS]:
            per_class += f"; the full split has {RAVI_IMAGES_PER_CLASS}"
        return (
            f"{self.split}: {len(self.class_names)} classes, {self.num_images} images ({per_class}) "
            f"from {self.source} [{self.layout} layout]"
        )


def _folder_listing(folder: Path, split: str) -> SplitListing:
    split_dir = folder / split
    classes = visible_subfolders(split_dir)
    if not classes:
        raise UserError(f"{split_dir} has no class folders; expected {split_dir}/<wnid>/<file>.jpg")
    files = []
    for class_dir in classes:
        found = image_files(class_dir, SUFFIXES)
        if not found:
            raise UserError(f"Mini-ImageNet class folder {class_dir} has no .jpg images")
        files.append(tuple(found))
    return SplitListing(split, "folders", split_dir, tuple(c.name for c in classes), tuple(files))


def _csv_listing(folder: Path, split: str, csv_path: Path) -> SplitListing:
    images_dir = folder / "images"
    by_class: dict[str, list[Path]] = {}
    with open(csv_path, newline="") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            if not row or (line_no == 1 and [c.strip().lower() for c in row[:2]] == ["filename", "label"]):
                continue
            if len(row) < 2:
                raise UserError(f"{csv_path} line {line_no}: expected `filename,label`, got {','.join(row)!r}")
            by_class.setdefault(row[1].strip(), []).append(images_dir / row[0].strip())
    if not by_class:
        raise UserError(f"{csv_path} lists no images")
    missing = [p for paths in by_class.values() for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of the images listed in {csv_path} are missing from {images_dir} "
            f"(first: {missing[0].name}); the csv layout needs every listed image"
        )
    names = tuple(sorted(by_class))
    files = tuple(tuple(sorted(by_class[n], key=lambda p: p.name)) for n in names)
    return SplitListing(split, "csv", csv_path, names, files)


def find_split(folder: Path, split: str) -> SplitListing | None:
    if (folder / split).is_dir():
        return _folder_listing(folder, split)
    if (folder / "images").is_dir():
        for csv_path in (folder / "splits" / "ravi" / f"{split}.csv", folder / f"{split}.csv"):
            if csv_path.is_file():
                return _csv_listing(folder, split, csv_path)
    return None


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip", ".h5", ".hdf5", ".npz", ".7z", ".rar")


def _unrecognised(folder: Path, split: str) -> str:
    """What ``folder`` holds instead of a readable split, with a hint for archives."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
    if not entries:
        return "is empty"
    shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
    hint = f"holds {shown}: no {split}/ folder, no images/ with a {split}.csv, no pickle cache"
    archives = [e for e in entries if e.lower().endswith(ARCHIVE_SUFFIXES)]
    if archives:
        hint += f" ({archives[0]} is an archive or array file, a format fewshot-nsl does not read: extract or convert it)"
    return hint


def list_split(folder: Path, split: str) -> SplitListing:
    """Find one split's files in either layout, or raise a ``UserError`` that says what was expected."""
    if split not in SPLITS:
        raise UserError(f"Mini-ImageNet has no {split!r} split; it has {', '.join(SPLITS)}")
    listing = find_split(folder, split)
    if listing is not None:
        return listing
    where = "does not exist" if not folder.is_dir() else _unrecognised(folder, split)
    raise UserError(
        f"Mini-ImageNet {split} split not found: {folder} {where}. Expected {folder}/{split}/<wnid>/*.jpg, or "
        f"{folder}/images/ plus {folder}/splits/ravi/{split}.csv (or {folder}/{split}.csv), or "
        f"{pickle_cache_path(folder, split).name} (pickle cache). Run `fewshot-nsl data prepare miniimagenet` "
        f"(downloads the pickle caches), or with your own copy `... --source DIR`, or point --data-root / "
        f"FEWSHOT_NSL_DATA at the folder holding miniimagenet/"
    )


def describe_miniimagenet(folder: Path) -> dict[str, SplitListing]:
    """Listings of the splits present in ``folder``; checks class counts and disjoint classes."""
    found = {split: find_split(folder, split) for split in SPLITS}
    listings = {split: listing for split, listing in found.items() if listing is not None}
    if not listings:
        raise UserError(
            f"no Mini-ImageNet split found in {folder}: expected train/, val/, test/ folders of <wnid>/*.jpg, "
            f"or images/ plus the Ravi split csv files"
        )
    for split, listing in listings.items():
        if len(listing.class_names) != RAVI_CLASSES[split]:
            raise UserError(
                f"{listing.source} has {len(listing.class_names)} classes; the Ravi {split} split has "
                f"{RAVI_CLASSES[split]}"
            )
    seen: dict[str, str] = {}
    for split, listing in listings.items():
        for name in listing.class_names:
            if name in seen:
                raise UserError(f"class {name} is in both the {seen[name]} and the {split} split of {folder}")
            seen[name] = split
    return listings


def _decode_split(listing: SplitListing, image_size: int) -> dict[str, torch.Tensor]:
    flat = [path for class_files in listing.files for path in class_files]
    images = torch.empty((len(flat), 3, image_size, image_size), dtype=torch.uint8)
    for index, image in enumerate(iter_decoded(flat, ImageReadMode.RGB)):
        images[index] = resize_square(image, image_size, crop=False)
    labels = torch.arange(len(listing.files)).repeat_interleave(torch.tensor([len(f) for f in listing.files]))
    return {"images": images, "labels": labels}


PICKLE_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


def pickle_cache_path(folder: Path, split: str) -> Path:
    return folder / f"mini-imagenet-cache-{PICKLE_SPLIT_NAMES[split]}.pkl"


def read_pickle_cache(path: Path, image_size: int) -> dict[str, torch.Tensor | tuple[str, ...]]:
    """Images (N, 3, S, S) uint8, labels and sorted class names from one pickle cache file."""
    data = load_plain_pickle(path)
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        raise UserError(f"{path} is not a Mini-ImageNet pickle cache: expected a dict with image_data and class_dict")
    images, classes = data["image_data"], data["class_dict"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise UserError(f"{path}: image_data must be a uint8 array of N x H x W x 3, got {getattr(images, 'shape', type(images))}")
    names = tuple(sorted(classes))
    order = [int(index) for name in names for index in classes[name]]
    if not order or min(order) < 0 or max(order) >= len(images):
        raise UserError(f"{path}: class_dict indices fall outside image_data's {len(images)} images")
    chosen = torch.from_numpy(images[order]).permute(0, 3, 1, 2).contiguous()
    if chosen.shape[-1] != image_size or chosen.shape[-2] != image_size:
        chosen = torch.stack([resize_square(image, image_size, crop=False) for image in chosen])
    labels = torch.arange(len(names)).repeat_interleave(torch.tensor([len(classes[n]) for n in names]))
    return {"images": chosen, "labels": labels, "class_names": names}


def load_miniimagenet(data_root: Path, split: str, cache_dir: Path, image_size: int = 84) -> ImageClassSet:
    """One Ravi split of Mini-ImageNet as an ``ImageClassSet`` (decoded once, then cached)."""
    folder = Path(data_root) / "miniimagenet"
    if split in PICKLE_SPLIT_NAMES and find_split(folder, split) is None and pickle_cache_path(folder, split).is_file():
        path = pickle_cache_path(folder, split)
        tensors = read_pickle_cache(path, image_size)
        return ImageClassSet(
            images=tensors["images"], labels=tensors["labels"], class_names=tensors["class_names"],
            mean=IMAGENET_MEAN, std=IMAGENET_STD, name=f"miniimagenet/ravi/{split}",
        )  # fmt: skip
    listing = list_split(folder, split)
    flat = [path for class_files in listing.files for path in class_files]
    key = source_key(flat, image_size, listing.layout, CACHE_VERSION)
    tensors = cached(
        Path(cache_dir), f"miniimagenet-{split}-{image_size}", key, lambda: _decode_split(listing, image_size)
    )
    return ImageClassSet(
        images=tensors["images"],
        labels=tensors["labels"],
        class_names=listing.class_names,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        name=f"miniimagenet/ravi/{split}",
    )


def prepare_miniimagenet(source: Path, data_root: Path) -> Path:
    """Check a user's Mini-ImageNet copy and make it ``<data_root>/miniimagenet`` (a symbolic link).

    Validates the layout (see the module docstring), the Ravi class counts and
    that the splits share no class, then links. Returns ``<data_root>/miniimagenet``.
    ``describe_miniimagenet`` gives per-split counts for a summary; a copy that
    is only the three pickle caches is checked by reading them.
    """
    source = Path(source).expanduser()
    if not source.is_dir():
        raise UserError(f"Mini-ImageNet source {source} is not a folder")
    if all(find_split(source, split) is None and pickle_cache_path(source, split).is_file() for split in SPLITS):
        for split in SPLITS:
            classes = read_pickle_cache(pickle_cache_path(source, split), image_size=84)["class_names"]
            if len(classes) != RAVI_CLASSES[split]:
                raise UserError(f"{pickle_cache_path(source, split)} has {len(classes)} classes; the Ravi {split} split has {RAVI_CLASSES[split]}")
    else:
        describe_miniimagenet(source)
    target = Path(data_root).expanduser() / "miniimagenet"
    if target.exists() or target.is_symlink():
        if target.resolve() == source.resolve():
            return target
        raise UserError(
            f"{target} already exists and is not {source}; remove it, or use another --data-root"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.symlink_to(source.resolve(), target_is_directory=True)
    except OSError as exc:
        raise UserError(
            f"cannot link {target} → {source} ({exc}); move or copy the folder there yourself, "
            f"or point --data-root at a folder whose miniimagenet/ is your copy"
        ) from None
    return target
