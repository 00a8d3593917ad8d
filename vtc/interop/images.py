"""Image preprocessing of a LLaVA directory: its ``preprocessor_config.json`` as vtc's
:class:`~vtc.data.image.ImageProcessor` settings, or an error naming the field vtc cannot reproduce.

Read by :func:`vtc.interop.spec.read_spec` for every format, and public as
:func:`image_processor_from_config` (also through :mod:`vtc.interop`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from vtc.data.image import CLIP_MEAN, CLIP_STD, ImageProcessor
from vtc.interop.formats import LlavaLoadError, read_json


@dataclass
class ImageSettings:
    """vtc's image preprocessing (:class:`vtc.data.image.ImageProcessor`) for a model."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True
    source: str = "default"

    def processor(self) -> ImageProcessor:
        return ImageProcessor(self.size, self.mean, self.std, self.pad_to_square)


def read_preprocessor(root: str) -> dict | None:
    """``preprocessor_config.json``, else the ``image_processor`` of ``processor_config.json``."""
    p = os.path.join(root, "preprocessor_config.json")
    if os.path.isfile(p):
        return read_json(p)
    p = os.path.join(root, "processor_config.json")
    if os.path.isfile(p):
        return read_json(p).get("image_processor")
    return None


def _edge(value, key: str, where: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value and not value.get("longest_edge"):
            return int(value["shortest_edge"])
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
    raise LlavaLoadError(f"{where}: {key}={value!r} is not a square size or a shortest edge")


def image_settings(pp: dict, image_size: int | None = None, pad_to_square: bool | None = None,
                   source: str = "preprocessor config") -> ImageSettings:
    """vtc image settings equal to a CLIP/Llava image processor config, or an error naming the
    field vtc's :class:`ImageProcessor` cannot reproduce. ``pad_to_square``: None = the config's
    ``do_pad`` (True when absent: LLaVA-1.5's ``image_aspect_ratio=pad``)."""
    where = source
    resample = pp.get("resample", 3)
    if int(resample) != 3:
        raise LlavaLoadError(f"{where}: resample={resample}; vtc's ImageProcessor resizes with PIL bicubic (3) only")
    if not pp.get("do_resize", True):
        raise LlavaLoadError(f"{where}: do_resize=false is not supported (images are always resized)")
    short = _edge(pp.get("size", {"shortest_edge": image_size or 224}), "size", where)
    crop = _edge(pp.get("crop_size", short), "crop_size", where) if pp.get("do_center_crop", True) else short
    if crop != short:
        raise LlavaLoadError(
            f"{where}: size {short} and crop_size {crop} differ: the processor resizes to {short} then crops "
            f"{crop}, vtc resizes straight to {crop}; the pixels would differ")
    if not pp.get("do_rescale", True) or not math.isclose(float(pp.get("rescale_factor", 1 / 255)), 1 / 255, rel_tol=1e-6):
        raise LlavaLoadError(f"{where}: pixels must be rescaled by 1/255 (do_rescale, rescale_factor)")
    if not pp.get("do_normalize", True):
        raise LlavaLoadError(f"{where}: do_normalize=false is not supported")
    if image_size is not None and crop != image_size:
        raise LlavaLoadError(f"{where}: images come out at {crop} px but the vision tower takes {image_size} px")
    mean = tuple(float(x) for x in pp.get("image_mean", CLIP_MEAN))
    std = tuple(float(x) for x in pp.get("image_std", CLIP_STD))
    pad = bool(pp.get("do_pad", True)) if pad_to_square is None else bool(pad_to_square)
    return ImageSettings(crop, mean, std, pad, source)  # type: ignore[arg-type]


def image_processor_from_config(pp: dict | str | os.PathLike, image_size: int | None = None,
                                pad_to_square: bool | None = None) -> ImageProcessor:
    """vtc's ImageProcessor from a ``preprocessor_config.json`` (a path, its directory, or the
    dict). See :func:`image_settings`."""
    source = "preprocessor config"
    if not isinstance(pp, dict):
        path = os.fspath(pp)
        source = path
        pp = read_preprocessor(path) if os.path.isdir(path) else read_json(path)
        if pp is None:
            raise LlavaLoadError(f"{path} has no preprocessor_config.json or processor_config.json")
    return image_settings(pp, image_size, pad_to_square, source).processor()


def image_for_directory(root: str, vcfg, pad_to_square: bool | None, notes: list[str]) -> ImageSettings:
    """The image settings of ``root``: its preprocessor config, else (noted) CLIP's mean/std at
    the vision tower's size."""
    pp = read_preprocessor(root)
    if pp is None:
        notes.append(f"no image processor config in {root}: CLIP mean/std at {vcfg.image_size} px")
        return ImageSettings(vcfg.image_size, pad_to_square=True if pad_to_square is None else pad_to_square)
    return image_settings(pp, vcfg.image_size, pad_to_square, os.path.join(root, "preprocessor_config.json"))
