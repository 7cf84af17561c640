"""Reward statistics of a labelled preference set and the preference scale derived from them.

SmPO turns a pair's rewards into a preference probability ``p = sigmoid((r_w - r_l) / s)``. The
reference script min-max normalised PickScore with global constants, i.e. ``s = r_max - r_min``;
this module computes the same ``s`` from the labelled data of any reward model
(``suggested_scale = max - min`` over all valid rewards) and keeps the PickScore constants as
defaults.

File convention: the statistics live in ``<dataset folder>/reward_stats.json``, the folder that
``Dataset.save_to_disk`` wrote (``load_from_disk`` ignores the extra file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Mapping

import numpy as np

__all__ = [
    "PICKSCORE_MAX",
    "PICKSCORE_MIN",
    "PICKSCORE_SCALE",
    "REWARD_COLUMNS",
    "REWARD_STATISTICS_FILENAME",
    "VALID_COLUMN",
    "compute_reward_statistics",
    "labels_digest",
    "load_reward_statistics",
    "reward_scale_from_statistics",
    "save_reward_statistics",
]

PICKSCORE_MIN = 0.11543526500463486
"""Lowest raw PickScore cosine similarity in the SmPO reference script's normalisation."""
PICKSCORE_MAX = 0.28201571106910706
"""Highest raw PickScore cosine similarity in the SmPO reference script's normalisation."""
PICKSCORE_SCALE = PICKSCORE_MAX - PICKSCORE_MIN
"""``s = PICKSCORE_MAX - PICKSCORE_MIN`` (~0.1666): the default preference scale for PickScore."""

REWARD_COLUMNS = ("reward_0", "reward_1")
VALID_COLUMN = "label_valid"
REWARD_STATISTICS_FILENAME = "reward_stats.json"
_REQUIRED_KEYS = ("reward_model", "count", "min", "max", "mean", "std", "suggested_scale")


def _column(source, name: str) -> np.ndarray:
    try:
        values = source[name]
    except KeyError:
        raise KeyError(f"Reward statistics need the column {name!r} (label the dataset first).") from None
    return np.asarray(values)


def compute_reward_statistics(dataset_or_columns, reward_model: str | None = None) -> dict[str, Any]:
    """Statistics of the valid rewards of a labelled preference set.

    Args:
        dataset_or_columns: a ``datasets.Dataset`` or a mapping with ``reward_0``, ``reward_1``
            (floats, NaN for unreadable pairs) and ``label_valid`` (bools).
        reward_model: name of the reward model that produced the scores (stored as given).

    Returns:
        A JSON-ready dict: ``reward_model``; ``reward_columns`` (the two columns described); ``num_pairs``,
        ``num_valid_pairs``; ``count`` (number of valid scores = 2 x valid pairs); ``min``, ``max``, ``mean``,
        ``std`` (population std, ``ddof=0``) over both reward columns of the valid pairs, computed in float64
        from the stored float32 values; ``suggested_scale = max - min``. With no valid pair the five numbers are None.
        ``labels_sha256``: :func:`labels_digest` of the columns described.
    """
    if hasattr(dataset_or_columns, "select_columns"):  # a datasets.Dataset: read only what we need
        dataset_or_columns = dataset_or_columns.select_columns([*REWARD_COLUMNS, VALID_COLUMN]).to_dict()
    valid = _column(dataset_or_columns, VALID_COLUMN).astype(bool)
    rewards = [_column(dataset_or_columns, name).astype(np.float64) for name in REWARD_COLUMNS]
    if not all(r.shape == valid.shape for r in rewards):
        raise ValueError("reward_0, reward_1 and label_valid must have the same length.")
    values = np.concatenate([r[valid] for r in rewards])
    if not np.isfinite(values).all():
        raise ValueError(
            "Some pairs marked label_valid=True have non-finite rewards; the labelled data is inconsistent."
        )
    stats: dict[str, Any] = {
        "reward_model": reward_model,
        "labels_sha256": labels_digest(dataset_or_columns),
        "reward_columns": list(REWARD_COLUMNS),
        "num_pairs": int(valid.size),
        "num_valid_pairs": int(valid.sum()),
        "count": int(values.size),
        "min": None,
        "max": None,
        "mean": None,
        "std": None,
        "suggested_scale": None,
    }
    if values.size:
        low, high = float(values.min()), float(values.max())
        stats.update(
            min=low, max=high, mean=float(values.mean()), std=float(values.std()), suggested_scale=high - low
        )
    return stats


def _statistics_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return path if path.endswith(".json") else os.path.join(path, REWARD_STATISTICS_FILENAME)


def save_reward_statistics(path: str | os.PathLike, stats: Mapping[str, Any]) -> str:
    """Write ``stats`` as JSON to ``path/reward_stats.json`` (or to ``path`` if it ends in ``.json``).

    The write is atomic (temporary file, then ``os.replace``). Returns the file path."""
    missing = [key for key in _REQUIRED_KEYS if key not in stats]
    if missing:
        raise ValueError(f"Reward statistics lack {missing}; build them with compute_reward_statistics().")
    target = _statistics_file(path)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    temporary = f"{target}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(dict(stats), handle, indent=2, sort_keys=True, allow_nan=False)
        handle.write("\n")
    os.replace(temporary, target)
    return target


def load_reward_statistics(dataset_path: str | os.PathLike) -> dict[str, Any] | None:
    """Read ``dataset_path/reward_stats.json`` (or the ``.json`` file given); None if it does not exist.

    Raises ``ValueError`` if the file exists but lacks the keys :func:`save_reward_statistics` writes."""
    target = _statistics_file(dataset_path)
    if not os.path.isfile(target):
        return None
    with open(target, encoding="utf-8") as handle:
        stats = json.load(handle)
    missing = (
        [key for key in _REQUIRED_KEYS if key not in stats]
        if isinstance(stats, dict)
        else list(_REQUIRED_KEYS)
    )
    if missing:
        raise ValueError(f"{target} is not a reward statistics file (missing {missing}).")
    return stats


def reward_scale_from_statistics(stats: Mapping[str, Any]) -> float:
    """The preference scale ``s`` (``stats["suggested_scale"]``, i.e. max - min reward).

    Raises ``ValueError`` when it is missing, not finite or not positive (no valid rewards, or all
    rewards equal), since ``p = sigmoid((r_w - r_l) / s)`` would then be undefined."""
    scale = stats.get("suggested_scale")
    if scale is None or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"Cannot derive a reward scale from these statistics (suggested_scale={scale!r}, "
            f"min={stats.get('min')!r}, max={stats.get('max')!r}, count={stats.get('count')!r}): "
            "the labelled "
            "data has no valid rewards or all rewards are equal. Check the reward model and the images, or "
            "pass --reward_scale explicitly."
        )
    return float(scale)


def labels_digest(dataset_or_columns) -> str:
    """SHA-256 hex digest of a labelled set's ``reward_0``, ``reward_1`` (as float32, every NaN alike) and
    ``label_valid`` columns, in row order: the statistics record it (``labels_sha256``) so that a reader can check
    they describe the rewards beside them. Takes a ``datasets.Dataset`` or a mapping of
    those columns."""
    if hasattr(dataset_or_columns, "select_columns"):
        dataset_or_columns = dataset_or_columns.select_columns([*REWARD_COLUMNS, VALID_COLUMN]).with_format("numpy")
    valid = np.asarray(dataset_or_columns[VALID_COLUMN], dtype=bool)
    digest = hashlib.sha256(f"{valid.size} pairs|".encode())
    for name in REWARD_COLUMNS:
        values = np.asarray(dataset_or_columns[name], dtype="<f4")
        digest.update(np.where(np.isnan(values), np.float32("nan"), values).astype("<f4").tobytes())
    digest.update(valid.astype(np.uint8).tobytes())
    return digest.hexdigest()
