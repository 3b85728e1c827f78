"""Omniglot in its two standard protocols, read from the project's npz form.

Layout under ``<data-root>/omniglot`` (what ``fewshot-nsl data prepare omniglot``
writes, and what ``../shared/data/omniglot`` holds):

* ``images_background.npz`` / ``images_evaluation.npz``: ``images`` bool
  (characters, 20, 105, 105), True = paper, False = ink;
* ``characters.csv``: ``char_id,set,row,alphabet,character``;
* ``splits/vinyals/{train,val,test}.txt``: ``Alphabet/characterNN/rotDDD`` lines.

Protocols:

* ``vinyals``: every character at 0/90/180/270 degrees is a class; the split
  files decide train/val/test (4112/688/1692 classes).
* ``lake``: the 964 background characters train, the 659 evaluation
  characters test, no rotation classes. There is no validation split.

Images are inverted (ink = 255, paper = 0) so that zero padding means blank
paper, and resized once with antialiasing; the resized characters are cached.
"""

from __future__ import annotations

import csv
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fewshot_nsl.data.dataset import ImageClassSet
from fewshot_nsl.data.tensor_cache import cached, source_key
from fewshot_nsl.errors import UserError

SETS = ("background", "evaluation")
PROTOCOL_SPLITS = {"vinyals": ("train", "val", "test", "trainval"), "lake": ("train", "test")}
DRAWERS = 20
# Ink is 255 and paper 0, standardised to [0, 1]: the dataset's images and outside images alike.
OMNIGLOT_MEAN, OMNIGLOT_STD = (0.0,), (1.0,)
RESIZE_CHUNK = 4096  # images interpolated at once (bounds the float copy of a set)
REBUILD = "rebuild it with `fewshot-nsl data prepare omniglot`"
# What numpy raises on a file that is not a complete npz archive.
_ARCHIVE_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class Character:
    set: str
    row: int
    alphabet: str
    character: str


def read_characters(folder: Path) -> list[Character]:
    """The character table, in file order (background first, as written).

    Raises ``UserError`` naming the line of a malformed row (the npz ``row``
    ranges are checked once the archives are read, in ``load_omniglot``).
    """
    path = folder / "characters.csv"
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"set", "row", "alphabet", "character"} - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"{path} lacks the column(s) {', '.join(sorted(missing))}; {REBUILD}")
        characters = []
        for line_no, row in enumerate(reader, start=2):
            if row["set"] not in SETS or not (row["row"] or "").isdigit():
                raise UserError(
                    f"{path} line {line_no}: set must be one of {', '.join(SETS)} and row a non-negative integer, "
                    f"got set={row['set']!r} row={row['row']!r}; {REBUILD}"
                )
            characters.append(Character(row["set"], int(row["row"]), row["alphabet"], row["character"]))
    return characters


def _read_paper(npz_path: Path) -> torch.Tensor:
    """The ``images`` array of one archive, bool (characters, 20, H, W), or a ``UserError`` saying what is wrong."""
    try:
        with np.load(npz_path) as archive:
            paper = archive["images"]
    except _ARCHIVE_ERRORS as exc:
        raise UserError(f"{npz_path} is not a readable Omniglot archive ({type(exc).__name__}: {exc}); {REBUILD}") from None
    if paper.dtype != np.bool_ or paper.ndim != 4 or paper.shape[1] != DRAWERS:
        raise UserError(
            f"{npz_path}: images must be bool (characters, {DRAWERS}, height, width), "
            f"got {paper.dtype} {tuple(paper.shape)}; {REBUILD}"
        )
    return torch.from_numpy(paper)


def resize_ink(ink: torch.Tensor, size: int) -> torch.Tensor:
    """Ink (N, 1, H, W), bool or float in [0, 1], as uint8 (N, 1, size, size): antialiased bilinear, then
    rounded. The one resize of Omniglot characters, for the dataset and for outside images
    (``data.preprocess``), so an original PNG comes out exactly as the dataset's own copy."""
    resized = torch.cat(
        [
            F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            for chunk in torch.split(ink, RESIZE_CHUNK)
        ]
    )
    return resized.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def _resize_set(npz_path: Path, size: int) -> dict[str, torch.Tensor]:
    paper = _read_paper(npz_path)
    chars, drawers, height, width = paper.shape
    images = resize_ink((~paper).reshape(-1, 1, height, width), size)
    return {"images": images.reshape(chars, drawers, size, size)}


def load_set(folder: Path, set_name: str, size: int, cache_dir: Path) -> torch.Tensor:
    """uint8 (characters, 20, size, size) of one Omniglot set, cached after the first call."""
    npz = folder / f"images_{set_name}.npz"
    return cached(cache_dir, f"omniglot-{set_name}-{size}", source_key([npz], size), lambda: _resize_set(npz, size))[
        "images"
    ]


def _require(folder: Path) -> None:
    missing = [n for n in ("images_background.npz", "images_evaluation.npz", "characters.csv") if not (folder / n).exists()]
    if missing:
        raise UserError(
            f"Omniglot not found in {folder} (missing {', '.join(missing)}); run `fewshot-nsl data prepare omniglot` "
            f"or point --data-root / FEWSHOT_NSL_DATA at a folder containing omniglot/"
        )


def load_omniglot(data_root: Path, protocol: str, split: str, cache_dir: Path, image_size: int = 28) -> ImageClassSet:
    """One split of one Omniglot protocol as an ``ImageClassSet``."""
    if protocol not in PROTOCOL_SPLITS:
        raise UserError(f"unknown Omniglot protocol {protocol!r}; choose one of {', '.join(PROTOCOL_SPLITS)}")
    if split not in PROTOCOL_SPLITS[protocol]:
        raise UserError(
            f"the {protocol} protocol has no {split!r} split; it has {', '.join(PROTOCOL_SPLITS[protocol])}"
        )
    folder = data_root / "omniglot"
    _require(folder)
    characters = read_characters(folder)
    sets = {name: load_set(folder, name, image_size, cache_dir) for name in SETS}
    for character in characters:
        if character.row >= len(sets[character.set]):
            raise UserError(
                f"{folder / 'characters.csv'} lists {character.alphabet}/{character.character} at row {character.row} "
                f"of images_{character.set}.npz, which has {len(sets[character.set])} characters; {REBUILD}"
            )
    if protocol == "lake":
        wanted = "background" if split == "train" else "evaluation"
        chosen = [(c, 0) for c in characters if c.set == wanted]
    else:
        chosen = _vinyals_classes(folder, split, characters)
    class_images = [torch.rot90(sets[c.set][c.row], k=quarter, dims=(-2, -1)) for c, quarter in chosen]
    images = torch.stack(class_images).reshape(-1, 1, image_size, image_size)
    names = tuple(
        f"{c.alphabet}/{c.character}" + (f"/rot{90 * q:03d}" if protocol == "vinyals" else "") for c, q in chosen
    )
    return ImageClassSet(
        images=images.contiguous(),
        labels=torch.arange(len(chosen)).repeat_interleave(DRAWERS),
        class_names=names,
        mean=OMNIGLOT_MEAN,
        std=OMNIGLOT_STD,
        name=f"omniglot/{protocol}/{split}",
    )


def _vinyals_classes(folder: Path, split: str, characters: list[Character]) -> list[tuple[Character, int]]:
    split_file = folder / "splits" / "vinyals" / f"{split}.txt"
    if not split_file.exists():
        raise UserError(f"missing {split_file}; run `fewshot-nsl data prepare omniglot` to fetch the Vinyals split files")
    by_name = {(c.alphabet, c.character): c for c in characters}
    chosen = []
    for line in split_file.read_text().split():
        alphabet, character, rotation = line.split("/")
        try:
            chosen.append((by_name[(alphabet, character)], int(rotation.removeprefix("rot")) // 90))
        except KeyError:
            raise UserError(f"{split_file} names {alphabet}/{character}, which characters.csv does not list") from None
    return chosen
