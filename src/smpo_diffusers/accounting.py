"""Exact accounting of what a training step costs: UNet evaluations, stage times and resident bytes.

Used by ``benchmarks/`` and the tests; nothing here changes how the trainer trains.

Evaluations are counted in *sample-evaluations*: one UNet call on a batch of ``m`` latents counts ``m``.
Per training pair (two images sharing one timestep ``t``), with ``K`` ReNoise iterations::

    SmPO:           2 (policy, with grad) + 2 (reference, no grad) + 2 * steps(t) * (K + 1) (inversion, no grad)
    Diffusion-DPO:  2 (policy, with grad) + 2 (reference, no grad)

``steps(t)`` is the number of inversion steps of :meth:`InversionScheduler.inversion_schedule`.

Bytes are *resident* bytes of tensors: each storage is counted once (shared storages are deduplicated by
device and data pointer); tensors on the ``meta`` device are counted by ``numel * element_size`` so that real
model sizes can be computed without allocating them.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

__all__ = [
    "write_report",
    "SD15_UNET_CONFIG",
    "SDXL_UNET_CONFIG",
    "SD_VAE_CONFIG",
    "CLIP_L_TEXT_CONFIG",
    "OPENCLIP_BIGG_TEXT_CONFIG",
    "REAL_MODEL_FAMILIES",
    "EvaluationCount",
    "UNetEvaluationCounter",
    "TrainerStageTimer",
    "STAGES",
    "ByteCounter",
    "tensor_bytes",
    "module_tensors",
    "optimizer_state_tensors",
    "trainer_resident_bytes",
    "optimizer_state_bytes",
    "OPTIMIZERS",
    "inversion_steps",
    "mean_inversion_steps",
    "expected_unet_evaluations",
    "expected_evaluations_per_pair",
    "real_unet_on_meta",
    "real_model_parts_on_meta",
    "estimate_training_bytes",
    "TrainingBytes",
    "RESIDENT_CATEGORIES",
]

# ---------------------------------------------------------------------------------------------- real configs
# Public configuration facts of the released models (their config.json values), written out here so that
# sizes can be computed on the meta device without any download.

SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
"""Stable Diffusion 1.5 ``unet/config.json`` (859,520,964 parameters)."""

SDXL_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
"""Stable Diffusion XL 1.0 base ``unet/config.json`` (2,567,463,684 parameters)."""

SD_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}
"""The SD 1.5 / SDXL ``vae/config.json`` architecture (83,653,863 parameters; SDXL differs only in scaling)."""

CLIP_L_TEXT_CONFIG = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
"""CLIP ViT-L/14 text tower (SD 1.5 ``text_encoder``, SDXL ``text_encoder``; 123,060,480 parameters)."""

OPENCLIP_BIGG_TEXT_CONFIG = {
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
}
"""OpenCLIP ViT-bigG/14 text tower with projection (SDXL ``text_encoder_2``; 694,659,840 parameters)."""

REAL_MODEL_FAMILIES = ("sd15", "sdxl")


def real_unet_on_meta(family: str):
    """The real SD 1.5 (``"sd15"``) or SDXL (``"sdxl"``) UNet on the meta device (no memory allocated)."""
    from diffusers import UNet2DConditionModel

    configs = {"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}
    if family not in configs:
        raise ValueError(f"family must be one of {REAL_MODEL_FAMILIES}, got {family!r}")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(configs[family])


def real_model_parts_on_meta(family: str) -> dict:
    """``{"unet", "vae", "text_encoders": [...], "is_sdxl"}`` of the real model family, on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = real_unet_on_meta(family)
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE_CONFIG)
        encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT_CONFIG)))
    return {"unet": unet, "vae": vae, "text_encoders": encoders, "is_sdxl": family == "sdxl"}


# ---------------------------------------------------------------------------------------------- evaluations
@dataclass
class EvaluationCount:
    """UNet sample-evaluations of some steps, by stage. ``grad`` = policy; ``no_grad`` = inversion + reference."""

    inversion: int = 0
    policy: int = 0
    reference: int = 0

    @property
    def grad(self) -> int:
        return self.policy

    @property
    def no_grad(self) -> int:
        return self.inversion + self.reference

    @property
    def total(self) -> int:
        return self.inversion + self.policy + self.reference


class UNetEvaluationCounter:
    """Count sample-evaluations of one or more modules with forward pre-hooks, split by autograd recording.

    A call counts the batch size of its ``sample`` (first positional argument or ``sample=`` keyword) under
    ``grad`` when autograd records it (``torch.is_grad_enabled()``), else under ``no_grad`` (``no_grad`` and
    ``inference_mode``). Each distinct module is hooked once. Use as a context manager; hooks are removed on exit.
    Gradient-checkpointing recomputation runs inner blocks, not the hooked module, so it is not counted.
    """

    def __init__(self, *modules: torch.nn.Module):
        unique = {id(m): m for m in modules if m is not None}
        if not unique:
            raise ValueError("UNetEvaluationCounter needs at least one module to hook")
        self.modules = list(unique.values())
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self.grad = self.no_grad = self.grad_calls = self.no_grad_calls = 0

    @property
    def total(self) -> int:
        return self.grad + self.no_grad

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if sample is None:
            raise ValueError("UNetEvaluationCounter: the hooked call has no `sample` argument to count")
        if torch.is_grad_enabled():
            self.grad += int(sample.shape[0])
            self.grad_calls += 1
        else:
            self.no_grad += int(sample.shape[0])
            self.no_grad_calls += 1

    def __enter__(self) -> "UNetEvaluationCounter":
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def inversion_steps(scheduler, timesteps: torch.Tensor, num_inversion_steps: int, grid: str = "exact") -> torch.Tensor:
    """``(B,)`` long: inversion steps each sample takes to reach ``timesteps`` (from the scheduler's own schedule)."""
    return scheduler.inversion_schedule(timesteps, num_inversion_steps, grid)[1]


def mean_inversion_steps(scheduler, num_inversion_steps: int, grid: str = "exact") -> float:
    """``E[steps(t)]`` for ``t`` uniform on ``{0, ..., T-1}``, computed exactly from the schedule over all ``t``.

    For the exact grid this is ``(N + 1) / 2`` when ``N`` divides ``T``.
    """
    levels = torch.arange(scheduler.config.num_train_timesteps)
    return float(inversion_steps(scheduler, levels, num_inversion_steps, grid).double().mean())


def expected_unet_evaluations(scheduler, pair_timesteps: torch.Tensor, *, noise_source: str, num_inversion_steps: int,
                              num_renoise_steps: int, grid: str = "exact") -> EvaluationCount:
    """The sample-evaluations the formula predicts for pairs with the given timesteps ``(B,)`` (one per pair).

    ``noise_source="random"`` (Diffusion-DPO): ``2B`` policy + ``2B`` reference. ``"inversion"`` adds
    ``2 (K + 1) sum_i steps(t_i)`` inversion evaluations (both images of a pair are inverted to ``t_i``).
    """
    pairs = int(torch.as_tensor(pair_timesteps).numel())
    if noise_source == "random":
        inversion = 0
    elif noise_source == "inversion":
        steps = inversion_steps(scheduler, pair_timesteps, num_inversion_steps, grid)
        inversion = 2 * (num_renoise_steps + 1) * int(steps.sum())
    else:
        raise ValueError(f"noise_source must be 'inversion' or 'random', got {noise_source!r}")
    return EvaluationCount(inversion=inversion, policy=2 * pairs, reference=2 * pairs)


def expected_evaluations_per_pair(scheduler, *, noise_source: str, num_inversion_steps: int, num_renoise_steps: int,
                                  grid: str = "exact") -> dict:
    """Expected sample-evaluations per pair for uniform ``t``: ``{"mean_steps", "grad", "no_grad", "total"}``.

    ``total = 4 + 2 E[steps(t)] (K + 1)`` with inversion, ``4`` with random noise; ``grad`` is always 2.
    """
    if noise_source == "random":
        mean_steps = 0.0
    elif noise_source == "inversion":
        mean_steps = mean_inversion_steps(scheduler, num_inversion_steps, grid)
    else:
        raise ValueError(f"noise_source must be 'inversion' or 'random', got {noise_source!r}")
    no_grad = 2.0 + 2.0 * mean_steps * (num_renoise_steps + 1)
    return {"mean_steps": mean_steps, "grad": 2.0, "no_grad": no_grad, "total": 2.0 + no_grad}


# ---------------------------------------------------------------------------------------------- stage timing
STAGES = ("vae_encode", "text_encode", "inversion", "policy_forward", "policy_backward", "reference_forward",
          "optimizer", "other")
"""Stages of one micro-step, in the order ``SmPOTrainer`` runs them (``other``: loss arithmetic, noising, logging)."""


class TrainerStageTimer:
    """Wall-clock seconds per stage of ``SmPOTrainer._micro_step``, without re-implementing the step.

    Inside ``with TrainerStageTimer(trainer) as timer:`` the trainer's own callables are wrapped with
    ``time.perf_counter`` (and a CUDA synchronise on GPU): ``encode_images``/``encode_prompts`` as the trainer
    module calls them, ``trainer._invert``, ``trainer._unet_call`` outside inversion (policy when autograd
    records, else reference), ``accelerator.backward``, and the optimiser (clip, ``step``, LR schedule,
    ``zero_grad``). Everything is restored on exit. :meth:`run_step` runs the trainer's normal micro-step.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.synchronize: Callable[[], None] | None = (
            torch.cuda.synchronize if trainer.accelerator.device.type == "cuda" else None)
        self._restore: list[Callable[[], None]] = []
        self._inversion_depth = 0
        self.current: dict[str, float] = {}

    # --------------------------------------------------------------- wrapping
    def _now(self) -> float:
        if self.synchronize is not None:
            self.synchronize()
        return time.perf_counter()

    def _timed(self, function, stage_of: Callable[[], str | None], nests: bool):
        timer = self

        def wrapper(*args, **kwargs):
            stage = stage_of()
            if stage is None:
                return function(*args, **kwargs)
            start = timer._now()
            timer._inversion_depth += nests
            try:
                return function(*args, **kwargs)
            finally:
                timer._inversion_depth -= nests
                timer.current[stage] = timer.current.get(stage, 0.0) + timer._now() - start

        return wrapper

    def _patch(self, owner, name: str, stage_of: Callable[[], str | None], nests: bool = False) -> None:
        had_own = name in getattr(owner, "__dict__", {})
        original = getattr(owner, name)
        setattr(owner, name, self._timed(original, stage_of, nests))

        def restore():
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)

        self._restore.append(restore)

    def _unet_stage(self) -> str | None:
        if self._inversion_depth:
            return None  # attributed to the enclosing inversion
        return "policy_forward" if torch.is_grad_enabled() else "reference_forward"

    def __enter__(self) -> "TrainerStageTimer":
        from . import trainer as trainer_module

        trainer = self.trainer
        self._patch(trainer_module, "encode_images", lambda: "vae_encode")
        self._patch(trainer_module, "encode_prompts", lambda: "text_encode")
        self._patch(trainer, "_invert", lambda: "inversion", nests=True)
        self._patch(trainer, "_unet_call", self._unet_stage)
        self._patch(trainer.accelerator, "backward", lambda: "policy_backward")
        self._patch(trainer.accelerator, "clip_grad_norm_", lambda: "optimizer")
        for name in ("step", "zero_grad"):
            self._patch(trainer.optimizer, name, lambda: "optimizer")
        self._patch(trainer.lr_scheduler, "step", lambda: "optimizer")
        return self

    def __exit__(self, *exc) -> None:
        while self._restore:
            self._restore.pop()()

    # --------------------------------------------------------------- running
    def run_step(self, batch: dict, generator: torch.Generator):
        """One ``trainer._micro_step`` under ``accelerator.accumulate``, as ``SmPOTrainer.train`` runs it.

        Returns ``(step_output, seconds)``: ``seconds`` maps every name in :data:`STAGES` and ``"total"`` to
        wall-clock seconds (``other = total - sum of the timed stages``).
        """
        if not self._restore:
            raise RuntimeError("use TrainerStageTimer as a context manager (`with TrainerStageTimer(t) as timer:`)")
        self.current = {}
        start = self._now()
        with self.trainer.accelerator.accumulate(self.trainer.unet):
            step = self.trainer._micro_step(batch, generator)
        total = self._now() - start
        seconds = {stage: self.current.get(stage, 0.0) for stage in STAGES}
        seconds["other"] = total - sum(value for key, value in seconds.items() if key != "other")
        seconds["total"] = total
        return step, seconds


# ---------------------------------------------------------------------------------------------- bytes
def _storage_key_and_bytes(tensor: torch.Tensor) -> tuple[tuple, int]:
    if tensor.device.type == "meta":
        return ("meta", id(tensor)), tensor.numel() * tensor.element_size()
    storage = tensor.untyped_storage()
    return (tensor.device.type, tensor.device.index, storage.data_ptr()), storage.nbytes()


class ByteCounter:
    """Resident bytes of tensors, each storage counted once across every :meth:`add` call.

    Non-meta tensors are keyed by ``(device, storage data pointer)`` and count their whole storage's bytes
    (a view keeps its full storage resident); meta tensors count ``numel * element_size`` once per tensor object.
    """

    def __init__(self):
        self._seen: set = set()
        self.by_category: dict[str, int] = {}

    def add(self, category: str, tensors: Iterable[torch.Tensor]) -> int:
        """Count the not-yet-seen storages among ``tensors`` under ``category``; returns the bytes added."""
        added = 0
        for tensor in tensors:
            if tensor is None:
                continue
            key, nbytes = _storage_key_and_bytes(tensor)
            if key in self._seen:
                continue
            self._seen.add(key)
            added += nbytes
        self.by_category[category] = self.by_category.get(category, 0) + added
        return added

    @property
    def total(self) -> int:
        return sum(self.by_category.values())


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Resident bytes of ``tensors`` with shared storages counted once (see :class:`ByteCounter`)."""
    counter = ByteCounter()
    return counter.add("all", tensors)


def module_tensors(module: torch.nn.Module | None) -> list[torch.Tensor]:
    """Parameters and buffers of ``module`` (none for ``None``)."""
    if module is None:
        return []
    return list(module.parameters()) + list(module.buffers())


def _unwrap_optimizer(optimizer):
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor held in an optimiser's per-parameter state (an accelerate wrapper is unwrapped)."""
    found: list[torch.Tensor] = []

    def collect(value):
        if torch.is_tensor(value):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    for state in _unwrap_optimizer(optimizer).state.values():
        collect(state)
    return found


RESIDENT_CATEGORIES = ("policy_trainable", "policy_frozen", "gradients", "optimizer_state", "ema", "reference_copy",
                       "inversion_copy", "vae", "text_encoders")


def trainer_resident_bytes(trainer) -> dict[str, int]:
    """Resident bytes the trainer holds, by category (:data:`RESIDENT_CATEGORIES`), plus ``"total"``.

    Gradients count only while they exist (after ``backward``, before ``zero_grad``); optimiser state only
    after the first ``step``. Storages shared between categories are counted in the first category listed.
    Tensors count wherever they live: with ``--cache_latents`` the VAE and text encoders sit in CPU memory.
    """
    unet = trainer.unwrapped_unet
    counter = ByteCounter()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    counter.add("policy_trainable", trainable)
    counter.add("policy_frozen", [p for p in unet.parameters() if not p.requires_grad] + list(unet.buffers()))
    counter.add("gradients", [p.grad for p in trainable if p.grad is not None])
    counter.add("optimizer_state", optimizer_state_tensors(trainer.optimizer))
    ema = getattr(trainer, "ema", None)  # --use_ema: an fp32 shadow of the trainable parameters
    counter.add("ema", ema.shadow_params if ema is not None else [])
    counter.add("reference_copy", module_tensors(trainer.reference.frozen_unet))
    copy = getattr(trainer, "inversion_copy", None)  # --inversion_weight_copy: one more UNet, weight dtype
    counter.add("inversion_copy", module_tensors(copy.module if copy is not None else None))
    counter.add("vae", module_tensors(trainer.parts.vae))
    counter.add("text_encoders", [t for encoder in trainer.parts.text_encoders for t in module_tensors(encoder)])
    return dict(counter.by_category) | {"total": counter.total}


# ---------------------------------------------------------------------------------------------- optimiser state
OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")


def _numel(shape) -> int:
    return math.prod(shape)


def optimizer_state_bytes(params: Iterable[torch.Tensor], optimizer: str, *, block_size: int = 256,
                          min_8bit_size: int = 4096) -> int:
    """Bytes of optimiser state for ``params`` after the first step, from their shapes and dtypes alone.

    * ``adamw`` (``torch.optim.AdamW``): ``exp_avg`` + ``exp_avg_sq`` in the parameter dtype and a 4-byte fp32
      ``step`` tensor per parameter.
    * ``adafactor`` (``transformers.optimization.Adafactor`` as the trainer builds it, no first moment): a
      tensor with ``ndim >= 2`` and shape ``s`` keeps a row factor of ``prod(s[:-1])`` and a column factor of
      ``prod(s[:-2] + s[-1:])`` elements, others a full second moment; in the gradient dtype (fp32 for
      fp16/bf16 parameters, which Adafactor upcasts), plus its 4-byte fp32 ``RMS`` scalar tensor.
    * ``adamw8bit`` (bitsandbytes ``AdamW8bit``, block-wise): tensors with at least ``min_8bit_size``
      elements keep two uint8 moments (2 bytes/element) and two fp32 absmax values per ``block_size``-element
      block; smaller tensors keep two fp32 moments; plus the two shared 256-entry fp32 quantisation maps.
      This is computed, not measured (recent bitsandbytes uses 256-element blocks; older releases 2048).
    """
    params = list(params)
    if optimizer == "adamw":
        return sum(2 * p.numel() * p.element_size() + 4 for p in params)
    if optimizer == "adafactor":
        total = 0
        for p in params:
            size = 4 if p.dtype in (torch.float16, torch.bfloat16) else p.element_size()
            shape = tuple(p.shape)
            elements = _numel(shape[:-1]) + _numel(shape[:-2] + shape[-1:]) if len(shape) >= 2 else _numel(shape)
            total += elements * size + 4
        return total
    if optimizer == "adamw8bit":
        total = 2 * 256 * 4 if params else 0  # the "dynamic" and "udynamic" quantisation maps, shared
        for p in params:
            n = p.numel()
            if n >= min_8bit_size:
                total += 2 * n + 2 * 4 * math.ceil(n / block_size)
            else:
                total += 2 * 4 * n
        return total
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


# ---------------------------------------------------------------------------------------------- estimates
@dataclass
class TrainingBytes:
    """Resident bytes of a training set-up, by category (see :func:`estimate_training_bytes`)."""

    by_category: dict[str, int]
    unet_parameters: int
    trainable_parameters: int

    @property
    def total(self) -> int:
        return sum(self.by_category.values())


def estimate_training_bytes(unet, vae, text_encoders: list, *, is_sdxl: bool, train_method: str,
                            optimizers: tuple[str, ...] | list[str], weight_dtype: torch.dtype, rank: int = 8,
                            lora_alpha: int | None = None,
                            target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0"),
                            separate_vae: bool = False, inversion_copy: bool = False,
                            ema: bool = False) -> dict[str, TrainingBytes]:
    """Resident bytes of parameters, gradients and optimiser state of a training set-up, without training.

    Give the models as loaded (any device; on the meta device real sizes cost no memory). The UNet is
    deep-copied and placed the way ``SmPOTrainer`` places it: LoRA - the UNet in ``weight_dtype`` plus fp32
    adapters, the reference being the same UNet with adapters off; full - an fp32 trainable UNet plus a frozen
    reference copy in ``weight_dtype``. The VAE is fp32 for SDXL unless ``separate_vae``, else ``weight_dtype``;
    text encoders are in ``weight_dtype``. Gradients: one per trainable parameter, in its dtype. Optimiser
    state: :func:`optimizer_state_bytes`. ``inversion_copy`` (``--inversion_weight_copy``): one more UNet in
    ``weight_dtype`` (LoRA merged into it). ``ema`` (``--use_ema``): an fp32 copy of the trainable parameters.
    Activations are not included.

    Returns ``{optimizer: TrainingBytes}`` for each name in ``optimizers`` (categories as
    :data:`RESIDENT_CATEGORIES`).
    """
    from diffusers.training_utils import cast_training_params

    from .models import add_lora_adapters

    if train_method not in ("lora", "full"):
        raise ValueError(f"train_method must be 'lora' or 'full', got {train_method!r}")
    device = next(unet.parameters()).device
    with torch.device(device):
        policy = copy.deepcopy(unet)
        reference = None
        if train_method == "lora":
            policy.requires_grad_(False).to(dtype=weight_dtype)
            add_lora_adapters(policy, rank, lora_alpha if lora_alpha is not None else rank, list(target_modules))
            cast_training_params(policy, dtype=torch.float32)
        else:
            reference = copy.deepcopy(unet).requires_grad_(False).to(dtype=weight_dtype)
            policy.requires_grad_(True).to(dtype=torch.float32)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    vae_dtype = torch.float32 if is_sdxl and not separate_vae else weight_dtype
    counter = ByteCounter()
    counter.add("policy_trainable", trainable)
    counter.add("policy_frozen", [p for p in policy.parameters() if not p.requires_grad] + list(policy.buffers()))
    counter.add("gradients", [torch.empty_like(p, device="meta") for p in trainable])
    counter.by_category["optimizer_state"] = 0
    counter.by_category["ema"] = sum(p.numel() for p in trainable) * 4 if ema else 0
    counter.add("reference_copy", module_tensors(reference))
    counter.by_category["inversion_copy"] = _bytes_in_dtype(unet, weight_dtype) if inversion_copy else 0
    counter.by_category["vae"] = _bytes_in_dtype(vae, vae_dtype)
    counter.by_category["text_encoders"] = sum(_bytes_in_dtype(encoder, weight_dtype) for encoder in text_encoders)
    results = {}
    for optimizer in optimizers:
        categories = dict(counter.by_category) | {"optimizer_state": optimizer_state_bytes(trainable, optimizer)}
        results[optimizer] = TrainingBytes(by_category=categories,
                                           unet_parameters=sum(p.numel() for p in unet.parameters()),
                                           trainable_parameters=sum(p.numel() for p in trainable))
    return results


def _bytes_in_dtype(module, dtype: torch.dtype) -> int:
    """Bytes of a module's parameters and buffers after ``module.to(dtype)`` (floating tensors change dtype)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in module_tensors(module))


# ---------------------------------------------------------------------------------------------- reports
def write_report(text: str, path: str | None, echo: bool = True) -> None:
    """Print a benchmark's report (``echo``) and, when ``path`` is given, write it there (parent folders created)."""
    if echo:
        print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        if echo:
            print(f"wrote {path}")
