"""Loading SD 1.x/2.x and SDXL parts, prompt encoding, LoRA/full set-up and "the reference" handle.

Latent conventions: VAE latents are scaled by ``vae.config.scaling_factor`` (the level the UNet is trained at);
``encode_images`` returns them in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from .schedulers import InversionScheduler

logger = logging.getLogger(__name__)

__all__ = [
    "EMA_WEIGHTS_NAME",
    "load_ema_state",
    "parameters_swapped",
    "save_ema_state",
    "DiffusionParts",
    "PromptEmbeddings",
    "InversionWeightCopy",
    "ReferenceModel",
    "add_lora_adapters",
    "encode_images",
    "encode_prompts",
    "inversion_scheduler_from_config",
    "latent_moments",
    "sample_latents",
    "load_diffusion_parts",
    "lora_state_dict",
    "load_lora_state_into_unet",
    "sdxl_time_ids",
]

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class DiffusionParts:
    """The components a training run needs. ``text_encoders``/``tokenizers`` hold one (SD) or two (SDXL)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list
    tokenizers: list
    scheduler: InversionScheduler
    is_sdxl: bool
    source: str | None = None
    """The folder or Hub id the parts were loaded from; None for in-process components."""
    other_components: dict = field(default_factory=dict)
    """In-process pipeline components training does not use (``safety_checker``, ``feature_extractor``,
    ``image_encoder``), kept for a saved pipeline."""
    sampler_config: dict = field(default_factory=dict)
    """The base model's own scheduler config (``_class_name`` e.g. ``EulerDiscreteScheduler``, with its own
    options such as PNDM's ``skip_prk_steps``), kept for saved pipelines."""

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type


def inversion_scheduler_from_config(scheduler_config: dict) -> InversionScheduler:
    """Build the :class:`InversionScheduler` from a model's scheduler config, refusing configs that would be
    silently misread (missing ``clip_sample``/``set_alpha_to_one`` fall back to DDIM class defaults that are
    wrong for latent diffusion) or prediction types SmPO does not train."""
    config = dict(scheduler_config)
    defaulted = set(config.get("_use_default_values", []))
    missing = [key for key in ("clip_sample", "set_alpha_to_one") if key not in config or key in defaulted]
    if missing:
        raise ValueError(
            f"The model's scheduler config lacks {', '.join(missing)}; without them DDIM would clip latents to "
            "±1 and/or end sampling at ā = 1. Add them to scheduler/scheduler_config.json "
            '(real SD/SDXL configs use "clip_sample": false, "set_alpha_to_one": false).'
        )
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {prediction_type!r} is not supported for training; SmPO trains "
            f"{' or '.join(SUPPORTED_PREDICTION_TYPES)} models."
        )
    config.pop("_use_default_values", None)
    return InversionScheduler.from_config(config)


def _is_sdxl(unet, text_encoders) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time" and len(text_encoders) == 2


def load_diffusion_parts(config, components: dict | None = None) -> DiffusionParts:
    """Load the parts with ordinary ``from_pretrained`` calls, or take them from ``components`` (pipeline
    keyword names: ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``,
    ``scheduler``). SD vs SDXL is detected from the UNet (``addition_embed_type="text_time"``) and the
    presence of a second text encoder."""
    if components is not None:
        parts = dict(components)
        scheduler_config = parts["scheduler"].config
    else:
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        path = config.pretrained_model_name_or_path
        if path is None:
            raise ValueError("--pretrained_model_name_or_path is required (a diffusers pipeline folder or Hub id).")
        common = {"revision": config.revision, "cache_dir": config.cache_dir}
        parts = {}
        scheduler_config = InversionScheduler.load_config(path, subfolder="scheduler", **common)
        parts["unet"] = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=config.variant, **common)
        vae_path = config.pretrained_vae_model_name_or_path
        parts["vae"] = (
            AutoencoderKL.from_pretrained(vae_path, cache_dir=config.cache_dir)
            if vae_path
            else AutoencoderKL.from_pretrained(path, subfolder="vae", variant=config.variant, **common)
        )
        parts["tokenizer"] = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **common)
        parts["text_encoder"] = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=config.variant,
                                                              **common)
        if getattr(parts["unet"].config, "addition_embed_type", None) == "text_time":
            parts["tokenizer_2"] = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common)
            parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", variant=config.variant, **common
            )
    text_encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if parts.get("text_encoder_2") else [])
    tokenizers = [parts["tokenizer"]] + ([parts["tokenizer_2"]] if parts.get("tokenizer_2") else [])
    if getattr(parts["unet"].config, "addition_embed_type", None) == "text_time" and len(text_encoders) != 2:
        raise ValueError("The UNet expects SDXL added conditions but the model has no text_encoder_2/tokenizer_2.")
    scheduler_dict = dict(scheduler_config)
    used = {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}
    return DiffusionParts(
        source=None if components is not None else config.pretrained_model_name_or_path,
        other_components={name: module for name, module in parts.items() if name not in used and module is not None},
        sampler_config={key: value for key, value in scheduler_dict.items() if key != "_use_default_values"},
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        scheduler=inversion_scheduler_from_config(scheduler_dict),
        is_sdxl=_is_sdxl(parts["unet"], text_encoders),
    )


# ---------------------------------------------------------------------------- encoding
@dataclass
class PromptEmbeddings:
    """``hidden``: ``(B, L, D)`` cross-attention states; ``pooled``: ``(B, D2)`` SDXL pooled text embeds or None."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None


class _TruncationWarning:
    warned = False


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids ``(B, model_max_length)``; over-long captions are truncated with one warning per process."""
    max_length = tokenizer.model_max_length
    encoded = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                        return_overflowing_tokens=False, return_length=False, return_tensors="pt")
    if not _TruncationWarning.warned:
        full = tokenizer(list(captions), truncation=False, padding=False)["input_ids"]
        too_long = sum(len(ids) > max_length for ids in full)
        if too_long:
            logger.warning("%d caption(s) exceed the tokenizer limit of %d tokens and were truncated "
                           "(this warning is shown once).", too_long, max_length)
            _TruncationWarning.warned = True
    return encoded.input_ids


@torch.no_grad()
def encode_prompts(parts: DiffusionParts, captions: list[str], device, dtype=None) -> PromptEmbeddings:
    """Encode captions as the model family does: SD uses the last hidden state of its text encoder; SDXL
    concatenates the penultimate hidden states of both encoders and pools with the second one."""
    if not parts.is_sdxl:
        ids = tokenize(parts.tokenizers[0], captions).to(device)
        hidden = parts.text_encoders[0](ids)[0]
        return PromptEmbeddings(hidden=hidden.to(dtype) if dtype else hidden, pooled=None)
    hiddens, pooled = [], None
    for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders):
        ids = tokenize(tokenizer, captions).to(device)
        out = encoder(ids, output_hidden_states=True)
        hiddens.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds
    hidden = torch.cat(hiddens, dim=-1)
    if dtype is not None:
        hidden, pooled = hidden.to(dtype), pooled.to(dtype)
    return PromptEmbeddings(hidden=hidden, pooled=pooled)


def sdxl_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL micro-conditioning ``(N, 6)``: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image."""
    target = torch.tensor([resolution, resolution], dtype=original_sizes.dtype, device=original_sizes.device)
    target = target.expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1)


@torch.no_grad()
def latent_moments(vae: AutoencoderKL, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 3, H, W)`` pixels in [-1, 1] -> the VAE posterior's ``(mean, std)``, each ``(N, C, H/f, W/f)`` fp32,
    unscaled (the VAE's own latent space, before ``shift_factor``/``scaling_factor``)."""
    dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def sample_latents(vae_config, mean: torch.Tensor, std: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw ``mean + std * noise`` (noise from ``generator``, on the CPU), shifted and scaled as the UNet
    expects: ``(x - shift_factor) * scaling_factor``, fp32, on ``mean``'s device."""
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    latents = mean.float() + std.float() * noise
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


def encode_images(vae: AutoencoderKL, pixel_values: torch.Tensor, generator: torch.Generator | None = None):
    """``(N, 3, H, W)`` pixels in [-1, 1] -> scaled latents ``(N, C, H/f, W/f)`` in fp32 (sampled with
    ``generator``)."""
    return sample_latents(vae.config, *latent_moments(vae, pixel_values), generator)


# ---------------------------------------------------------------------------- LoRA
def add_lora_adapters(unet, rank: int, alpha: int, target_modules: list[str]) -> None:
    """Attach LoRA adapters through ``peft.LoraConfig`` + ``unet.add_adapter`` (gaussian init: starts at B = 0)."""
    from peft import LoraConfig

    names = {name.rsplit(".", 1)[-1] for name, _ in unet.named_modules()} | {name for name, _ in unet.named_modules()}
    unknown = [t for t in target_modules if t not in names and not any(n.endswith("." + t) for n in names)]
    if unknown:
        raise ValueError(
            f"--lora_target_modules {unknown} match no UNet module; typical choices: to_q to_k to_v to_out.0 "
            "(attention) and proj_in proj_out ff.net.0.proj ff.net.2."
        )
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules))


def lora_state_dict(unet) -> dict:
    """The UNet's LoRA weights in diffusers format (keys without the ``unet.`` prefix)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(path: str, unet, is_sdxl: bool) -> None:
    """Write ``pytorch_lora_weights.safetensors`` loadable by the pipeline's ``load_lora_weights``, with the
    adapter's ``LoraConfig`` in the file's metadata (without it, loading assumes ``lora_alpha = rank`` and scales
    the update by ``rank / lora_alpha``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    pipeline_class.save_lora_weights(path, unet_lora_layers=lora_state_dict(unet), safe_serialization=True,
                                     unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())


def load_lora_state_into_unet(unet, path: str) -> None:
    """Load ``path/pytorch_lora_weights.safetensors`` (as written by :func:`save_lora`) into existing adapters."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))
    state = {key[len("unet."):]: value for key, value in state.items() if key.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA checkpoint at {path} does not match the model: unexpected keys {unexpected[:5]}")


# ---------------------------------------------------------------------------- the reference
class ReferenceModel:
    """The frozen reference UNet, whichever way it is realised.

    * LoRA: the policy UNet itself with its adapters disabled (one UNet in memory).
    * full: a frozen copy of the initial UNet, in the weight dtype.

    ``with reference.active(policy_unet) as unet:`` yields the module to call; ``policy_unet`` must be the
    unwrapped model (not the DDP wrapper) so toggling adapters acts on the real modules.
    """

    def __init__(self, frozen_unet=None):
        self.frozen_unet = frozen_unet
        if frozen_unet is not None:
            frozen_unet.requires_grad_(False).eval()

    @contextlib.contextmanager
    def active(self, policy_unet):
        if self.frozen_unet is not None:
            yield self.frozen_unet
            return
        policy_unet.disable_adapters()
        try:
            yield policy_unet
        finally:
            policy_unet.enable_adapters()


class InversionWeightCopy:
    """A frozen copy of the policy UNet for the inversion's no-grad forwards: in the weight dtype, LoRA adapters
    merged (``W + scaling * B @ A``, summed in fp32 and rounded once), rebuilt lazily after each optimiser update.

    Calling the fp32 policy under autocast re-casts every weight at every inversion call, and a LoRA policy runs
    its adapter layers at every call; the copy does neither, for one more UNet in memory (in the weight dtype).
    The copy carries no adapters, holds no gradients and is never saved (it is derived from the policy).

    ``current(policy)`` returns the copy, refreshed from ``policy`` (the unwrapped model) if it is stale;
    ``mark_stale()`` after anything that changes the policy's weights (an update, a checkpoint load).
    """

    def __init__(self, policy, dtype: torch.dtype):
        from peft.tuners.lora import LoraLayer

        with torch.device("meta"):
            clone = type(policy).from_config(policy.config)
        self.module = clone.to(dtype=dtype).to_empty(device=next(policy.parameters()).device)
        self.module.requires_grad_(False).eval()
        self.lora_layers = {name: m for name, m in policy.named_modules() if isinstance(m, LoraLayer)}
        source = {}
        for name, tensor in [*policy.named_parameters(), *policy.named_buffers()]:
            if ".lora_" not in name:
                source[name.replace(".base_layer.", ".")] = tensor
        target = dict([*self.module.named_parameters(), *self.module.named_buffers()])
        if set(source) != set(target):
            raise ValueError(f"cannot mirror this UNet: tensors {sorted(set(source) ^ set(target))[:5]} differ")
        self._pairs = [(target[name], source[name]) for name in sorted(target)]
        self.stale = True

    def mark_stale(self) -> None:
        self.stale = True

    def compile_forward(self) -> None:
        """``torch.compile`` the copy's ``forward`` (module hooks such as evaluation counters stay eager).

        Refreshes copy values into the same parameter tensors, so an update never triggers a recompile. The
        number of rows the inversion evaluates changes as samples finish inverting: the first call compiles for
        its batch size, the first different size compiles one batch-size-dynamic graph (two compiles in all).
        """
        self.module.forward = torch.compile(self.module.forward)

    @torch.no_grad()
    def current(self, policy):
        if self.stale:
            targets, sources = zip(*self._pairs)
            torch._foreach_copy_(list(targets), list(sources))  # casts to the copy's dtype
            for name, layer in self.lora_layers.items():
                merged = layer.get_base_layer().weight.float()
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A and not layer.disable_adapters:
                        merged = merged + layer.get_delta_weight(adapter).float()
                self.module.get_submodule(name).weight.copy_(merged)
            self.stale = False
        return self.module


EMA_WEIGHTS_NAME = "ema.safetensors"
"""A checkpoint's ``--use_ema`` average: one fp32 tensor per trainable parameter, by name, and the average's
update count and last decay in the metadata."""


def save_ema_state(folder: str, ema, names: list[str]) -> None:
    """Write ``ema`` (diffusers ``EMAModel`` over the parameters called ``names``, in order) to
    ``folder/ema.safetensors``: safetensors, not a pickle."""
    from safetensors.torch import save_file

    if len(names) != len(ema.shadow_params):
        raise ValueError(f"{len(names)} names for the {len(ema.shadow_params)} averaged parameters.")
    metadata = {"optimization_step": str(ema.optimization_step), "decay": repr(float(ema.decay)),
                "cur_decay_value": repr(ema.cur_decay_value)}
    save_file({name: tensor.detach().contiguous() for name, tensor in zip(names, ema.shadow_params)},
              os.path.join(folder, EMA_WEIGHTS_NAME), metadata=metadata)


def load_ema_state(folder: str, ema, names: list[str]) -> None:
    """Read ``folder/ema.safetensors`` into ``ema`` in place, one tensor at a time (no second copy of the average
    in host memory); a file of other parameters raises ``RuntimeError("Missing key(s) ...")``."""
    from safetensors import safe_open

    with safe_open(os.path.join(folder, EMA_WEIGHTS_NAME), framework="pt", device="cpu") as handle:
        stored = set(handle.keys())
        missing, unexpected = sorted(set(names) - stored), sorted(stored - set(names))
        if missing or unexpected:
            raise RuntimeError(f"Error(s) in loading state_dict for the --use_ema average: Missing key(s): "
                               f"{missing[:3]} ({len(missing)}), Unexpected key(s): {unexpected[:3]} "
                               f"({len(unexpected)})")
        for name, shadow in zip(names, ema.shadow_params):
            value = handle.get_tensor(name)
            if value.shape != shadow.shape:
                raise RuntimeError(f"size mismatch for {name} in the --use_ema average: {tuple(value.shape)} in the "
                                   f"checkpoint, {tuple(shadow.shape)} now")
            shadow.copy_(value)
        metadata = handle.metadata() or {}
    ema.optimization_step = int(metadata["optimization_step"])
    last = metadata.get("cur_decay_value", "None")
    ema.cur_decay_value = None if last == "None" else float(last)


@contextlib.contextmanager
def parameters_swapped(parameters: list[torch.Tensor], replacements: list[torch.Tensor]):
    """Inside the block each parameter holds its replacement's values and the replacement the parameter's (their
    storages are exchanged: exact, no copy); after it, both are as before, also when the block raises. Same
    shapes, dtypes and devices."""
    if len(parameters) != len(replacements):
        raise ValueError(f"{len(replacements)} replacements for {len(parameters)} parameters.")

    def exchange():
        for parameter, replacement in zip(parameters, replacements):
            parameter.data, replacement.data = replacement.data, parameter.data

    exchange()
    try:
        yield
    finally:
        exchange()
