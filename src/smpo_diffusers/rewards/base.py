"""The reward-model interface, a wrapper for user callables, and the normalised ensemble."""

from __future__ import annotations

import abc
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

from .images import crop_to_aspect_ratio, to_rgb

logger = logging.getLogger(__name__)

__all__ = ["CallableRewardModel", "EnsembleRewardModel", "RewardModel", "map_in_threads", "split_contiguous"]

_T = TypeVar("_T")
_R = TypeVar("_R")


def split_contiguous(items: Sequence[_T], parts: int) -> list[list[_T]]:
    """Split ``items`` into at most ``parts`` contiguous, non-empty, near-equal groups (order kept)."""
    items = list(items)
    parts = max(1, min(parts, len(items)))
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]


def map_in_threads(fn: Callable[[_T], _R], items: Sequence[_T], threads: int) -> list[_R]:
    """``[fn(x) for x in items]``, run in up to ``threads`` threads (PIL decoding/resizing and numpy
    release the GIL, so CPU image work scales with threads). Results keep the input order."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


class RewardModel(abc.ABC):
    """Scores (image, prompt) pairs: ``score(images, prompts) -> (N,)`` float32 tensor.

    Subclasses implement :meth:`_score_batch` for one chunk of at most ``max_batch_size`` pairs;
    :meth:`score` checks inputs, converts images to RGB, chunks, disables autograd and concatenates.
    Higher scores mean "more preferred". ``name`` identifies the backend in statistics and logs.
    ``preprocess_threads`` is how many threads the backend (and :class:`RewardLabeler`, for decoding)
    may use for CPU image work; it never changes the scores.
    """

    max_aspect_ratio: float | None = None
    """When set, :meth:`score` centre-crops an image whose long side exceeds this many times its short side to
    that ratio (:func:`~smpo_diffusers.rewards.images.crop_to_aspect_ratio`). Set it on backends whose processor
    resizes the short side and centre-crops a square: images within the ratio score exactly as before, longer ones
    on the central part the processor keeps anyway, and the resized image stays small."""

    def __init__(
        self,
        name: str,
        device: torch.device | str = "cpu",
        max_batch_size: int | None = 64,
        preprocess_threads: int = 1,
    ):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None (no chunking), got {max_batch_size}.")
        if preprocess_threads < 1:
            raise ValueError(f"preprocess_threads must be >= 1, got {preprocess_threads}.")
        self.name = name
        self._device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.preprocess_threads = preprocess_threads

    def _preprocess(self, fn: Callable[[list], torch.Tensor], images: list) -> torch.Tensor:
        """``fn(images)`` for a batch-preprocessing ``fn`` (images -> stacked tensor), computed on
        contiguous groups in ``preprocess_threads`` threads and concatenated (same result)."""
        groups = split_contiguous(images, self.preprocess_threads)
        return torch.cat(map_in_threads(fn, groups, self.preprocess_threads))

    @property
    def device(self) -> torch.device:
        """Device holding the model's weights and the returned scores."""
        return self._device

    def to(self, device: torch.device | str) -> "RewardModel":
        """Move the model to ``device`` (in place) and return ``self``."""
        self._device = torch.device(device)
        return self

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Rewards of ``images[i]`` for ``prompts[i]``.

        Args:
            images: N PIL images (any mode; converted to RGB).
            prompts: N strings.

        Returns:
            float32 tensor of shape ``(N,)`` on :attr:`device`, computed without autograd in chunks
            of ``max_batch_size`` pairs (None: one chunk).
        """
        images = list(images)
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise ValueError(
                f"score() got {len(images)} images but {len(prompts)} prompts; pass one prompt per image."
            )
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {type(prompt).__name__}.")
        images = self._bounded([to_rgb(image) for image in images])
        if not images:
            return torch.empty(0, dtype=torch.float32, device=self.device)
        step = self.max_batch_size or len(images)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), step):
                chunk_images = images[start : start + step]
                scores = torch.as_tensor(self._score_batch(chunk_images, prompts[start : start + step]))
                if scores.shape != (len(chunk_images),):
                    raise ValueError(
                        f"Reward model {self.name!r} returned shape {tuple(scores.shape)} for "
                        f"{len(chunk_images)} images; expected ({len(chunk_images)},)."
                    )
                chunks.append(scores.to(device=self.device, dtype=torch.float32))
        return torch.cat(chunks)

    def _bounded(self, images: list) -> list:
        """``images`` cropped to :attr:`max_aspect_ratio` (as they are when None); a zero-size image raises
        ``ValueError``."""
        for image in images:
            if image.width < 1 or image.height < 1:
                raise ValueError(f"Reward model {self.name!r} got a zero-size image ({image.width}x{image.height}).")
        if self.max_aspect_ratio is None:
            return images
        return [crop_to_aspect_ratio(image, self.max_aspect_ratio) for image in images]

    @abc.abstractmethod
    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Scores of one chunk: RGB images and their prompts -> ``(len(images),)`` tensor."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r})"


class CallableRewardModel(RewardModel):
    """Wrap ``fn(images, prompts) -> N scores`` (list, numpy array or tensor) as a reward model.

    ``max_batch_size=None`` (default) hands every ``score`` call to ``fn`` in one piece;
    ``preprocess_threads`` only sets the labeler's decoding threads (``fn`` does its own work).
    """

    def __init__(
        self,
        fn: Callable[[list[Image.Image], list[str]], Sequence[float] | np.ndarray | torch.Tensor],
        name: str | None = None,
        device: torch.device | str = "cpu",
        max_batch_size: int | None = None,
        preprocess_threads: int = 1,
    ):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
        super().__init__(
            name or getattr(fn, "__name__", "callable"), device, max_batch_size, preprocess_threads
        )
        self.fn = fn

    def _score_batch(self, images, prompts):
        scores = self.fn(images, prompts)
        if not isinstance(scores, torch.Tensor):
            scores = torch.as_tensor(np.asarray(scores, dtype=np.float32))
        if scores.ndim == 2 and scores.shape[1] == 1:  # accept (N, 1) column outputs
            scores = scores[:, 0]
        return scores


class EnsembleRewardModel(RewardModel):
    """Weighted mean of per-model z-scores, a model of "varied preferences".

    For member ``m`` with statistics ``(mean_m, std_m)`` and weight ``w_m``::

        ensemble(x, c) = sum_m w_m * (r_m(x, c) - mean_m) / std_m  /  sum_m w_m

    The statistics are fixed numbers, never re-estimated per batch, so a pair's score does not
    depend on what else is in its batch. Give them as ``statistics=[{"mean": .., "std": ..}, ...]``
    (one per member, in order) or estimate them with :meth:`calibrate` on a sample of the data
    (population mean and std, ``ddof=0``, over the sample's scores). Scoring before either raises.
    """

    def __init__(
        self,
        models: Sequence[RewardModel],
        weights: Sequence[float] | None = None,
        statistics: Sequence[dict] | None = None,
        name: str | None = None,
    ):
        models = list(models)
        if len(models) < 2:
            raise ValueError(f"An ensemble needs at least 2 reward models, got {len(models)}.")
        if weights is None:
            weights = [1.0] * len(models)
        weights = [float(w) for w in weights]
        if (
            len(weights) != len(models)
            or any(not math.isfinite(w) or w < 0 for w in weights)
            or sum(weights) <= 0
        ):
            raise ValueError(
                f"weights must be {len(models)} finite non-negative numbers with a positive sum, "
                f"got {weights}."
            )
        super().__init__(
            name or "+".join(m.name for m in models),
            models[0].device,
            max_batch_size=None,
            preprocess_threads=max(m.preprocess_threads for m in models),
        )
        self.models = models
        self.weights = weights
        self.statistics: list[dict] | None = None
        if statistics is not None:
            self.set_statistics(statistics)

    def to(self, device):
        for model in self.models:
            model.to(device)
        return super().to(device)

    def set_statistics(self, statistics: Sequence[dict]) -> None:
        """Set per-member ``{"mean": float, "std": float}`` (std finite and > 0)."""
        statistics = [dict(s) for s in statistics]
        if len(statistics) != len(self.models):
            raise ValueError(
                f"Expected {len(self.models)} statistics entries (one per member), got {len(statistics)}."
            )
        for model, stats in zip(self.models, statistics):
            mean, std = float(stats["mean"]), float(stats["std"])
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(
                    f"Ensemble member {model.name!r} has mean={mean}, std={std}; std must be finite and > 0 "
                    "(all calibration scores equal?). Calibrate on more varied data or pass statistics."
                )
            stats.update(name=model.name, mean=mean, std=std)
        self.statistics = statistics

    def member_scores(self, images, prompts) -> torch.Tensor:
        """Raw scores of every member: ``(num_models, N)`` float32 on :attr:`device`."""
        return torch.stack([m.score(images, prompts).to(self.device) for m in self.models])

    def calibrate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[dict]:
        """Estimate and set each member's mean/std (``ddof=0``) from the scores of a sample. Images that any
        member scores non-finite are left out (counted in a warning), as the labeller leaves out their pairs.

        Returns the statistics list (also stored in :attr:`statistics`)."""
        raw = self.member_scores(images, prompts).double()
        finite = torch.isfinite(raw).all(dim=0)
        if not finite.all():
            logger.warning("ensemble calibration: %d of %d images have a non-finite member score and are left out",
                           int((~finite).sum()), raw.shape[1])
            raw = raw[:, finite]
        if raw.shape[1] < 2:
            raise ValueError("calibrate() needs at least 2 images that every member scores finite; calibrate on "
                             "more (readable) images or pass statistics=[{'mean': .., 'std': ..}, ...].")
        stats = [{"mean": float(row.mean()), "std": float(row.std(unbiased=False))} for row in raw]
        self.set_statistics(stats)
        return self.statistics

    def _score_batch(self, images, prompts):
        if self.statistics is None:
            raise RuntimeError(
                "EnsembleRewardModel has no per-model statistics: call calibrate(images, prompts) on a "
                "sample of the data or pass statistics=[{'mean': .., 'std': ..}, ...]."
            )
        raw = self.member_scores(images, prompts).double()
        mean = torch.tensor([s["mean"] for s in self.statistics], dtype=torch.float64, device=raw.device)
        std = torch.tensor([s["std"] for s in self.statistics], dtype=torch.float64, device=raw.device)
        weights = torch.tensor(self.weights, dtype=torch.float64, device=raw.device)
        z = (raw - mean[:, None]) / std[:, None]
        return (weights[:, None] * z).sum(0) / weights.sum()
