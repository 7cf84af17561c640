"""Decoding dataset image cells into RGB ``PIL.Image`` objects.

A preference set stores each image as encoded bytes (``Value("binary")``), as the dict that
``datasets.Image(decode=False)`` yields (``{"bytes": ..., "path": ...}``), or as a decoded
``PIL.Image`` (``datasets.Image()``). :func:`load_image` accepts all three. Unreadable data raises
:class:`UnreadableImageError`, which the labelling callback turns into a counted, skipped pair.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from typing import Any

from PIL import Image, ImageFile

__all__ = ["UnreadableImageError", "load_image", "to_rgb"]

# Modes that carry transparency; they are composited onto white before dropping alpha.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255)


class UnreadableImageError(ValueError):
    """The cell holds no decodable image (missing, truncated or corrupted data)."""


_strict_lock = threading.Lock()
_strict_depth = 0
_saved_truncation_flag = False


@contextlib.contextmanager
def _strict_truncation():
    """Make PIL raise on truncated files while any thread is inside this block.

    ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` (set globally by some libraries) would silently
    decode a truncated file with grey padding; a corrupted image must never get a reward. The flag
    is process-global, so nested/concurrent blocks share one save/restore (restored by the last exit).
    """
    global _strict_depth, _saved_truncation_flag
    with _strict_lock:
        if _strict_depth == 0:
            _saved_truncation_flag = ImageFile.LOAD_TRUNCATED_IMAGES
        _strict_depth += 1
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        with _strict_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_truncation_flag


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` in mode ``"RGB"`` (the same object when it already is).

    Transparent modes (RGBA, LA, PA, palette images with a transparency key) are alpha-composited
    onto a white background; greyscale, palette, CMYK, YCbCr, ... use PIL's ``convert("RGB")``.
    """
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _decode_bytes(data: bytes) -> Image.Image:
    with _strict_truncation():
        image = Image.open(io.BytesIO(data))
        image.load()  # force full decoding so truncation/corruption surfaces here
    return image


def load_image(value: Any) -> Image.Image:
    """Decode one dataset image cell into an RGB ``PIL.Image``.

    Args:
        value: encoded image ``bytes``/``bytearray``/``memoryview``; a dict with ``"bytes"``
            (and optionally ``"path"``, read when ``"bytes"`` is None) as ``datasets.Image(decode=False)``
            yields; or a ``PIL.Image.Image``.

    Returns:
        The fully decoded image converted with :func:`to_rgb`.

    Raises:
        UnreadableImageError: the cell is None/empty or its data cannot be decoded.
        TypeError: the cell has a type no image column can hold (a schema error, not bad data).
    """
    if value is None:
        raise UnreadableImageError("missing image (None)")
    try:
        if isinstance(value, Image.Image):
            with _strict_truncation():
                value.load()
            return to_rgb(value)
        if isinstance(value, dict):
            data = value.get("bytes")
            path = value.get("path")
            if data is None and path:
                if not os.path.isfile(path):
                    raise UnreadableImageError(f"image file not found: {path!r}")
                with open(path, "rb") as handle:
                    data = handle.read()
            if data is None:
                raise UnreadableImageError("image dict holds neither 'bytes' nor a readable 'path'")
            value = data
        if isinstance(value, (bytes, bytearray, memoryview)):
            if len(value) == 0:
                raise UnreadableImageError("empty image bytes")
            return to_rgb(_decode_bytes(bytes(value)))
    except UnreadableImageError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise UnreadableImageError(f"cannot decode image: {type(error).__name__}: {error}") from error
    raise TypeError(
        f"Unsupported image cell of type {type(value).__name__}: expected encoded bytes, a dict with "
        "'bytes'/'path' (datasets.Image(decode=False)) or a PIL.Image.Image."
    )
