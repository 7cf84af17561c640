"""Durable writes: what a rename publishes must be on disk first, or a power loss can leave a complete-looking
file or folder with empty contents. Used by checkpoints, reward-label shards, the latent cache's records and
the labelling records."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["atomic_write_json", "atomic_write_text", "fsync_directory", "fsync_tree"]


def fsync_directory(path: str) -> None:
    """Persist a folder's entries (a rename into it); a no-op where the file system cannot fsync folders."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def fsync_tree(folder: str) -> None:
    """fsync every file under ``folder`` and the folders themselves."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(root)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file that is fsynced, then renamed over it: readers see
    the old content or the new, never a part."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(path: str, obj: Any) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented JSON with sorted keys."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
