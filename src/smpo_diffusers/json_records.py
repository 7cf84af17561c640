"""Strict JSON for the records the library writes (``training_metrics.json``, evaluation ``results.json``)."""

from __future__ import annotations

import math

__all__ = ["finite_or_none"]


def finite_or_none(value):
    """``value`` (parsed-JSON shaped) with every non-finite float replaced by None, so ``json.dump(...,
    allow_nan=False)`` succeeds and strict parsers read it: NaN means "nothing to average" (no metric, one
    sample, no standard error)."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
