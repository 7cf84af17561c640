"""`SmPOConfig`: every training option, its default and its validation.

``transformers.HfArgumentParser(SmPOConfig)`` turns the fields into ``--flags``. Flag names follow
diffusers' Diffusion-DPO training examples where the concept exists there. Defaults that depend on the
model family (SD 1.x/2.x vs SDXL) are ``None`` here and resolved by :meth:`SmPOConfig.resolve_model_defaults`
once the model has been inspected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

__all__ = ["SmPOConfig", "SDXL_DEFAULTS", "SD_DEFAULTS", "PICKSCORE_REWARD_SCALE"]

PICKSCORE_REWARD_SCALE = 0.28201571106910706 - 0.11543526500463486
"""``r_max - r_min`` of raw PickScore cosine similarities (the reference script's constants)."""

SDXL_DEFAULTS = {"beta_dpo": 5000.0, "num_inversion_steps": 10, "resolution": 1024}
SD_DEFAULTS = {"beta_dpo": 2000.0, "num_inversion_steps": 5, "resolution": 512}

_CHOICES = {
    "train_method": ("lora", "full"),
    "loss_type": ("smpo", "dpo"),
    "inversion_model": ("policy", "reference"),
    "inversion_grid": ("exact", "reference"),
    "noise_source": ("inversion", "random"),
    "tie_policy": ("drop", "keep"),
    "mixed_precision": (None, "no", "fp16", "bf16"),
    "lr_scheduler": ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                     "constant_with_warmup"),
    "report_to": ("tensorboard", "wandb", "all", "none"),
}


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


def default_latent_cache_root() -> str:
    """``$HF_HOME/smpo_diffusers/latent_cache``."""
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "smpo_diffusers", "latent_cache")


@dataclass
class SmPOConfig:
    """Options of an SmPO (or Diffusion-DPO baseline) fine-tuning run. See the README for a tour."""

    # ---------------------------------------------------------------- model
    pretrained_model_name_or_path: str | None = field(
        default=None, metadata=_help("Diffusers pipeline folder or Hub id (SD 1.x/2.x or SDXL).")
    )
    pretrained_vae_model_name_or_path: str | None = field(
        default=None, metadata=_help("A separate VAE (e.g. an fp16-safe SDXL VAE); its folder or Hub id.")
    )
    revision: str | None = field(default=None, metadata=_help(
        "Revision (branch, tag or commit) of a Hub --pretrained_model_name_or_path; a local folder is used as is."))
    variant: str | None = field(default=None, metadata=_help("Weights variant to load, e.g. 'fp16'."))
    cache_dir: str | None = field(default=None, metadata=_help("Where downloaded models/datasets are cached."))

    # ---------------------------------------------------------------- data
    dataset_name: str | None = field(
        default=None,
        metadata=_help("Preference set: Hub id, `save_to_disk` folder (e.g. from examples/label_rewards.py) "
                       "or local parquet/json/csv files in the Pick-a-Pic v2 layout."),
    )
    dataset_split_name: str = field(default="train", metadata=_help("Split to train on."))
    max_train_samples: int | None = field(
        default=None, metadata=_help("Keep this many pairs (after filtering), chosen with --seed.")
    )
    resolution: int | None = field(
        default=None, metadata=_help("Training resolution in pixels (default: 1024 SDXL, 512 SD).")
    )
    random_crop: bool = field(default=False,
                              metadata=_help("Random instead of centre crop (same box for both images)."))
    no_hflip: bool = field(default=False,
                           metadata=_help("Disable random horizontal flips (same flip for both images)."))
    dataloader_num_workers: int = field(default=0, metadata=_help("Data-loading worker processes."))
    ddp_timeout: int = field(
        default=1800,
        metadata=_help("Seconds a process waits at a collective for the others before the job stops (several "
                       "processes). The others wait while the main process alone downloads the data or model, "
                       "writes a checkpoint or the final weights, or renders validation images: raise it when one "
                       "of these takes longer (torch's NCCL default would be 10 minutes). An Accelerator passed to "
                       "SmPOTrainer keeps its own (InitProcessGroupKwargs)."),
    )
    proportion_empty_prompts: float = field(
        default=0.2, metadata=_help("Fraction of prompts replaced by '' (the paper's recipe; inversion uses it too).")
    )
    tie_policy: str = field(
        default="drop", metadata=_help("Human ties (label_0 == 0.5): 'drop' them, or 'keep' them.")
    )
    cache_latents: bool = field(
        default=False,
        metadata=_help("Encode every pair's images (VAE latent mean/std, both flips) and captions once into an "
                       "on-disk safetensors cache, reused across epochs and runs with the same data and models; "
                       "the VAE and text encoders then stay off the accelerator. Centre crop only."),
    )
    latent_cache_dir: str | None = field(
        default=None,
        metadata=_help("Folder of the --cache_latents cache (default: $HF_HOME/smpo_diffusers/latent_cache); one "
                       "sub-folder per dataset/model/settings key."),
    )

    # ---------------------------------------------------------------- optimisation
    train_batch_size: int = field(default=1, metadata=_help("Pairs per device per micro-batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimiser update."))
    max_train_steps: int | None = field(
        default=None, metadata=_help("Optimiser updates to run (the run's length; give it or --num_train_epochs).")
    )
    num_train_epochs: int | None = field(
        default=None, metadata=_help("Epochs to run (default 1); give it or --max_train_steps, not both.")
    )
    learning_rate: float = field(default=1e-5, metadata=_help("Peak learning rate."))
    scale_lr: bool = field(
        default=False, metadata=_help("Multiply the learning rate by batch size x accumulation x processes.")
    )
    lr_scheduler: str = field(default="constant", metadata=_help(
        "diffusers.optimization schedule: linear, cosine, cosine_with_restarts, polynomial, constant or "
        "constant_with_warmup."))
    lr_warmup_steps: int = field(default=0, metadata=_help("Warm-up updates."))
    lr_num_cycles: int = field(default=1, metadata=_help("Hard restarts of --lr_scheduler cosine_with_restarts."))
    lr_power: float = field(default=1.0, metadata=_help("Power factor of --lr_scheduler polynomial."))
    use_8bit_adam: bool = field(default=False, metadata=_help("bitsandbytes AdamW8bit (CUDA only)."))
    use_adafactor: bool = field(default=False, metadata=_help("transformers Adafactor (the reference SDXL choice)."))
    adam_beta1: float = field(default=0.9, metadata=_help("Adam beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("Adam beta2."))
    adam_weight_decay: float = field(default=1e-2, metadata=_help("Decoupled weight decay."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("Adam epsilon."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm (0 disables clipping)."))
    mixed_precision: str | None = field(
        default=None, metadata=_help("'no', 'fp16' or 'bf16'; default: the `accelerate config` setting.")
    )
    gradient_checkpointing: bool = field(default=False, metadata=_help("Trade compute for UNet activation memory."))
    allow_tf32: bool = field(default=False, metadata=_help("Allow TF32 matmuls on Ampere+ GPUs."))
    seed: int = field(default=0, metadata=_help("Seed for data order, augmentation, timesteps and noise."))
    use_ema: bool = field(
        default=False,
        metadata=_help("Keep an exponential moving average of the trained weights (diffusers' EMAModel: one more "
                       "fp32 copy of the trainable parameters, on the accelerator) and save it as the final "
                       "weights; validation images render it, checkpoints hold both."),
    )
    ema_decay: float = field(
        default=0.9999,
        metadata=_help("Largest decay of the --use_ema average: update n (from 0) averages with decay "
                       "min(ema_decay, (1 + n) / (10 + n)), 0 for the first update."),
    )
    max_consecutive_nonfinite: int = field(
        default=10,
        metadata=_help("Stop (after saving) when this many updates in a row had a non-finite loss or gradient; "
                       "each such update is skipped and counted."),
    )

    # ---------------------------------------------------------------- the method
    train_method: str = field(default="lora", metadata=_help("'lora' adapters or the 'full' UNet."))
    rank: int = field(default=8, metadata=_help("LoRA rank."))
    lora_alpha: int | None = field(default=None, metadata=_help("LoRA alpha (default: the rank)."))
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        metadata=_help("UNet module names that get LoRA adapters."),
    )
    loss_type: str = field(
        default="smpo", metadata=_help("'smpo' (reward-smoothed labels) or 'dpo' (hard labels, γ = 1).")
    )
    beta_dpo: float | None = field(default=None, metadata=_help("β of the DPO objective (default 5000 SDXL, 2000 SD)."))
    gamma: float = field(default=10.0, metadata=_help("SmPO smoothing scale γ."))
    reward_columns: list[str] | None = field(
        default=None,
        metadata=_help("The two reward columns; default: 'reward_0 reward_1', or the reference script's "
                       "'ps_score_0 ps_score_1' when those are the ones present."),
    )
    reward_scale: float | None = field(
        default=None,
        metadata=_help("Reward normalising scale s in p = σ((r_w - r_l)/s); default: the labelled dataset's "
                       "reward_stats.json, else the PickScore constant."),
    )
    num_inversion_steps: int | None = field(
        default=None, metadata=_help("Inversion grid density N over [0, T) (default 10 SDXL, 5 SD).")
    )
    num_renoise_steps: int = field(default=1, metadata=_help("ReNoise iterations K per inversion step (0 = DDIM)."))
    inversion_model: str = field(
        default="policy", metadata=_help("Which UNet inverts: the 'policy' (paper) or the 'reference'.")
    )
    inversion_grid: str = field(
        default="exact", metadata=_help("'exact' per-sample levels, or the 'reference' script's fixed grid.")
    )
    noise_source: str = field(
        default="inversion", metadata=_help("'inversion' (SmPO) or 'random' (Diffusion-DPO forward noising).")
    )
    inversion_weight_copy: bool = field(
        default=False,
        metadata=_help("Invert with a frozen copy of the policy in the weight dtype, LoRA merged, refreshed after "
                       "each update: no per-call weight casts or adapter layers in the inversion forwards, for one "
                       "more UNet in the weight dtype (2 bytes/parameter under fp16/bf16)."),
    )
    compile_inversion_copy: bool = field(
        default=False,
        metadata=_help("torch.compile the --inversion_weight_copy forward (inductor): the first inversion compiles "
                       "(two graphs: the first batch size, then one for any batch size; minutes for SDXL, cached "
                       "by inductor across runs), later inversion forwards run the compiled graph."),
    )

    # ---------------------------------------------------------------- outputs, logging, checkpoints
    output_dir: str = field(default="smpo-model", metadata=_help("Where weights, checkpoints and logs go."))
    logging_dir: str = field(default="logs", metadata=_help("Tracker folder, relative to --output_dir."))
    report_to: str = field(
        default="tensorboard", metadata=_help("'tensorboard', 'wandb', 'all' or 'none' (no trackers).")
    )
    checkpointing_steps: int = field(default=500, metadata=_help("Save a resumable checkpoint every N updates."))
    checkpoints_total_limit: int | None = field(default=None, metadata=_help("Keep at most this many checkpoints."))
    resume_from_checkpoint: str | None = field(
        default=None, metadata=_help("'latest', a checkpoint folder, or the name of one in --output_dir "
                                     "(e.g. checkpoint-500) to resume from.")
    )
    validation_prompts: list[str] | None = field(
        default=None, metadata=_help("Prompts rendered with fixed seeds during and after training.")
    )
    validation_steps: int | None = field(
        default=None, metadata=_help("Render the validation prompts every N updates (always at the end).")
    )
    validation_num_inference_steps: int = field(default=25, metadata=_help("Sampler steps for validation images."))
    save_full_pipeline: bool = field(
        default=False, metadata=_help("Save a whole pipeline folder (the base's scheduler and, for SD 1.x/2.x, its "
                                      "safety checker) instead of unet/ alone (full-UNet training).")
    )
    push_to_hub: bool = field(default=False, metadata=_help("Upload the final output to the Hugging Face Hub."))
    hub_model_id: str | None = field(default=None, metadata=_help("Hub repository id (default: output folder name)."))
    hub_private: bool = field(default=False, metadata=_help("Create the Hub repository as private."))

    def _changed(self, name: str) -> bool:
        """Whether field ``name`` differs from its default."""
        spec = type(self).__dataclass_fields__[name]
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        return getattr(self, name) != default

    def __post_init__(self):
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                shown = ", ".join(repr(c) for c in choices if c is not None)
                raise ValueError(f"--{name} {value!r} is not supported; choose one of {shown}.")
        for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                     "rank", "validation_num_inference_steps", "max_consecutive_nonfinite", "ddp_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("max_train_steps", "num_train_epochs", "max_train_samples", "validation_steps",
                     "checkpoints_total_limit", "num_inversion_steps", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1 when given, got {value}.")
        for name in ("learning_rate", "gamma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name} must be a positive number, got {value}.")
        for name in ("beta_dpo", "reward_scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name} must be a positive number, got {value}.")
        if self.num_renoise_steps < 0:
            raise ValueError(
                f"--num_renoise_steps must be >= 0 (0 = plain DDIM inversion), got {self.num_renoise_steps}.")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError(f"--proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}.")
        if not math.isfinite(self.max_grad_norm) or self.max_grad_norm < 0:
            raise ValueError(f"--max_grad_norm must be a finite number >= 0 (0 disables clipping), got "
                             f"{self.max_grad_norm}.")
        if self.lr_warmup_steps < 0 or self.dataloader_num_workers < 0:
            raise ValueError("--lr_warmup_steps and --dataloader_num_workers must be >= 0.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}.")
        for name in ("adam_epsilon", "adam_weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {value}.")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}.")
        if self.lr_num_cycles < 1:
            raise ValueError(f"--lr_num_cycles must be >= 1, got {self.lr_num_cycles}.")
        if not (math.isfinite(self.lr_power) and self.lr_power > 0):
            raise ValueError(f"--lr_power must be a positive number, got {self.lr_power}.")
        if self._changed("lr_num_cycles") and self.lr_scheduler != "cosine_with_restarts":
            raise ValueError("--lr_num_cycles only applies to --lr_scheduler cosine_with_restarts; drop it.")
        if self._changed("lr_power") and self.lr_scheduler != "polynomial":
            raise ValueError("--lr_power only applies to --lr_scheduler polynomial; drop it.")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"--resolution must be at least 8 pixels, got {self.resolution}; use e.g. 512 or 1024.")
        if self.reward_columns is not None and (
                len(self.reward_columns) != 2 or self.reward_columns[0] == self.reward_columns[1]):
            raise ValueError(
                f"--reward_columns needs two distinct column names (image 0, image 1), got {self.reward_columns}; "
                "e.g. --reward_columns reward_0 reward_1"
            )
        if self.cache_latents and self.random_crop:
            raise ValueError("--cache_latents stores centre crops; a --random_crop differs every epoch. Drop one.")
        if self.latent_cache_dir is not None and not self.cache_latents:
            raise ValueError("--latent_cache_dir is only used with --cache_latents; add it or drop the folder.")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in (0, 1), got {self.ema_decay}; e.g. 0.999 (an average over "
                             "about the last 1000 updates).")
        if self._changed("ema_decay") and not self.use_ema:
            raise ValueError("--ema_decay sets the --use_ema average's decay; add --use_ema or drop it.")
        if self.use_8bit_adam and self.use_adafactor:
            raise ValueError("--use_8bit_adam and --use_adafactor are mutually exclusive; pick one optimiser.")
        if self.noise_source == "random" and self.inversion_model != "policy":
            raise ValueError(
                "--inversion_model only applies to --noise_source inversion; drop it or use --noise_source inversion."
            )
        if self.inversion_weight_copy and (self.noise_source != "inversion" or self.inversion_model != "policy"):
            raise ValueError(
                "--inversion_weight_copy copies the policy for --noise_source inversion with --inversion_model "
                "policy; drop it (the reference is already a frozen weight-dtype model)."
            )
        if self.compile_inversion_copy and not self.inversion_weight_copy:
            raise ValueError("--compile_inversion_copy compiles the inversion's weight copy: add "
                             "--inversion_weight_copy (or drop --compile_inversion_copy).")
        if self.noise_source == "random" and (self.num_inversion_steps is not None or self.num_renoise_steps != 1):
            raise ValueError(
                "--num_inversion_steps and --num_renoise_steps only apply to --noise_source inversion; drop them or "
                "use --noise_source inversion."
            )
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError(
                f"--lr_scheduler constant ignores --lr_warmup_steps {self.lr_warmup_steps}; use --lr_scheduler "
                "constant_with_warmup (or linear/cosine/...), or drop the warm-up."
            )
        if self.loss_type == "dpo" and self.reward_columns is not None:
            raise ValueError("--reward_columns is only used by --loss_type smpo (DPO uses the human labels); drop it.")
        if self.noise_source == "random" and self.inversion_grid != "exact":
            raise ValueError(
                "--inversion_grid only applies to --noise_source inversion; drop it or use --noise_source inversion."
            )
        if self.loss_type == "dpo" and self.reward_scale is not None:
            raise ValueError("--reward_scale is only used by --loss_type smpo; drop it for --loss_type dpo.")
        lora_options = [name for name in ("rank", "lora_alpha", "lora_target_modules") if self._changed(name)]
        if self.train_method == "full" and lora_options:
            raise ValueError(f"--{'/--'.join(lora_options)} only apply to --train_method lora; drop them.")
        if self.loss_type == "dpo" and self._changed("gamma"):
            raise ValueError("--gamma scales SmPO's smoothed labels; --loss_type dpo uses hard labels. Drop it.")
        adam_options = [name for name in ("adam_beta1", "adam_beta2", "adam_epsilon") if self._changed(name)]
        if self.use_adafactor and adam_options:
            raise ValueError(f"Adafactor ignores --{'/--'.join(adam_options)}; drop them (--adam_weight_decay "
                             "applies to it).")
        if self.max_train_steps is not None and self.num_train_epochs is not None:
            raise ValueError(f"--max_train_steps {self.max_train_steps} sets the run's length, so --num_train_epochs "
                             f"{self.num_train_epochs} would be ignored; give one of them.")
        if self.loss_type == "dpo" and self.tie_policy == "keep":
            raise ValueError("--tie_policy keep with --loss_type dpo: a human tie has no winner, so a kept tie gives "
                             "zero gradient and only dilutes the other pairs' mean. Drop ties (the default), or use "
                             "--loss_type smpo, where the rewards order tied pairs.")
        if self.validation_steps is not None and not self.validation_prompts:
            raise ValueError("--validation_steps needs --validation_prompts.")
        if self._changed("validation_num_inference_steps") and not self.validation_prompts:
            raise ValueError("--validation_num_inference_steps needs --validation_prompts (nothing is rendered "
                             "without them).")
        if self.save_full_pipeline and self.train_method != "full":
            raise ValueError(
                "--save_full_pipeline applies to --train_method full; LoRA runs save adapter weights that "
                "load_lora_weights() applies to the base pipeline."
            )
        if (self.hub_model_id is not None or self.hub_private) and not self.push_to_hub:
            raise ValueError(
                "--hub_model_id/--hub_private only apply with --push_to_hub; add --push_to_hub or drop them.")
        if self._changed("logging_dir") and self.report_to == "none":
            raise ValueError("--logging_dir is the trackers' folder; --report_to none writes no tracker logs. Drop "
                             "it or pick a tracker.")
        if self._changed("logging_dir") and self.report_to == "wandb":
            raise ValueError("--logging_dir is TensorBoard's folder; wandb keeps its runs where WANDB_DIR says. Drop "
                             "--logging_dir, or use --report_to all to log to both.")
        if self.revision is not None and self.pretrained_model_name_or_path and os.path.isdir(
                self.pretrained_model_name_or_path):
            raise ValueError(
                f"--revision {self.revision!r} selects a Hub revision, but --pretrained_model_name_or_path "
                f"{self.pretrained_model_name_or_path!r} is a local folder, whose files are read as they are. Drop "
                "--revision (or check that revision out into the folder, or pass the Hub id).")
        if self.resume_from_checkpoint not in (None, "latest"):
            self.resume_from_checkpoint = self._checkpoint_folder(self.resume_from_checkpoint)

    def _checkpoint_folder(self, value: str) -> str:
        """The folder ``--resume_from_checkpoint value`` names: a bare name (``checkpoint-500``) is looked up in
        ``--output_dir`` first, as diffusers' training scripts do, then here; a path is taken as it is."""
        inside = os.path.join(self.output_dir, value)
        if os.sep not in value.rstrip(os.sep) and os.path.isdir(inside):
            return inside
        if os.path.isdir(value):
            return value
        raise ValueError(
            f"--resume_from_checkpoint {value!r} is not a folder (neither here nor in --output_dir "
            f"{self.output_dir!r}); pass 'latest', the name of a checkpoint-N folder in --output_dir, or its path."
        )

    # ------------------------------------------------------------------
    def resolve_model_defaults(self, is_sdxl: bool) -> "SmPOConfig":
        """Fill the model-family defaults (β, N, resolution) left as ``None``; returns ``self``. N stays ``None``
        with ``--noise_source random`` (nothing is inverted)."""
        defaults = SDXL_DEFAULTS if is_sdxl else SD_DEFAULTS
        for name, value in defaults.items():
            if name == "num_inversion_steps" and self.noise_source != "inversion":
                continue
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self

    @property
    def latent_cache_root(self) -> str:
        """The --cache_latents folder (the default lives beside the Hugging Face caches)."""
        return self.latent_cache_dir or default_latent_cache_root()

    @property
    def lora_alpha_value(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else self.rank

    def to_dict(self) -> dict:
        """A JSON-safe dict of the options (none holds a secret: the Hub token is never an option)."""
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        """Write :meth:`to_dict` as JSON."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True)
