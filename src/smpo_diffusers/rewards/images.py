"""Decoding dataset image cells for reward scoring: the library's one decoder lives in :mod:`smpo_diffusers.data`.

A preference set stores each image as encoded bytes (``Value("binary")``), as the dict that
``datasets.Image(decode=False)`` yields (``{"bytes": ..., "path": ...}``), or as a decoded ``PIL.Image``
(``datasets.Image()``). :func:`load_image` accepts all three; unreadable data raises
:class:`UnreadableImageError`, which the labelling callback turns into a counted, skipped pair.
"""

from ..data import UnreadableImageError, load_image, to_rgb

__all__ = ["UnreadableImageError", "load_image", "to_rgb"]
