"""Build the project's Omniglot form (see ``fewshot_nsl.data.omniglot``) from the original PNGs.

Source: the PNG tree of the official ``images_background.zip`` /
``images_evaluation.zip`` (brendenlake/omniglot), as ``torchvision.datasets.Omniglot``
unpacks them under ``<root>/omniglot-py/``::

    images_background/<Alphabet>/<characterNN>/<XXXX>_<YY>.png

``XXXX`` is the character id (1..964 background, 965..1623 evaluation), ``YY``
the drawer (01..20). Characters are ordered by character id, which is the
original order of Lake et al.: alphabet by alphabet, characters in folder-name
order, but the alphabets are *not* in alphabetical order (e.g.
``Alphabet_of_the_Magi`` comes 23rd). Sorting folder names, as torchvision does,
would give a different row order than ``characters.csv`` of the reference data.

Output, under ``<data_root>/omniglot``:

* ``images_<set>.npz``: ``images`` bool (characters, 20, 105, 105), True =
  paper; ``labels`` int64 (characters, 20), the row index;
* ``characters.csv``: ``char_id,set,row,alphabet,character``;
* ``splits/vinyals/{train,val,test,trainval}.txt``: downloaded from the
  prototypical-networks repository (jakesnell), or copied from ``splits_from``.

Every file is written to a temporary name and renamed into place, and
``characters.csv`` is written after both npz files, so an interrupted prepare
never leaves a set of files that looks complete.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import io
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import IO, Any

import numpy as np

from fewshot_nsl.data.image_folder import visible_subfolders
from fewshot_nsl.data.omniglot import DRAWERS, SETS, read_characters
from fewshot_nsl.errors import UserError

IMAGE_SIDE = 105
SPLIT_NAMES = ("train", "val", "test", "trainval")
SPLITS_REPOSITORY = "https://github.com/jakesnell/prototypical-networks"
SPLITS_URL = "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/splits/vinyals/{name}.txt"
DOWNLOAD_TIMEOUT_S = 30.0
PNG_FOLDER = "omniglot-py"  # torchvision.datasets.Omniglot.folder
_PNG_NAME = re.compile(r"(\d+)_(\d+)\.png", re.IGNORECASE)
_SPLIT_LINE = re.compile(r"([^/\s]+)/([^/\s]+)/rot(000|090|180|270)")


@dataclass(frozen=True)
class CharacterRow:
    """One row of ``characters.csv``."""

    char_id: int
    set: str
    row: int
    alphabet: str
    character: str


CSV_FIELDS = tuple(f.name for f in fields(CharacterRow))


# ---------------------------------------------------------------- reading the PNG tree


def set_folder(folder: Path, set_name: str) -> Path:
    """``folder/images_<set>`` (``folder`` is e.g. ``omniglot-py``), or ``folder`` itself if it is that folder."""
    if set_name not in SETS:
        raise ValueError(f"unknown Omniglot set {set_name!r}")
    folder = Path(folder)
    if folder.name == f"images_{set_name}":
        return folder
    return folder / f"images_{set_name}"


def scan_png_tree(folder: Path, set_name: str) -> list[tuple[CharacterRow, tuple[Path, ...]]]:
    """Character rows (in character-id order) and each character's 20 PNG paths (drawer 1..20).

    Reads names only, decodes nothing. Raises ``UserError`` for a tree that
    does not have the original layout.
    """
    root = set_folder(folder, set_name)
    if not root.is_dir():
        raise UserError(f"Omniglot PNG folder {root} does not exist")
    found = []
    for alphabet in visible_subfolders(root):
        for character in visible_subfolders(alphabet):
            drawers: dict[int, Path] = {}
            ids = set()
            for path in character.iterdir():
                if path.name.startswith(".") or path.suffix.lower() != ".png":
                    continue
                match = _PNG_NAME.fullmatch(path.name)
                if not match:
                    raise UserError(f"unexpected Omniglot file name {path} (expected <char_id>_<drawer>.png)")
                ids.add(int(match.group(1)))
                drawers[int(match.group(2))] = path
            if len(ids) != 1 or sorted(drawers) != list(range(1, DRAWERS + 1)):
                raise UserError(
                    f"{character} should hold {DRAWERS} images XXXX_01.png .. XXXX_{DRAWERS:02d}.png of one "
                    f"character id; found {len(drawers)} drawers and ids {sorted(ids)}"
                )
            found.append((ids.pop(), alphabet.name, character.name, tuple(drawers[d] for d in sorted(drawers))))
    if not found:
        raise UserError(f"{root} holds no <Alphabet>/<character>/ folders of PNGs")
    found.sort(key=lambda item: item[0])
    for (a, *_), (b, *_) in zip(found, found[1:]):
        if a == b:
            raise UserError(f"character id {a} appears in two character folders of {root}")
    return [
        (CharacterRow(char_id, set_name, row, alphabet, character), paths)
        for row, (char_id, alphabet, character, paths) in enumerate(found)
    ]


def read_png(path: Path) -> np.ndarray:
    """One Omniglot PNG as bool (105, 105), True = white paper."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "1":
                paper = np.asarray(image, dtype=bool)
            else:
                paper = np.asarray(image.convert("L")) >= 128
    except (OSError, SyntaxError) as exc:  # PIL: UnidentifiedImageError is an OSError
        raise UserError(f"cannot read Omniglot image {path}: {exc}") from None
    if paper.shape != (IMAGE_SIDE, IMAGE_SIDE):
        raise UserError(f"{path} is {paper.shape[1]}x{paper.shape[0]}, Omniglot images are {IMAGE_SIDE}x{IMAGE_SIDE}")
    return paper


def read_png_tree(folder: Path, set_name: str) -> tuple[np.ndarray, list[CharacterRow]]:
    """Read one set of the PNG tree into the npz layout.

    ``folder`` holds ``images_<set_name>/`` (e.g. ``<root>/omniglot-py``) or is
    that folder. Returns bool (characters, 20, 105, 105), True = paper, rows
    in character-id order, and the matching ``characters.csv`` rows.
    """
    scanned = scan_png_tree(folder, set_name)
    images = np.empty((len(scanned), DRAWERS, IMAGE_SIDE, IMAGE_SIDE), dtype=bool)
    for row, (_, paths) in enumerate(scanned):
        for drawer, path in enumerate(paths):
            images[row, drawer] = read_png(path)
    return images, [character for character, _ in scanned]


# ---------------------------------------------------------------- writing


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def write_npz(path: Path, images: np.ndarray) -> None:
    """``images`` bool (characters, 20, 105, 105) and ``labels`` int64 (characters, 20) = row index."""
    labels = np.repeat(np.arange(images.shape[0], dtype=np.int64)[:, None], images.shape[1], axis=1)
    atomic_write(path, lambda stream: np.savez_compressed(stream, images=images, labels=labels))


def write_characters(path: Path, rows: list[CharacterRow]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    writer.writerows(astuple(row) for row in rows)
    _write_text(path, buffer.getvalue())


def has_npz_form(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (*(f"images_{s}.npz" for s in SETS), "characters.csv"))


def convert_png_tree(png_root: Path, out: Path) -> None:
    """PNG tree (``png_root/images_{background,evaluation}``) → npz files and ``characters.csv`` in ``out``."""
    rows: list[CharacterRow] = []
    for set_name in SETS:
        images, set_rows = read_png_tree(png_root, set_name)
        write_npz(out / f"images_{set_name}.npz", images)
        del images
        rows.extend(set_rows)
    write_characters(out / "characters.csv", rows)  # last: its presence marks a complete conversion


# ---------------------------------------------------------------- finding / downloading the PNGs


def _extract_zips(png_root: Path) -> None:
    """Unpack ``images_<set>.zip`` lying in ``png_root`` whose folder is missing (atomically per set)."""
    for set_name in SETS:
        target = png_root / f"images_{set_name}"
        archive = png_root / f"images_{set_name}.zip"
        if target.is_dir() or not archive.is_file():
            continue
        staging = Path(tempfile.mkdtemp(dir=png_root, prefix=f".images_{set_name}."))
        try:
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(staging)
            os.replace(staging / target.name, target)
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"cannot unpack {archive} ({exc}); delete it and run prepare again") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _has_png_tree(png_root: Path) -> bool:
    return all(set_folder(png_root, s).is_dir() for s in SETS)


def torchvision_download(root: Path, background: bool) -> None:
    """One official zip (background or evaluation set), downloaded and unpacked into ``root/omniglot-py``."""
    from torchvision import datasets

    datasets.Omniglot(str(root), background=background, download=True)


def download_png_tree(root: Path, sources: OmniglotSources) -> Path:
    """Download and unpack both official zips; returns ``root/omniglot-py``."""
    for background in (True, False):
        try:
            sources.download_images(root, background)
        except (OSError, RuntimeError, http.client.HTTPException) as exc:
            raise UserError(
                f"could not download Omniglot ({type(exc).__name__}: {exc}). Offline? Put the official "
                f"images_background.zip and images_evaluation.zip (github.com/brendenlake/omniglot, python/) "
                f"or their unpacked folders in {root / PNG_FOLDER} and run prepare again"
            ) from None
    return root / PNG_FOLDER


def _png_source(data_root: Path, png_root: Path | None, download: bool, sources: OmniglotSources) -> Path:
    if png_root is not None:
        png_root = Path(png_root).expanduser()
        if png_root.is_dir():
            _extract_zips(png_root)
        if not _has_png_tree(png_root):
            raise UserError(f"{png_root} does not hold images_background/ and images_evaluation/ (or their zips)")
        return png_root
    default = data_root / PNG_FOLDER
    if default.is_dir():
        _extract_zips(default)
        if _has_png_tree(default):
            return default
    if not download:
        raise UserError(
            f"Omniglot not found: no npz form in {data_root / 'omniglot'} and no PNG folders in {default}; "
            f"allow the download, or put images_background/ and images_evaluation/ (or the zips) in {default}"
        )
    return download_png_tree(data_root, sources)


# ---------------------------------------------------------------- Vinyals split files


def fetch_split(name: str, timeout: float = DOWNLOAD_TIMEOUT_S, open_url: Callable[..., Any] = urllib.request.urlopen) -> str:
    """The text of one Vinyals split file from the prototypical-networks repository."""
    with open_url(SPLITS_URL.format(name=name), timeout=timeout) as response:
        return response.read().decode("utf-8")


@dataclass(frozen=True)
class OmniglotSources:
    """Where missing pieces come from: the official zips (``download_images(root, background)``)
    and the Vinyals split files (``fetch_split(name) -> text``). Tests pass stand-ins, so every
    path but the network itself is exercised."""

    download_images: Callable[[Path, bool], None] = torchvision_download
    fetch_split: Callable[[str], str] = fetch_split


def validate_split(text: str, origin: str, known: set[tuple[str, str]]) -> str:
    """Check ``Alphabet/characterNN/rotDDD`` lines naming known characters; returns the normalised text."""
    lines = text.split()
    if not lines:
        raise UserError(f"Vinyals split file {origin} is empty")
    for line in lines:
        match = _SPLIT_LINE.fullmatch(line)
        if not match:
            raise UserError(f"{origin}: line {line!r} is not Alphabet/characterNN/rotDDD")
        if (match.group(1), match.group(2)) not in known:
            raise UserError(f"{origin} names {match.group(1)}/{match.group(2)}, which characters.csv does not list")
    return "\n".join(lines) + "\n"


def prepare_splits(
    out: Path, splits_from: Path | None = None, download: bool = True, sources: OmniglotSources = OmniglotSources()
) -> None:
    """Write the missing ``splits/vinyals/*.txt`` files, from ``splits_from`` or downloaded."""
    target = out / "splits" / "vinyals"
    missing = [name for name in SPLIT_NAMES if not (target / f"{name}.txt").is_file()]
    if not missing:
        return
    known = {(c.alphabet, c.character) for c in read_characters(out)}
    how = (
        f"download train.txt, val.txt, test.txt and trainval.txt from data/splits/vinyals/ of "
        f"{SPLITS_REPOSITORY} into a folder and pass it with --splits-from DIR (or put them in {target})"
    )
    texts = {}
    for name in missing:
        if splits_from is not None:
            source = Path(splits_from).expanduser() / f"{name}.txt"
            if not source.is_file():
                raise UserError(f"--splits-from: {source} does not exist; {how}")
            texts[name] = validate_split(source.read_text(encoding="utf-8"), str(source), known)
            continue
        if not download:
            raise UserError(f"the Vinyals split files are missing from {target}; {how}")
        try:
            text = sources.fetch_split(name)
        except (OSError, http.client.HTTPException, UnicodeDecodeError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise UserError(
                f"could not download the Vinyals split file {name}.txt ({reason}); offline? {how}"
            ) from None
        texts[name] = validate_split(text, SPLITS_URL.format(name=name), known)
    for name, text in texts.items():
        _write_text(target / f"{name}.txt", text)


# ---------------------------------------------------------------- entry point


def prepare_omniglot(
    data_root: Path,
    download: bool = True,
    png_root: Path | None = None,
    splits_from: Path | None = None,
    sources: OmniglotSources = OmniglotSources(),
) -> Path:
    """Make ``<data_root>/omniglot`` complete; returns that folder.

    * npz form already there: kept as is (only missing split files are added);
    * else the PNG tree (``png_root``, default ``<data_root>/omniglot-py``,
      unpacked zips or the zips themselves) is converted;
    * else, with ``download``, torchvision downloads the official zips into
      ``<data_root>/omniglot-py`` first.

    Split files come from ``splits_from`` (a folder with ``train.txt`` ...)
    when given, else from the prototypical-networks repository. ``sources``
    says how to download (see ``OmniglotSources``).
    """
    data_root = Path(data_root).expanduser()
    out = data_root / "omniglot"
    if not has_npz_form(out):
        convert_png_tree(_png_source(data_root, png_root, download, sources), out)
    prepare_splits(out, splits_from, download, sources)
    return out
