"""LLaVA-1.5 image preprocessing with PIL and torch only (no torchvision).

Pipeline of :class:`ImageProcessor` (LLaVA-1.5 with ``image_aspect_ratio=pad``):

1. any PIL mode -> RGB (:func:`to_rgb`): alpha is composited over the mean colour, so that
   transparent pixels look like padding; 16/32-bit integer and float greyscale are rescaled to
   8 bits rather than clipped; palette, CMYK, YCbCr, LAB, HSV, 1-bit go through PIL's converter.
2. pad to a square canvas filled with the mean colour, the image centred (:func:`pad_to_square`;
   the fill is ``int(m * 255)`` per channel, truncated as LLaVA's ``expand2square`` does; the
   offset is ``(long - short) // 2`` on the short side).
3. resize to ``size`` x ``size`` with PIL's bicubic filter (antialiased when shrinking, as
   CLIPImageProcessor does).
4. to a float32 tensor ``[3, size, size]``: ``(pixel / 255 - mean) / std`` per channel.

With ``pad_to_square=False`` step 2-3 become CLIP's own: resize the shorter side to ``size``
(bicubic) then centre-crop ``size`` x ``size``. EXIF orientation is not applied (LLaVA does not).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def fill_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The 8-bit padding colour for a 0..1 mean, truncated like LLaVA's ``int(x * 255)``."""
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """Rescale a 16/32-bit integer or float greyscale image to 8-bit 'L' (PIL would clip)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        if arr.size and np.nanmax(arr) <= 1.0 and np.nanmin(arr) >= 0.0:
            arr = arr * 255.0
    elif img.mode.startswith("I;16") or (arr.size and 255 < arr.max() <= 65535 and arr.min() >= 0):
        arr = arr / 257.0  # 0..65535 -> 0..255
    elif arr.size and (arr.max() > 255 or arr.min() < 0):
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    arr = np.nan_to_num(arr, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: Sequence[int] = (0, 0, 0)) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited over ``background``."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode in ("I", "F") or mode.startswith("I;16"):
        img = _wide_grey_to_l(img)
        mode = "L"
    elif mode == "1":
        img = img.convert("L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = (img.convert("LA") if mode == "La" else img).convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def pad_to_square(img: Image.Image, colour: Sequence[int]) -> Image.Image:
    """Centre ``img`` (RGB) on a square canvas of its longer side filled with ``colour``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), tuple(colour))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _resize_shorter_and_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageProcessor:
    """PIL image -> normalised float tensor ``[3, size, size]`` (see module docstring)."""

    def __init__(
        self,
        size: int = 336,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        pad_to_square: bool = True,
    ):
        if int(size) <= 0:
            raise ValueError(f"image size must be positive, got {size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 channels, got {list(mean)} and {list(std)}")
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pad_to_square = bool(pad_to_square)
        self.fill = fill_colour(self.mean)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def geometry(self, pil: Image.Image) -> Image.Image:
        """Steps 1-3: the RGB ``size`` x ``size`` PIL image the tensor is made from."""
        img = to_rgb(pil, self.fill)
        if self.pad_to_square:
            img = pad_to_square(img, self.fill)
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        else:
            img = _resize_shorter_and_crop(img, self.size)
        return img

    def normalise(self, rgb: Image.Image) -> torch.Tensor:
        """Step 4: an RGB PIL image -> ``(x / 255 - mean) / std`` as float32 ``[3, H, W]``."""
        arr = np.asarray(rgb, dtype=np.uint8)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return (x - self._mean_t) / self._std_t

    def __call__(self, pil: Image.Image) -> torch.Tensor:
        return self.normalise(self.geometry(pil))

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(size={self.size}, mean={self.mean}, std={self.std}, "
            f"pad_to_square={self.pad_to_square})"
        )
