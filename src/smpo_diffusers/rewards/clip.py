"""CLIP dual-encoder rewards: PickScore and a plain CLIP score.

Both embed images and prompts with a ``transformers`` CLIP model (``get_image_features`` /
``get_text_features``), L2-normalise the embeddings in float32 and take their dot product, the
cosine similarity ``cos`` in ``[-1, 1]``. They differ only in the map from ``cos`` to a reward:

* :class:`PickScoreRewardModel`: ``reward = cos`` (raw cosine similarity, as the SmPO reference
  labelling used; PickScore's paper reports ``logit_scale.exp() * cos`` ~= ``100 * cos``, a
  constant factor that min-max normalisation removes).
* :class:`CLIPScoreRewardModel`: ``reward = 100 * max(cos, 0)``, the widespread CLIPScore
  convention of ``torchmetrics``/the CLIPScore paper (which used weight 2.5 instead of 100).
  Negative similarities all become 0, which creates ties; prefer PickScore for preference labels.
"""

from __future__ import annotations

import logging

import torch

from .base import RewardModel
from .images import MAX_ASPECT_RATIO

logger = logging.getLogger(__name__)

__all__ = ["CLIPRewardModel", "CLIPScoreRewardModel", "PickScoreRewardModel", "clip_embedding"]


def clip_embedding(output) -> torch.Tensor:
    """The projected embedding from ``get_image_features``/``get_text_features`` output.

    transformers 4.x returns the ``(N, D)`` tensor itself; transformers 5.x returns a
    ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the projected embedding."""
    if isinstance(output, torch.Tensor):
        return output
    for attribute in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, attribute, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(
        f"Cannot find an embedding in {type(output).__name__}; expected a tensor or an output with "
        "'pooler_output' (call get_*_features with return_dict=True)."
    )


class CLIPRewardModel(RewardModel):
    """Cosine similarity of normalised CLIP embeddings, mapped by :meth:`transform`.

    Args:
        model: a CLIP-style model with ``get_image_features(pixel_values=...)`` and
            ``get_text_features(input_ids=..., attention_mask=...)`` (e.g. ``CLIPModel``).
        processor: a processor whose ``images=`` call gives ``pixel_values`` and whose ``text=``
            call tokenises (e.g. ``CLIPProcessor``).
        name: backend name recorded in statistics.
        max_batch_size: images per forward pass.
        preprocess_threads: threads for the processor's CPU image work (identical results).

    Each chunk encodes every distinct prompt once (a pair's two images share their caption).
    Prompts longer than the text model's positions are truncated. An image more elongated than
    ``max_aspect_ratio`` (4:1) is centre-cropped to it first: the processor keeps only the central square of the
    short-side-resized image anyway, and a very thin image would make that resize huge.
    """

    max_aspect_ratio = MAX_ASPECT_RATIO

    default_name = "clip-cosine"
    default_model_name_or_path: str | None = None
    default_processor_name_or_path: str | None = None

    def __init__(
        self,
        model,
        processor,
        name: str | None = None,
        max_batch_size: int | None = 64,
        preprocess_threads: int = 1,
    ):
        for method in ("get_image_features", "get_text_features"):
            if not callable(getattr(model, method, None)):
                raise TypeError(
                    f"{type(model).__name__} has no {method}(); a CLIP reward needs a CLIP-style dual "
                    "encoder such as transformers.CLIPModel."
                )
        parameter = next(model.parameters())
        super().__init__(name or self.default_name, parameter.device, max_batch_size, preprocess_threads)
        self.model = model.eval()
        self.processor = processor
        self.max_text_length = self._max_text_length(model, processor)

    @staticmethod
    def _max_text_length(model, processor) -> int:
        lengths = []
        text_config = getattr(model.config, "text_config", None)
        if text_config is not None and getattr(text_config, "max_position_embeddings", None):
            lengths.append(int(text_config.max_position_embeddings))
        tokenizer = getattr(processor, "tokenizer", None)
        model_max = getattr(tokenizer, "model_max_length", None)
        if model_max and model_max < 1_000_000:  # transformers uses a huge sentinel when unset
            lengths.append(int(model_max))
        return min(lengths) if lengths else 77

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | None = None,
        processor_name_or_path: str | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cache_dir: str | None = None,
        max_batch_size: int | None = 64,
        preprocess_threads: int = 1,
        name: str | None = None,
    ) -> "CLIPRewardModel":
        """Load with ``AutoModel``/``AutoProcessor.from_pretrained``.

        The processor defaults to ``model_name_or_path`` when a model path is given, else to the
        backend's default processor. ``dtype`` defaults to float32; ``device`` to CUDA if available.
        """
        from transformers import AutoModel, AutoProcessor

        if model_name_or_path is None:
            model_name_or_path = cls.default_model_name_or_path
            processor_name_or_path = processor_name_or_path or cls.default_processor_name_or_path
        if model_name_or_path is None:
            raise ValueError(f"{cls.__name__} needs model_name_or_path (it has no default checkpoint).")
        processor_name_or_path = processor_name_or_path or model_name_or_path
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        logger.info(
            "Loading reward model %s (processor %s) on %s", model_name_or_path, processor_name_or_path, device
        )
        model = AutoModel.from_pretrained(model_name_or_path, cache_dir=cache_dir)
        processor = AutoProcessor.from_pretrained(processor_name_or_path, cache_dir=cache_dir)
        model = model.to(device=device, dtype=dtype or torch.float32)
        return cls(
            model, processor, name=name, max_batch_size=max_batch_size, preprocess_threads=preprocess_threads
        )

    def to(self, device):
        self.model.to(device)
        return super().to(device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def embed_images(self, images) -> torch.Tensor:
        """Unit-norm image embeddings, ``(N, D)`` float32 on :attr:`device`."""
        pixel_values = self._preprocess(
            lambda group: self.processor(images=group, return_tensors="pt")["pixel_values"], self._bounded(images)
        )
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        features = clip_embedding(self.model.get_image_features(pixel_values=pixel_values)).float()
        return torch.nn.functional.normalize(features, dim=-1)

    def embed_prompts(self, prompts) -> torch.Tensor:
        """Unit-norm text embeddings, ``(N, D)`` float32 on :attr:`device`."""
        tokens = self.processor(
            text=list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device) if "attention_mask" in tokens else None,
        )
        return torch.nn.functional.normalize(clip_embedding(features).float(), dim=-1)

    def cosine_similarity(self, images, prompts) -> torch.Tensor:
        """``cos(image_i, prompt_i)``, ``(N,)`` float32; each distinct prompt is encoded once."""
        unique_prompts = list(dict.fromkeys(prompts))
        position = {prompt: i for i, prompt in enumerate(unique_prompts)}
        index = torch.tensor([position[p] for p in prompts], device=self.device)
        text = self.embed_prompts(unique_prompts)[index]
        return (self.embed_images(images) * text).sum(-1)

    @staticmethod
    def transform(cosine: torch.Tensor) -> torch.Tensor:
        """Map cosine similarities to rewards (identity here)."""
        return cosine

    def _score_batch(self, images, prompts):
        return self.transform(self.cosine_similarity(images, prompts))


class PickScoreRewardModel(CLIPRewardModel):
    """PickScore: raw cosine similarity of PickScore_v1's normalised CLIP-H embeddings."""

    default_name = "pickscore"
    default_model_name_or_path = "yuvalkirstain/PickScore_v1"
    default_processor_name_or_path = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class CLIPScoreRewardModel(CLIPRewardModel):
    """CLIP score: ``100 * max(cos, 0)`` (the torchmetrics CLIPScore convention)."""

    default_name = "clip"
    default_model_name_or_path = "openai/clip-vit-large-patch14"
    default_processor_name_or_path = None  # the model's own processor

    @staticmethod
    def transform(cosine: torch.Tensor) -> torch.Tensor:
        return 100.0 * cosine.clamp(min=0.0)
