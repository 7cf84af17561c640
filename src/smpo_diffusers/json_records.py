"""The JSON records the library writes (``training_config.json``, ``training_metrics.json``, evaluation
``results.json``): one walker over their leaves, and strict-JSON cleaning."""

from __future__ import annotations

import json
import math
from typing import Any, Callable

__all__ = ["finite_or_none", "map_leaves", "read_json_record"]


def map_leaves(value, function: Callable[[Any], Any]):
    """``value`` (parsed-JSON shaped: dicts, lists/tuples, scalars) with ``function`` applied to every leaf;
    dict keys stay, tuples become lists."""
    if isinstance(value, dict):
        return {key: map_leaves(item, function) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [map_leaves(item, function) for item in value]
    return function(value)


def finite_or_none(value):
    """``value`` with every non-finite float replaced by None, so ``json.dump(..., allow_nan=False)`` succeeds
    and strict parsers read it: NaN means "nothing to average" (no metric, one sample, no standard error)."""
    return map_leaves(value, lambda leaf: None if isinstance(leaf, float) and not math.isfinite(leaf) else leaf)


def read_json_record(path: str, fix: str) -> dict:
    """The JSON object in ``path``; a ``ValueError`` naming the file and ``fix`` when it is not one (a save that
    did not finish, a hand edit, another program's file)."""
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a JSON {type(record).__name__}, not the object this library writes; {fix}")
    return record
