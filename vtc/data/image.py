"""LLaVA-1.5 image preprocessing with PIL and torch only (no torchvision).

Pipeline of :class:`ImageProcessor` (LLaVA-1.5 with ``image_aspect_ratio=pad``):

1. any PIL mode -> RGB (:func:`to_rgb`, the same policy as the shard converter's, which only
   composites on white instead): alpha (and a palette/L/RGB transparency key) is composited
   over the mean colour, so that transparent pixels look like padding; 16/32-bit integer and
   float greyscale are rescaled to 8 bits rather than clipped (:func:`grey_to_8bit`); palette,
   CMYK, YCbCr, LAB, HSV, 1-bit go through PIL's converter.
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


# The one image-mode policy of the project: the converter's shards (``vtc.data.convert_images``,
# which composites on white) and the images evaluation and the benchmarks read through
# :class:`ImageProcessor` (composited on the mean colour) both go through :func:`to_rgb`.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def _stretch(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((a.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def grey_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey images to mode L, rescaled rather than clipped.

    16-bit grey (I;16, I;16L, I;16B, I;16N) is scaled ``round(v * 255 / 65535)``; 32-bit integer
    "I" images are read as 8-bit if all values lie in 0..255, as 16-bit if they lie in 0..65535,
    else stretched min..max to 0..255; float "F" images as [0, 1] if they lie there, as 0..255 if
    they lie there, else stretched min..max (NaN and +-inf -> 0 first). A flat image with no range
    to stretch is black.
    """
    a = np.asarray(im)
    if im.mode in SIXTEEN_BIT_MODES:
        out = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            out = np.round(a * 255.0).astype(np.uint8)
        elif lo >= 0.0 and hi <= 255.0:
            out = np.round(a).astype(np.uint8)
        else:
            out = _stretch(a)
    else:
        a = a.astype(np.int64)
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 255:
            out = a.astype(np.uint8)
        elif lo >= 0 and hi <= 65535:
            out = ((a * 255 + 32767) // 65535).astype(np.uint8)
        else:
            out = _stretch(a)
    return Image.fromarray(np.ascontiguousarray(out), "L")


def to_rgb(img: Image.Image, background: Sequence[int] = (0, 0, 0)) -> Image.Image:
    """Any Pillow image to RGB: alpha composited on ``background``, high bit depth scaled.

    * transparency (LA, La, PA, RGBA, RGBa, P or L/RGB with a transparency key) is composited
      on ``background`` (La, premultiplied, goes through LA: Pillow converts it only to LA);
    * wide grey (I;16*, I, F) is rescaled to 8 bits by :func:`grey_to_8bit`, not clipped;
    * everything else (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX, ...) goes through Pillow's
      ``convert("RGB")``; an RGB image without a transparency key is returned as it is.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ALPHA_MODES or img.has_transparency_data:
        if mode == "La":  # premultiplied grey+alpha: Pillow converts it only to LA
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*tuple(background), 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F") or mode.startswith("I;"):
        return grey_to_8bit(img).convert("RGB")
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
