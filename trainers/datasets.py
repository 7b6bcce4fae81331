"""Training data: image + caption sets (a folder, or IMAGE + text inputs) and a resumable, seeded sampler.

Images are ``[H, W, 3]`` float tensors in 0..1 (ComfyUI's IMAGE layout without the batch axis), resized
so the shorter side matches ``size`` and centre-cropped to ``size × size`` so they batch.

Bad data is refused before training starts, with the file (or the input and image index) and the problem:
an unreadable image file, a caption file that is not UTF-8, an IMAGE with NaN pixels (``validation``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from ..validation import check_image

logger = logging.getLogger("likeness")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_CAPTION = "a photo of a person"


@dataclass
class ImageCaption:
    image: torch.Tensor  # [H, W, 3] float 0..1
    caption: str
    name: str


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[H, W, C]`` so the shorter side is ``size`` (antialiased), then centre-crop to a square."""
    if image.ndim != 3:
        raise InvalidInputError(f"expected one image [H, W, C], got shape {tuple(image.shape)}")
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    chw = image.permute(2, 0, 1).unsqueeze(0).float()
    if (nh, nw) != (h, w):
        chw = F.interpolate(chw, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    out = chw[0, :, top:top + size, left:left + size].permute(1, 2, 0)
    return out.clamp(0.0, 1.0).contiguous()


def center_square(image: torch.Tensor) -> torch.Tensor:
    """The centred square of ``[H, W, C]`` (side = the shorter side), no resizing."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top:top + side, left:left + side]


def read_image(path: str) -> torch.Tensor:
    """An image file as ``[H, W, 3]`` float 0..1 (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


def list_image_folder(folder: str, default_caption: str = DEFAULT_CAPTION) -> list[tuple[str, str, str]]:
    """``(name, path, caption)`` of every image in ``folder`` (sorted by name, not recursive); the caption
    comes from the same-stem ``.txt`` file. Images are not read, so big sets stay cheap."""
    if not os.path.isdir(folder):
        raise InvalidInputError(f"training folder '{folder}' does not exist or is not a folder")
    entries = []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        caption_path = os.path.join(folder, stem + ".txt")
        caption = read_caption(caption_path, default_caption) if os.path.isfile(caption_path) else default_caption
        entries.append((name, os.path.join(folder, name), caption))
    if not entries:
        raise InvalidInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in training folder '{folder}'")
    return entries


def read_caption(path: str, default_caption: str = DEFAULT_CAPTION) -> str:
    """The text of a caption file, or InvalidInputError naming the file when it is unreadable or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or default_caption
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"caption file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                f"save it as UTF-8 (or delete it to use '{default_caption}').") from exc
    except OSError as exc:
        raise InvalidInputError(f"caption file '{path}' cannot be read ({exc.strerror or exc}).") from exc


def read_image_folder(folder: str, default_caption: str = DEFAULT_CAPTION) -> list[tuple[str, torch.Tensor, str]]:
    """``(name, image [H, W, 3], caption)`` of every image at full resolution. An unreadable file is refused:
    InvalidInputError lists every such file with the reason (a silently smaller training set is worse)."""
    from PIL import Image

    items, problems = [], []
    for name, path, caption in list_image_folder(folder, default_caption):
        try:
            items.append((name, read_image(path), caption))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            problems.append(f"'{name}' ({exc})")
    if problems:
        raise InvalidInputError(f"{len(problems)} of {len(problems) + len(items)} training image(s) in '{folder}' "
                                f"cannot be read: {'; '.join(problems)}. Fix or remove those files.")
    return items


def load_image_folder(folder: str, size: int, default_caption: str = DEFAULT_CAPTION) -> list[ImageCaption]:
    """Every image in ``folder`` with its same-stem ``.txt`` caption, resized and centre-cropped to ``size``."""
    return [ImageCaption(resize_center_crop(image, size), caption, name)
            for name, image, caption in read_image_folder(folder, default_caption)]


def captions_for(count: int, text: str | Sequence[str] | None, default_caption: str = DEFAULT_CAPTION) -> list[str]:
    """One caption per image: a list as given, one line per image, or one text for all."""
    if text is None:
        return [default_caption] * count
    if not isinstance(text, str):
        captions = [str(t).strip() or default_caption for t in text]
        if len(captions) != count:
            raise InvalidInputError(f"{len(captions)} captions for {count} images; give one per image or one for all")
        return captions
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if count > 1 and len(lines) == count:
        return lines
    return [text.strip() or default_caption] * count


def from_images(images: torch.Tensor, text: str | Sequence[str] | None, size: int,
                default_caption: str = DEFAULT_CAPTION) -> list[ImageCaption]:
    """Items from an IMAGE batch ``[B, H, W, C]`` and caption text (see :func:`captions_for`)."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise InvalidInputError(f"expected IMAGE [B, H, W, C>=3], got shape {tuple(images.shape)}")
    check_image(images, "images")
    captions = captions_for(images.shape[0], text, default_caption)
    return [ImageCaption(resize_center_crop(images[i, ..., :3], size), captions[i], f"image_{i}")
            for i in range(images.shape[0])]


class EpochSampler:
    """Hands out indices in a fresh seeded permutation every epoch; batches run across epoch boundaries.

    Its whole state is ``position`` (items handed out so far): the permutation of epoch ``e`` depends
    only on (seed, e), so a resumed sampler continues exactly where the saved one stopped.
    """

    def __init__(self, size: int, seed: int, position: int = 0):
        if size <= 0:
            raise InvalidInputError("the training set is empty")
        self.size = int(size)
        self.seed = int(seed)
        self.position = int(position)
        self._epoch = -1
        self._order: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
            self._order = torch.randperm(self.size, generator=generator).tolist()
            self._epoch = epoch
        return self._order

    def next_indices(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            epoch, offset = divmod(self.position, self.size)
            out.append(self._permutation(epoch)[offset])
            self.position += 1
        return out


def collate(items: Sequence):
    """Stack a list of samples: tensors are stacked, dicts collated per key, other values kept as lists."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(items))
    if isinstance(first, dict):
        return {key: collate([item[key] for item in items]) for key in first}
    if isinstance(first, ImageCaption):
        return {"image": torch.stack([i.image for i in items]), "caption": [i.caption for i in items],
                "name": [i.name for i in items]}
    return list(items)


def training_sources(images: torch.Tensor | None, captions: str | None,
                     folder: str | None) -> list[tuple[str, torch.Tensor, str]]:
    """``(name, image, caption)`` from an IMAGE batch with caption text and/or a folder (same-stem .txt)."""
    sources: list = []
    if images is not None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise InvalidInputError("images must be an IMAGE batch [B, H, W, C]")
        check_image(images, "images")
        texts = captions_for(images.shape[0], captions if captions and captions.strip() else None)
        sources += [(f"image_{i}", images[i], texts[i]) for i in range(images.shape[0])]
    if folder:
        sources += read_image_folder(folder)
    if not sources:
        raise InvalidInputError("give training images: connect 'images' or set 'folder' to a folder of photos")
    return sources
