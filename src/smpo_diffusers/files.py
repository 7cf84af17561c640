"""Durable writes: what a rename publishes must be on disk first, or a power loss can leave a complete-looking
file or folder with empty contents. Used by checkpoints, the final weights and records, model cards, evaluation
results, reward-label shards, the latent cache's records and the labelling records."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

__all__ = [
    "atomic_output", "atomic_write_json", "atomic_write_text", "fsync_directory", "fsync_tree", "publish_entries",
]


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


@contextlib.contextmanager
def atomic_output(path: str):
    """Yield a temporary path next to ``path``; once the block has written it, fsync it and rename it over
    ``path`` (readers see the old file or the new, never a part). Nothing is published if the block raises."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_output`."""
    with atomic_output(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_json(path: str, obj: Any, **dumps_kwargs) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented JSON with sorted keys (``dumps_kwargs`` go to
    ``json.dumps``, e.g. ``default=str`` or ``allow_nan=False``)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, **dumps_kwargs) + "\n")


def publish_entries(staging: str, destination: str) -> None:
    """Move every entry of the folder ``staging`` (same file system) into ``destination``, each by a rename.
    ``staging`` is fsynced first, so a published file is never a truncated one. An entry
    that exists is replaced: a file by ``os.replace``; a folder is first renamed aside (``.<name>.old``), then
    deleted, so a crash leaves either the old folder, the new one, or the old one aside, never a mixture."""
    fsync_tree(staging)
    for name in sorted(os.listdir(staging)):
        source, target = os.path.join(staging, name), os.path.join(destination, name)
        aside = None
        if os.path.isdir(target) and not os.path.islink(target):
            aside = os.path.join(destination, f".{name}.old")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(target, aside)
        elif os.path.isdir(source) and os.path.lexists(target):
            os.remove(target)  # a file where the new folder goes
        os.replace(source, target)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    fsync_directory(destination)
