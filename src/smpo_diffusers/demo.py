"""The embedded default behind ``--demo``: a tiny in-process pipeline and a generated, reward-labelled
preference set, built on the fly (no downloads) with the library's ordinary save/label code paths."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["build_demo_inputs", "colourfulness_reward"]


def colourfulness_reward(images, prompts) -> np.ndarray:
    """A smooth programmatic preference: mean HSV saturation of the image, in [0, 1] (higher = preferred).

    The generated demo pairs draw the preferred image with a saturated shape, so this reward mostly agrees
    with the human-style ``label_0`` while giving near-ties a probability close to 0.5.
    """
    scores = []
    for image in images:
        hsv = np.asarray(image.convert("HSV"), dtype=np.float32) / 255.0
        scores.append(float(hsv[..., 1].mean()))
    return np.asarray(scores, dtype=np.float32)


def build_demo_inputs(folder: str, family: str = "sdxl", num_pairs: int = 64, seed: int = 0) -> tuple[str, str]:
    """Write ``folder/base-model-<family>-<seed>`` (a tiny SD or SDXL pipeline with random weights drawn from
    ``seed``) and ``folder/preferences-<family>-<num_pairs>-<seed>`` (a labelled ``save_to_disk`` set with
    ``reward_stats.json``). Reuses them when already built with the same settings."""
    from .rewards import (
        CallableRewardModel,
        RewardLabeler,
        compute_reward_statistics,
        reward_features,
        save_reward_statistics,
    )
    from .testing import make_preference_dataset, save_tiny_pipeline
    import datasets

    if family not in ("sd", "sdxl"):
        raise ValueError(f"family must be 'sd' or 'sdxl', got {family!r}")
    tag = f"{family}-{num_pairs}-{seed}"
    model_dir = os.path.join(folder, f"base-model-{family}-{seed}")
    dataset_dir = os.path.join(folder, f"preferences-{tag}")
    if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
        save_tiny_pipeline(model_dir, kind=family, seed=seed)
    if not os.path.isfile(os.path.join(dataset_dir, "reward_stats.json")):
        raw = make_preference_dataset(num_pairs=num_pairs, seed=seed)
        labeler = RewardLabeler(CallableRewardModel(colourfulness_reward, name="colourfulness"))
        features = datasets.Features({**raw.features, **reward_features()})
        labelled = raw.map(labeler, batched=True, batch_size=16, features=features, load_from_cache_file=False)
        labelled.save_to_disk(dataset_dir)
        save_reward_statistics(dataset_dir, compute_reward_statistics(labelled, reward_model="colourfulness"))
    return model_dir, dataset_dir
