"""Preference data: load a pair dataset, validate its columns early, order and filter the pairs,
decode images, apply one paired transform to both images, collate.

Layout of a preference set (Pick-a-Pic v2 convention), one row per pair:

* ``caption`` (string): the prompt.
* ``jpg_0``, ``jpg_1``: the two images, encoded bytes (``Value("binary")``) or ``datasets.Image()``.
* ``label_0`` (numeric): 1 if image 0 is preferred by the human, 0 if image 1, 0.5 for a tie.
  ``label_1`` (optional) must equal ``1 - label_0``.
* SmPO only: two numeric reward columns (``reward_0``/``reward_1`` as written by
  ``examples/label_rewards.py``, or the reference script's ``ps_score_0``/``ps_score_1``).
* ``label_valid`` (optional, bool): rows with ``False`` are dropped.

:func:`prepare_preference_pairs` adds ``winner_index`` (0 or 1: which image is the winner) and
``prob_w`` (probability that the winner is preferred, >= 0.5 in SmPO mode). Everything downstream
puts the winner first: ``pixel_values[:, 0]`` is the winner, ``pixel_values[:, 1]`` the loser.
"""

from __future__ import annotations

import contextlib
import glob
import io
import math
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

LOSS_TYPES = ("smpo", "dpo")
TIE_POLICIES = ("drop", "keep")
LABEL_TOLERANCE = 1e-6
"""Absolute tolerance when checking ``label_0 in {0, 0.5, 1}`` and ``label_0 + label_1 == 1``."""

REWARD_COLUMN_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("reward_0", "reward_1"),
    ("ps_score_0", "ps_score_1"),
)
"""Reward-column pairs looked for (in this order) when ``reward_columns`` is None in SmPO mode."""

DATA_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
"""File extension -> ``datasets`` packaged builder used for local data files."""

_IMAGE_COLUMNS = ("jpg_0", "jpg_1")
_LABELLING_COMMAND = (
    "smpo-label-rewards --dataset_name {dataset} --reward_model pickscore --output_dir OUTPUT_DIR "
    "(the same flags as python examples/label_rewards.py)"
)


# ----------------------------------------------------------------------------- loading


def _is_saved_dataset_folder(path: str) -> bool:
    from datasets import config

    return os.path.isfile(os.path.join(path, config.DATASETDICT_JSON_FILENAME)) or os.path.isfile(
        os.path.join(path, config.DATASET_STATE_JSON_FILENAME)
    )


def _builder_for_files(files: Sequence[str], source: str) -> str:
    builders = {DATA_FILE_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in builders:
        bad = sorted({os.path.splitext(f)[1].lower() or f for f in files} - set(DATA_FILE_BUILDERS))
        raise ValueError(
            f"{source}: unsupported data file type(s) {bad}; supported extensions are "
            f"{sorted(DATA_FILE_BUILDERS)} (or a folder written by Dataset.save_to_disk)."
        )
    if len(builders) != 1:
        raise ValueError(
            f"{source}: data files mix formats {sorted(builders)}; put one format per dataset."
        )
    return builders.pop()


def _holds_no_rows(path: str, builder: str) -> bool:
    """True when the data file ``path`` certainly holds no rows: a parquet file whose metadata counts none, an empty
    (or whitespace-only) file, a CSV file with a header line only, a JSON file holding ``[]`` or ``{}``. False when
    it holds rows or that cannot be told cheaply (``datasets`` reads it then)."""
    import csv
    import json

    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows == 0
        if builder == "csv":
            with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
                records = (row for row in csv.reader(handle) if row)  # pandas skips blank lines
                return next(records, None) is None or next(records, None) is None  # nothing, or a header alone
        if os.path.getsize(path) > 1 << 16:
            return False
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            text = handle.read().strip()
        return not text or (text[0] in "[{" and json.loads(text) in ([], {}))
    except Exception:  # unreadable or malformed: datasets reports it
        return False


def _without_empty_files(files: Sequence[str], builder: str, split: str, source: str | None, flag: str) -> list[str]:
    """``files`` less those that hold no rows (:func:`_holds_no_rows`; ``datasets`` fails on them, with an error
    that names neither the file nor the cause), with a warning naming them; ``ValueError`` when none is left."""
    empty = [f for f in files if _holds_no_rows(f, builder)]
    if len(empty) == len(files):
        raise _no_rows_error(files, split, source, flag)
    if empty:
        import logging

        logging.getLogger(__name__).warning("skipping %d data file(s) that hold no rows%s: %s", len(empty),
                                            f" in {source}" if source else "", empty)
    return [f for f in files if f not in empty]


def _no_rows_error(files: Sequence[str], split: str, source: str | None, flag: str) -> ValueError:
    what = f"the data file {files[0]!r} holds" if len(files) == 1 else f"the data files {list(files)} hold"
    return ValueError(
        f"The dataset split {split!r}{f' of {source}' if source else ''} is empty: {what} no rows (a header or "
        f"schema alone, or nothing). Check how {'it was' if len(files) == 1 else 'they were'} written, or pass "
        f"{flag} data that holds rows."
    )


def _load_data_files(builder: str, files: Sequence[str], split: str, source: str | None, flag: str, cache_dir):
    """``datasets.load_dataset(builder, ...)`` on ``files`` as split ``split``, empty files skipped (all empty:
    ``ValueError`` naming them)."""
    import datasets

    files = _without_empty_files(files, builder, split, source, flag)
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split, cache_dir=cache_dir)
    except ValueError as error:  # rows the checks above cannot see missing (e.g. a JSON object without rows)
        if "corresponds to no data" not in str(error):
            raise
        raise _no_rows_error(files, split, source, flag) from None


def _select_split(dataset_dict, split: str, source: str):
    if split not in dataset_dict:
        raise ValueError(
            f"Split {split!r} not found in {source}; available splits: {sorted(dataset_dict)}. "
            "Pass one of them with --dataset_split_name."
        )
    return dataset_dict[split]


def _load_data_folder(folder: str, split: str, cache_dir: str | None):
    """Folder of parquet/json/jsonl/csv files; splits inferred from file names as on the Hub
    (``train-*.parquet``, ``data/test.csv``...; a single unnamed group is ``train``)."""
    import datasets
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(folder)
    except datasets.exceptions.DataFilesNotFoundError as err:  # pragma: no cover - empty folder
        raise ValueError(f"{folder!r} holds no data files.") from err
    resolved = DataFilesDict.from_patterns(patterns, base_path=folder)
    files_by_split = {
        name: sorted(f for f in files if os.path.splitext(f)[1].lower() in DATA_FILE_BUILDERS)
        for name, files in resolved.items()
    }
    files_by_split = {name: files for name, files in files_by_split.items() if files}
    if not files_by_split:
        raise ValueError(
            f"{folder!r} is neither a folder written by save_to_disk nor holds data files with extensions "
            f"{sorted(DATA_FILE_BUILDERS)}."
        )
    files = _select_split(files_by_split, split, f"data folder {folder!r}")
    builder = _builder_for_files(files, folder)
    return _load_data_files(builder, files, split, f"the data folder {folder!r}", "--dataset_name", cache_dir)


def load_preference_dataset(
    dataset_name: str | os.PathLike | Sequence[str],
    split: str = "train",
    cache_dir: str | None = None,
    revision: str | None = None,
):
    """Load one split of a preference dataset as a ``datasets.Dataset``.

    ``dataset_name`` is tried in this order:

    1. a folder written by ``Dataset.save_to_disk`` (the folder is one split: ``split`` must be
       ``"train"`` or the split it was saved from) or ``DatasetDict.save_to_disk`` (``split`` picks the
       split; a missing split raises a ``ValueError`` listing the available ones);
    2. local data files: a file, a list of files, a glob (``data/*.parquet``) or a folder of
       ``.parquet``/``.json``/``.jsonl``/``.csv`` files, loaded with the matching ``datasets``
       builder. Explicit files/globs form one split (``split`` must be ``"train"``); in a folder, splits
       are inferred from file names as on the Hub;
    3. otherwise a Hugging Face Hub dataset id, ``load_dataset(name, split=split, revision=...)``.

    ``cache_dir`` is where ``datasets`` caches converted Arrow files (cases 2 and 3). ``revision``
    applies to Hub ids only; passing it with a local path raises. Remote code is never trusted.
    """
    import datasets

    if isinstance(dataset_name, (list, tuple)):
        names = [os.fspath(n) for n in dataset_name]
        if not names:
            raise ValueError("dataset_name is an empty list.")
    else:
        names = [os.fspath(dataset_name)]

    local_files: list[str] = []
    for name in names:
        expanded = os.path.expanduser(name)
        if os.path.isdir(expanded) and len(names) == 1:
            if revision is not None:
                raise ValueError(
                    f"revision={revision!r} applies to Hub datasets only, not local folder {name!r}."
                )
            if _is_saved_dataset_folder(expanded):
                loaded = datasets.load_from_disk(expanded)
                if isinstance(loaded, datasets.DatasetDict):
                    return _select_split(loaded, split, f"saved dataset {name!r}")
                if split != "train" and str(loaded.split) != split:
                    raise ValueError(
                        f"{name!r} holds one split (saved with Dataset.save_to_disk), so split {split!r} cannot "
                        "be selected from it: drop --dataset_split_name, or save a DatasetDict with that split."
                    )
                return loaded
            return _load_data_folder(expanded, split, cache_dir)
        if os.path.isdir(expanded):
            raise ValueError(f"{name!r} is a folder; pass a folder on its own, or list data files only.")
        if os.path.isfile(expanded):
            local_files.append(expanded)
            continue
        if glob.has_magic(expanded):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"The glob {name!r} matches no files.")
            local_files.extend(matches)
            continue
        if len(names) > 1 or os.path.isabs(expanded) or name.startswith((".", "~")) or (
            os.path.splitext(name)[1].lower() in DATA_FILE_BUILDERS
        ):
            raise FileNotFoundError(f"Local dataset path {name!r} does not exist.")
        # A Hub dataset id ("user/name").
        return datasets.load_dataset(name, split=split, cache_dir=cache_dir, revision=revision)

    if revision is not None:
        raise ValueError(f"revision={revision!r} applies to Hub datasets only, not local files {names}.")
    if split != "train":
        raise ValueError(
            f"{names} are data files, which form one split, so split {split!r} cannot be selected from them: drop "
            "--dataset_split_name (the files are read as they are), or pass a folder whose file names name the "
            "splits (train-*.parquet, data/test.csv...)."
        )
    builder = _builder_for_files(local_files, str(names))
    globs = [name for name in names if glob.has_magic(name) and not os.path.isfile(os.path.expanduser(name))]
    source = None if not globs else repr(globs[0]) if len(names) == 1 else str(names)  # else the files name it
    return _load_data_files(builder, local_files, "train", source, "--dataset_name", cache_dir)


# ----------------------------------------------------------------------------- validation


def _feature_description(feature) -> str:
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype
    if isinstance(feature, datasets.Image):
        return "Image"
    return type(feature).__name__


def _is_string(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _is_numeric(feature) -> bool:
    import datasets

    if not isinstance(feature, datasets.Value):
        return False
    dtype = feature.dtype
    return dtype.startswith(("int", "uint", "float")) or dtype in ("double", "halffloat")


def _is_image(feature) -> bool:
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    return isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")


def _is_bool_or_numeric(feature) -> bool:
    import datasets

    return _is_numeric(feature) or (isinstance(feature, datasets.Value) and feature.dtype == "bool")


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")


def _columns_found(features) -> str:
    return ", ".join(f"{name} ({_feature_description(feature)})" for name, feature in features.items())


def resolve_reward_columns(
    dataset, *, loss_type: str, reward_columns: Sequence[str] | None
) -> tuple[str, str] | None:
    """The two reward column names used in SmPO mode (None in DPO mode, where rewards are unused).

    Explicit ``reward_columns`` are returned as given (checked by
    :func:`validate_preference_columns`). When None, the first pair of
    :data:`REWARD_COLUMN_CANDIDATES` present in ``dataset`` is used; if several are present the
    choice is ambiguous and a ``ValueError`` asks for ``--reward_columns``; if none is present,
    returns None (validation then explains how to label the dataset).
    """
    _check_loss_type(loss_type)
    if loss_type == "dpo":
        return None
    if reward_columns is not None:
        reward_columns = tuple(reward_columns)
        if len(reward_columns) != 2 or not all(isinstance(c, str) for c in reward_columns):
            raise ValueError(
                f"reward_columns must be two column names (image 0, image 1), got {reward_columns!r}."
            )
        return reward_columns
    present = [pair for pair in REWARD_COLUMN_CANDIDATES if all(c in dataset.column_names for c in pair)]
    if len(present) > 1:
        raise ValueError(
            f"Several reward column pairs found: {present}. Choose one with --reward_columns "
            f"(e.g. --reward_columns {present[0][0]} {present[0][1]})."
        )
    return present[0] if present else None


def validate_preference_columns(
    dataset, *, loss_type: str, reward_columns: Sequence[str] | None
) -> None:
    """Check the columns and their types before any model is loaded; raise ``ValueError`` if wrong.

    Required: ``caption`` (string), ``jpg_0``/``jpg_1`` (binary bytes or ``datasets.Image``),
    ``label_0`` (numeric); optional ``label_1`` (numeric) and ``label_valid`` (bool or numeric).
    In ``"smpo"`` mode also the two reward columns (numeric): ``reward_columns``, or when None the
    first of :data:`REWARD_COLUMN_CANDIDATES` found. The error message lists the columns found
    with their types and what is expected; missing rewards name the labelling command and the
    ``--loss_type dpo`` alternative.
    """
    _check_loss_type(loss_type)
    features = dataset.features
    found = _columns_found(features)
    problems: list[str] = []

    def check(name: str, predicate, expected: str, required: bool = True) -> None:
        if name not in features:
            if required:
                problems.append(f"missing column {name!r} (expected {expected})")
            return
        if not predicate(features[name]):
            problems.append(
                f"column {name!r} has type {_feature_description(features[name])} (expected {expected})"
            )

    check("caption", _is_string, "string")
    for column in _IMAGE_COLUMNS:
        check(column, _is_image, "encoded image bytes (binary) or datasets.Image")
    check("label_0", _is_numeric, "numeric: 1 = image 0 preferred, 0 = image 1 preferred, 0.5 = tie")
    check("label_1", _is_numeric, "numeric, 1 - label_0", required=False)
    check("label_valid", _is_bool_or_numeric, "bool", required=False)

    reward_hint = ""
    if loss_type == "smpo":
        resolved = resolve_reward_columns(dataset, loss_type=loss_type, reward_columns=reward_columns)
        if resolved is None:
            candidates = " or ".join(f"{a}/{b}" for a, b in REWARD_COLUMN_CANDIDATES)
            problems.append(f"no reward columns found (looked for {candidates})")
            missing_rewards = True
        else:
            missing_rewards = any(c not in features for c in resolved)
            for column in resolved:
                check(column, _is_numeric, "numeric reward score")
        if missing_rewards:
            reward_hint = (
                "\nSmPO needs a reward score per image. Label the dataset first:\n    "
                + _LABELLING_COMMAND.format(dataset="YOUR_DATASET")
                + "\nthen train on OUTPUT_DIR; or point --reward_columns at existing reward columns "
                "(e.g. --reward_columns ps_score_0 ps_score_1); or train plain Diffusion-DPO with "
                "--loss_type dpo (human labels only)."
            )

    if problems:
        raise ValueError(
            "The preference dataset does not have the expected columns:\n  - "
            + "\n  - ".join(problems)
            + f"\nColumns found: {found or '(none)'}."
            + "\nExpected: caption (string), jpg_0 and jpg_1 (image bytes or Image), label_0 (numeric)"
            + (", plus two numeric reward columns." if loss_type == "smpo" else ".")
            + reward_hint
        )


# ----------------------------------------------------------------------------- filtering / ordering


@dataclass
class PairStatistics:
    """Counts from :func:`prepare_preference_pairs`. Each input row is counted in exactly one of
    ``kept``, ``dropped_invalid``, ``dropped_nonfinite``, ``dropped_ties``, ``dropped_by_max_samples``.

    * ``dropped_invalid``: ``label_valid`` False or null.
    * ``dropped_nonfinite``: NaN/inf/null reward (SmPO mode only).
    * ``dropped_ties``: human ties (``label_0 == 0.5``) under ``tie_policy="drop"``.
    * ``kept_ties``: human ties among the kept pairs (``tie_policy="keep"``).
    * ``reward_disagreements``: kept pairs that humans decided and the reward strictly ranks the
      other way (SmPO mode; 0 in DPO mode).
    * ``missing_captions``: kept pairs whose caption is null (trained with the empty prompt).
    * ``blank_captions``: kept pairs whose caption is empty or whitespace only (encoded as written; a CLIP
      tokenizer gives it the empty prompt's tokens).
    * ``zero_weight_pairs``: kept pairs with ``prob_w`` exactly 0.5 (equal rewards in SmPO mode, or kept ties):
      their label weight ``2p - 1`` is 0, so they give no gradient.
    * ``mean_prob_w``: mean ``prob_w`` over the kept pairs (NaN if none).
    """

    total: int
    kept: int
    dropped_ties: int
    dropped_invalid: int
    dropped_nonfinite: int
    kept_ties: int
    mean_prob_w: float
    dropped_by_max_samples: int = 0
    reward_disagreements: int = 0
    missing_captions: int = 0
    blank_captions: int = 0
    zero_weight_pairs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for the training log."""
        return (
            f"preference pairs: {self.kept}/{self.total} kept (dropped: {self.dropped_ties} ties, "
            f"{self.dropped_invalid} invalid labels, {self.dropped_nonfinite} non-finite rewards, "
            f"{self.dropped_by_max_samples} beyond max_train_samples); {self.kept_ties} ties kept; "
            f"{self.reward_disagreements} reward/human disagreements; "
            f"{self.missing_captions} missing and {self.blank_captions} blank captions; {self.zero_weight_pairs} "
            "pairs of weight 0 (prob_w 0.5); "
            f"mean prob_w {self.mean_prob_w:.4f}"
        )


def _read_columns(dataset, columns: Sequence[str]) -> dict[str, Any]:
    """The given columns as pyarrow arrays (respecting any indices mapping), images untouched."""
    table = dataset.select_columns(list(columns)).with_format("arrow")[:]
    return {name: table.column(name) for name in columns}


def _as_float(column) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    return np.asarray(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _example_rows(mask: np.ndarray, values: np.ndarray, limit: int = 5) -> str:
    rows = np.flatnonzero(mask)[:limit]
    return ", ".join(f"row {int(r)}: {np.asarray(values[r]).tolist()!r}" for r in rows)


def prepare_preference_pairs(
    dataset,
    *,
    loss_type: str,
    reward_columns: Sequence[str] | None,
    reward_scale: float | None,
    tie_policy: str = "drop",
    max_train_samples: int | None = None,
    seed: int = 0,
):
    """Filter and order the pairs; returns ``(pairs, PairStatistics)``.

    Steps (vectorised over the label/reward columns with numpy; image bytes are not read or copied):

    1. :func:`validate_preference_columns`; ``label_0`` must be in {0, 0.5, 1} and ``label_1`` (if
       present) equal ``1 - label_0`` (tolerance :data:`LABEL_TOLERANCE`), else ``ValueError`` (rows marked
       ``label_valid`` False are not checked: they are dropped).
    2. Drop rows with ``label_valid`` False/null/NaN, then (SmPO) rows with a non-finite reward, then
       human ties if ``tie_policy == "drop"``. ``tie_policy == "keep"`` keeps them.
    3. Order: ``"dpo"``: winner = image 0 iff ``label_0 == 1``, ``prob_w = 1`` (0.5 for a kept tie,
       i.e. zero gradient). ``"smpo"``: winner = the image with the higher reward (image 0 on equal
       rewards, where ``prob_w = 0.5`` gives the pair zero weight), ``prob_w = sigmoid((r_w - r_l) /
       reward_scale)`` >= 0.5; the human label does not order the pair (it only decides which human ties are
       dropped). ``reward_scale`` must be finite and > 0 (ignored in DPO mode).
    4. ``max_train_samples``: ``shuffle(seed)`` then keep the first ``max_train_samples`` rows.

    Adds ``winner_index`` (int8, 0/1), ``prob_w`` (float32) and ``source_row`` (int64, the row in ``dataset``;
    the latent cache keys its entries by it); the original columns are kept.
    Raises ``ValueError`` if no pair survives, stating what was dropped and what to change.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from .losses import preference_probability

    _check_loss_type(loss_type)
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}.")
    if max_train_samples is not None and (
        isinstance(max_train_samples, bool) or not isinstance(max_train_samples, (int, np.integer))
        or max_train_samples < 1
    ):
        raise ValueError(f"max_train_samples must be a positive integer or None, got {max_train_samples!r}.")
    if loss_type == "smpo":
        if reward_scale is None or not math.isfinite(float(reward_scale)) or float(reward_scale) <= 0:
            raise ValueError(
                f"reward_scale must be finite and > 0 in smpo mode, got {reward_scale!r} "
                "(e.g. r_max - r_min of the labelled rewards; PickScore default 0.1666)."
            )
    validate_preference_columns(dataset, loss_type=loss_type, reward_columns=reward_columns)
    computed = [name for name in ("winner_index", "prob_w", "source_row") if name in dataset.column_names]
    if computed:
        raise ValueError(
            f"the dataset already has the column(s) {computed}, which preparing the pairs computes from the labels "
            f"and rewards (a saved set of prepared pairs?). Drop them (dataset.remove_columns({computed})) and pass "
            "the labelled preference set.")
    rewards = resolve_reward_columns(dataset, loss_type=loss_type, reward_columns=reward_columns)

    names = ["label_0", "caption"]
    for optional in ("label_1", "label_valid"):
        if optional in dataset.column_names:
            names.append(optional)
    if rewards is not None:
        names.extend(rewards)
    columns = _read_columns(dataset, names)
    total = len(dataset)

    # Rows the labelling marked invalid are dropped below whatever their labels hold; a float label_valid
    # column counts NaN as invalid (Arrow's cast would turn it into True).
    marked_valid = np.ones(total, dtype=bool)
    if "label_valid" in columns:
        if pa.types.is_floating(columns["label_valid"].type):
            flags = _as_float(columns["label_valid"])
            marked_valid = np.isfinite(flags) & (flags != 0)
        else:
            marked_valid = np.asarray(
                pc.fill_null(pc.cast(columns["label_valid"], "bool"), False).to_numpy(zero_copy_only=False),
                dtype=bool,
            )
    label_0 = _as_float(columns["label_0"])
    is_win_0 = np.abs(label_0 - 1.0) <= LABEL_TOLERANCE
    is_win_1 = np.abs(label_0) <= LABEL_TOLERANCE
    is_tie = np.abs(label_0 - 0.5) <= LABEL_TOLERANCE
    bad_label = ~(is_win_0 | is_win_1 | is_tie) & marked_valid  # NaN/null compare False -> bad
    if bad_label.any():
        raise ValueError(
            f"label_0 must be 1 (image 0 preferred), 0 (image 1 preferred) or 0.5 (tie); "
            f"{int(bad_label.sum())} of {total} rows are not ({_example_rows(bad_label, label_0)}). "
            "Fix or filter the dataset."
        )
    if "label_1" in columns:
        label_1 = _as_float(columns["label_1"])
        inconsistent = ~(np.abs(label_0 + label_1 - 1.0) <= LABEL_TOLERANCE) & marked_valid
        if inconsistent.any():
            pairs_shown = _example_rows(inconsistent, np.stack([label_0, label_1], axis=1))
            raise ValueError(
                f"label_1 must equal 1 - label_0; {int(inconsistent.sum())} of {total} rows do not "
                f"({pairs_shown}). Fix the labels or drop the label_1 column."
            )

    dropped_invalid_mask = ~marked_valid
    keep = marked_valid.copy()

    winner_index = np.where(is_win_1, 1, 0).astype(np.int8)
    prob_w = np.where(is_tie, 0.5, 1.0)
    dropped_nonfinite_mask = np.zeros(total, dtype=bool)
    reward_disagrees = np.zeros(total, dtype=bool)
    if rewards is not None:
        reward_0 = _as_float(columns[rewards[0]])
        reward_1 = _as_float(columns[rewards[1]])
        finite = np.isfinite(reward_0) & np.isfinite(reward_1)
        dropped_nonfinite_mask = keep & ~finite
        keep &= finite
        reward_0 = np.where(finite, reward_0, 0.0)
        reward_1 = np.where(finite, reward_1, 0.0)
        reward_winner = np.where(reward_1 > reward_0, 1, 0).astype(np.int8)
        reward_disagrees = ~is_tie & (reward_0 != reward_1) & (reward_winner != winner_index)
        winner_index = reward_winner
        r_w = np.maximum(reward_0, reward_1)
        r_l = np.minimum(reward_0, reward_1)
        prob_w = preference_probability(
            torch.from_numpy(r_w), torch.from_numpy(r_l), float(reward_scale)
        ).numpy()

    dropped_ties_mask = np.zeros(total, dtype=bool)
    if tie_policy == "drop":
        dropped_ties_mask = keep & is_tie
        keep &= ~is_tie

    kept_rows = np.flatnonzero(keep)
    if kept_rows.size == 0:
        raise ValueError(
            f"No preference pairs left: {total} rows, dropped {int(dropped_invalid_mask.sum())} with "
            f"label_valid False, {int(dropped_nonfinite_mask.sum())} with non-finite rewards, "
            f"{int(dropped_ties_mask.sum())} human ties (tie_policy={tie_policy!r}). "
            + ("Use tie_policy='keep' if the set is mostly ties, (re)label rewards with "
               "smpo-label-rewards if they are NaN, or check the dataset/split." if loss_type == "smpo" else
               "DPO trains on human preferences only (ties have no winner): use --loss_type smpo with reward "
               "labels for a set of mostly ties, or check the dataset/split.")
        )

    dropped_by_max = 0
    final_rows = kept_rows
    if max_train_samples is not None:
        # Same rows and order as ``filtered.shuffle(seed=seed).select(range(max_train_samples))``
        # (datasets shuffles with ``np.random.default_rng(seed).permutation``), in one selection.
        permutation = np.random.default_rng(seed).permutation(kept_rows.size)
        final_rows = kept_rows[permutation[:max_train_samples]]
        dropped_by_max = int(kept_rows.size - final_rows.size)

    # numpy arrays: the columns get their dtypes (int8, float32, int64) on every supported datasets version
    prepared = dataset.add_column("winner_index", np.asarray(winner_index, dtype=np.int8)).add_column(
        "prob_w", prob_w.astype(np.float32)).add_column("source_row", np.arange(total, dtype=np.int64))
    if final_rows.size != total or max_train_samples is not None:
        prepared = prepared.select(final_rows)

    caption_null = np.asarray(columns["caption"].is_null().to_numpy(zero_copy_only=False), dtype=bool)
    caption_blank = np.zeros(total, dtype=bool)
    if pa.types.is_string(columns["caption"].type) or pa.types.is_large_string(columns["caption"].type):
        blank = pc.equal(pc.utf8_trim_whitespace(columns["caption"]), "")
        caption_blank = np.asarray(pc.fill_null(blank, False).to_numpy(zero_copy_only=False), dtype=bool)
    final_prob = np.asarray(prob_w[final_rows], dtype=np.float32)
    zero_weight = int((final_prob == 0.5).sum())
    if zero_weight == final_prob.size:
        raise ValueError(
            f"every one of the {final_prob.size} pairs left has prob_w 0.5 (weight 2p - 1 = 0): "
            + ("their two rewards are equal" if rewards is not None else "they are all human ties")
            + ", so the loss has no gradient and training would change nothing. "
            + ("Check the reward columns and the reward model that labelled them (smpo-label-rewards)."
               if rewards is not None else "Use --loss_type smpo with reward labels, or check the dataset/split.")
        )
    stats = PairStatistics(
        total=total,
        kept=int(final_rows.size),
        dropped_ties=int(dropped_ties_mask.sum()),
        dropped_invalid=int(dropped_invalid_mask.sum()),
        dropped_nonfinite=int(dropped_nonfinite_mask.sum()),
        kept_ties=int(is_tie[final_rows].sum()),
        mean_prob_w=float(final_prob.mean()) if final_prob.size else float("nan"),
        dropped_by_max_samples=dropped_by_max,
        reward_disagreements=int(reward_disagrees[final_rows].sum()),
        missing_captions=int(caption_null[final_rows].sum()),
        blank_captions=int(caption_blank[final_rows].sum()),
        zero_weight_pairs=zero_weight,
    )
    return prepared, stats


# ----------------------------------------------------------------------------- decoding


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image):
    """Any PIL mode -> RGB (the same object when already RGB). Transparency is composited on white;
    16/32-bit integer images are scaled from 0..65535 when their maximum exceeds 255 (else taken as
    0..255); float images (mode F) from 0..1 when their maximum is <= 1 (else clipped to 0..255)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite_max = float(np.nanmax(values)) if values.size else 0.0
        if image.mode == "F":
            scale = 255.0 if finite_max <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if finite_max > 255 else 1.0
        grey = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class UnreadableImageError(ValueError):
    """The cell holds no decodable image (missing, truncated or corrupted data)."""


_strict_lock = threading.Lock()
_strict_depth = 0
_saved_truncation_flag = False


@contextlib.contextmanager
def _strict_truncation():
    """Make PIL raise on truncated files while any thread is inside this block.

    ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` (set globally by some libraries) would silently decode a
    truncated file with grey padding; a corrupted image must never be trained on or rewarded. The flag is
    process-global, so nested/concurrent blocks share one save/restore (restored by the last exit).
    """
    from PIL import ImageFile

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


def load_image(value):
    """Decode one image cell to a fully loaded RGB ``PIL.Image`` or raise :class:`UnreadableImageError`.

    ``value`` may be encoded bytes, a ``{"bytes": ..., "path": ...}`` dict (``datasets.Image`` storage;
    ``bytes`` first, else the file at ``path``) or a ``PIL.Image``. EXIF orientation is applied; any mode
    becomes RGB (:func:`to_rgb`). A value of a type no image column can hold raises ``TypeError`` (a schema
    error, not bad data).
    """
    from PIL import Image, ImageOps

    if value is None:
        raise UnreadableImageError("missing image (None)")
    try:
        with _strict_truncation():
            if isinstance(value, Image.Image):
                image = value
            else:
                if isinstance(value, dict):
                    data, path = value.get("bytes"), value.get("path")
                    if data is None and path:
                        if not os.path.isfile(path):
                            raise UnreadableImageError(f"image file not found: {path!r}")
                        with open(path, "rb") as handle:
                            data = handle.read()
                    if data is None:
                        raise UnreadableImageError("image dict holds neither 'bytes' nor a readable 'path'")
                    value = data
                if not isinstance(value, (bytes, bytearray, memoryview)):
                    raise TypeError(
                        f"Unsupported image cell of type {type(value).__name__}: expected encoded bytes, a dict "
                        "with 'bytes'/'path' (datasets.Image(decode=False)) or a PIL.Image.Image."
                    )
                if len(value) == 0:
                    raise UnreadableImageError("empty image bytes")
                image = Image.open(io.BytesIO(bytes(value)))
            image.load()  # truncated or corrupt data fails here, not later in a worker
            image = to_rgb(ImageOps.exif_transpose(image))
            image.load()
            return image
    except (UnreadableImageError, TypeError):
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise UnreadableImageError(f"cannot decode image: {type(error).__name__}: {error}") from error


def decode_image(value):
    """Like :func:`load_image`, but returns None instead of raising for unreadable data (callers count the
    skip). Never raises."""
    try:
        return load_image(value)
    except (UnreadableImageError, TypeError):
        return None


# ----------------------------------------------------------------------------- paired transform


@dataclass
class PairSample:
    """Output of :class:`PairTransform`.

    * ``pixel_values``: float32 ``(2, 3, res, res)`` in [-1, 1], ``[winner, loser]``.
    * ``original_sizes``: int64 ``(2, 2)``, ``(height, width)`` of each image before any resizing.
    * ``crop_top_lefts``: int64 ``(2, 2)``, ``(top, left)`` of the crop in the resized image as shown (same
      box for both images): for a flipped pair, measured in the mirrored image (``width - res - left``), the
      corner SDXL's micro-conditioning gets when an image is flipped before it is cropped.
    * ``resized_pair``: the loser had a different size and was resized to the winner's first.
    * ``upscaled``: at least one image was enlarged (in width or height).
    * ``flipped``: both images were mirrored horizontally.
    """

    pixel_values: torch.Tensor
    original_sizes: torch.Tensor
    crop_top_lefts: torch.Tensor
    resized_pair: bool
    upscaled: bool
    flipped: bool


def _to_tensor(image) -> torch.Tensor:
    """RGB PIL image -> float32 ``(3, H, W)`` in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class PairTransform:
    """Resize, crop and flip a (winner, loser) pair identically.

    1. If the loser's size differs from the winner's, the loser takes the winner's size
       (``resized_pair``).
    2. Both are resized (bilinear, antialiased when shrinking) so the winner's shorter side equals
       ``resolution``; enlarging is allowed and flagged (``upscaled``).
    3. One ``resolution`` x ``resolution`` crop box for both: centred (``top = round((H - res) / 2)``)
       or, with ``random_crop``, drawn uniformly from ``rng``.

    Steps 1-3 are one resampling per image of just the source region the crop keeps (PIL's ``resize`` with a
    ``box``; the filter still reads the pixels around it), so a very thin or very large image never
    allocates its whole resized size.
    4. With ``hflip``, both are mirrored with probability 0.5 drawn from ``rng``.
    5. To float tensors in [-1, 1].

    Draw order from ``rng``: crop top, crop left (random crop only), then the flip draw (hflip only).
    """

    def __init__(self, resolution: int, random_crop: bool = False, hflip: bool = True):
        if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}.")
        self.resolution = int(resolution)
        self.random_crop = bool(random_crop)
        self.hflip = bool(hflip)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` after scaling so the shorter side equals ``resolution``."""
        scale = self.resolution / min(width, height)
        return max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale))

    def __call__(self, img_w, img_l, rng: np.random.Generator) -> PairSample:
        from PIL import Image

        res = self.resolution
        original_sizes = [(img_w.height, img_w.width), (img_l.height, img_l.width)]
        resized_pair = img_l.size != img_w.size
        # Both map to the winner's target size: the loser takes the winner's aspect ratio.
        width, height = size = self.target_size(*img_w.size)
        upscaled = any(size[0] > image.width or size[1] > image.height for image in (img_w, img_l))
        if self.random_crop:
            top = int(rng.integers(0, height - res + 1))
            left = int(rng.integers(0, width - res + 1))
        else:
            top = int(round((height - res) / 2.0))
            left = int(round((width - res) / 2.0))

        def resized_crop(image):
            """The crop box of the image resized to ``size``, resampled from the source region it covers."""
            if image.size == size:
                return image.crop((left, top, left + res, top + res))
            scale_x, scale_y = image.width / width, image.height / height
            box = (left * scale_x, top * scale_y, (left + res) * scale_x, (top + res) * scale_y)
            return image.resize((res, res), resample=Image.BILINEAR, box=box)

        img_w, img_l = resized_crop(img_w), resized_crop(img_l)

        flipped = bool(self.hflip and rng.random() < 0.5)
        if flipped:
            img_w = img_w.transpose(Image.FLIP_LEFT_RIGHT)
            img_l = img_l.transpose(Image.FLIP_LEFT_RIGHT)
            left = width - res - left  # the same pixels, as a crop of the mirrored resized image

        return PairSample(
            pixel_values=torch.stack([_to_tensor(img_w), _to_tensor(img_l)]),
            original_sizes=torch.tensor(original_sizes, dtype=torch.long),
            crop_top_lefts=torch.tensor([(top, left), (top, left)], dtype=torch.long),
            resized_pair=resized_pair,
            upscaled=upscaled,
            flipped=flipped,
        )


# ----------------------------------------------------------------------------- torch dataset


PADDING_INDEX = -1
"""A sampler index that stands for no pair: :class:`EpochIndexedDataset` gives :data:`PADDING_ITEM` for it and
:func:`collate_preference_batch` drops it without counting it as a skip. The trainer's sampler pads the last
batches of an epoch with it so that every process gets the same number of full-size batches and accelerate
has nothing to fill (it would repeat pairs from the start of the epoch)."""

PADDING_ITEM = {"padding": True}


class EpochIndexedDataset(torch.utils.data.Dataset):
    """What the pair datasets share: an epoch that seeds per-item randomness, bounds-checked indices and the
    padding index. Subclasses implement ``_item(index)`` (None for an undecodable pair)."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict | None:
        index = int(i)
        if index == PADDING_INDEX:
            return dict(PADDING_ITEM)
        if not 0 <= index < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} pairs")
        return self._item(index)

    def _item(self, index: int) -> dict | None:
        raise NotImplementedError


class PreferencePairDataset(EpochIndexedDataset):
    """Map-style torch dataset over prepared pairs (output of :func:`prepare_preference_pairs`).

    ``__getitem__(i)`` returns None when either image fails to decode (counted by the collate
    function), else a dict:

    * ``pixel_values``: float32 ``(2, 3, H, W)`` in [-1, 1], winner first (per ``winner_index``).
    * ``prob_w`` (float), ``caption`` (str; "" with probability ``proportion_empty_prompts`` or when
      the stored caption is null/not a string), ``index`` (int, row in ``pairs``).
    * ``original_sizes``, ``crop_top_lefts``: int64 ``(2, 2)``, winner first (see :class:`PairSample`).
    * flags: ``empty_prompt`` (replaced by ""), ``missing_caption`` (caption was null/non-str),
      ``resized_pair``, ``upscaled``, ``flipped``.

    All randomness comes from ``np.random.default_rng([seed, epoch, i])`` (first draw: empty
    prompt, then the transform's draws), so an item depends only on (seed, epoch, i), never on the
    worker/process count or resume point. Call :meth:`set_epoch` before iterating each epoch
    (DataLoader workers copy the dataset when an iterator is created, so don't use
    ``persistent_workers=True`` together with ``set_epoch``).
    """

    def __init__(self, pairs, transform: PairTransform, *, seed: int, proportion_empty_prompts: float = 0.0):
        required = ("caption", "jpg_0", "jpg_1", "winner_index", "prob_w")
        missing = [c for c in required if c not in pairs.column_names]
        if missing:
            raise ValueError(
                f"pairs lacks columns {missing}; build it with prepare_preference_pairs(...) first."
            )
        if not 0.0 <= float(proportion_empty_prompts) <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {proportion_empty_prompts!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        # Arrow rows: image cells stay undecoded (bytes or {"bytes", "path"}) until decode_image.
        self._rows = pairs.select_columns(list(required)).with_format("arrow")
        self.transform = transform
        self.seed = int(seed)
        self.proportion_empty_prompts = float(proportion_empty_prompts)

    def __len__(self) -> int:
        return len(self._rows)

    def _item(self, index: int) -> dict | None:
        row = self._rows[index].to_pylist()[0]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        empty_prompt = bool(rng.random() < self.proportion_empty_prompts)

        winner = int(row["winner_index"])
        img_0, img_1 = decode_image(row["jpg_0"]), decode_image(row["jpg_1"])
        if img_0 is None or img_1 is None:
            return None
        img_w, img_l = (img_0, img_1) if winner == 0 else (img_1, img_0)
        sample = self.transform(img_w, img_l, rng)

        caption = row["caption"]
        missing_caption = not isinstance(caption, str)
        if missing_caption or empty_prompt:
            caption = ""
        return {
            "pixel_values": sample.pixel_values,
            "prob_w": float(row["prob_w"]),
            "caption": caption,
            "original_sizes": sample.original_sizes,
            "crop_top_lefts": sample.crop_top_lefts,
            "index": index,
            "empty_prompt": empty_prompt,
            "missing_caption": missing_caption,
            "resized_pair": sample.resized_pair,
            "upscaled": sample.upscaled,
            "flipped": sample.flipped,
        }


CACHED_ITEM_TENSORS = ("latent_mean", "latent_std", "prompt_hidden", "prompt_pooled")
"""Tensors a :class:`~smpo_diffusers.latent_cache.CachedPairDataset` item has instead of ``pixel_values``."""


def collate_preference_batch(items: list[dict | None]) -> dict:
    """Stack :class:`PreferencePairDataset` items; None items (undecodable pairs) and padding items
    (:data:`PADDING_INDEX`) are dropped.

    Returns a dict with

    * ``pixel_values``: float32 ``(B, 2, 3, H, W)``, winner first (cached items instead: ``latent_mean``,
      ``latent_std`` ``(B, 2, C, h, w)``, ``prompt_hidden`` ``(B, L, D)``, SDXL ``prompt_pooled``);
      ``prob_w``: float32 ``(B,)``;
      ``original_sizes``, ``crop_top_lefts``: int64 ``(B, 2, 2)``; ``indices``: int64 ``(B,)``;
      ``captions``: list of B str;
    * ``batch_size`` (B), ``num_skipped`` (None items dropped from this batch; padding is not counted) and the
      counts
      ``num_empty_prompts``, ``num_missing_captions``, ``num_resized_pairs``, ``num_upscaled``.

    If every item was None, B = 0 and ``pixel_values``, ``prob_w``, ``original_sizes``,
    ``crop_top_lefts`` and ``indices`` are None and ``captions`` is ``[]``: the caller skips the
    step and adds ``num_skipped`` to its counter.
    """
    items = [item for item in items if item is None or not item.get("padding")]
    kept = [item for item in items if item is not None]
    batch: dict[str, Any] = {
        "batch_size": len(kept),
        "num_skipped": len(items) - len(kept),
        "captions": [item["caption"] for item in kept],
        "num_empty_prompts": sum(bool(item["empty_prompt"]) for item in kept),
        "num_missing_captions": sum(bool(item["missing_caption"]) for item in kept),
        "num_resized_pairs": sum(bool(item["resized_pair"]) for item in kept),
        "num_upscaled": sum(bool(item["upscaled"]) for item in kept),
    }
    if not kept:
        batch.update(pixel_values=None, prob_w=None, original_sizes=None, crop_top_lefts=None, indices=None)
        return batch
    for key in ("pixel_values",) + CACHED_ITEM_TENSORS:  # pixels, or the latent cache's tensors
        if key in kept[0]:
            batch[key] = torch.stack([item[key] for item in kept])
    batch.update(
        prob_w=torch.tensor([item["prob_w"] for item in kept], dtype=torch.float32),
        original_sizes=torch.stack([item["original_sizes"] for item in kept]),
        crop_top_lefts=torch.stack([item["crop_top_lefts"] for item in kept]),
        indices=torch.tensor([item["index"] for item in kept], dtype=torch.long),
    )
    return batch


__all__ = [
    "DATA_FILE_BUILDERS",
    "LOSS_TYPES",
    "REWARD_COLUMN_CANDIDATES",
    "TIE_POLICIES",
    "PairSample",
    "PairStatistics",
    "PairTransform",
    "EpochIndexedDataset",
    "PADDING_INDEX",
    "PreferencePairDataset",
    "collate_preference_batch",
    "decode_image",
    "load_preference_dataset",
    "prepare_preference_pairs",
    "resolve_reward_columns",
    "validate_preference_columns",
]
