"""Reward backends whose packages are optional: HPSv2, ImageReward and the LAION aesthetic predictor.

None of these packages is a dependency of smpo_diffusers. Selecting a backend whose package does
not import raises an ``ImportError`` naming the pip package to install. Each backend scores in
batches with the package's own network and preprocessing:

* ``hpsv2`` (pip ``hpsv2``): cosine similarity of HPSv2's normalised OpenCLIP ViT-H-14 embeddings.
* ``imagereward`` (pip ``image-reward``): ImageReward's BLIP + MLP score, standardised with the
  mean/std that the package ships (``(raw - mean) / std``).
* ``aesthetic`` (pip ``simple-aesthetics-predictor``): LAION aesthetic score (about 1-10) of the
  image alone; the prompt is ignored.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from .base import RewardModel
from .images import MAX_ASPECT_RATIO

logger = logging.getLogger(__name__)

__all__ = ["AestheticRewardModel", "HPSv2RewardModel", "ImageRewardRewardModel", "import_optional"]


def import_optional(module: str, pip_package: str, backend: str):
    """Import ``module`` or raise an ImportError that names ``pip install pip_package``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"The {backend!r} reward model needs the optional package {pip_package!r}, which could not be "
            f"imported ({error}). Install it with `pip install {pip_package}` or choose another "
            "--reward_model."
        ) from error


def _resolve_device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _no_processor(backend: str, processor_name_or_path) -> None:
    if processor_name_or_path is not None:
        raise ValueError(
            f"The {backend!r} reward model has its own preprocessing; do not pass a processor path."
        )


class HPSv2RewardModel(RewardModel):
    """HPSv2 / HPSv2.1: cosine similarity of normalised OpenCLIP ViT-H-14 embeddings.

    ``model_name_or_path`` is a local checkpoint file or a version, ``"v2.1"`` (default) or
    ``"v2.0"``, fetched from the ``xswu/HPSv2`` Hub repository with ``huggingface_hub``.
    """

    default_name = "hpsv2"
    checkpoint_files = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}

    def __init__(self, model, preprocess, tokenizer, name=None, max_batch_size=64, preprocess_threads=1):
        super().__init__(
            name or self.default_name, next(model.parameters()).device, max_batch_size, preprocess_threads
        )
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path=None,
        processor_name_or_path=None,
        *,
        device=None,
        dtype=None,
        cache_dir=None,
        max_batch_size=64,
        preprocess_threads=1,
        name=None,
    ):
        _no_processor("hpsv2", processor_name_or_path)
        open_clip = import_optional("hpsv2.src.open_clip", "hpsv2", "hpsv2")
        checkpoint = model_name_or_path or "v2.1"
        if not os.path.isfile(checkpoint):
            if checkpoint not in cls.checkpoint_files:
                raise ValueError(
                    "HPSv2 model_name_or_path must be a checkpoint file or one of "
                    f"{sorted(cls.checkpoint_files)}, "
                    f"got {checkpoint!r}."
                )
            import huggingface_hub

            checkpoint = huggingface_hub.hf_hub_download(
                "xswu/HPSv2", cls.checkpoint_files[checkpoint], cache_dir=cache_dir
            )
        model, _, preprocess = open_clip.create_model_and_transforms(
            "ViT-H-14",
            None,
            precision="amp",
            device="cpu",
            jit=False,
            force_quick_gelu=False,
            force_custom_text=False,
            force_patch_dropout=False,
            force_image_size=None,
            pretrained_image=False,
            image_mean=None,
            image_std=None,
            light_augmentation=True,
            aug_cfg={},
            output_dict=True,
            with_score_predictor=False,
            with_region_predictor=False,
        )
        state = torch.load(checkpoint, map_location="cpu")
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        model = model.to(device=_resolve_device(device), dtype=dtype or torch.float32)
        tokenizer = open_clip.get_tokenizer("ViT-H-14")
        return cls(
            model,
            preprocess,
            tokenizer,
            name=name,
            max_batch_size=max_batch_size,
            preprocess_threads=preprocess_threads,
        )

    def to(self, device):
        self.model.to(device)
        return super().to(device)

    def _score_batch(self, images, prompts):
        dtype = next(self.model.parameters()).dtype
        pixels = self._preprocess(lambda group: torch.stack([self.preprocess(i) for i in group]), images)
        pixels = pixels.to(self.device, dtype)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        image_features = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_features = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (image_features * text_features).sum(-1)


class ImageRewardRewardModel(RewardModel):
    """ImageReward v1.0: BLIP cross-attention text features -> MLP, standardised by the package's
    shipped mean/std. ``model_name_or_path``: ``"ImageReward-v1.0"`` (default) or a checkpoint file."""

    default_name = "imagereward"
    text_length = 35  # ImageReward's tokenizer length
    max_aspect_ratio = MAX_ASPECT_RATIO  # its BLIP preprocessing resizes the short side, then centre-crops

    def __init__(self, model, name=None, max_batch_size=64, preprocess_threads=1):
        super().__init__(
            name or self.default_name, next(model.parameters()).device, max_batch_size, preprocess_threads
        )
        self.model = model.eval()

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path=None,
        processor_name_or_path=None,
        *,
        device=None,
        dtype=None,
        cache_dir=None,
        max_batch_size=64,
        preprocess_threads=1,
        name=None,
    ):
        _no_processor("imagereward", processor_name_or_path)
        package = import_optional("ImageReward", "image-reward", "imagereward")
        device = _resolve_device(device)
        model = package.load(
            model_name_or_path or "ImageReward-v1.0", device=str(device), download_root=cache_dir
        )
        model = model.to(device=device, dtype=dtype or torch.float32)
        return cls(model, name=name, max_batch_size=max_batch_size, preprocess_threads=preprocess_threads)

    def to(self, device):
        self.model.to(device)
        self.model.device = torch.device(device)
        return super().to(device)

    def _score_batch(self, images, prompts):
        blip = self.model.blip
        dtype = next(self.model.parameters()).dtype
        pixels = self._preprocess(
            lambda group: torch.stack([self.model.preprocess(i) for i in group]), images
        )
        pixels = pixels.to(self.device, dtype)
        tokens = blip.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.text_length,
            return_tensors="pt",
        ).to(self.device)
        image_embeds = blip.visual_encoder(pixels)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text = blip.text_encoder(
            tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            return_dict=True,
        )
        raw = self.model.mlp(text.last_hidden_state[:, 0, :]).float()[:, 0]
        return (raw - self.model.mean) / self.model.std


class AestheticRewardModel(RewardModel):
    """LAION aesthetic predictor (CLIP ViT-L/14 image embedding -> linear/MLP head); ignores prompts.

    ``model_name_or_path`` defaults to the Hub checkpoint
    ``shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE``; its class is chosen from the
    name (``v1`` -> ``AestheticsPredictorV1``, ``relu`` -> ``AestheticsPredictorV2ReLU``, else
    ``AestheticsPredictorV2Linear``). The processor defaults to the model path.
    """

    default_name = "aesthetic"
    default_model_name_or_path = "shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
    max_aspect_ratio = MAX_ASPECT_RATIO  # a CLIP processor: short side resized, then centre-cropped

    def __init__(self, model, processor, name=None, max_batch_size=64, preprocess_threads=1):
        super().__init__(
            name or self.default_name, next(model.parameters()).device, max_batch_size, preprocess_threads
        )
        self.model = model.eval()
        self.processor = processor

    @staticmethod
    def predictor_class_name(model_name_or_path: str) -> str:
        lowered = os.path.basename(os.path.normpath(model_name_or_path)).lower()
        if "v1" in lowered:
            return "AestheticsPredictorV1"
        if "relu" in lowered:
            return "AestheticsPredictorV2ReLU"
        return "AestheticsPredictorV2Linear"

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path=None,
        processor_name_or_path=None,
        *,
        device=None,
        dtype=None,
        cache_dir=None,
        max_batch_size=64,
        preprocess_threads=1,
        name=None,
    ):
        package = import_optional("aesthetics_predictor", "simple-aesthetics-predictor", "aesthetic")
        from transformers import CLIPProcessor

        model_name_or_path = model_name_or_path or cls.default_model_name_or_path
        class_name = cls.predictor_class_name(model_name_or_path)
        predictor_class = getattr(package, class_name, None)
        if predictor_class is None:
            raise ImportError(
                f"aesthetics_predictor has no {class_name}; upgrade it with "
                "`pip install -U simple-aesthetics-predictor`."
            )
        model = predictor_class.from_pretrained(model_name_or_path, cache_dir=cache_dir)
        processor = CLIPProcessor.from_pretrained(
            processor_name_or_path or model_name_or_path, cache_dir=cache_dir
        )
        model = model.to(device=_resolve_device(device), dtype=dtype or torch.float32)
        return cls(
            model, processor, name=name, max_batch_size=max_batch_size, preprocess_threads=preprocess_threads
        )

    def to(self, device):
        self.model.to(device)
        return super().to(device)

    def _score_batch(self, images, prompts):
        dtype = next(self.model.parameters()).dtype
        pixels = self._preprocess(
            lambda group: self.processor(images=group, return_tensors="pt")["pixel_values"], images
        )
        pixels = pixels.to(self.device, dtype)
        logits = self.model(pixel_values=pixels).logits
        return logits.float().reshape(len(images))
