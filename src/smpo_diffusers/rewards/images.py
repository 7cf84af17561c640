"""Decoding dataset image cells for reward scoring: the library's one decoder lives in :mod:`smpo_diffusers.data`.

A preference set stores each image as encoded bytes (``Value("binary")``), as the dict that
``datasets.Image(decode=False)`` yields (``{"bytes": ..., "path": ...}``), or as a decoded ``PIL.Image``
(``datasets.Image()``). :func:`load_image` accepts all three; unreadable data raises
:class:`UnreadableImageError`, which the labelling callback turns into a counted, skipped pair.
:func:`crop_to_aspect_ratio` bounds how elongated an image a reward backend's processor receives.
"""

from __future__ import annotations

import math

from ..data import UnreadableImageError, load_image, to_rgb

__all__ = ["MAX_ASPECT_RATIO", "UnreadableImageError", "crop_to_aspect_ratio", "load_image", "to_rgb"]

MAX_ASPECT_RATIO = 4.0
"""Long side / short side beyond which CLIP-style backends centre-crop an image before their processor."""


def crop_to_aspect_ratio(image, max_ratio: float):
    """``image`` centre-cropped along its long side to at most ``max_ratio`` times its short side (the same
    object when it already fits). A processor that resizes the short side and centre-crops a square keeps only
    the central square, so cropping first leaves that square in view while the resized image stays small
    (a 1x40000 image would otherwise be resized to 224x8960000). Raises ``ValueError`` for a zero-size image."""
    if not max_ratio >= 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}.")
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"zero-size image ({width}x{height}) cannot be scored")
    limit = max(1, math.floor(max_ratio * min(width, height)))
    if width > limit:
        left = (width - limit) // 2
        return image.crop((left, 0, left + limit, height))
    if height > limit:
        top = (height - limit) // 2
        return image.crop((0, top, width, top + limit))
    return image
