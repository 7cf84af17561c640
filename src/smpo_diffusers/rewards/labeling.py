"""The ``datasets.map`` callback that scores both images of each preference pair.

``dataset.map(RewardLabeler(model), batched=True, batch_size=16)`` adds ``reward_0``,
``reward_1`` (float32) and ``label_valid`` (bool) to a Pick-a-Pic-style set (``caption``,
``jpg_0``, ``jpg_1``). All readable images of a map batch are scored in one
``reward_model.score`` call (which chunks by the model's ``max_batch_size``). A pair whose caption
is missing or either of whose images cannot be decoded (or has zero size) gets NaN rewards and
``label_valid=False``; the trainer skips such pairs. Count them from the output with
:func:`summarize_labels` (the labeler's own counters only see the batches of its own process).

With ``datasets.Image()`` columns, ``datasets`` decodes the images before the callback sees the batch and
raises on a corrupt file; map over :func:`undecoded_images` of the dataset so that the labeler sees the bytes
(``label_dataset`` does this itself).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import torch

from .base import RewardModel, map_in_threads
from .images import UnreadableImageError, load_image
from .statistics import REWARD_COLUMNS, VALID_COLUMN

logger = logging.getLogger(__name__)

__all__ = ["CAPTION_COLUMN", "IMAGE_COLUMNS", "RewardLabeler", "reward_features", "summarize_labels",
           "undecoded_images"]

CAPTION_COLUMN = "caption"
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
_MAX_LOGGED_PROBLEMS = 10


def undecoded_images(dataset):
    """``dataset`` with its ``datasets.Image`` columns (``jpg_0``, ``jpg_1``) cast to ``Image(decode=False)``:
    cells become ``{"bytes", "path"}`` dicts, so a corrupt image reaches :class:`RewardLabeler` (and is counted)
    instead of failing inside ``datasets``. The labelled output keeps that feature; cast back with
    ``cast_column(name, datasets.Image())`` if decoded cells are wanted."""
    import datasets

    for column in IMAGE_COLUMNS:
        feature = dataset.features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def reward_features():
    """``datasets.Features`` of the columns the labeler adds."""
    import datasets

    return datasets.Features(
        {
            REWARD_COLUMNS[0]: datasets.Value("float32"),
            REWARD_COLUMNS[1]: datasets.Value("float32"),
            VALID_COLUMN: datasets.Value("bool"),
        }
    )


class RewardLabeler:
    """Batched ``datasets.map`` callback adding ``reward_0``, ``reward_1``, ``label_valid``.

    Args:
        reward_model: the :class:`RewardModel` that scores ``(image, caption)``.

    Call as ``labeler(batch)`` or, with ``map(..., with_rank=True)``, ``labeler(batch, rank)``: when
    CUDA is available a rank moves the model to ``cuda:{rank % torch.cuda.device_count()}``; without
    CUDA the rank is ignored. For one process per GPU, build the model on the CPU and call
    ``map(labeler, batched=True, with_rank=True, num_proc=torch.cuda.device_count())``: each worker
    moves its own copy (CUDA must not be initialised in the parent before it forks).
    ``examples/label_rewards.py`` under ``accelerate launch`` is the resumable alternative.

    Images are decoded in ``reward_model.preprocess_threads`` threads.

    Counters (this process only): ``num_pairs``, ``num_invalid_pairs``, ``num_score_calls``.
    """

    def __init__(self, reward_model: RewardModel):
        if not isinstance(reward_model, RewardModel):
            raise TypeError(
                f"reward_model must be a RewardModel, got {type(reward_model).__name__}; wrap plain "
                "functions with CallableRewardModel or load_reward_model()."
            )
        self.reward_model = reward_model
        self.num_pairs = 0
        self.num_invalid_pairs = 0
        self.num_score_calls = 0

    def _select_device(self, rank: int | None) -> None:
        if rank is None or not torch.cuda.is_available():
            return
        device = torch.device(f"cuda:{rank % torch.cuda.device_count()}")
        if self.reward_model.device != device:
            self.reward_model.to(device)

    def _report(self, message: str) -> None:
        self.num_invalid_pairs += 1
        if self.num_invalid_pairs <= _MAX_LOGGED_PROBLEMS:
            logger.warning("Skipping pair (label_valid=False): %s", message)
        elif self.num_invalid_pairs == _MAX_LOGGED_PROBLEMS + 1:
            logger.warning("Further skipped pairs are not logged individually; see the final summary.")

    def __call__(self, batch: Mapping[str, list], rank: int | None = None) -> dict[str, Any]:
        """Label one batch (a dict of column lists); returns the three new columns."""
        missing = [c for c in (CAPTION_COLUMN, *IMAGE_COLUMNS) if c not in batch]
        if missing:
            raise KeyError(
                f"The preference set lacks column(s) {missing}; expected {CAPTION_COLUMN!r}, "
                f"{IMAGE_COLUMNS[0]!r}, {IMAGE_COLUMNS[1]!r} (Pick-a-Pic layout)."
            )
        self._select_device(rank)
        captions = batch[CAPTION_COLUMN]
        # Read the columns here: datasets' LazyBatch formats on first access and is not thread-safe.
        image_cells = [batch[column] for column in IMAGE_COLUMNS]
        size = len(captions)
        rewards = np.full((2, size), np.nan, dtype=np.float32)
        valid = np.zeros(size, dtype=bool)

        def decode(row: int):
            caption = captions[row]
            if not isinstance(caption, str):
                return f"caption is {type(caption).__name__}, not a string"
            try:
                pair = [load_image(cells[row]) for cells in image_cells]
            except UnreadableImageError as error:
                return f"{error} (caption {caption[:60]!r})"
            empty = [f"{image.width}x{image.height}" for image in pair if image.width < 1 or image.height < 1]
            return f"zero-size image ({empty[0]}) (caption {caption[:60]!r})" if empty else pair

        rows, images, prompts = [], [], []
        decoded = map_in_threads(decode, range(size), self.reward_model.preprocess_threads)
        for row, pair in enumerate(decoded):
            if isinstance(pair, str):
                self._report(pair)
                continue
            rows.append(row)
            images.extend(pair)
            prompts.extend([captions[row], captions[row]])

        if rows:
            scores = self.reward_model.score(images, prompts).detach().float().cpu().numpy()
            self.num_score_calls += 1
            pair_scores = scores.reshape(len(rows), 2)
            finite = np.isfinite(pair_scores).all(axis=1)
            for row, score, ok in zip(rows, pair_scores, finite):
                if ok:
                    rewards[:, row] = score
                    valid[row] = True
                else:
                    self._report(f"reward model returned a non-finite score {score.tolist()}")
        self.num_pairs += size
        return {REWARD_COLUMNS[0]: rewards[0], REWARD_COLUMNS[1]: rewards[1], VALID_COLUMN: valid}


def summarize_labels(dataset) -> dict[str, int]:
    """Counts from a labelled dataset (works whatever process or cache produced it):
    ``{"num_pairs", "num_valid_pairs", "num_invalid_pairs"}``."""
    valid = np.asarray(dataset.select_columns([VALID_COLUMN]).with_format("numpy")[VALID_COLUMN], dtype=bool)
    return {
        "num_pairs": int(valid.size),
        "num_valid_pairs": int(valid.sum()),
        "num_invalid_pairs": int((~valid).sum()),
    }
