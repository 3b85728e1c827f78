"""Any folder of labelled images: ``<root>/<split>/<class>/<image>``.

* Images: ``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.webp`` (any letter case);
  other files (``.DS_Store``, notes ...) and hidden entries are ignored.
  EXIF orientation is applied, an alpha channel is dropped.
* Channels: 3 (RGB) unless every image of the split is grayscale, then 1.
  Grayscale images in a split that also has colour images are repeated to 3
  channels.
* Size: the shorter side is resized to ``image_size`` (bilinear, antialiased)
  and the centre ``image_size`` x ``image_size`` square is cropped, so no
  image is distorted; images that are already that square are kept as they are.
* Classes: the class folder names, sorted; images within a class sorted by
  file name.
* Normalisation: mean = std = 0.5 per channel, i.e. [0, 1] → [-1, 1]. Not
  statistics computed from the images: a test split must be usable on its
  own, without reading the training split, and two splits of one folder must
  be normalised identically.

The decoded, resized uint8 tensor is cached (``tensor_cache.cached``), keyed by
the files' sizes and modification times and the image size.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from fewshot_nsl.data.class_split import ClassSplit
from fewshot_nsl.data.dataset import ImageClassSet
from fewshot_nsl.data.tensor_cache import cached, source_key
from fewshot_nsl.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
JPEG_SUFFIXES = (".jpg", ".jpeg")
FOLDER_MEAN = 0.5
FOLDER_STD = 0.5
DECODE_BATCH = 256
CACHE_VERSION = "folder-v1"


# ---------------------------------------------------------------- listing


def visible_subfolders(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` not starting with ``.`` (or ``__MACOSX``), sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX"),
        key=lambda p: p.name,
    )


def image_files(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (``os.scandir``: no stat per file)."""
    with os.scandir(folder) as entries:
        names = sorted(
            entry.name
            for entry in entries
            if not entry.name.startswith(".")
            and os.path.splitext(entry.name)[1].lower() in suffixes
            and entry.is_file()
        )
    return [folder / name for name in names]


# ---------------------------------------------------------------- decoding


def _decode_with_pil(path: Path) -> torch.Tensor:
    """Fallback for formats torchvision.io does not decode (BMP, unusual PNG/WebP variants)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        gray = image.mode in ("1", "L", "LA", "I", "I;16", "F")
        array = np.asarray(image.convert("L" if gray else "RGB"))
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if gray else tensor.permute(2, 0, 1).contiguous()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_palette_png(data: torch.Tensor) -> bool:
    """PNG colour type 3 (palette): ``decode_image`` would return it as one channel, so ask for RGB."""
    head = bytes(data[:26].tolist())
    return len(head) == 26 and head[:8] == _PNG_SIGNATURE and head[25] == 3


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint16:  # 16-bit PNG
        return (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def _decode_one(data: torch.Tensor, path: Path, mode: ImageReadMode) -> torch.Tensor:
    if mode == ImageReadMode.UNCHANGED and _is_palette_png(data):
        mode = ImageReadMode.RGB
    try:
        return _to_uint8(decode_image(data, mode=mode, apply_exif_orientation=True))
    except (RuntimeError, ValueError):
        pass
    try:
        image = _decode_with_pil(path)
    except Exception as exc:  # PIL raises many types for broken files
        raise UserError(f"cannot decode image {path} ({exc}); replace or delete the file, then run again") from None
    if mode == ImageReadMode.RGB and image.shape[0] == 1:
        image = image.expand(3, -1, -1).contiguous()
    return image


def iter_decoded(
    files: Sequence[Path], mode: ImageReadMode = ImageReadMode.UNCHANGED, batch_size: int = DECODE_BATCH
) -> Iterator[torch.Tensor]:
    """Decode ``files`` in order, yielding uint8 (C, H, W) tensors.

    JPEGs are decoded in batches (one ``decode_jpeg`` call per batch); a batch
    that fails is decoded file by file, so the broken file can be named.
    Other formats go through ``decode_image`` and, failing that, PIL. With
    ``UNCHANGED`` the channels are 1 (gray), 2 (gray + alpha), 3 (RGB) or 4
    (RGB + alpha, or CMYK JPEG already converted to RGB + 255); palette PNGs
    come out as RGB, 16-bit PNGs are scaled to 8 bits.
    Raises ``UserError`` naming the first file that cannot be read.
    """
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of torchcodec; they still work
            warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities", category=DeprecationWarning)
            images = _decode_batch(chunk, mode)
        yield from images


def _read_bytes(path: Path) -> torch.Tensor:
    try:
        return torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError as exc:
        raise UserError(f"cannot read image file {path} ({exc}); check its permissions, or delete it") from None


def _decode_batch(chunk: Sequence[Path], mode: ImageReadMode) -> list[torch.Tensor]:
    datas = [_read_bytes(path) for path in chunk]
    jpeg = [i for i, p in enumerate(chunk) if p.suffix.lower() in JPEG_SUFFIXES and datas[i].numel()]
    decoded: dict[int, torch.Tensor] = {}
    if jpeg:
        try:
            decoded = dict(zip(jpeg, decode_jpeg([datas[i] for i in jpeg], mode=mode, apply_exif_orientation=True)))
        except (RuntimeError, ValueError):
            decoded = {}  # find the culprit below, file by file
    return [decoded[i] if i in decoded else _decode_one(datas[i], path, mode) for i, path in enumerate(chunk)]


def resize_square(image: torch.Tensor, size: int, crop: bool) -> torch.Tensor:
    """uint8 (C, H, W) → uint8 (C, size, size).

    ``crop=True``: shorter side to ``size`` then centre crop (keeps the aspect
    ratio); ``crop=False``: plain resize of both sides (may distort). Bilinear
    with antialiasing; an image already ``size`` x ``size`` is returned as is.
    """
    if image.shape[-2:] == (size, size):
        return image
    if crop:
        image = TF.resize(image, [size], antialias=True)
        return TF.center_crop(image, [size, size])
    return TF.resize(image, [size, size], antialias=True)


# ---------------------------------------------------------------- folder reader


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "folder"


def list_image_folder(
    root: Path, split: str, class_split: ClassSplit | None = None
) -> tuple[tuple[str, ...], list[list[Path]]]:
    """Class names (sorted) and each class's image files, or a ``UserError``.

    With ``class_split`` the classes are ``<root>/<class>`` and the split picks its share of them.
    """
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist (expected <folder>/<split>/<class>/<image>)")
    split_dir = root / split
    if class_split is not None:
        everything = visible_subfolders(root)
        if not everything:
            raise UserError(f"{root} has no class folders; --split-ratios expects <folder>/<class>/<image>")
        chosen = set(class_split.classes([p.name for p in everything], split))
        classes = [p for p in everything if p.name in chosen]
    elif not split_dir.is_dir():
        available = [p.name for p in visible_subfolders(root)]
        raise UserError(
            f"image folder {root} has no {split!r} split ({split_dir} is missing); "
            f"it has {', '.join(repr(a) for a in available) if available else 'no sub-folders'}; "
            f"expected <folder>/<split>/<class>/<image>, or <folder>/<class>/<image> with --split-ratios"
        )
    else:
        classes = visible_subfolders(split_dir)
    if not classes:
        loose = image_files(split_dir)
        hint = f" ({len(loose)} images lie directly in it: put them in one folder per class)" if loose else ""
        raise UserError(f"{split_dir} has no class folders{hint}; expected <folder>/<split>/<class>/<image>")
    files = []
    for folder in classes:
        found = image_files(folder)
        if not found:
            raise UserError(
                f"class folder {folder} has no images (looked for {', '.join(IMAGE_SUFFIXES)}); "
                f"remove it or add images"
            )
        files.append(found)
    return tuple(p.name for p in classes), files


def _decode_folder(files: list[list[Path]], image_size: int) -> dict[str, torch.Tensor]:
    flat = [path for class_files in files for path in class_files]
    images: list[torch.Tensor] = []
    for image in iter_decoded(flat, ImageReadMode.UNCHANGED):
        if image.shape[0] == 2:  # gray + alpha
            image = image[:1]
        elif image.shape[0] == 4:  # RGB + alpha
            image = image[:3]
        images.append(resize_square(image, image_size, crop=True).contiguous())
    channels = 1 if all(image.shape[0] == 1 for image in images) else 3
    out = torch.empty((len(images), channels, image_size, image_size), dtype=torch.uint8)
    for index, image in enumerate(images):
        out[index] = image  # a gray image broadcasts to 3 channels
    labels = torch.arange(len(files)).repeat_interleave(torch.tensor([len(f) for f in files]))
    return {"images": out, "labels": labels}


def load_image_folder(
    root: Path, split: str, cache_dir: Path, image_size: int, class_split: ClassSplit | None = None
) -> ImageClassSet:
    """One split of ``<root>/<split>/<class>/<image>`` (or of ``<root>/<class>/<image>`` cut by
    ``class_split``) as an ``ImageClassSet`` (see the module docstring)."""
    root = Path(root)
    class_names, files = list_image_folder(root, split, class_split)
    flat = [path for class_files in files for path in class_files]
    key = source_key(flat, image_size, CACHE_VERSION)
    protocol = "" if class_split is None else f"/{class_split.protocol}"
    name = f"folder-{_safe(root.resolve().name + protocol.replace('/', '-'))}-{_safe(split)}-{image_size}"
    tensors = cached(Path(cache_dir), name, key, lambda: _decode_folder(files, image_size))
    channels = tensors["images"].shape[1]
    return ImageClassSet(
        images=tensors["images"],
        labels=tensors["labels"],
        class_names=class_names,
        mean=(FOLDER_MEAN,) * channels,
        std=(FOLDER_STD,) * channels,
        name=f"folder/{root.name}{protocol}/{split}",
    )
