"""The JSON records the library writes (``training_config.json``, ``training_metrics.json``, evaluation
``results.json``): one walker over their leaves, and strict-JSON cleaning."""

from __future__ import annotations

import math
from typing import Any, Callable

__all__ = ["finite_or_none", "map_leaves"]


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
