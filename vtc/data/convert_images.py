"""The converter's image policy: one source image file -> the RGB JPEG bytes stored in a shard.

Separate from the record checks (:mod:`vtc.data.convert_records`) and the shard writing
(:mod:`vtc.data.convert_shards`): it is the one place that decides the pixels a model trained on
converted shards sees. Video frames get the same policy through :func:`fit_image` and
:func:`encode_jpeg` (:mod:`vtc.data.convert_videos`); EXIF and draft decoding concern files only.

Image policy (see :func:`to_rgb`, which is :func:`vtc.data.image.to_rgb` on white):

* every image is decoded fully (a truncated or corrupt file is skipped, never half-kept) and
  re-encoded as an RGB JPEG at quality 95 (Pillow's default 4:2:0 chroma subsampling), without
  EXIF or ICC data;
* transparency (LA, La, PA, RGBA, RGBa, P or L/RGB with a transparency key) is composited on
  **white**: transparent areas of diagrams, logos and screenshots are meant to be shown on a page,
  and black would swallow the black text and strokes they usually carry. (LLaVA's own loader calls
  ``convert("RGB")``, which drops alpha and leaves whatever colour the transparent pixels stored,
  often black.)
* 16-bit grey (I;16, I;16L, I;16B, I;16N) is scaled ``round(v * 255 / 65535)``, not clipped as
  Pillow's ``convert("L")`` does; 32-bit integer "I" images are read as 8-bit if all values lie in
  0..255, as 16-bit if they lie in 0..65535, else stretched min..max to 0..255; float "F" images
  as [0, 1] if they lie there, as 0..255 if they lie there, else stretched min..max (NaN -> 0);
* CMYK, YCbCr, 1, L, HSV and the rest go through Pillow's ``convert("RGB")``; ICC profiles are
  ignored, as in LLaVA's loader;
* the EXIF orientation tag is ignored by default, as in LLaVA's loader (the pixels are stored as
  the model would have seen them); ``--exif-transpose`` applies it instead;
* ``--max-side PX`` shrinks the longer side to PX keeping the aspect ratio (shorter side rounded,
  at least 1), with Pillow's antialiased bicubic filter (what CLIP's image processor uses); it
  never enlarges. JPEG sources are first decoded with DCT scaling (``Image.draft``) to no less
  than the target size, which is faster and changes the result only within resampling noise.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

from vtc.data.convert_records import CORRUPT_IMAGE, IMAGE_TOO_LARGE, MISSING_IMAGE, UNSUPPORTED_IMAGE_MODE, SkipSample
from vtc.data.image import to_rgb as _to_rgb

JPEG_QUALITY = 95
BACKGROUND = (255, 255, 255)  # transparency is composited on white (see module docstring)


@dataclass(frozen=True)
class Options:
    """Per-run settings for the workers. ``max_side``, ``exif_transpose`` and ``frames`` (per
    video, :mod:`vtc.data.convert_videos`) decide a shard's bytes and enter its fingerprint;
    ``images_dir`` and ``videos_dir`` (None: ``images_dir``) do not (moving files is harmless)."""

    images_dir: str
    max_side: int | None = None
    exif_transpose: bool = False
    frames: int = 8
    videos_dir: str | None = None


def to_rgb(im: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any Pillow image to RGB, composited on white by default: the one policy of
    :func:`vtc.data.image.to_rgb` (the evaluation images' too), with the converter's background."""
    return _to_rgb(im, background)


def target_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Size after shrinking the longer side to ``max_side`` (never enlarging)."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    if width >= height:
        return max_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_side


def fit_image(im: Image.Image, max_side: int | None) -> Image.Image:
    """The policy for an already decoded picture (a video frame): :func:`to_rgb`, then shrink to
    :func:`target_size` with the antialiased bicubic filter, as :func:`load_image` does."""
    rgb = to_rgb(im)
    size = target_size(rgb.width, rgb.height, max_side)
    return rgb if size == rgb.size else rgb.resize(size, Image.Resampling.BICUBIC)


def load_image(image: str, opts: Options) -> Image.Image:
    """Open ``image`` (relative to ``opts.images_dir``), fully decode, convert to RGB and resize
    per ``opts``, or raise SkipSample (whose detail names the relative path, not the full one)."""
    path = os.path.join(opts.images_dir, image)
    if not os.path.isfile(path):
        raise SkipSample(MISSING_IMAGE, f"no file {image!r} under the image directory")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning, odd-metadata chatter
        try:
            with Image.open(path) as src:
                # The final size comes from the stored size, not from draft()'s rounded one.
                size = target_size(src.width, src.height, opts.max_side)
                if size != src.size and src.format == "JPEG":
                    src.draft(None, size)  # DCT-domain downscale to >= the target size
                src.load()
                im = src
                if opts.exif_transpose:
                    im = ImageOps.exif_transpose(src)
                    if src.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
                        size = size[::-1]
                if im.width < 1 or im.height < 1:
                    raise SkipSample(CORRUPT_IMAGE, f"empty image {im.size}")
                try:
                    rgb = to_rgb(im)
                except Exception as e:
                    raise SkipSample(UNSUPPORTED_IMAGE_MODE,
                                     f"{im.mode}: {type(e).__name__}: {e}") from e
                if rgb is src:
                    rgb = src.copy()  # detach from the file about to be closed
        except SkipSample:
            raise
        except Image.DecompressionBombError as e:
            raise SkipSample(IMAGE_TOO_LARGE, str(e).replace(path, image)) from e
        except Exception as e:  # decoders raise all sorts on corrupt data
            raise SkipSample(CORRUPT_IMAGE,
                             f"{type(e).__name__}: {str(e).replace(path, image)}") from e
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return rgb


def encode_jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
