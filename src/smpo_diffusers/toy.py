"""The toy world: a tiny text-to-image model of coloured shapes that ships with the package, a smooth
programmatic reward, and preference pairs of the model's own generations labelled by that reward.

Everything is seeded and runs on one CPU thread:

* :func:`toy_captions` / :func:`toy_caption_split` - the 224 captions ``"a {colour} {shape} on a
  {background} background"`` (8 chromatic colours, 4 shapes), split into preference-training and
  held-out captions.
* :func:`draw_toy_image` - the training pictures: a flat shape on a flat background, the whole image
  desaturated by a random factor, so the world contains dull and vivid versions of every caption.
* :func:`build_toy_world` - trains a tiny ``AutoencoderKL`` (32 px -> latents ``(4, 8, 8)``) and a tiny
  text-conditioned ``UNet2DConditionModel`` (epsilon prediction, SD 1.5 noise schedule) under a frozen,
  randomly initialised tiny CLIP text encoder, and saves a ``StableDiffusionPipeline`` folder (SD 1.x
  layout, ``DDIMScheduler``, safetensors). The shipped copy is :data:`TOY_ASSETS_DIR`.
* :func:`build_toy_sdxl_world` - the same world in SDXL layout (two text encoders, pooled embedding,
  micro-conditioning; the SD world's VAE), a ``StableDiffusionXLPipeline`` folder. The shipped copy is
  :data:`TOY_SDXL_ASSETS_DIR`; ``examples/train_smpo_sdxl.py --demo`` trains on it.
* :func:`toy_reward_scores` / :class:`ToyRewardModel` - reward in [0, 1]: half vividness (mean HSV
  saturation), half prompt fidelity (colour distance of the shape and background regions to the
  named colours). Continuous, so pairs range from near-ties to clear wins.
* :func:`build_toy_preferences` - Pick-a-Pic-layout pairs of the toy pipeline's own generations,
  labelled through :class:`~smpo_diffusers.rewards.RewardLabeler`, with a noisy Bradley-Terry "human"
  ``label_0``; saved with ``save_to_disk`` plus ``reward_stats.json``.
* :func:`build_toy_demo_inputs` / :func:`run_toy_demo` - what ``--demo`` trains on (the world of the
  script's layout), and a before/after evaluation of a short SmPO LoRA run.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from pathlib import Path

import numpy as np
import torch

from .rewards.base import RewardModel
from .testing import COLOURS, SD15_SCHEDULER_CONFIG, SHAPES, _draw_picture, _saturate, write_slow_tokenizer_files

logger = logging.getLogger(__name__)

__all__ = [
    "TOY_ASSETS_DIR",
    "TOY_COLOURS",
    "TOY_LAYOUTS",
    "TOY_RESOLUTION",
    "TOY_SDXL_ASSETS_DIR",
    "TOY_SDXL_TIME_IDS",
    "TOY_SDXL_TRAINING_DEFAULTS",
    "TOY_SHAPES",
    "TOY_TRAINING_DEFAULTS",
    "ToyRewardModel",
    "build_toy_demo_inputs",
    "build_toy_preferences",
    "build_toy_sdxl_world",
    "build_toy_world",
    "check_toy_build_options",
    "colour_accuracy",
    "draw_toy_image",
    "evaluate_toy_model",
    "human_labels",
    "load_toy_pipeline",
    "nearest_palette_colour",
    "parse_toy_caption",
    "record_colour_accuracy",
    "run_toy_demo",
    "toy_caption_split",
    "toy_captions",
    "toy_model_path",
    "toy_reward_scores",
    "toy_training_defaults",
    "train_toy_model",
]

TOY_ASSETS_DIR = Path(__file__).resolve().parent / "toy_assets"
"""The shipped toy pipeline folder (``StableDiffusionPipeline.from_pretrained(TOY_ASSETS_DIR)``)."""
TOY_SDXL_ASSETS_DIR = Path(__file__).resolve().parent / "toy_assets_sdxl"
"""The shipped SDXL-layout toy pipeline (``StableDiffusionXLPipeline.from_pretrained(TOY_SDXL_ASSETS_DIR)``)."""

TOY_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan")
"""Chromatic colours of the toy world (a subset of :data:`smpo_diffusers.testing.COLOURS`)."""
TOY_SHAPES: tuple[str, ...] = SHAPES
TOY_RESOLUTION = 32
TOY_WORLD_INFO = "toy_world.json"
"""Build record written next to the pipeline: seeds, steps, losses, build time, caption split."""

TOY_SATURATION_RANGE = (0.2, 1.0)
"""Range of the whole-image saturation factor of the training pictures (1 = the palette colour)."""
TOY_GUIDANCE_SCALE = 3.0
TOY_INFERENCE_STEPS = 20


# ----------------------------------------------------------------------------- captions and pictures


def toy_captions() -> list[str]:
    """All captions of the toy world, in a fixed order: colour x shape x background (background != colour)."""
    return [f"a {colour} {shape} on a {background} background"
            for colour in TOY_COLOURS for shape in TOY_SHAPES for background in TOY_COLOURS if background != colour]


def toy_caption_split(num_heldout: int = 32, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(training_captions, heldout_captions)``: a seeded split of :func:`toy_captions`.

    Held-out captions never appear in the toy preference pairs; both sets were seen by the base model."""
    captions = toy_captions()
    if not 0 < num_heldout < len(captions):
        raise ValueError(f"num_heldout must be in [1, {len(captions) - 1}], got {num_heldout}.")
    order = np.random.default_rng(seed).permutation(len(captions))
    heldout = sorted(int(i) for i in order[:num_heldout])
    training = sorted(int(i) for i in order[num_heldout:])
    return [captions[i] for i in training], [captions[i] for i in heldout]


def parse_toy_caption(caption: str) -> tuple[str | None, str | None, str | None]:
    """``(shape, shape colour, background colour)`` named by a caption; ``None`` for parts it does not name.

    The first colour word (of :data:`~smpo_diffusers.testing.COLOURS`) is the shape's, the second the
    background's; the first shape word is the shape."""
    words = [w.strip(".,;:!?") for w in caption.lower().split()]
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    return (shapes[0] if shapes else None, colours[0] if colours else None,
            colours[1] if len(colours) > 1 else None)


def draw_toy_image(caption: str, rng: np.random.Generator, saturation: float | None = None,
                   size: int = TOY_RESOLUTION):
    """One training picture for a toy caption (RGB PIL image, ``size`` x ``size``).

    The shape (half-width 28-40 % of the side, centre within +-6 % of the middle) in its colour on the
    background colour; both colours are blended towards grey by ``saturation`` (default: uniform in
    :data:`TOY_SATURATION_RANGE`). Raises ``ValueError`` if the caption does not name shape, colour
    and background."""
    shape, colour, background = parse_toy_caption(caption)
    if shape is None or colour is None or background is None:
        raise ValueError(f"toy captions name a colour, a shape and a background colour; got {caption!r}.")
    if saturation is None:
        saturation = float(rng.uniform(*TOY_SATURATION_RANGE))
    centre = tuple(size * (0.5 + rng.uniform(-0.06, 0.06, size=2)))
    radius = size * float(rng.uniform(0.28, 0.40))
    return _draw_picture(size, shape, _saturate(COLOURS[colour], saturation),
                         _saturate(COLOURS[background], saturation), centre, radius)


def _pictures_to_tensor(images) -> torch.Tensor:
    """PIL RGB images -> ``(N, 3, H, W)`` float32 in [-1, 1]."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- the reward


_CENTRE_HALF_WIDTH = 0.19  # centre box half-width, fraction of the side: inside every training shape
_BORDER_WIDTH = 0.1        # border ring width, fraction of the side: background in every training picture
_FIDELITY_SCALE = 0.35     # RGB distance (0..sqrt(3)) at which fidelity has fallen to exp(-1)


def _region_means(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean RGB (0..1) of the centre box and of the border ring of an ``(H, W, 3)`` image in 0..1."""
    height, width = pixels.shape[:2]
    cy, cx = height // 2, width // 2
    hy, hx = max(1, round(height * _CENTRE_HALF_WIDTH)), max(1, round(width * _CENTRE_HALF_WIDTH))
    centre = pixels[cy - hy:cy + hy, cx - hx:cx + hx].reshape(-1, 3).mean(0)
    by, bx = max(1, round(height * _BORDER_WIDTH)), max(1, round(width * _BORDER_WIDTH))
    mask = np.ones((height, width), dtype=bool)
    mask[by:height - by, bx:width - bx] = False
    return centre, pixels[mask].mean(0)


def toy_reward_scores(images, prompts) -> np.ndarray:
    """The toy preference: ``0.5 * vividness + 0.5 * fidelity`` per image, a float32 ``(N,)`` array in [0, 1].

    * vividness: mean HSV saturation of the image (0 grey .. 1 pure colour);
    * fidelity: mean over the colours the prompt names of ``exp(-(d / 0.35)^2)``, ``d`` the RGB distance
      (channels in 0..1) between the named palette colour and the mean colour of its region: the centre
      box (38 % of the side) for the shape colour, the outer 10 % ring for the background. A prompt
      naming no colour gets vividness only.

    Smooth in the pixels, so two generations for one prompt get different, comparable rewards; a
    vivid, on-prompt image beats a dull or off-prompt one."""
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
    scores = np.empty(len(images), dtype=np.float32)
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        rgb = image.convert("RGB")
        vividness = float((np.asarray(rgb.convert("HSV"), dtype=np.float32)[..., 1] / 255.0).mean())
        _, colour, background = parse_toy_caption(prompt)
        centre, border = _region_means(np.asarray(rgb, dtype=np.float32) / 255.0)
        terms = []
        for name, region in ((colour, centre), (background, border)):
            if name is not None:
                distance = float(np.linalg.norm(region - np.asarray(COLOURS[name], dtype=np.float32) / 255.0))
                terms.append(math.exp(-(distance / _FIDELITY_SCALE) ** 2))
        scores[index] = 0.5 * vividness + 0.5 * float(np.mean(terms)) if terms else vividness
    return scores


class ToyRewardModel(RewardModel):
    """:func:`toy_reward_scores` behind the :class:`~smpo_diffusers.rewards.RewardModel` interface."""

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__("toy", device=device, max_batch_size=None)

    def _score_batch(self, images, prompts):
        return torch.from_numpy(toy_reward_scores(images, prompts))


def nearest_palette_colour(rgb: np.ndarray, names: tuple[str, ...] = TOY_COLOURS) -> str:
    """The palette colour (of ``names``) whose hue is closest to that of ``rgb`` (three values in 0..1)."""
    import colorsys

    hue = colorsys.rgb_to_hsv(*[float(c) for c in rgb])[0]

    def hue_distance(name: str) -> float:
        other = colorsys.rgb_to_hsv(*[c / 255.0 for c in COLOURS[name]])[0]
        gap = abs(hue - other)
        return min(gap, 1.0 - gap)

    return min(names, key=hue_distance)


def colour_accuracy(images, prompts) -> dict:
    """Fraction of images whose centre box / border ring hue is nearest the named shape / background colour."""
    shape_hits = background_hits = 0
    for image, prompt in zip(images, prompts):
        _, colour, background = parse_toy_caption(prompt)
        centre, border = _region_means(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        shape_hits += nearest_palette_colour(centre) == colour
        background_hits += nearest_palette_colour(border) == background
    count = max(1, len(prompts))
    return {"shape_colour": shape_hits / count, "background_colour": background_hits / count,
            "chance": 1.0 / len(TOY_COLOURS), "count": len(prompts)}


# ----------------------------------------------------------------------------- building the world


def _toy_components(seed: int) -> dict:
    """Untrained toy parts: the tiny CLIP tokenizer/text encoder, VAE (factor 4) and UNet of ``testing``."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel

    from .testing import _scheduler_with_full_config, _tiny_text_config, _tiny_unet, _tiny_vae, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden_act="quick_gelu")).eval()
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": _tiny_vae(seed, scaling_factor=1.0),
        "unet": _tiny_unet(seed + 1, cross_attention_dim=text_encoder.config.hidden_size),
        "scheduler": _scheduler_with_full_config(DDIMScheduler, SD15_SCHEDULER_CONFIG, "epsilon"),
    }


@torch.no_grad()
def _encode_captions(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def _one_cycle_schedule(optimizer, lr: float, steps: int):
    """``OneCycleLR`` peaking at ``lr`` after 5 % of ``steps`` (10 % when 5 % is exactly one step: torch divides by
    ``pct_start * steps - 1`` there, so e.g. ``steps=20`` would fail)."""
    pct_start = 0.05 if 0.05 * steps != 1 else 0.1
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=pct_start)


def _train_vae(vae, captions, rng, generator, steps, batch_size, lr, kl_weight, log_every, device):
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = _one_cycle_schedule(optimizer, lr, steps)
    losses = []
    for step in range(steps):
        chosen = rng.integers(len(captions), size=batch_size)
        pixels = _pictures_to_tensor([draw_toy_image(captions[i], rng) for i in chosen]).to(device)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        reconstruction = vae.decode(latents).sample
        kl = posterior.kl().mean() / latents[0].numel()
        loss = torch.nn.functional.mse_loss(reconstruction, pixels) + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            logger.info("vae step %d/%d loss %.4f", step + 1, steps, float(np.mean(losses[-log_every:])))
    vae.eval()
    return float(np.mean(losses[-20:]))


def _train_unet(unet, latents, embeddings, empty_embedding, caption_index, generator, steps, batch_size, lr,
                uncond_fraction, log_every, device, pooled=None, empty_pooled=None, time_ids=None):
    """Epsilon-prediction training on ``latents`` (``(M, 4, 8, 8)``, scaled) captioned by ``caption_index``
    (``(M,)`` rows of ``embeddings``, ``(C, 77, D)``). A dropped caption gets a row of ``empty_embedding``
    (``(E, 77, D)``: one of E unconditional inputs, drawn with equal odds when E > 1). SDXL layout: ``pooled``
    (``(C, P)``; dropped: the same row of ``empty_pooled``, ``(E, P)``) and the constant ``time_ids``
    (``(1, 6)``) go in as ``added_cond_kwargs``. Returns the mean loss of the last 50 steps."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER_CONFIG.items()
                                       if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                                "clip_sample", "steps_offset")})
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    schedule = _one_cycle_schedule(optimizer, lr, steps)
    losses = []
    count = latents.shape[0]
    for step in range(steps):
        chosen = torch.randint(0, count, (batch_size,), generator=generator)
        x0 = latents[chosen].to(device)
        conditions = embeddings[caption_index[chosen]].to(device)
        dropped = (torch.rand(batch_size, generator=generator) < uncond_fraction).to(device)
        variant = (torch.randint(0, len(empty_embedding), (batch_size,), generator=generator)
                   if len(empty_embedding) > 1 else torch.zeros(batch_size, dtype=torch.long))
        conditions = torch.where(dropped[:, None, None], empty_embedding[variant].to(device), conditions)
        extra = {}
        if pooled is not None:
            text_embeds = pooled[caption_index[chosen]].to(device)
            text_embeds = torch.where(dropped[:, None], empty_pooled[variant].to(device), text_embeds)
            extra["added_cond_kwargs"] = {"text_embeds": text_embeds,
                                          "time_ids": time_ids.to(device).expand(batch_size, -1)}
        noise = torch.randn(x0.shape, generator=generator).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,),
                                  generator=generator).to(device)
        prediction = unet(noise_scheduler.add_noise(x0, noise, timesteps), timesteps,
                          encoder_hidden_states=conditions, **extra).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            logger.info("unet step %d/%d loss %.4f", step + 1, steps, float(np.mean(losses[-log_every:])))
    unet.eval()
    return float(np.mean(losses[-50:]))


@torch.no_grad()
def _encode_toy_pictures(vae, captions, rng, generator, num_latents, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(caption_index (M,), latents (M, 4, 8, 8))``: ``num_latents`` fresh pictures of random captions encoded
    by ``vae`` (posterior samples, not yet multiplied by the scaling factor), on the CPU."""
    caption_index = torch.from_numpy(rng.integers(len(captions), size=num_latents))
    raw = []
    for start in range(0, num_latents, 256):
        pixels = _pictures_to_tensor([draw_toy_image(captions[int(i)], rng)
                                      for i in caption_index[start:start + 256]]).to(device)
        posterior = vae.encode(pixels).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        raw.append((posterior.mean + posterior.std * noise).cpu())
    return caption_index, torch.cat(raw)


_BUILD_COUNTS = ("vae_steps", "unet_steps", "num_latents", "batch_size", "vae_batch_size", "threads")
"""Options of :func:`check_toy_build_options` that count something: integers >= 1."""


def check_toy_build_options(flag_prefix: str = "", **options) -> None:
    """Raise ``ValueError`` naming the first bad toy-world build option, before anything is trained or written.

    Checks whichever of these are given: ``output_dir`` (not an existing file), ``seed`` (integer in
    [0, 2**32)), the counts ``vae_steps``, ``unet_steps``, ``num_latents``, ``batch_size``, ``vae_batch_size``,
    ``threads`` (integers >= 1), ``device`` (``cpu`` or an available ``cuda``/``cuda:N``). ``flag_prefix="--"``
    names them as the command-line flags of ``examples/toy/build_toy_world.py``."""
    def bad(name: str, message: str) -> ValueError:
        return ValueError(f"{flag_prefix}{name} {message}")

    if "output_dir" in options:
        output_dir = os.fspath(options["output_dir"])
        if not output_dir:
            raise bad("output_dir", "is empty; name the pipeline folder to write.")
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise bad("output_dir", f"{output_dir!r} is a file; name a folder (it is created if missing).")
    if "seed" in options:
        seed = options["seed"]
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
            raise bad("seed", f"must be an integer in [0, 2**32), got {seed!r}.")
    for name in _BUILD_COUNTS:
        if name in options:
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise bad(name, f"must be an integer >= 1, got {value!r}.")
    if "device" in options:
        device = options["device"]
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError):
            raise bad("device", f"{device!r} is not a device; use cpu, cuda or cuda:N.") from None
        if parsed.type not in ("cpu", "cuda"):
            raise bad("device", f"{device!r} is not supported; the toy world trains on cpu, cuda or cuda:N.")
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise bad("device", f"{device!r}: CUDA is not available on this machine; use cpu.")
        if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise bad("device", f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                                "use cuda:0 up to the last.")


def _check_finite_loss(what: str, loss: float, fix: str) -> None:
    """``FloatingPointError`` naming ``fix`` when a final training loss is NaN or infinite."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"{what} training diverged (final loss {loss}); nothing was written. {fix}")


def build_toy_world(output_dir: str | os.PathLike, seed: int = 0, vae_steps: int = 1500, unet_steps: int = 3000,
                    num_latents: int = 4096, batch_size: int = 128, vae_batch_size: int = 64,
                    vae_learning_rate: float = 2e-3, unet_learning_rate: float = 1e-3, kl_weight: float = 1e-6,
                    uncond_fraction: float = 0.1, log_every: int = 100, device: str = "cpu") -> dict:
    """Train the toy world's VAE and UNet from scratch and save the pipeline to ``output_dir``.

    Steps: (1) the VAE learns to reconstruct :func:`draw_toy_image` pictures of all captions (MSE +
    ``kl_weight`` x per-element KL); its ``scaling_factor`` is then set to ``1 / std`` of the encoded
    latents, so UNet inputs have unit variance as in SD. (2) ``num_latents`` pictures are encoded once
    (posterior samples). (3) The UNet learns epsilon prediction on them with the DDPM scaled-linear
    schedule (SD 1.5 betas), conditioned on the frozen text encoder's hidden states; ``uncond_fraction``
    of captions are replaced by ``""`` for classifier-free guidance. Everything draws from ``seed``.

    Writes an SD 1.x pipeline folder (safetensors, ``DDIMScheduler`` with ``clip_sample=False``,
    ``set_alpha_to_one=False``) and ``toy_world.json``. Returns that record (dict). Bad options raise
    ``ValueError`` (:func:`check_toy_build_options`) and a non-finite final loss ``FloatingPointError``, both
    before anything is written.

    The defaults are the shipped recipe: about 2.6 minutes with ``device="cuda"``; on one CPU thread budget
    roughly an hour. Much shorter CPU runs (200 VAE / 800 UNet steps) gave chance-level colours."""
    from diffusers import StableDiffusionPipeline

    check_toy_build_options(output_dir=output_dir, seed=seed, vae_steps=vae_steps, unet_steps=unet_steps,
                            num_latents=num_latents, batch_size=batch_size, vae_batch_size=vae_batch_size,
                            device=device)
    for name, value in (("vae_learning_rate", vae_learning_rate), ("unet_learning_rate", unet_learning_rate)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    if not (math.isfinite(kl_weight) and kl_weight >= 0) or not 0.0 <= uncond_fraction <= 1.0 or (log_every or 0) < 0:
        raise ValueError(f"kl_weight must be finite and >= 0, uncond_fraction in [0, 1] and log_every >= 0; got "
                         f"{kl_weight!r}, {uncond_fraction!r}, {log_every!r}.")
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    parts = _toy_components(seed)
    captions = toy_captions()

    vae_started = time.perf_counter()
    parts["vae"].to(device)
    parts["unet"].to(device)
    vae_loss = _train_vae(parts["vae"], captions, rng, generator, vae_steps, vae_batch_size, vae_learning_rate,
                          kl_weight, log_every, device)
    _check_finite_loss("VAE", vae_loss, "Lower vae_learning_rate or kl_weight.")
    vae_seconds = time.perf_counter() - vae_started

    caption_index, raw = _encode_toy_pictures(parts["vae"], captions, rng, generator, num_latents, device)
    scaling_factor = float(1.0 / raw.std())
    if not (math.isfinite(scaling_factor) and scaling_factor > 0):
        raise FloatingPointError(f"the trained VAE gives latents with std {float(raw.std())}, so no scaling factor; "
                                 "nothing was written. Train the VAE longer (vae_steps) or with another seed.")
    parts["vae"].register_to_config(scaling_factor=scaling_factor)
    latents = raw * scaling_factor

    embeddings = _encode_captions(parts["tokenizer"], parts["text_encoder"], captions)
    empty_embedding = _encode_captions(parts["tokenizer"], parts["text_encoder"], [""])
    unet_started = time.perf_counter()
    unet_loss = _train_unet(parts["unet"], latents, embeddings, empty_embedding, caption_index, generator,
                            unet_steps, batch_size, unet_learning_rate, uncond_fraction, log_every, device)
    _check_finite_loss("UNet", unet_loss, "Lower unet_learning_rate.")
    parts["vae"].to("cpu")
    parts["unet"].to("cpu")
    unet_seconds = time.perf_counter() - unet_started

    pipeline = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, image_encoder=None,
                                       requires_safety_checker=False)
    output_dir = str(output_dir)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    _make_loadable_by_transformers_4(output_dir, pipeline.tokenizer)
    training, heldout = toy_caption_split()
    info = {
        "seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps, "num_latents": num_latents,
        "batch_size": batch_size, "vae_batch_size": vae_batch_size, "vae_learning_rate": vae_learning_rate,
        "unet_learning_rate": unet_learning_rate, "kl_weight": kl_weight, "uncond_fraction": uncond_fraction,
        "vae_final_loss": vae_loss, "unet_final_loss": unet_loss, "vae_scaling_factor": scaling_factor,
        "vae_seconds": round(vae_seconds, 1), "unet_seconds": round(unet_seconds, 1),
        "build_seconds": round(time.perf_counter() - started, 1), "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "device": str(device), "guidance_scale": TOY_GUIDANCE_SCALE,
        "num_inference_steps": TOY_INFERENCE_STEPS, "num_captions": len(captions),
        "heldout_captions": heldout,
    }
    with open(os.path.join(output_dir, TOY_WORLD_INFO), "w") as handle:
        json.dump(info, handle, indent=2, allow_nan=False)  # standard JSON: the losses were checked finite
    return info


TOY_SDXL_TIME_IDS = (TOY_RESOLUTION, TOY_RESOLUTION, 0, 0, TOY_RESOLUTION, TOY_RESOLUTION)
"""SDXL micro-conditioning of every toy picture: original size (h, w), crop top-left (top, left), target size."""


def build_toy_sdxl_world(output_dir: str | os.PathLike, vae_from: str | os.PathLike | None = None, seed: int = 0,
                         unet_steps: int = 3000, num_latents: int = 4096, batch_size: int = 128,
                         unet_learning_rate: float = 1e-3, uncond_fraction: float = 0.1, log_every: int = 100,
                         device: str = "cpu") -> dict:
    """The toy world in SDXL layout: save a ``StableDiffusionXLPipeline`` folder to ``output_dir``.

    Parts: the trained VAE of the SD toy world at ``vae_from`` (default: the shipped :data:`TOY_ASSETS_DIR`),
    frozen; the two frozen, randomly initialised tiny CLIP text encoders of
    :func:`~smpo_diffusers.testing.tiny_sdxl_components` (seeded with ``seed``); a ``text_time`` UNet
    (cross-attention width 64, pooled width 32) trained from scratch as :func:`build_toy_world` trains the SD
    one: epsilon prediction on ``num_latents`` freshly drawn pictures, SD 1.5 / SDXL noise schedule. It is
    conditioned as ``StableDiffusionXLPipeline.encode_prompt`` (and the trainer) condition it: both encoders'
    penultimate hidden states concatenated ``(77, 64)``, ``text_encoder_2``'s pooled projection ``(32,)`` and
    the time ids :data:`TOY_SDXL_TIME_IDS`. A dropped caption (``uncond_fraction``) gets, with equal odds, zeros
    for both (what the pipeline's ``force_zeros_for_empty_prompt`` gives the unconditional branch when sampling)
    or the encoded empty prompt ``""`` (what the trainer's ``--proportion_empty_prompts`` gives), so both
    unconditional inputs are ones the UNet has seen. The scheduler is the SD world's ``DDIMScheduler``, so both
    layouts sample alike.

    Writes the folder and ``toy_world.json``; returns that record. Bad options raise ``ValueError``, a
    non-finite final loss ``FloatingPointError``, both before anything is written. About 18 minutes on two
    CPU threads."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline

    from .testing import tiny_sdxl_components

    vae_from = str(vae_from or TOY_ASSETS_DIR)
    check_toy_build_options(output_dir=output_dir, seed=seed, unet_steps=unet_steps, num_latents=num_latents,
                            batch_size=batch_size, device=device)
    if not (math.isfinite(unet_learning_rate) and unet_learning_rate > 0):
        raise ValueError(f"unet_learning_rate must be a finite number > 0, got {unet_learning_rate!r}.")
    if not 0.0 <= uncond_fraction <= 1.0 or (log_every or 0) < 0:
        raise ValueError(f"uncond_fraction must be in [0, 1] and log_every >= 0; got {uncond_fraction!r}, "
                         f"{log_every!r}.")
    if not os.path.isfile(os.path.join(vae_from, "vae", "config.json")):
        raise ValueError(f"vae_from {vae_from!r} holds no vae/ folder; pass the SD toy world (build it with "
                         "examples/toy/build_toy_world.py).")
    shipped_vae = os.path.realpath(vae_from) == os.path.realpath(TOY_ASSETS_DIR)
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    parts = tiny_sdxl_components(seed)
    parts["vae"] = AutoencoderKL.from_pretrained(vae_from, subfolder="vae").eval()
    parts["scheduler"] = DDIMScheduler.from_pretrained(vae_from, subfolder="scheduler")
    pipeline = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    captions = toy_captions()

    caption_index, raw = _encode_toy_pictures(pipeline.vae.to(device), captions, rng, generator, num_latents, device)
    pipeline.vae.to("cpu")
    latents = raw * pipeline.vae.config.scaling_factor
    with torch.no_grad():
        embeddings, _, pooled, _ = pipeline.encode_prompt(captions + [""], device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
    # unconditional inputs: zeros (sampling's), then the encoded "" (training's empty prompts)
    empty_embedding = torch.cat([torch.zeros_like(embeddings[-1:]), embeddings[-1:]])
    empty_pooled = torch.cat([torch.zeros_like(pooled[-1:]), pooled[-1:]])
    embeddings, pooled = embeddings[:-1], pooled[:-1]
    time_ids = torch.tensor([TOY_SDXL_TIME_IDS], dtype=torch.float32)
    unet = pipeline.unet.to(device)
    unet_started = time.perf_counter()
    unet_loss = _train_unet(unet, latents, embeddings, empty_embedding, caption_index, generator, unet_steps,
                            batch_size, unet_learning_rate, uncond_fraction, log_every, device, pooled=pooled,
                            empty_pooled=empty_pooled, time_ids=time_ids)
    _check_finite_loss("UNet", unet_loss, "Lower unet_learning_rate.")
    unet.to("cpu")
    unet_seconds = time.perf_counter() - unet_started

    output_dir = str(output_dir)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    _make_loadable_by_transformers_4(output_dir, pipeline.tokenizer, ("tokenizer", "tokenizer_2"))
    _, heldout = toy_caption_split()
    info = {
        "layout": "sdxl", "vae_from": "toy_assets" if shipped_vae else vae_from,
        "seed": seed, "unet_steps": unet_steps, "num_latents": num_latents,
        "batch_size": batch_size, "unet_learning_rate": unet_learning_rate, "uncond_fraction": uncond_fraction,
        "unet_final_loss": unet_loss, "vae_scaling_factor": pipeline.vae.config.scaling_factor,
        "time_ids": list(TOY_SDXL_TIME_IDS), "unet_seconds": round(unet_seconds, 1),
        "build_seconds": round(time.perf_counter() - started, 1), "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "device": str(device), "guidance_scale": TOY_GUIDANCE_SCALE,
        "num_inference_steps": TOY_INFERENCE_STEPS, "num_captions": len(captions), "heldout_captions": heldout,
    }
    with open(os.path.join(output_dir, TOY_WORLD_INFO), "w") as handle:
        json.dump(info, handle, indent=2, allow_nan=False)
    return info


def record_colour_accuracy(folder: str | os.PathLike, info: dict, seed: int = 0,
                           captions: list[str] | None = None) -> dict:
    """Render one image per caption (default: all of :func:`toy_captions`; generator seeded with ``seed``) with the
    toy pipeline saved in ``folder`` at its recorded sampling settings, add their :func:`colour_accuracy` to the
    build record ``info`` and rewrite ``folder/toy_world.json`` with it. Returns ``info``."""
    captions = list(captions) if captions is not None else toy_captions()
    pipeline = load_toy_pipeline(str(folder))
    images = pipeline(captions, num_inference_steps=info["num_inference_steps"], guidance_scale=info["guidance_scale"],
                      height=TOY_RESOLUTION, width=TOY_RESOLUTION,
                      generator=torch.Generator().manual_seed(seed)).images
    info["colour_accuracy"] = colour_accuracy(images, captions)
    with open(os.path.join(str(folder), TOY_WORLD_INFO), "w") as handle:
        json.dump(info, handle, indent=2, allow_nan=False)
    return info


def _make_loadable_by_transformers_4(folder: str | os.PathLike, tokenizer,
                                     tokenizer_folders: tuple[str, ...] = ("tokenizer",)) -> None:
    """A pipeline folder written by transformers >= 5 that transformers 4.x loads too (same outputs): the
    tokenizer's ``vocab.json``/``merges.txt`` beside its ``tokenizer.json`` (in each of ``tokenizer_folders``), and
    ``text_encoder``'s weights under the ``text_model.`` names 4.x expects (5.x reads both; 4.x would silently
    re-initialise unprefixed ones). A ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``) is already
    saved under those names."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for name in tokenizer_folders:
        write_slow_tokenizer_files(tokenizer, os.path.join(folder, name))
    weights = os.path.join(folder, "text_encoder", "model.safetensors")
    with safe_open(weights, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(weights)
    if any(not name.startswith("text_model.") for name in tensors):
        save_file({name if name.startswith("text_model.") else f"text_model.{name}": tensor.contiguous()
                   for name, tensor in tensors.items()}, weights, metadata=metadata)


TOY_LAYOUTS = {"sd": TOY_ASSETS_DIR, "sdxl": TOY_SDXL_ASSETS_DIR}
"""The shipped toy pipelines by layout, and the script that regenerates each."""
_TOY_BUILD_SCRIPTS = {"sd": "examples/toy/build_toy_world.py", "sdxl": "examples/toy/build_toy_sdxl_world.py"}


def toy_model_path(layout: str = "sd") -> str:
    """Path of the shipped toy pipeline of ``layout`` (``"sd"`` or ``"sdxl"``); a clear error naming the fix when
    it is missing."""
    if layout not in TOY_LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(TOY_LAYOUTS)}, got {layout!r}.")
    folder = TOY_LAYOUTS[layout]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The {layout} toy pipeline is missing from {folder}; regenerate it with "
            f"`python {_TOY_BUILD_SCRIPTS[layout]}` or reinstall the package (it ships as package data)."
        )
    return str(folder)


def load_toy_pipeline(model_path: str | None = None):
    """The toy pipeline at ``model_path`` (default: the shipped SD one) with the class its ``model_index.json``
    names (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``), progress bar off."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(model_path or toy_model_path())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ----------------------------------------------------------------------------- preference pairs


def _encode_png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def human_labels(reward_0: np.ndarray, reward_1: np.ndarray, rng: np.random.Generator, temperature: float,
                 tie_threshold: float) -> np.ndarray:
    """A noisy "human" ``label_0`` per pair: 0.5 when ``|r0 - r1| < tie_threshold``, else 1 with the Bradley-Terry
    probability ``sigmoid((r0 - r1) / temperature)`` and 0 otherwise. Float64 ``(N,)``."""
    if temperature <= 0 or tie_threshold < 0:
        raise ValueError(f"temperature must be > 0 and tie_threshold >= 0, got {temperature}, {tie_threshold}.")
    difference = np.asarray(reward_0, dtype=np.float64) - np.asarray(reward_1, dtype=np.float64)
    prefer_0 = rng.random(difference.shape) < 1.0 / (1.0 + np.exp(-difference / temperature))
    labels = prefer_0.astype(np.float64)
    labels[np.abs(difference) < tie_threshold] = 0.5
    return labels


def build_toy_preferences(output_dir: str | os.PathLike, model_path: str | None = None,
                          captions: list[str] | None = None, pairs_per_caption: int = 1, seed: int = 0,
                          human_temperature: float = 0.02, tie_threshold: float = 0.002,
                          num_inference_steps: int = TOY_INFERENCE_STEPS, guidance_scale: float = TOY_GUIDANCE_SCALE,
                          progress: bool = False) -> str:
    """Write a labelled toy preference set (``save_to_disk`` folder with ``reward_stats.json``) and return its path.

    Each pair is two generations of the toy pipeline for one caption (default: the training captions of
    :func:`toy_caption_split`, ``pairs_per_caption`` pairs each), from seeds ``seed * 1_000_003 + k``. Columns:
    ``caption``, ``jpg_0``/``jpg_1`` (PNG bytes), ``reward_0``/``reward_1``/``label_valid`` (added by
    :class:`~smpo_diffusers.rewards.RewardLabeler` with :class:`ToyRewardModel`), and a noisy human
    ``label_0``/``label_1`` from :func:`human_labels`. ``toy_preferences.json`` records how often the human
    label agrees with the reward."""
    import datasets

    from .evaluation import generate_images
    from .rewards import RewardLabeler, compute_reward_statistics, reward_features, save_reward_statistics

    if pairs_per_caption < 1:
        raise ValueError(f"pairs_per_caption must be >= 1, got {pairs_per_caption}.")
    captions = list(captions) if captions is not None else toy_caption_split()[0]
    pair_captions = captions * pairs_per_caption
    pipeline = load_toy_pipeline(model_path)
    first_seed = seed * 1_000_003
    all_prompts = pair_captions * 2
    images = generate_images(pipeline, all_prompts, [first_seed + k for k in range(len(all_prompts))],
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             height=TOY_RESOLUTION, width=TOY_RESOLUTION, progress=progress, desc="toy pairs")
    count = len(pair_captions)
    raw = datasets.Dataset.from_dict(
        {"caption": pair_captions, "jpg_0": [_encode_png(i) for i in images[:count]],
         "jpg_1": [_encode_png(i) for i in images[count:]]},
        features=datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Value("binary"),
                                    "jpg_1": datasets.Value("binary")}),
    )
    labelled = raw.map(RewardLabeler(ToyRewardModel()), batched=True, batch_size=64, load_from_cache_file=False,
                       features=datasets.Features({**raw.features, **reward_features()}))
    reward_0, reward_1 = np.asarray(labelled["reward_0"]), np.asarray(labelled["reward_1"])
    label_0 = human_labels(reward_0, reward_1, np.random.default_rng(seed), human_temperature, tie_threshold)
    labelled = labelled.add_column("label_0", label_0.tolist()).add_column("label_1", (1.0 - label_0).tolist())
    output_dir = str(output_dir)
    labelled.save_to_disk(output_dir)
    save_reward_statistics(output_dir, compute_reward_statistics(labelled, reward_model="toy"))
    decided = label_0 != 0.5
    agree = ((label_0 == 1.0) == (reward_0 > reward_1))[decided]
    summary = {"num_pairs": count, "num_human_ties": int((~decided).sum()),
               "human_agrees_with_reward": float(agree.mean()) if agree.size else None,
               "human_temperature": human_temperature, "tie_threshold": tie_threshold, "seed": seed,
               "mean_abs_reward_gap": float(np.abs(reward_0 - reward_1).mean()),
               "model_path": str(model_path or toy_model_path())}
    with open(os.path.join(output_dir, "toy_preferences.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return output_dir


# ----------------------------------------------------------------------------- demo


def build_toy_demo_inputs(folder: str | os.PathLike, pairs_per_caption: int = 1, seed: int = 0,
                          layout: str = "sd") -> tuple[str, str]:
    """``(model_dir, labelled_dataset_dir)`` for ``--demo``: the shipped toy pipeline of ``layout`` (``"sd"`` or
    ``"sdxl"``) and preference pairs of its own generations under ``folder`` (built once per ``(layout,
    pairs_per_caption, seed)``, reused afterwards)."""
    model_dir = toy_model_path(layout)
    prefix = "toy" if layout == "sd" else f"toy-{layout}"
    dataset_dir = os.path.join(str(folder), f"{prefix}-preferences-{pairs_per_caption}x-seed{seed}")
    if not os.path.isfile(os.path.join(dataset_dir, "reward_stats.json")):
        build_toy_preferences(dataset_dir, model_path=model_dir, pairs_per_caption=pairs_per_caption, seed=seed)
    return model_dir, dataset_dir


TOY_TRAINING_DEFAULTS = dict(resolution=TOY_RESOLUTION, train_batch_size=8, max_train_steps=60, learning_rate=3e-4,
                             rank=8, report_to="none", checkpointing_steps=10**6, lr_scheduler="constant")
"""SmPOConfig values the toy studies and the SD-layout demo start from (any of them can be overridden). β and the
inversion grid N are left to the model family: β 2000 and N 5 for the SD world, β 5000 and N 10 for the SDXL one."""
TOY_SDXL_TRAINING_DEFAULTS = dict(TOY_TRAINING_DEFAULTS, max_train_steps=120)
"""The SDXL-layout demo's values: 120 updates. With 60, its held-out gain was within noise for one of two pair
seeds (+0.004 ± 0.002 and +0.018 ± 0.005; with 120: +0.036 ± 0.005 and +0.029 ± 0.008)."""


def toy_training_defaults(layout: str = "sd") -> dict:
    """The training defaults of the toy world of ``layout`` (a copy): :data:`TOY_TRAINING_DEFAULTS` or
    :data:`TOY_SDXL_TRAINING_DEFAULTS`."""
    if layout not in TOY_LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(TOY_LAYOUTS)}, got {layout!r}.")
    return dict(TOY_SDXL_TRAINING_DEFAULTS if layout == "sdxl" else TOY_TRAINING_DEFAULTS)


def train_toy_model(output_dir: str, dataset_dir: str, layout: str = "sd", **overrides):
    """Train a LoRA on the toy world with :class:`~smpo_diffusers.SmPOTrainer`.

    ``overrides`` are :class:`~smpo_diffusers.SmPOConfig` fields on top of :func:`toy_training_defaults` of
    ``layout`` (the model defaults to the shipped toy pipeline of ``layout``). Returns the trainer after
    ``train()`` (weights saved in ``output_dir``; ``trainer.unet_evaluations`` holds the UNet sample-evaluations
    spent)."""
    from .config import SmPOConfig
    from .trainer import SmPOTrainer

    options = dict(toy_training_defaults(layout), pretrained_model_name_or_path=toy_model_path(layout),
                   dataset_name=dataset_dir, output_dir=str(output_dir))
    if "num_train_epochs" in overrides and "max_train_steps" not in overrides:
        del options["max_train_steps"]  # the epochs given set the run's length
    options.update(overrides)
    trainer = SmPOTrainer(SmPOConfig(**options))
    trainer.train()
    return trainer


def evaluate_toy_model(base_model: str, aligned_model: str, seed: int = 0, seeds_per_prompt: int = 2,
                       progress: bool = True) -> dict:
    """Before/after comparison of a toy training output with its base on the held-out captions, with the toy
    reward and the toy sampling settings (seeds from ``10_000 + seed``); writes ``aligned_model/evaluation``
    (results.json, results.md, grid.png) and returns the results dict of
    :func:`smpo_diffusers.evaluation.evaluate`."""
    from .evaluation import evaluate

    _, heldout = toy_caption_split()
    return evaluate(base_model, aligned_model, heldout, output_dir=os.path.join(aligned_model, "evaluation"),
                    seeds_per_prompt=seeds_per_prompt, seed=10_000 + seed, num_inference_steps=TOY_INFERENCE_STEPS,
                    guidance_scale=TOY_GUIDANCE_SCALE, resolution=TOY_RESOLUTION, progress=progress,
                    model_names=("base", "SmPO"))


def run_toy_demo(output_dir: str, seed: int = 0, seeds_per_prompt: int = 2, progress: bool = True,
                 layout: str = "sd", **overrides) -> dict:
    """The embedded demo end to end in ``layout`` (``"sd"`` or ``"sdxl"``): toy preference pairs -> SmPO LoRA
    (:func:`toy_training_defaults` of ``layout``, then ``overrides``) -> before/after evaluation on the held-out
    captions (:func:`evaluate_toy_model`). Returns its results dict."""
    model_dir, dataset_dir = build_toy_demo_inputs(os.path.join(output_dir, "demo-inputs"), seed=seed,
                                                   layout=layout)
    train_toy_model(output_dir, dataset_dir, layout=layout, seed=seed, **overrides)
    return evaluate_toy_model(model_dir, output_dir, seed=seed, seeds_per_prompt=seeds_per_prompt,
                              progress=progress)
