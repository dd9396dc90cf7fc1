"""Image transforms (no torchvision, which the package does not install): PIL image -> CLIP-normalized float
tensor [3, S, S].

train: random-resized-crop (scale (0.9, 1.0), ratio (3/4, 4/3), bicubic, torchvision's sampling algorithm) to
``image_size``; eval: resize the shortest side to ``image_size`` (bicubic) + center crop. Both then scale to
float [0, 1] and normalize with the CLIP mean/std.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL's modes for 16-bit greyscale (PNG: "I;16" in recent Pillow, "I" in older ones); PIL reads 16-bit RGB(A)
# and grey + alpha PNGs at 8 bits itself
_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grey levels are divided by 257 (65535 -> 255): ``convert("RGB")`` would clip them to 255,
    turning almost every 16-bit greyscale image white."""
    if img.mode in _GREY16_MODES:
        levels = np.asarray(img, dtype=np.float32) / 257.0
        img = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


class ImageTransform:
    """PIL image -> normalized float tensor [3, S, S]. ``train``: random-resized-crop; else resize + center crop."""

    def __init__(
        self,
        image_size: int,
        *,
        train: bool,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        self.image_size = int(image_size)
        self.train = bool(train)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def crop_params(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """torchvision RandomResizedCrop.get_params: (top, left, crop_h, crop_w)."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            h, w = height, round(height * max(self.ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _resize_center_crop(self, img: Image.Image) -> Image.Image:
        """transformers' CLIPImageProcessor, step for step, so that a user of the exported model embeds an image
        as this trainer's evaluation did: the long side truncated (int), the crop offset floored (//)."""
        s = self.image_size
        w, h = img.size
        if min(w, h) != s:
            nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            w, h = nw, nh
        left, top = (w - s) // 2, (h - s) // 2
        if (w, h) != (s, s):
            img = img.crop((left, top, left + s, top + s))
        return img

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = to_rgb(img)
        s = self.image_size
        if self.train:
            top, left, h, w = self.crop_params(img.width, img.height, rng if rng is not None else random)
            img = img.resize((s, s), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        else:
            img = self._resize_center_crop(img)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std
