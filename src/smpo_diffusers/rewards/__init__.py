"""Reward models, the preference-labelling callback and reward statistics.

Typical use::

    from smpo_diffusers.rewards import RewardLabeler, load_reward_model, undecoded_images

    model = load_reward_model("pickscore", device="cuda", dtype="float16")
    labelled = undecoded_images(dataset).map(RewardLabeler(model), batched=True, batch_size=16)

or the resumable job ``label_dataset(LabelingArguments(...))`` behind ``examples/label_rewards.py``.
"""

from .base import CallableRewardModel, EnsembleRewardModel, RewardModel
from .clip import CLIPRewardModel, CLIPScoreRewardModel, PickScoreRewardModel, clip_embedding
from .images import UnreadableImageError, load_image, to_rgb
from ..data import load_preference_dataset
from .job import LabelingArguments, label_dataset
from .labeling import (CAPTION_COLUMN, IMAGE_COLUMNS, RewardLabeler, reward_features, summarize_labels,
                       undecoded_images)
from .optional import AestheticRewardModel, HPSv2RewardModel, ImageRewardRewardModel
from .registry import available_reward_models, load_reward_model, register_reward_model, resolve_dtype
from .statistics import (
    PICKSCORE_MAX,
    PICKSCORE_MIN,
    PICKSCORE_SCALE,
    REWARD_COLUMNS,
    REWARD_STATISTICS_FILENAME,
    VALID_COLUMN,
    compute_reward_statistics,
    labels_digest,
    load_reward_statistics,
    reward_scale_from_statistics,
    save_reward_statistics,
)

__all__ = [
    "AestheticRewardModel",
    "CAPTION_COLUMN",
    "CLIPRewardModel",
    "CLIPScoreRewardModel",
    "CallableRewardModel",
    "EnsembleRewardModel",
    "HPSv2RewardModel",
    "IMAGE_COLUMNS",
    "ImageRewardRewardModel",
    "LabelingArguments",
    "PICKSCORE_MAX",
    "PICKSCORE_MIN",
    "PICKSCORE_SCALE",
    "PickScoreRewardModel",
    "REWARD_COLUMNS",
    "REWARD_STATISTICS_FILENAME",
    "RewardLabeler",
    "RewardModel",
    "UnreadableImageError",
    "VALID_COLUMN",
    "available_reward_models",
    "clip_embedding",
    "compute_reward_statistics",
    "label_dataset",
    "labels_digest",
    "load_image",
    "load_preference_dataset",
    "load_reward_model",
    "load_reward_statistics",
    "register_reward_model",
    "resolve_dtype",
    "reward_features",
    "reward_scale_from_statistics",
    "save_reward_statistics",
    "summarize_labels",
    "undecoded_images",
    "to_rgb",
]
