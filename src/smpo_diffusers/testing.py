"""Tiny, deterministic components for tests and demos (seeded, no network).

Everything here is built in-process from fixed configurations and a seed:

* :func:`tiny_clip_tokenizer` - a CLIP BPE tokenizer over a small local vocabulary.
* :func:`tiny_sd_components` / :func:`tiny_sdxl_components` - keyword arguments for
  ``diffusers.StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` with tiny models.
  Default resolution is :data:`TINY_RESOLUTION` (32 px); the VAE downsamples by
  :data:`TINY_VAE_SCALE_FACTOR` (4), so latents are ``(4, 8, 8)``.
* :func:`save_tiny_pipeline` - writes such a pipeline to disk in the ordinary Diffusers layout.
* :func:`add_to_hub_cache` - files a saved pipeline under a Hub id and revision in a local Hub cache, so that
  ``from_pretrained(repo_id, revision=..., cache_dir=...)`` reads it offline.
* :func:`tiny_clip_model` - a tiny ``CLIPModel`` + ``CLIPProcessor`` (reward-model stand-in).
* :func:`make_preference_dataset` - a synthetic preference set in the Pick-a-Pic v2 layout.
"""

from __future__ import annotations

import io
import json
import os
import string
import tempfile

import numpy as np

TINY_RESOLUTION = 32
"""Default image height/width (pixels) of the tiny SD and SDXL pipelines."""

TINY_VAE_SCALE_FACTOR = 4
"""Spatial downsampling factor of the tiny VAE (3 blocks -> 2**2)."""

TINY_LATENT_CHANNELS = 4

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Colour name -> RGB (0..255). Used for the synthetic images and their captions.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "pink": (245, 120, 180),
    "cyan": (30, 210, 220),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (120, 70, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

CAPTION_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "background", "photo", "picture",
    "small", "large", "big", "bright", "dark", "shape",
) + tuple(COLOURS) + SHAPES
"""Words that the tiny tokenizer encodes as single tokens (covers every generated caption)."""

SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
)
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
    sample_max_value=1.0,
    skip_prk_steps=True,
)

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _scheduler_with_full_config(scheduler_class, config: dict, prediction_type: str):
    """Instantiate ``scheduler_class`` from ``config`` and keep the keys it does not take in its
    saved config too (as the released SD 1.5 / SDXL ``scheduler_config.json`` files do), so that a
    different scheduler class loaded from the same folder (e.g. ``DDPMScheduler`` with
    ``clip_sample``) sees the real values rather than its own defaults."""
    import inspect

    accepted = set(inspect.signature(scheduler_class.__init__).parameters)
    scheduler = scheduler_class(
        **{k: v for k, v in config.items() if k in accepted}, prediction_type=prediction_type
    )
    scheduler.register_to_config(**{k: v for k, v in config.items() if k not in accepted})
    return scheduler


_IMAGE_FORMATS = ("JPEG", "PNG")


# ----------------------------------------------------------------------------- tokenizer


def _bpe_segment(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to ``pieces`` until none applies."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        applicable = [(rank, i) for rank, i in pairs if rank is not None]
        if not applicable:
            break
        _, i = min(applicable)
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _tiny_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary: all printable ASCII characters (plain and with ``</w>``), one
    token per word, then the two CLIP special tokens last.

    Words are added in order; each word is first segmented with the merges so far, then merges
    joining its pieces left to right are appended. Appended merges rank below all earlier ones, so
    every earlier word still ends as one token, and so does the new one."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    chars = [chr(c) for c in range(33, 127)]  # printable ASCII maps to itself in byte-level BPE
    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe_segment(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        current = pieces[0]
        for piece in pieces[1:]:
            ranks.setdefault((current, piece), len(ranks))
            current = current + piece
            add(current)
    add(BOS_TOKEN)
    add(EOS_TOKEN)
    merges = sorted(ranks, key=ranks.__getitem__)
    return vocab, merges


def pil_clip_image_processor(**options):
    """A CLIP image processor that works on PIL/numpy (no torchvision) on every supported transformers:
    ``CLIPImageProcessorPil`` on transformers >= 5 (its plain ``CLIPImageProcessor`` needs torchvision there),
    ``CLIPImageProcessor`` before. ``options``: the processor's arguments (size, crop_size, image_mean, ...)."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(**options)


def write_slow_tokenizer_files(tokenizer, folder: str) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of a (fast) CLIP tokenizer into ``folder``, beside the
    ``tokenizer.json`` that ``save_pretrained`` writes: transformers 4.x builds its ``CLIPTokenizer`` from these two
    files, transformers >= 5 from ``tokenizer.json`` alone, so a folder holding all three loads with both."""
    if not hasattr(tokenizer, "backend_tokenizer"):  # a transformers 4.x slow tokenizer: its own two files
        tokenizer.save_vocabulary(folder)
        return
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    _write_bpe_files(folder, model["vocab"], [merge if isinstance(merge, str) else " ".join(merge)
                                              for merge in model["merges"]])


def _write_bpe_files(folder: str, vocab: dict[str, int], merges: list[str]) -> None:
    """``vocab.json`` and ``merges.txt`` (``"left right"`` pairs, highest priority first) as CLIP's tokenizer
    reads them."""
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges))


def tiny_clip_tokenizer(vocab_words: list[str] | None = None, model_max_length: int = 77):
    """Build a ``transformers.CLIPTokenizer`` over a tiny local vocabulary.

    Args:
        vocab_words: extra lowercase words (ASCII letters/digits) to encode as single tokens, on top
            of :data:`CAPTION_WORDS`. Any other text still tokenizes, BPE falling back to characters.
        model_max_length: padding/truncation length (77 as in CLIP).

    Returns:
        A tokenizer with ``<|startoftext|>`` as BOS and ``<|endoftext|>`` as EOS/PAD/UNK; it
        round-trips through ``save_pretrained`` + ``CLIPTokenizer``/``AutoTokenizer.from_pretrained``.
    """
    from transformers import CLIPTokenizer

    if model_max_length < 2:
        raise ValueError(f"model_max_length must be >= 2 (BOS + EOS), got {model_max_length}.")
    allowed = set(string.ascii_lowercase + string.digits)
    words = list(CAPTION_WORDS)
    for word in vocab_words or []:
        if not word or not set(word) <= allowed:
            raise ValueError(
                f"vocab_words entries must be non-empty lowercase ASCII letters/digits, got {word!r}."
            )
        if word not in words:
            words.append(word)
    vocab, merges = _tiny_vocab_and_merges(words)
    # through files: transformers 4.x takes only file paths, 5.x also in-memory vocabularies
    with tempfile.TemporaryDirectory() as folder:
        _write_bpe_files(folder, vocab, [f"{left} {right}" for left, right in merges])
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


# ----------------------------------------------------------------------------- models


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}.")


def _tiny_text_config(tokenizer, *, hidden_act: str, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(seed: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    import torch

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=TINY_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def _tiny_unet(seed: int, cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    import torch

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // TINY_VAE_SCALE_FACTOR,
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        norm_num_groups=16,
        **extra,
    )


def tiny_sd_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Keyword arguments for ``StableDiffusionPipeline(**components, requires_safety_checker=False)``.

    Tiny SD-1.5-shaped models (text hidden size 32, UNet channels (32, 64), VAE factor 4), a
    ``PNDMScheduler`` with the real SD 1.5 config and the given ``prediction_type``, and
    ``safety_checker``/``feature_extractor``/``image_encoder`` set to ``None``. Each model is built
    right after ``torch.manual_seed(seed)``, so equal seeds give equal weights.
    """
    import torch
    from diffusers import PNDMScheduler
    from transformers import CLIPTextModel

    _check_prediction_type(prediction_type)
    tokenizer = tiny_clip_tokenizer()
    unet = _tiny_unet(seed, cross_attention_dim=32)
    vae = _tiny_vae(seed, scaling_factor=0.18215)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden_act="quick_gelu"))
    scheduler = _scheduler_with_full_config(PNDMScheduler, SD15_SCHEDULER_CONFIG, prediction_type)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_sdxl_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Keyword arguments for ``StableDiffusionXLPipeline(**components)``.

    Two tiny text encoders (hidden 32 each; ``text_encoder_2`` with projection 32), a UNet with
    ``addition_embed_type="text_time"`` (``addition_time_embed_dim=8``, so
    ``projection_class_embeddings_input_dim = 8 * 6 + 32 = 80``) and ``cross_attention_dim = 64``,
    the tiny VAE (factor 4, SDXL scaling factor 0.13025) and an ``EulerDiscreteScheduler`` with
    SDXL's config and the given ``prediction_type``. ``image_encoder``/``feature_extractor`` are None.
    """
    import torch
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    _check_prediction_type(prediction_type)
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    text_config = _tiny_text_config(tokenizer, hidden_act="quick_gelu")
    text_config_2 = _tiny_text_config(tokenizer_2, hidden_act="gelu", projection_dim=32)
    addition_time_embed_dim = 8
    unet = _tiny_unet(
        seed,
        cross_attention_dim=text_config.hidden_size + text_config_2.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=addition_time_embed_dim * 6 + text_config_2.projection_dim,
        transformer_layers_per_block=1,
        use_linear_projection=True,
    )
    vae = _tiny_vae(seed, scaling_factor=0.13025)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
    scheduler = _scheduler_with_full_config(EulerDiscreteScheduler, SDXL_SCHEDULER_CONFIG, prediction_type)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd_pipeline(kind: str = "sdxl", seed: int = 0, prediction_type: str = "epsilon"):
    """Construct the tiny ``StableDiffusionXLPipeline`` (``kind="sdxl"``) or
    ``StableDiffusionPipeline`` (``kind="sd"``) from the components above."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sdxl":
        return StableDiffusionXLPipeline(
            **tiny_sdxl_components(seed, prediction_type), add_watermarker=False
        )
    if kind == "sd":
        return StableDiffusionPipeline(
            **tiny_sd_components(seed, prediction_type), requires_safety_checker=False
        )
    raise ValueError(f"kind must be 'sdxl' or 'sd', got {kind!r}.")


def save_tiny_pipeline(
    path: str | os.PathLike, kind: str = "sdxl", seed: int = 0, prediction_type: str = "epsilon"
) -> str:
    """Build the tiny pipeline (see :func:`tiny_sd_pipeline`) and save it to ``path`` with
    safetensors in the ordinary Diffusers folder layout (``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/`` ..., ``model_index.json``). Returns ``str(path)``."""
    pipe = tiny_sd_pipeline(kind=kind, seed=seed, prediction_type=prediction_type)
    path = str(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def add_to_hub_cache(folder: str | os.PathLike, cache_dir: str | os.PathLike, repo_id: str, commit: str,
                     refs: tuple[str, ...] = ("main",)) -> str:
    """Copy a saved pipeline ``folder`` into ``cache_dir`` as the snapshot of model ``repo_id`` at ``commit``
    (40 hex digits), with each of ``refs`` (branch or tag names) pointing at it: the layout
    ``huggingface_hub`` writes when it downloads, read without network under ``HF_HUB_OFFLINE=1``. Files a
    download would have looked for and not found (a tokenizer folder's ``config.json``) are recorded as
    absent, as the Hub cache does. Returns the snapshot folder."""
    import shutil

    repo_folder = os.path.join(str(cache_dir), "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo_folder, "snapshots", commit)
    shutil.copytree(str(folder), snapshot)
    os.makedirs(os.path.join(repo_folder, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo_folder, "refs", ref), "w") as handle:
            handle.write(commit)
    for name in os.listdir(snapshot):
        if name.startswith("tokenizer") and not os.path.exists(os.path.join(snapshot, name, "config.json")):
            os.makedirs(os.path.join(repo_folder, ".no_exist", commit, name), exist_ok=True)
            open(os.path.join(repo_folder, ".no_exist", commit, name, "config.json"), "w").close()
    return snapshot


def tiny_clip_model(seed: int = 0):
    """A tiny ``CLIPModel`` and matching ``CLIPProcessor`` (reward-model stand-in, e.g. PickScore).

    Text and vision towers have hidden size 32; images are 32x32 with 8x8 patches; the joint
    embedding has 16 dimensions. The processor resizes/crops to 32 px and normalises with the
    OpenAI CLIP mean/std. Both save to one folder and load with ``AutoModel``/``AutoProcessor``.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    tokenizer = tiny_clip_tokenizer()
    text_config = _tiny_text_config(tokenizer, hidden_act="quick_gelu", projection_dim=16).to_dict()
    vision_config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_RESOLUTION,
        patch_size=8,
        num_channels=3,
        projection_dim=16,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = pil_clip_image_processor(
        size={"shortest_edge": TINY_RESOLUTION},
        crop_size={"height": TINY_RESOLUTION, "width": TINY_RESOLUTION},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


# ----------------------------------------------------------------------------- preference data


def _saturate(rgb: tuple[int, int, int], saturation: float) -> tuple[int, int, int]:
    """Blend ``rgb`` towards its grey level: saturation 1 keeps it, 0 gives grey."""
    grey = sum(rgb) / 3.0
    return tuple(int(round(grey + saturation * (c - grey))) for c in rgb)


def _draw_picture(
    size: int,
    shape: str,
    colour: tuple[int, int, int],
    background: tuple[int, int, int],
    centre: tuple[float, float],
    radius: float,
):
    """RGB ``size`` x ``size`` PIL image: ``shape`` of half-width ``radius`` px at ``centre`` (px)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = centre
    r = radius
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:  # pragma: no cover - shapes come from SHAPES
        raise ValueError(f"unknown shape {shape!r}")
    return image


def _scene_from_caption(caption: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(shape, shape colour, background colour) named by ``caption``; unnamed parts drawn from rng.

    The first colour word is the shape's colour, the second the background's; the first shape
    word is the shape."""
    words = [w.strip(".,;:!?") for w in caption.lower().split()]
    named_colours = [w for w in words if w in COLOURS]
    named_shapes = [w for w in words if w in SHAPES]
    names = list(COLOURS)
    shape = named_shapes[0] if named_shapes else SHAPES[int(rng.integers(len(SHAPES)))]
    colour = named_colours[0] if named_colours else names[int(rng.integers(len(names)))]
    if len(named_colours) > 1:
        background = named_colours[1]
    else:
        others = [n for n in names if n != colour]
        background = others[int(rng.integers(len(others)))]
    return shape, colour, background


def encode_image(image, image_format: str = "PNG", **save_kwargs) -> bytes:
    """A PIL image as the bytes of an image file (``PIL.Image.save`` options pass through)."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_kwargs)
    return buffer.getvalue()


def make_preference_dataset(
    num_pairs: int = 16,
    seed: int = 0,
    image_size: int = 32,
    tie_fraction: float = 0.125,
    image_format: str = "JPEG",
    captions: list[str] | None = None,
):
    """Synthetic preference pairs in the Pick-a-Pic v2 layout, as a ``datasets.Dataset``.

    Columns: ``caption`` (str), ``jpg_0``/``jpg_1`` (encoded image bytes, ``Value("binary")``),
    ``label_0`` (1.0: image 0 preferred, 0.0: image 1 preferred, 0.5: tie) and
    ``label_1 = 1 - label_0``.

    Each pair shows the caption's coloured shape on its background twice, with random position,
    size and saturation. In a decided pair the preferred image is fully saturated, large and near
    the centre; the other is desaturated, smaller and off-centre (so a reward model can learn the
    preference); which side holds the preferred image is random. Ties draw both images from the
    preferred-image ranges. Exactly ``round(num_pairs * tie_fraction)`` pairs are ties (Python
    ``round``).

    Args:
        num_pairs: number of rows (>= 1).
        seed: seed of the single ``numpy.random.Generator`` used; equal seeds give byte-identical data.
        image_size: height and width of every image in pixels (>= 8).
        tie_fraction: fraction of tied pairs, in [0, 1].
        image_format: ``"JPEG"`` or ``"PNG"``.
        captions: optional ``num_pairs`` captions. Colour/shape words in them (see :data:`COLOURS`,
            :data:`SHAPES`) choose what is drawn; missing parts are drawn at random. By default
            captions read ``"a {colour} {shape} on a {background} background"``.
    """
    import datasets

    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}.")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}.")
    if not 0.0 <= tie_fraction <= 1.0:
        raise ValueError(f"tie_fraction must be in [0, 1], got {tie_fraction}.")
    if image_format not in _IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {_IMAGE_FORMATS}, got {image_format!r}.")
    if captions is not None:
        captions = list(captions)
        if len(captions) != num_pairs:
            raise ValueError(
                f"captions has {len(captions)} entries but num_pairs={num_pairs}; pass one caption per pair."
            )
        if not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError("captions must be non-empty strings.")

    rng = np.random.default_rng(seed)
    num_ties = int(round(num_pairs * tie_fraction))
    is_tie = np.zeros(num_pairs, dtype=bool)
    is_tie[rng.choice(num_pairs, size=num_ties, replace=False)] = True

    def good_view() -> tuple[tuple[float, float], float, float]:
        centre = tuple(image_size * (0.5 + rng.uniform(-0.08, 0.08, size=2)))
        return centre, image_size * rng.uniform(0.30, 0.40), rng.uniform(0.9, 1.0)

    def poor_view() -> tuple[tuple[float, float], float, float]:
        offset = rng.choice([-1.0, 1.0], size=2) * rng.uniform(0.12, 0.22, size=2)
        centre = tuple(image_size * (0.5 + offset))
        return centre, image_size * rng.uniform(0.15, 0.25), rng.uniform(0.1, 0.45)

    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for index in range(num_pairs):
        if captions is None:
            shape, colour, background = _scene_from_caption("", rng)
            caption = f"a {colour} {shape} on a {background} background"
        else:
            caption = captions[index]
            shape, colour, background = _scene_from_caption(caption, rng)
        if is_tie[index]:
            views = [good_view(), good_view()]
            label_0 = 0.5
        else:
            views = [good_view(), poor_view()]
            preferred_first = bool(rng.integers(2))
            if not preferred_first:
                views.reverse()
            label_0 = 1.0 if preferred_first else 0.0
        images = []
        for centre, radius, saturation in views:
            picture = _draw_picture(
                image_size,
                shape,
                _saturate(COLOURS[colour], saturation),
                COLOURS[background],
                centre,
                radius,
            )
            quality = {"quality": 95} if image_format == "JPEG" else {}
            images.append(encode_image(picture, image_format, **quality))
        rows["caption"].append(caption)
        rows["jpg_0"].append(images[0])
        rows["jpg_1"].append(images[1])
        rows["label_0"].append(label_0)
        rows["label_1"].append(1.0 - label_0)

    features = datasets.Features(
        {
            "caption": datasets.Value("string"),
            "jpg_0": datasets.Value("binary"),
            "jpg_1": datasets.Value("binary"),
            "label_0": datasets.Value("float64"),
            "label_1": datasets.Value("float64"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


__all__ = [
    "CAPTION_WORDS",
    "COLOURS",
    "SHAPES",
    "SD15_SCHEDULER_CONFIG",
    "SDXL_SCHEDULER_CONFIG",
    "TINY_RESOLUTION",
    "TINY_VAE_SCALE_FACTOR",
    "add_to_hub_cache",
    "encode_image",
    "make_preference_dataset",
    "pil_clip_image_processor",
    "save_tiny_pipeline",
    "tiny_clip_model",
    "tiny_clip_tokenizer",
    "tiny_sd_components",
    "tiny_sd_pipeline",
    "tiny_sdxl_components",
    "write_slow_tokenizer_files",
]
