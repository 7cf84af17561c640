"""`SmPOTrainer`: the training loop. It orchestrates; the formulas live in `losses.py` and `schedulers/`.

One step, as data::

    pixel pairs [winner, loser], captions, p            (data.py)
    -> x0 latents (2B) and prompt embeddings            (models.py)
    -> one t per pair, shared by its two images
    -> x~_t, τ_t by ReNoise inversion (or x_t, ε by random noising for the Diffusion-DPO baseline)
    -> policy prediction with grad, reference prediction without
    -> per-image errors -> smpo_loss(...)               (losses.py)
    -> backward, clip, optimiser step, LR schedule; log; checkpoint; validate
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from .config import PICKSCORE_REWARD_SCALE, SmPOConfig
from .distributed import (OtherProcessFailed, computed_on_main, on_every_process, process_state,
                          same_on_every_process, use_cpu_process_group)
from .data import (
    PADDING_INDEX,
    PairTransform,
    PreferencePairDataset,
    collate_preference_batch,
    load_preference_dataset,
    prepare_preference_pairs,
    resolve_reward_columns,
    validate_preference_columns,
)
from .losses import per_sample_mse, smpo_loss
from .models import (
    EMA_WEIGHTS_NAME,
    InversionWeightCopy,
    PromptEmbeddings,
    ReferenceModel,
    add_lora_adapters,
    encode_images,
    encode_prompts,
    load_diffusion_parts,
    load_ema_state,
    load_lora_state_into_unet,
    parameters_swapped,
    sample_latents,
    save_ema_state,
    save_lora,
    sdxl_time_ids,
)
from .files import atomic_output, atomic_write_json, fsync_directory, fsync_tree, publish_entries
from .json_records import finite_or_none
from .latent_cache import CachedPairDataset, LatentCache, cache_settings, pair_entry_bases

logger = logging.getLogger(__name__)


_WRITTEN_OR_REPLACED = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
                        "safety_checker", "feature_extractor", "image_encoder")
"""Sub-folders of ``--output_dir`` that a run writes, or removes when they belong to another weight layout (with
``checkpoint-N`` and the hidden ``.checkpoint-*.tmp`` folders of checkpoint writes and deletions, which a run
clears when it starts)."""


def check_inputs_outside_output(output_dir: str, inputs: dict[str, str | None]) -> None:
    """Refuse an ``output_dir`` that is one of the run's local inputs (``inputs``: flag name -> path or Hub id),
    or that holds one in a folder the run writes or replaces: saving there would overwrite or delete it (a base
    pipeline's ``unet/``, ``vae/``, ... folders are removed when a LoRA run saves into it). The latent cache's root
    may be ``output_dir`` itself: the run never touches the cache's hash-named folders."""
    out = os.path.realpath(output_dir)
    for flag, path in inputs.items():
        if not path or not os.path.isdir(path):
            continue  # a Hub id, or not given
        relative = os.path.relpath(os.path.realpath(path), out)
        first = relative.split(os.sep)[0]
        if relative == "." and flag == "latent_cache_dir":
            continue
        if (relative == "." or first in _WRITTEN_OR_REPLACED or CHECKPOINT_PATTERN.match(first)
                or (first.startswith(".checkpoint-") and first.endswith(".tmp"))):
            where = "is" if relative == "." else f"lies in {os.path.join(output_dir, first)!r} of"
            raise ValueError(f"--{flag} {path!r} {where} --output_dir {output_dir!r}: the run would overwrite or "
                             "delete it when it saves. Choose another --output_dir.")


PER_PROCESS_SKIPS = ("undecodable_pairs", "empty_batches")
"""Skip counters each process keeps for its own data (summed over processes when reported): undecodable pairs
(counted in epoch 0, so each pair once) and micro-batches with none left. The update counters (non-finite, fp16
overflow, empty: no pair on any process) are decided jointly and equal on every process."""

__all__ = ["SmPOTrainer", "StepOutput", "EpochShuffleSampler", "make_optimizer"]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
_LOAD_MISMATCH = re.compile(r"size mismatch|Error\(s\) in loading state_dict|Missing key|Unexpected key")
"""What torch/peft say when readable weights do not fit the model (not a damaged file)."""
TRAINER_STATE_NAME = "trainer_state.json"
FINAL_STAGING_PREFIX = ".final-"  # the hidden folder the final weights are written to before being renamed into place


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``, so data order survives resumes,
    followed by :data:`~smpo_diffusers.data.PADDING_INDEX` up to a multiple of ``pad_to_multiple``.

    With N processes and batches of B the trainer pads to N·B: every process then gets the same number of
    full-size batches, each pair is drawn exactly once an epoch, and accelerate (``even_batches``) has nothing
    to fill with repeated pairs. Padding never fills a whole round of N batches, so no update is padding only."""

    def __init__(self, num_samples: int, seed: int, pad_to_multiple: int = 1):
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}.")
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0
        self.padding = -num_samples % pad_to_multiple

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        return iter(order + [PADDING_INDEX] * self.padding)

    def __len__(self) -> int:
        return self.num_samples + self.padding


def _step_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (seed, epoch, batch, rank): the same keys give the same draws."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]))


@dataclass
class StepOutput:
    """What one micro-batch produced. ``loss`` has a graph; the rest are detached ``(B,)`` tensors or counts."""

    loss: torch.Tensor
    implicit_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    weight: torch.Tensor
    policy_err_w: torch.Tensor
    policy_err_l: torch.Tensor
    ref_err_w: torch.Tensor
    ref_err_l: torch.Tensor
    inversion_residual: torch.Tensor
    timesteps: torch.Tensor
    unet_evaluations: dict

    METRIC_NAMES = ("loss", "implicit_acc", "reward_margin", "preference_weight", "policy_err_w", "policy_err_l",
                    "ref_err_w", "ref_err_l", "inversion_residual")
    """The keys of :meth:`metrics`, in the order processes reduce them."""

    @property
    def num_pairs(self) -> int:
        """Pairs in the micro-batch (``B``)."""
        return int(self.implicit_accuracy.numel())

    def metrics(self) -> dict[str, tuple[float, int]]:
        """Per metric ``(sum over the micro-batch's pairs, number of pairs)``, so that updates and processes
        average per pair however the pairs fall into micro-batches (the loss counts as its mean times the pairs;
        the inversion residual counts only its finite entries)."""
        pairs = self.num_pairs
        residual = self.inversion_residual[torch.isfinite(self.inversion_residual)]
        per_pair = {"implicit_acc": self.implicit_accuracy, "reward_margin": self.reward_margin,
                    "preference_weight": self.weight, "policy_err_w": self.policy_err_w,
                    "policy_err_l": self.policy_err_l, "ref_err_w": self.ref_err_w, "ref_err_l": self.ref_err_l}
        return {"loss": (self.loss.detach().item() * pairs, pairs),
                **{name: (values.detach().double().sum().item(), pairs) for name, values in per_pair.items()},
                "inversion_residual": (residual.double().sum().item(), int(residual.numel()))}


def make_optimizer(config: SmPOConfig, params, lr: float):
    """The optimiser the flags ask for: AdamW, bitsandbytes AdamW8bit (CUDA) or transformers Adafactor."""
    if config.use_8bit_adam:
        if not torch.cuda.is_available():
            raise ValueError("--use_8bit_adam needs a CUDA GPU (bitsandbytes); drop it on CPU.")
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs `pip install smpo-diffusers[bnb]` (bitsandbytes).") from error
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                                   weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if config.use_adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=config.adam_weight_decay)
    params = list(params)
    # On CUDA the fused kernel (all tensors in a few launches) instead of the default multi-tensor path:
    # benchmarks/results/gpu_sdxl_step_h200.md times the optimisers on an SDXL UNet.
    fused = bool(params) and all(isinstance(p, torch.Tensor) and p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                             weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, fused=fused or None)


class SmPOTrainer:
    """Fine-tune an SD 1.x/2.x or SDXL UNet (LoRA or full) with SmPO or the Diffusion-DPO baseline.

    Args:
        config: the run's :class:`SmPOConfig`.
        dataset: a Pick-a-Pic-layout ``datasets.Dataset`` (default: load ``config.dataset_name``).
        pipeline_components: pipeline keyword components (default: ``from_pretrained`` of
            ``config.pretrained_model_name_or_path``).
        accelerator: an ``accelerate.Accelerator`` (default: built from the config).
        reward_statistics: the labelling run's statistics dict (default: ``reward_stats.json`` beside a
            ``save_to_disk`` dataset), used for the reward scale unless ``--reward_scale`` is given.
    """

    def __init__(self, config: SmPOConfig, *, dataset=None, pipeline_components: dict | None = None,
                 accelerator: Accelerator | None = None, reward_statistics: dict | None = None):
        self.config = config
        check_inputs_outside_output(config.output_dir, self._local_inputs())
        self._check_output_dir_writable()
        if config.push_to_hub:  # fail before hours of training, not after
            from .hub import check_hub_credentials, check_private_push_target, check_training_card, training_repo_id

            repo_id = training_repo_id(config.output_dir, config.hub_model_id)  # what the push after training uses
            token = check_hub_credentials()
            check_training_card(config.output_dir)  # a README.md the user wrote would block the card's upload
            if config.hub_private:  # every process asks, so that all of them stop (none waits for the others)
                check_private_push_target(repo_id, token)
        if accelerator is not None:
            self._check_given_accelerator(accelerator)
        self.accelerator = accelerator or self._make_accelerator()
        if config.use_8bit_adam and self.accelerator.device.type != "cuda":  # before any data or model loads
            raise ValueError(f"--use_8bit_adam needs a CUDA GPU (bitsandbytes' AdamW8bit) but this run trains on "
                             f"{self.accelerator.device}; drop it, or use --use_adafactor to save optimiser memory.")
        self.skipped = {"nonfinite_updates": 0, "fp16_overflow_updates": 0, "empty_updates": 0,
                        "undecodable_pairs": 0, "empty_batches": 0}
        self.consecutive_nonfinite = 0
        self._nonfinite_loss_in_update = False
        self._pairs_in_update = 0  # pairs this process trained in the current update
        self.unet_evaluations = {"inversion": 0, "policy": 0, "reference": 0}
        self.data_counts = {"upscaled_pairs": 0, "resized_pairs": 0, "empty_prompts": 0}
        """Per process, summed when reported: pairs with an image upscaled to the resolution and pairs whose loser
        was resized to the winner's size (epoch 0: each pair once), captions emptied (every draw)."""
        self.last_metrics: dict = {}

        # Each process reads its own data and models (no collective yet): a failure on one (a path another node
        # lacks, out of memory) stops every process here, instead of leaving the others waiting in the first
        # collective of the set-up below.
        on_every_process(lambda: self._load_data_and_models(dataset, pipeline_components, reward_statistics),
                         self.accelerator, "load the data and the models")
        self._setup_data()
        self._setup_optimization()
        self.inversion_copy = (InversionWeightCopy(self.unwrapped_unet, self.weight_dtype)
                               if config.inversion_weight_copy else None)
        if config.compile_inversion_copy:
            logger.info("compiling the inversion copy's forward: the first inversions compile (minutes for SDXL)")
            self.inversion_copy.compile_forward()

    # ------------------------------------------------------------------ set-up
    def _load_data_and_models(self, dataset, pipeline_components, reward_statistics) -> None:
        """This process's pairs (checked before any model is loaded), then the models, on the accelerator."""
        config = self.config
        raw = dataset if dataset is not None else self._load_dataset()
        self.dataset_fingerprint = raw._fingerprint  # identifies the data for --cache_latents
        self.reward_columns = resolve_reward_columns(raw, loss_type=config.loss_type,
                                                     reward_columns=config.reward_columns)
        validate_preference_columns(raw, loss_type=config.loss_type, reward_columns=self.reward_columns)
        self.reward_statistics = reward_statistics
        self.reward_scale, self.reward_scale_source = self._resolve_reward_scale(
            reward_statistics, labelled=raw if dataset is None else None)
        self.pairs, self.pair_statistics = prepare_preference_pairs(
            raw, loss_type=config.loss_type, reward_columns=self.reward_columns, reward_scale=self.reward_scale,
            tie_policy=config.tie_policy, max_train_samples=config.max_train_samples, seed=config.seed,
        )
        logger.info("%s", self.pair_statistics.summary())

        set_seed(config.seed)  # LoRA initialisation and anything else drawing from the global RNGs
        self.parts = load_diffusion_parts(config, pipeline_components)
        config.resolve_model_defaults(self.parts.is_sdxl)
        levels = self.parts.scheduler.config.num_train_timesteps
        if config.num_inversion_steps is not None and config.num_inversion_steps > levels:
            raise ValueError(f"--num_inversion_steps {config.num_inversion_steps} exceeds the model's {levels} "
                             f"noise levels; use at most {levels} (10 for SDXL and 5 for SD are the defaults).")
        factor = self.parts.vae_scale_factor
        if config.resolution % factor:
            raise ValueError(
                f"--resolution {config.resolution} must be divisible by the VAE downsampling factor {factor} of "
                f"this model; e.g. --resolution {max(factor, config.resolution // factor * factor)}."
            )
        self._setup_models()

    def _local_inputs(self) -> dict[str, str | None]:
        """The inputs that a save into the output folder must not touch (flag name -> path or Hub id)."""
        config = self.config
        return {"pretrained_model_name_or_path": config.pretrained_model_name_or_path,
                "pretrained_vae_model_name_or_path": config.pretrained_vae_model_name_or_path,
                "dataset_name": config.dataset_name, "latent_cache_dir": config.latent_cache_dir}

    def _check_output_dir_writable(self) -> None:
        out = self.config.output_dir
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, f".write-test-{os.getpid()}")
            with open(probe, "w") as handle:
                handle.write("ok")
            os.remove(probe)
        except OSError as error:
            raise OSError(f"--output_dir {out!r} is not writable ({error}); choose a writable folder.") from error

    def _check_given_accelerator(self, accelerator: Accelerator) -> None:
        """An ``Accelerator`` passed in carries its own accumulation and precision; the config must agree, since
        the step count, ``--scale_lr`` and the saved records read them from the config. Its data-loader options
        must leave batching and the data order to the trainer: ``train_batch_size`` is per process (the step
        count, the LR schedule and ``--scale_lr`` count it so), and the trainer resumes the data order itself."""
        config = self.config
        loader_options = accelerator.dataloader_config
        unsupported = {"split_batches": (loader_options.split_batches, "train_batch_size is per process; pass "
                                         "train_batch_size // num_processes instead"),
                       "dispatch_batches": (loader_options.dispatch_batches, "every process reads its own pairs"),
                       "use_stateful_dataloader": (loader_options.use_stateful_dataloader, "a resume would skip "
                                                   "the trained batches twice")}
        for name, (value, reason) in unsupported.items():
            if value:
                raise ValueError(f"the given Accelerator has {name}=True, which the trainer does not support "
                                 f"({reason}); build it with DataLoaderConfiguration({name}=False).")
        if not accelerator.gradient_state.sync_with_dataloader:
            raise ValueError("the given Accelerator has GradientAccumulationPlugin(sync_with_dataloader=False), which "
                             "the trainer does not support (an epoch's short last update would run into the next "
                             "epoch, and checkpoints record positions by epoch); leave it True.")
        if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
            raise ValueError(
                f"the given Accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
                f"gradient_accumulation_steps is {config.gradient_accumulation_steps}; make them equal.")
        if config._changed("ddp_timeout"):
            raise ValueError(
                f"ddp_timeout={config.ddp_timeout} would be ignored: the given Accelerator's process group already "
                "has its timeout. Set it there (accelerate's InitProcessGroupKwargs(timeout=...)) and leave "
                "ddp_timeout at its default.")
        if config.mixed_precision is not None and config.mixed_precision != accelerator.mixed_precision:
            raise ValueError(
                f"the given Accelerator runs mixed_precision={accelerator.mixed_precision!r} but the config says "
                f"{config.mixed_precision!r}; make them equal (or leave the config's None).")

    def _make_accelerator(self) -> Accelerator:
        config = self.config
        log_with = None
        if config.report_to != "none":
            from accelerate.utils import is_tensorboard_available, is_wandb_available

            wanted = ["tensorboard", "wandb"] if config.report_to == "all" else [config.report_to]
            available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
            for name in wanted:  # the names were checked by SmPOConfig
                if not available[name]:
                    raise ImportError(f"--report_to {name} needs `pip install {name}` (or use --report_to none).")
            log_with = wanted
        project_config = ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, config.logging_dir)
        )
        # the process group first, with the timeout (accelerate's InitProcessGroupKwargs would drop a timeout equal
        # to its own default); the Accelerator then joins the state this made
        process_state(config.ddp_timeout)
        return Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                           mixed_precision=config.mixed_precision, log_with=log_with, project_config=project_config,
                           cpu=use_cpu_process_group())

    def _load_dataset(self):
        if self.config.dataset_name is None:
            raise ValueError("--dataset_name is required (a Hub id, a save_to_disk folder or local data files).")
        return load_preference_dataset(self.config.dataset_name, self.config.dataset_split_name,
                                       cache_dir=self.config.cache_dir)

    def _resolve_reward_scale(self, reward_statistics: dict | None, labelled=None) -> tuple[float | None, str]:
        """SmPO's reward scale and where it came from: ``--reward_scale``, the statistics given, the
        ``reward_stats.json`` beside a ``save_to_disk`` dataset (checked against ``labelled``, the dataset loaded
        from that folder, when they record what they describe) or, failing those, the PickScore constant."""
        config = self.config
        if config.loss_type != "smpo":
            return None, "unused (dpo)"
        if config.reward_scale is not None:
            return float(config.reward_scale), "--reward_scale"
        from .rewards import load_reward_statistics, reward_scale_from_statistics
        from .rewards.job import SHARDS_DIRNAME
        from .rewards.statistics import REWARD_COLUMNS

        source = "reward_statistics argument"
        if reward_statistics is None and config.dataset_name and os.path.isdir(str(config.dataset_name)):
            reward_statistics = load_reward_statistics(config.dataset_name)
            source = f"{config.dataset_name}/reward_stats.json"
            relabel = ("Rerun label_rewards with the same arguments (it resumes from its shards and rewrites the "
                       "statistics), or pass --reward_scale.")
            if reward_statistics is None and os.path.isdir(os.path.join(config.dataset_name, SHARDS_DIRNAME)):
                raise ValueError(f"{config.dataset_name} was labelled by label_rewards but holds no reward_stats.json "
                                 f"(the labelling was interrupted before writing it). {relabel}")
            if reward_statistics is not None and labelled is not None:
                self._check_statistics_describe(reward_statistics, labelled, source, relabel)
        if reward_statistics is not None:
            described = tuple(reward_statistics.get("reward_columns", REWARD_COLUMNS))
            if self.reward_columns is not None and tuple(self.reward_columns) != described:
                raise ValueError(
                    f"{source} describes the reward columns {list(described)} (model "
                    f"{reward_statistics.get('reward_model')!r}), but training uses {list(self.reward_columns)}: its "
                    "scale would not fit them. Pass --reward_scale for these columns (PickScore: "
                    f"{PICKSCORE_REWARD_SCALE:.4f}), or train on {' '.join(described)}."
                )
            self.reward_statistics = reward_statistics
            return reward_scale_from_statistics(reward_statistics), source
        logger.warning("No reward statistics found; using the PickScore scale %.4f. Pass --reward_scale for "
                       "other reward models.", PICKSCORE_REWARD_SCALE)
        return PICKSCORE_REWARD_SCALE, "PickScore default"

    @staticmethod
    def _check_statistics_describe(statistics: dict, labelled, source: str, relabel: str) -> None:
        """Refuse statistics recorded for other rewards than ``labelled``'s (a labelling interrupted mid-way through
        rewriting its folder). Statistics without ``labels_sha256`` (older or hand-written) are taken as they are."""
        from .rewards.statistics import REWARD_COLUMNS, VALID_COLUMN, labels_digest

        if "labels_sha256" not in statistics or not {*REWARD_COLUMNS, VALID_COLUMN} <= set(labelled.column_names):
            return
        if statistics.get("num_pairs") != len(labelled) or statistics["labels_sha256"] != labels_digest(labelled):
            raise ValueError(f"{source} describes other rewards than the dataset beside it "
                             f"({statistics.get('num_pairs')} pairs recorded, {len(labelled)} present, or other "
                             f"values): its scale would not fit them. {relabel}")

    def _setup_models(self) -> None:
        config, parts, accelerator = self.config, self.parts, self.accelerator
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            accelerator.mixed_precision, torch.float32)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        elif config.allow_tf32:
            logger.warning("--allow_tf32 has no effect without a CUDA GPU (TF32 is an Ampere+ matmul mode).")
        device = accelerator.device
        # The SDXL VAE overflows in fp16; keep it fp32 unless a separate (fp16-safe) VAE is given.
        fp16_unsafe_vae = parts.is_sdxl and not config.pretrained_vae_model_name_or_path
        vae_dtype = torch.float32 if fp16_unsafe_vae else self.weight_dtype
        parts.vae.requires_grad_(False).to(device, dtype=vae_dtype).eval()
        for encoder in parts.text_encoders:
            encoder.requires_grad_(False).to(device, dtype=self.weight_dtype).eval()
        unet = parts.unet
        if config.train_method == "lora":
            unet.requires_grad_(False)
            unet.to(device, dtype=self.weight_dtype)
            add_lora_adapters(unet, config.rank, config.lora_alpha_value, config.lora_target_modules)
            from diffusers.training_utils import cast_training_params

            cast_training_params(unet, dtype=torch.float32)  # trainable adapters stay fp32 under fp16/bf16
            self.reference = ReferenceModel(None)
        else:
            self.reference = ReferenceModel(copy.deepcopy(unet).to(device, dtype=self.weight_dtype))
            unet.requires_grad_(True).to(device, dtype=torch.float32)
        unet.train()
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = unet

    def _setup_data(self) -> None:
        config = self.config
        self.latent_cache_stats = None
        if config.cache_latents:
            self.train_dataset = self._cached_dataset()
        else:
            transform = PairTransform(config.resolution, random_crop=config.random_crop, hflip=not config.no_hflip)
            self.train_dataset = PreferencePairDataset(self.pairs, transform, seed=config.seed,
                                                       proportion_empty_prompts=config.proportion_empty_prompts)
        # pad to one round of batches (N batches of B)
        processes = self.accelerator.num_processes
        self.sampler = EpochShuffleSampler(len(self.train_dataset), config.seed,
                                           pad_to_multiple=config.train_batch_size * processes if processes > 1 else 1)
        self.train_dataloader = torch.utils.data.DataLoader(
            self.train_dataset, batch_size=config.train_batch_size, sampler=self.sampler,
            collate_fn=collate_preference_batch, num_workers=config.dataloader_num_workers,
        )

    def _cached_dataset(self) -> CachedPairDataset:
        """Fill the latent cache with whatever these pairs lack, then read from it; the VAE and text encoders
        leave the accelerator (they come back only for validation images)."""
        config, parts = self.config, self.parts
        settings = cache_settings(dataset_fingerprint=self.dataset_fingerprint, parts=parts,
                                  resolution=config.resolution, hflip=not config.no_hflip, vae_dtype=parts.vae.dtype,
                                  weight_dtype=self.weight_dtype)
        cache = LatentCache(config.latent_cache_root, settings)
        same_on_every_process(cache.key, self.accelerator, "the latent-cache key (model weights, data, settings)")
        # one stat per path-only image, by the main process (another node may hold copies with other times),
        # shared by the build and the reader
        bases = computed_on_main(lambda: pair_entry_bases(self.pairs), self.accelerator)
        stats = cache.ensure(self.pairs, parts, resolution=config.resolution, weight_dtype=self.weight_dtype,
                             accelerator=self.accelerator, batch_size=config.train_batch_size, entry_bases=bases)
        self.latent_cache_stats = stats
        logger.info("latent cache %s: %d/%d pair entries built, %d/%d prompts built, %d undecodable, %.1f s",
                    stats.path, stats.pairs_built, stats.pairs_needed, stats.prompts_built, stats.prompts_needed,
                    stats.undecodable_pairs, stats.seconds)
        self._move_encoders(torch.device("cpu"))
        # every process reads the whole cache: one that lacks entries (a --latent_cache_dir local to each machine)
        # stops them all, with the fix
        return on_every_process(
            lambda: CachedPairDataset(self.pairs, cache.reader(), seed=config.seed,
                                      proportion_empty_prompts=config.proportion_empty_prompts,
                                      hflip=not config.no_hflip, is_sdxl=parts.is_sdxl, entry_bases=bases),
            self.accelerator, f"read the latent cache {stats.path}")

    def _move_encoders(self, device) -> None:
        self.parts.vae.to(device)
        for encoder in self.parts.text_encoders:
            encoder.to(device)

    @contextlib.contextmanager
    def _encoders_on_accelerator(self):
        """With --cache_latents the VAE and text encoders live on the CPU; bring them over for a while."""
        if not self.config.cache_latents:
            yield
            return
        self._move_encoders(self.accelerator.device)
        try:
            yield
        finally:
            self._move_encoders(torch.device("cpu"))

    def _setup_optimization(self) -> None:
        from diffusers.optimization import get_scheduler

        config, accelerator = self.config, self.accelerator
        lr = config.learning_rate
        if config.scale_lr:
            lr *= config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        self.learning_rate = lr
        self.trainable_params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(config, self.trainable_params, lr)
        batches_per_epoch = math.ceil(len(self.train_dataset) / config.train_batch_size / accelerator.num_processes)
        if config.gradient_accumulation_steps > batches_per_epoch:  # an update ends with its epoch
            raise ValueError(
                f"--gradient_accumulation_steps {config.gradient_accumulation_steps} is more than the "
                f"{batches_per_epoch} micro-batches an epoch holds per process ({len(self.train_dataset)} pairs, "
                f"--train_batch_size {config.train_batch_size}, {accelerator.num_processes} "
                f"process{'es' if accelerator.num_processes > 1 else ''}): an update ends with its epoch, so each "
                f"would average {batches_per_epoch} micro-batches, not the batch size asked for. Use "
                f"--gradient_accumulation_steps {batches_per_epoch} or less (or more pairs).")
        updates_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
        self.max_train_steps = config.max_train_steps or (config.num_train_epochs or 1) * updates_per_epoch
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler, optimizer=self.optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=self.max_train_steps * accelerator.num_processes,
            num_cycles=config.lr_num_cycles, power=config.lr_power,
        )
        self.unet, self.optimizer, self.train_dataloader, self.lr_scheduler = accelerator.prepare(
            self.unet, self.optimizer, self.train_dataloader, self.lr_scheduler
        )
        updates_per_epoch = math.ceil(len(self.train_dataloader) / config.gradient_accumulation_steps)
        self.num_train_epochs = math.ceil(self.max_train_steps / updates_per_epoch)
        self._warn_about_unreached_intervals()
        accelerator.register_save_state_pre_hook(self._save_state_hook)
        accelerator.register_load_state_pre_hook(self._load_state_hook)
        self.ema = None
        if config.use_ema:  # an fp32 shadow of the trainable parameters; checkpoints hold it (ema.safetensors)
            from diffusers.training_utils import EMAModel

            # one parameter at a time: foreach would hold a temporary as large as the whole average
            self.ema = EMAModel(self.trainable_params, decay=config.ema_decay, foreach=False)

    def _warn_about_unreached_intervals(self) -> None:
        """Options whose interval this run never reaches do nothing: say so before training, not after."""
        config, steps = self.config, self.max_train_steps
        if config.checkpoints_total_limit is not None and config.checkpointing_steps > steps:
            logger.warning("--checkpoints_total_limit %d has nothing to prune: --checkpointing_steps %d is more than "
                           "this run's %d updates, so no checkpoint is written (lower --checkpointing_steps to "
                           "checkpoint this run)", config.checkpoints_total_limit, config.checkpointing_steps, steps)
        if config.validation_steps is not None and config.validation_steps >= steps:
            logger.warning("--validation_steps %d is not below this run's %d updates: only the final validation "
                           "images are rendered (give a --validation_steps below %d for intermediate ones, or drop "
                           "it)", config.validation_steps, steps, steps)

    @property
    def unwrapped_unet(self):
        return self.accelerator.unwrap_model(self.unet)

    @contextlib.contextmanager
    def averaged_weights(self):
        """With ``--use_ema``, the policy holds the moving average inside this block (what is saved and rendered)
        and its trained weights again after it (the two exchange storages: exact, no copy); without, nothing
        changes."""
        if self.ema is None:
            yield
            return
        with parameters_swapped(self.trainable_params, self.ema.shadow_params):
            yield

    @property
    def _trainable_names(self) -> list[str]:
        """Names of the trainable parameters, in :attr:`trainable_params` order (the average's file keys)."""
        return [name for name, p in self.unwrapped_unet.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ checkpoint hooks
    def _save_state_hook(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            for model in models:
                unwrapped = self.accelerator.unwrap_model(model)
                if self.config.train_method == "lora":
                    save_lora(output_dir, unwrapped, self.parts.is_sdxl)
                else:
                    unwrapped.save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
                if weights:
                    weights.pop()
            if self.ema is not None:
                save_ema_state(output_dir, self.ema, self._trainable_names)

    def _load_state_hook(self, models, input_dir):
        if getattr(self, "inversion_copy", None) is not None:
            self.inversion_copy.mark_stale()
        if self.ema is not None:  # in place, on the accelerator
            load_ema_state(input_dir, self.ema, self._trainable_names)
        while models:
            model = self.accelerator.unwrap_model(models.pop())
            if self.config.train_method == "lora":
                load_lora_state_into_unet(model, input_dir)
            else:
                from diffusers import UNet2DConditionModel

                loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
                model.load_state_dict(loaded.state_dict())
                del loaded

    # ------------------------------------------------------------------ one step
    def _unet_call(self, unet, latents, timesteps, conditioning):
        return unet(latents.to(self.weight_dtype), timesteps,
                    encoder_hidden_states=conditioning["encoder_hidden_states"],
                    added_cond_kwargs=conditioning.get("added_cond_kwargs")).sample

    def compute_loss(self, batch: dict, generator: torch.Generator) -> StepOutput:
        """Loss and diagnostics for one micro-batch of ``B`` pairs (images ordered winners first, then losers)."""
        config, parts, device = self.config, self.parts, self.accelerator.device
        scheduler = parts.scheduler
        num_pairs = batch["batch_size"]
        x0, prompts = self._clean_latents_and_prompts(batch, generator)
        conditioning = {"encoder_hidden_states": prompts.hidden.repeat(2, 1, 1)}
        if parts.is_sdxl:
            sizes, crops = batch["original_sizes"], batch["crop_top_lefts"]
            time_ids = sdxl_time_ids(torch.cat([sizes[:, 0], sizes[:, 1]]), torch.cat([crops[:, 0], crops[:, 1]]),
                                     config.resolution)
            conditioning["added_cond_kwargs"] = {"text_embeds": prompts.pooled.repeat(2, 1),
                                                 "time_ids": time_ids.to(device, dtype=self.weight_dtype)}
        # One timestep per pair, shared by its two images.
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (num_pairs,), generator=generator)
        timesteps = timesteps.repeat(2).to(device)

        if config.noise_source == "random":
            noise = torch.randn(x0[:num_pairs].shape, generator=generator).to(device).repeat(2, 1, 1, 1)
            noisy = scheduler.add_noise(x0, noise, timesteps)
            residual = torch.full((num_pairs,), math.nan)
            inversion_evaluations = 0
        else:
            inversion = self._invert(x0, timesteps, conditioning)
            noisy, noise = inversion.latents, inversion.epsilon
            # per pair: the mean of its two images' last ReNoise correction (NaN where K = 0)
            residual = inversion.renoise_residual.view(2, num_pairs).mean(0).cpu()
            inversion_evaluations = inversion.num_model_evaluations
        target = noise if parts.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)

        policy_err = per_sample_mse(self._unet_call(self.unet, noisy, timesteps, conditioning), target)
        with torch.no_grad(), self.accelerator.autocast(), self.reference.active(self.unwrapped_unet) as reference:
            ref_err = per_sample_mse(self._unet_call(reference, noisy, timesteps, conditioning), target)

        # prob_w is the reward-smoothed p in smpo mode; in dpo mode the hard label (1, or 0.5 for a kept human
        # tie) with γ = 1, which is exactly Diffusion-DPO.
        prob_w = batch["prob_w"].to(device)
        gamma = config.gamma if config.loss_type == "smpo" else 1.0
        out = smpo_loss(policy_err[:num_pairs], policy_err[num_pairs:], ref_err[:num_pairs], ref_err[num_pairs:],
                        prob_w, config.beta_dpo, gamma)
        return StepOutput(
            loss=out.loss, implicit_accuracy=out.implicit_accuracy, reward_margin=out.reward_margin,
            weight=out.weight, policy_err_w=policy_err[:num_pairs].detach(),
            policy_err_l=policy_err[num_pairs:].detach(), ref_err_w=ref_err[:num_pairs],
            ref_err_l=ref_err[num_pairs:], inversion_residual=residual, timesteps=timesteps[:num_pairs].cpu(),
            unet_evaluations={"inversion": inversion_evaluations, "policy": 2 * num_pairs,
                              "reference": 2 * num_pairs},
        )

    def _clean_latents_and_prompts(self, batch: dict, generator: torch.Generator):
        """``x0`` ``(2B, C, h, w)`` fp32 (winners, then losers; one VAE posterior draw from ``generator``) and the
        prompt embeddings, encoded now or read from the latent cache (same draw either way)."""
        parts, device = self.parts, self.accelerator.device
        if "latent_mean" not in batch:
            pixels = batch["pixel_values"]
            x0 = encode_images(parts.vae, torch.cat([pixels[:, 0], pixels[:, 1]]), generator)
            return x0, encode_prompts(parts, batch["captions"], device, dtype=self.weight_dtype)
        mean, std = (torch.cat([batch[key][:, 0], batch[key][:, 1]]).to(device)
                     for key in ("latent_mean", "latent_std"))
        pooled = batch["prompt_pooled"].to(device, self.weight_dtype) if parts.is_sdxl else None
        prompts = PromptEmbeddings(hidden=batch["prompt_hidden"].to(device, self.weight_dtype), pooled=pooled)
        return sample_latents(parts.vae.config, mean, std, generator), prompts

    def _invert(self, x0, timesteps, conditioning):
        """ReNoise-invert ``x0`` to ``timesteps`` with the policy (default) or the reference, no autograd."""
        config = self.config
        invert_kwargs = dict(num_inversion_steps=config.num_inversion_steps, num_renoise_steps=config.num_renoise_steps,
                             grid=config.inversion_grid, prediction_type=self.parts.prediction_type,
                             model_kwargs=conditioning)

        def invert_with(unet):
            def model_fn(latents, level, encoder_hidden_states, added_cond_kwargs=None):
                return self._unet_call(unet, latents, level, {"encoder_hidden_states": encoder_hidden_states,
                                                              "added_cond_kwargs": added_cond_kwargs})

            return self.parts.scheduler.invert(model_fn, x0, timesteps, **invert_kwargs)

        with self.accelerator.autocast():
            if config.inversion_model == "reference":
                with self.reference.active(self.unwrapped_unet) as reference:
                    return invert_with(reference)
            if self.inversion_copy is not None:
                return invert_with(self.inversion_copy.current(self.unwrapped_unet))
            return invert_with(self.unwrapped_unet)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        """Run the configured number of updates; saves the model at the end. Returns the final metrics."""
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator

        def start():  # main process; a failure stops every process (none waits for it in the first all-reduce)
            self._clean_partial_checkpoints()
            accelerator.init_trackers("smpo", config=self._tracker_config())

        computed_on_main(start, accelerator, "start the run (old partial checkpoints, trackers)")
        global_step, first_epoch, resume_batch = self._maybe_resume()
        self._check_no_later_checkpoints(global_step)
        self.global_step, start_step, trained_updates = global_step, global_step, 0
        progress = tqdm(range(self.max_train_steps), initial=global_step, desc="updates",
                        disable=not accelerator.is_local_main_process)
        window: list[dict] = []
        done = global_step >= self.max_train_steps
        for epoch in range(first_epoch, self.num_train_epochs):
            if done:
                break
            start = resume_batch if epoch == first_epoch else 0
            loader = accelerator.skip_first_batches(self.train_dataloader, start) if start else self.train_dataloader
            # Data order (our sampler) and augmentation (our dataset) depend only on the epoch, set here on both.
            # accelerate's loaders would otherwise use their own iteration count, which restarts at 0 after a
            # resume; a loader made by skip_first_batches does not pass the epoch to the dataset, nor, with
            # several processes (its batch sampler then wraps accelerate's shard), to the sampler.
            loader.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            self.train_dataset.set_epoch(epoch)
            for batch_index, batch in enumerate(loader, start=start):
                generator = _step_generator(config.seed, epoch, batch_index, accelerator.process_index)
                if epoch == 0 and batch:  # every pair is drawn once an epoch: count each pair once
                    self.skipped["undecodable_pairs"] += int(batch.get("num_skipped", 0))
                    self.data_counts["upscaled_pairs"] += int(batch.get("num_upscaled", 0))
                    self.data_counts["resized_pairs"] += int(batch.get("num_resized_pairs", 0))
                if batch:
                    self.data_counts["empty_prompts"] += int(batch.get("num_empty_prompts", 0))
                with accelerator.accumulate(self.unet):
                    step = self._micro_step(batch, generator)
                    if step is not None:
                        window.append(step.metrics())
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                self.global_step = global_step
                progress.update(1)
                logs = self._reduce_metrics(window) | {"lr": self.lr_scheduler.get_last_lr()[0]}
                window = []
                if "loss" in logs:
                    trained_updates += 1
                    self.last_metrics = logs
                else:  # every micro-batch of the update, on every process, was empty
                    self.skipped["empty_updates"] += 1
                    logger.warning("update %d trained nothing: no pair in it could be decoded (%d empty updates "
                                   "so far)", global_step, self.skipped["empty_updates"])
                progress.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}",
                                     acc=f"{logs.get('implicit_acc', float('nan')):.2f}")
                accelerator.log(logs, step=global_step)
                if global_step % config.checkpointing_steps == 0:
                    self.save_checkpoint(global_step, epoch, batch_index + 1)
                if (config.validation_steps and global_step % config.validation_steps == 0
                        and global_step < self.max_train_steps):  # the last update gets the final rendering
                    # the main process renders while the others wait; a failure there stops every process
                    computed_on_main(lambda: self.log_validation(global_step), accelerator,
                                     "render the validation images")
                if global_step >= self.max_train_steps:
                    done = True
                    break
        progress.close()
        accelerator.wait_for_everyone()
        if global_step > start_step and trained_updates == 0:
            raise ValueError(  # bad data: the CLIs print it as an input error
                f"None of the {global_step - start_step} updates trained anything: no pair could be decoded "
                f"({self.count_totals()[1]['undecodable_pairs']} undecodable pairs). Check the image columns "
                "(jpg_0/jpg_1: encoded image bytes, {'bytes': ..., 'path': ...} cells or PIL images); no weights "
                "were saved."
            )
        self.save_model(config.output_dir)
        if config.validation_prompts:
            computed_on_main(lambda: self.log_validation(global_step, final=True), accelerator,
                             "render the final validation images")
        accelerator.end_training()  # flush trackers before anything is uploaded
        if accelerator.is_main_process:
            if config.push_to_hub:
                self._push_trained_output()
            else:
                self._write_model_card(required=False)
        return self.last_metrics

    def _micro_step(self, batch, generator) -> StepOutput | None:
        accelerator = self.accelerator
        if batch is None or not batch.get("batch_size"):
            # Every pair of this micro-batch failed to decode (counted), or it is the epoch's end padding (several
            # processes only; not a skip). Alone we simply skip it; with several processes this rank still runs
            # the wrapped UNet once (times zero) so that it joins the gradient all-reduce the others are in.
            self.skipped["empty_batches"] += int(bool(batch and batch.get("num_skipped")))
            if accelerator.num_processes > 1:
                accelerator.backward(self._placeholder_policy_loss())
            if accelerator.sync_gradients and any(p.grad is not None for p in self.trainable_params):
                self._finish_update()  # apply what earlier micro-batches accumulated
            return None
        step = self.compute_loss(batch, generator)
        for stage, count in step.unet_evaluations.items():
            self.unet_evaluations[stage] += count
        self._nonfinite_loss_in_update |= not bool(torch.isfinite(step.loss.detach()))
        self._pairs_in_update += step.num_pairs
        # step.loss is this micro-batch's mean over its pairs: weighted by its share of a full micro-batch, every
        # pair counts the same in the update (_finish_update turns the sum into the mean over the pairs trained)
        full = self.config.train_batch_size
        accelerator.backward(step.loss if step.num_pairs == full else step.loss * (step.num_pairs / full))
        if accelerator.sync_gradients:
            self._finish_update()
        return step

    def _placeholder_policy_loss(self) -> torch.Tensor:
        """Zero times one policy forward on a blank latent (level 0, zero conditioning): its gradients are exactly
        zero, but it goes through the wrapped (DDP) model like a real step."""
        unet_config, device = self.unwrapped_unet.config, self.accelerator.device
        size = self.config.resolution // self.parts.vae_scale_factor
        latents = torch.zeros(1, unet_config.in_channels, size, size, device=device)
        conditioning = {"encoder_hidden_states": torch.zeros(1, 1, unet_config.cross_attention_dim, device=device,
                                                             dtype=self.weight_dtype)}
        if self.parts.is_sdxl:
            pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
            conditioning["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(1, pooled, device=device, dtype=self.weight_dtype),
                "time_ids": sdxl_time_ids(torch.full((1, 2), self.config.resolution, device=device),
                                          torch.zeros(1, 2, device=device), self.config.resolution
                                          ).to(self.weight_dtype)}
        timesteps = torch.zeros(1, dtype=torch.long, device=device)
        return self._unet_call(self.unet, latents, timesteps, conditioning).float().sum() * 0.0

    def _finish_update(self) -> None:
        """Average over the pairs trained, clip, check finiteness on every process, then step the optimiser and
        LR schedule (or skip).

        The accumulated gradient is the sum over the update's pairs divided by the pairs a full update holds
        (micro-batch losses weighted by their pair counts, then accelerate's division by the accumulation steps
        and DDP's mean over processes). An update with fewer pairs (undecodable pairs, the epoch's last partial
        micro-batch or update, the padding at an epoch's end on several processes) is scaled up here to the mean
        over the pairs it did train, so that every pair weighs the same in every update.

        An update in which no process trained a pair (every micro-batch empty; the gradients are the zeros of
        the placeholder forwards) takes no step, as with one process: AdamW's weight decay and momentum would
        otherwise still move the weights."""
        accelerator = self.accelerator
        nonfinite, self._nonfinite_loss_in_update = self._nonfinite_loss_in_update, False
        trained, self._pairs_in_update = self._pairs_in_update, 0
        trained = int(self._summed_over_processes(trained))
        if not trained:  # before clipping: nothing was unscaled, so an fp16 grad scaler's cycle stays closed
            self.optimizer.zero_grad(set_to_none=True)
            return
        full_update = self.config.train_batch_size * self.config.gradient_accumulation_steps * accelerator.num_processes
        if trained != full_update:
            for param in self.trainable_params:
                if param.grad is not None:
                    param.grad.mul_(full_update / trained)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(self.trainable_params, max_norm)
        # With fp16 gradient scaling an overflowing step is the scaler's business: it skips the step and lowers
        # the scale. A non-finite *loss* (in any micro-batch of the update) is a real problem in every precision.
        if accelerator.scaler is None:
            nonfinite = nonfinite or not torch.isfinite(torch.as_tensor(grad_norm)).item()
        nonfinite = self._summed_over_processes(nonfinite) > 0
        if nonfinite:
            self._skip_nonfinite_update()
            return
        self.optimizer.step()
        if self.inversion_copy is not None:
            self.inversion_copy.mark_stale()
        applied = not accelerator.optimizer_step_was_skipped
        if applied:
            self.lr_scheduler.step()
        else:
            self.skipped["fp16_overflow_updates"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        if applied and self.ema is not None:  # after the gradients are freed; a skipped update moved nothing
            self.ema.step(self.trainable_params)
        self.consecutive_nonfinite = 0

    def _summed_over_processes(self, value: float) -> float:
        """``value`` (a count, or a flag as 0/1) summed over the processes: one all-reduce."""
        if self.accelerator.num_processes == 1:
            return float(value)
        return self.accelerator.reduce(torch.tensor([float(value)], device=self.accelerator.device),
                                       reduction="sum").item()

    def _skip_nonfinite_update(self) -> None:
        """Drop the accumulated gradients of a non-finite update; stop after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator.scaler is not None:
            # clip_grad_norm_ unscaled this update's gradients; close the scaler's cycle (and lower the scale if it
            # saw infs) as its own skipped step would, or the next update's unscale fails.
            self.accelerator.scaler.update()
        self.skipped["nonfinite_updates"] += 1
        self.consecutive_nonfinite += 1
        logger.warning("non-finite loss or gradient: update skipped (%d in a row, %d in total)",
                       self.consecutive_nonfinite, self.skipped["nonfinite_updates"])
        if self.consecutive_nonfinite >= self.config.max_consecutive_nonfinite:
            self.save_model(self.config.output_dir)
            if self.accelerator.is_main_process:  # a card an earlier run left would describe other weights
                self._write_model_card(required=False)
            saved = "the --use_ema average of the finite updates" if self.ema is not None else "the last finite weights"
            raise FloatingPointError(
                f"{self.consecutive_nonfinite} consecutive updates had a non-finite loss or gradient; stopped after "
                f"saving {saved} to {self.config.output_dir}. Try --mixed_precision bf16 (or no) "
                "instead of fp16, a smaller --beta_dpo, or a lower --learning_rate / --max_grad_norm."
            )

    def _reduce_metrics(self, window: list[dict]) -> dict:
        """Each metric's mean per pair over the update's micro-batches on every process (one all-reduce of sums
        and counts, which every process joins even when all its micro-batches were empty). A NaN entry makes the
        mean NaN; a metric no pair produced is left out."""
        names = StepOutput.METRIC_NAMES
        sums = torch.zeros(2, len(names), dtype=torch.float64)
        for entry in window:
            for column, name in enumerate(names):
                total, count = entry[name]
                sums[0, column] += total
                sums[1, column] += count
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums.to(self.accelerator.device), reduction="sum").cpu()
        return {name: float(sums[0, column] / sums[1, column])
                for column, name in enumerate(names) if sums[1, column] > 0}

    def _tracker_config(self) -> dict:
        flat = {}
        for key, value in self.config.to_dict().items():
            flat[key] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
        return {k: v for k, v in flat.items() if v is not None}

    # ------------------------------------------------------------------ checkpoints
    def _checkpoints(self) -> list[tuple[int, str]]:
        out = self.config.output_dir
        found = []
        for name in os.listdir(out) if os.path.isdir(out) else []:
            match = CHECKPOINT_PATTERN.match(name)
            path = os.path.join(out, name)
            if match and os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
                found.append((int(match.group(1)), path))
        return sorted(found)

    def _clean_partial_checkpoints(self) -> None:
        out = self.config.output_dir
        for name in os.listdir(out):
            if name.startswith(".checkpoint-") and name.endswith(".tmp"):
                logger.warning("removing incomplete checkpoint %s left by an interrupted save", name)
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)

    def save_checkpoint(self, global_step: int, epoch: int, next_batch: int) -> str:
        """Write ``checkpoint-N`` atomically: everything goes to a hidden temporary folder that is renamed when
        complete, so a checkpoint is never visible (or picked by ``latest``) half-written. A write that fails on
        any process stops every process with an error (none is left waiting for the failed one)."""
        config, accelerator = self.config, self.accelerator
        final = os.path.join(config.output_dir, f"checkpoint-{global_step}")
        partial = os.path.join(config.output_dir, f".checkpoint-{global_step}.tmp")
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()

        def publish():  # main process: the trainer state, then every file on disk before the rename shows it
            state = {"global_step": global_step, "epoch": epoch, "next_batch": next_batch,
                     "data_layout": self._data_layout(), "restored_settings": self._restored_settings(),
                     "base_model": self._base_model_record(), "unet_evaluations": evaluations, "skipped": skipped,
                     "data_counts": data_counts, "last_metrics": self.last_metrics,
                     "consecutive_nonfinite": self.consecutive_nonfinite}
            with open(os.path.join(partial, TRAINER_STATE_NAME), "w") as handle:
                json.dump(state, handle, indent=2)
            fsync_tree(partial)
            if os.path.exists(final):  # only a step saved twice (never after the later-checkpoint check)
                shutil.rmtree(final)
            os.rename(partial, final)
            fsync_directory(config.output_dir)

        what = f"write checkpoint-{global_step}"
        evaluations, skipped, data_counts = self.count_totals()  # a collective: every process gets here
        try:  # only writes in here: a full disk shows as OSError, torch.save's RuntimeError or a SafetensorError
            # every process writes its part (RNG states; weights on main)
            on_every_process(lambda: accelerator.save_state(partial), accelerator, what)
            computed_on_main(publish, accelerator, what)
        except Exception as error:
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            previous = self._checkpoints()
            kept = (f"the previous checkpoint {previous[-1][1]} is intact" if previous
                    else "no earlier checkpoint exists")
            detail = error if isinstance(error, (OSError, OtherProcessFailed)) else f"{type(error).__name__}: {error}"
            raise OSError(
                f"could not write checkpoint-{global_step} in {config.output_dir} ({detail}); {kept}. Free disk "
                "space or point --output_dir somewhere writable, then relaunch with --resume_from_checkpoint latest."
            ) from error

        def prune():  # main process: hidden first, then deleted, so a crash mid-delete leaves no half checkpoint
            for _, old in self._checkpoints()[:-config.checkpoints_total_limit]:
                doomed = os.path.join(config.output_dir, f".{os.path.basename(old)}.deleting.tmp")
                os.rename(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

        if config.checkpoints_total_limit is not None:
            computed_on_main(prune, accelerator, f"remove checkpoints beyond --checkpoints_total_limit after {what}")
        if accelerator.is_main_process:
            logger.info("saved %s", final)
        return final

    def _data_layout(self) -> dict:
        """What fixes which pairs a (process, batch index) holds: a checkpoint's position means nothing under
        another layout."""
        return {"num_processes": self.accelerator.num_processes, "train_batch_size": self.config.train_batch_size,
                "gradient_accumulation_steps": self.config.gradient_accumulation_steps, "seed": self.config.seed,
                "num_pairs": len(self.train_dataset), "pairs_sha256": self._pairs_digest}

    @functools.cached_property
    def _pairs_digest(self) -> str:
        """A hash of the prepared pairs (rows, winners, preference probabilities, captions): other labels, another
        loss type's ordering or another subset change it."""
        digest = hashlib.sha256()
        for column in ("source_row", "winner_index", "prob_w"):
            digest.update(np.ascontiguousarray(np.asarray(self.pairs[column])).tobytes())
        for caption in self.pairs["caption"]:
            digest.update(f"{caption}\0".encode())
        return digest.hexdigest()

    def _base_model_record(self) -> dict:
        """Which base the run trains from: the policy in a checkpoint continues that base's training, while the
        reference and the latents come from the base loaded now. Local paths are made absolute (not resolved
        through links, so a moved folder can be given under its old path by a link); ``--variant`` is left out
        (the same weights stored in another precision)."""
        from .hub import _is_local_path

        def named(value):
            if value and _is_local_path(str(value)):
                return os.path.abspath(os.path.expanduser(str(value)))
            return value

        config = self.config
        return {"pretrained_model_name_or_path": named(config.pretrained_model_name_or_path),
                "revision": config.revision,
                "pretrained_vae_model_name_or_path": named(config.pretrained_vae_model_name_or_path)}

    def _restored_settings(self) -> dict:
        """The settings a checkpoint's optimiser, LR-scheduler, adapter and average state carry: ``load_state``
        restores the checkpoint's learning rate, Adam/Adafactor hyper-parameters and EMA decay whatever is asked
        now, and the adapter's weights mean something else under another alpha."""
        config = self.config
        settings = {"train_method": config.train_method, "effective_learning_rate": self.learning_rate,
                    "use_adafactor": config.use_adafactor, "use_8bit_adam": config.use_8bit_adam,
                    "adam_beta1": config.adam_beta1, "adam_beta2": config.adam_beta2,
                    "adam_epsilon": config.adam_epsilon, "adam_weight_decay": config.adam_weight_decay,
                    "fp16_loss_scaling": self.accelerator.scaler is not None,  # fp16 checkpoints hold the scaler
                    "use_ema": config.use_ema}  # the average and its decay are restored with the rest
        if config.use_ema:
            settings["ema_decay"] = config.ema_decay
        if config.train_method == "lora":
            settings.update(rank=config.rank, lora_alpha=config.lora_alpha_value,
                            lora_target_modules=list(config.lora_target_modules))
        return settings

    @staticmethod
    def _changed_since(saved: dict | None, now: dict) -> str:
        """``"key old -> new, ..."`` for the keys of a checkpoint's record ``saved`` that differ now ("" when none,
        or for a checkpoint written before the record existed)."""
        def shown(value):  # hashes shortened; settings in full
            text = str(value)
            return f"{text[:12]}..." if re.fullmatch(r"[0-9a-f]{64}", text) else text

        changed = {key: (saved[key], now[key]) for key in (saved or {}) if key in now and saved[key] != now[key]}
        return ", ".join(f"{key} {shown(old)} -> {shown(new)}" for key, (old, new) in changed.items())

    def _check_resumable(self, path: str, state: dict) -> None:
        """Refuse a resume from checkpoint ``path`` (its ``trainer_state.json`` = ``state``) that would silently do
        something other than asked."""
        listed = self._changed_since(state.get("data_layout"), self._data_layout())
        if listed:
            raise ValueError(
                f"cannot resume from {path}: the data layout changed ({listed}). Its position in the epoch would "
                "point at other pairs, silently skipping or repeating some. Resume with the checkpoint's settings "
                "(processes, --train_batch_size, --gradient_accumulation_steps, --seed, the same pairs with the "
                "same labels and --loss_type), or start a new run in a new --output_dir."
            )
        listed = self._changed_since(state.get("base_model"), self._base_model_record())
        if listed:
            raise ValueError(
                f"cannot resume from {path}: it was trained from another base model or VAE ({listed}). The policy "
                "would go on from that base's training while the frozen reference the loss compares against, and "
                "the latents, come from this one. Resume with the checkpoint's --pretrained_model_name_or_path, "
                "--revision and --pretrained_vae_model_name_or_path (a folder that moved: give its old path, e.g. "
                "through a link), or start a new run in a new --output_dir."
            )
        saved = state.get("restored_settings")
        if saved is not None:  # checkpoints written before --use_ema existed hold no average
            saved = {"use_ema": False} | saved
        listed = self._changed_since(saved, self._restored_settings())
        if listed:
            raise ValueError(
                f"cannot resume from {path}: it was trained with other optimiser, adapter or average settings "
                f"({listed}). Its optimiser and LR-scheduler state would bring back its own learning rate and "
                "hyper-parameters (the records would show yours), LoRA weights trained under another "
                "rank/alpha/targets do not fit, and a --use_ema average (with its decay) exists only if it was kept "
                "from the start. Resume with the checkpoint's values (its trainer_state.json lists them under "
                "restored_settings), or start a new run in a new --output_dir."
            )
        if self.config.use_ema and not os.path.isfile(os.path.join(path, EMA_WEIGHTS_NAME)):
            raise ValueError(
                f"cannot resume from {path} with --use_ema: it holds no average ({EMA_WEIGHTS_NAME}; it was trained "
                "without --use_ema). Resume without --use_ema, or start a new run in a new --output_dir.")
        if state["global_step"] > self.max_train_steps:
            raise ValueError(
                f"cannot resume from {path}: it is at update {state['global_step']}, past this run's length of "
                f"{self.max_train_steps} updates. Give a --max_train_steps of at least {state['global_step']} (or "
                "the --num_train_epochs that reach it), or use its weights as they are."
            )

    def _check_no_later_checkpoints(self, start_step: int) -> None:
        """Checkpoints past the starting update belong to another run: ``latest`` would pick them and the
        checkpoint limit would prune this run's instead."""
        later = [os.path.basename(path) for step, path in self._checkpoints() if step > start_step]
        if later:
            raise ValueError(
                f"--output_dir {self.config.output_dir} holds checkpoints past update {start_step} ({', '.join(later)})"
                " from another run; this run's checkpoints would be mixed with them ('latest' would resume theirs and "
                "--checkpoints_total_limit would delete this run's). Resume from the latest one "
                "(--resume_from_checkpoint latest), move them away, or use a new --output_dir."
            )

    def count_totals(self) -> tuple[dict, dict, dict]:
        """``(unet_evaluations, skipped, data_counts)`` over all processes: per-process counts summed (UNet
        evaluations, undecodable pairs, empty micro-batches, data counts); update counts are the same on every
        process. A collective with several processes: every process must call it."""
        evaluations, skipped, data_counts = dict(self.unet_evaluations), dict(self.skipped), dict(self.data_counts)
        if self.accelerator.num_processes > 1:
            slots = ([(evaluations, key) for key in sorted(evaluations)] + [(skipped, key) for key in PER_PROCESS_SKIPS]
                     + [(data_counts, key) for key in sorted(data_counts)])
            values = torch.tensor([counts[key] for counts, key in slots], dtype=torch.float64,
                                  device=self.accelerator.device)
            for (counts, key), total in zip(slots, self.accelerator.reduce(values, reduction="sum").tolist()):
                counts[key] = int(round(total))
        return evaluations, skipped, data_counts

    def _damaged_checkpoint(self, path: str, error: BaseException) -> OSError:
        """The error for a checkpoint that cannot be read (a truncated file from a bad copy or a disk fault: the
        trainer's own writes are atomic), naming the latest earlier checkpoint to resume from instead."""
        match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
        step = int(match.group(1)) if match else None
        earlier = [p for s, p in self._checkpoints() if (step is None or s < step)
                   and os.path.realpath(p) != os.path.realpath(path)]
        instead = (f"resume from an earlier one (--resume_from_checkpoint {earlier[-1]}; present: "
                   f"{', '.join(os.path.basename(p) for p in earlier)})" if earlier
                   else "start again without --resume_from_checkpoint (no earlier checkpoint exists)")
        return OSError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); it is damaged: move it "
                       f"away and {instead}.")

    @staticmethod
    def _checkpoint_does_not_fit(path: str, error: BaseException) -> ValueError:
        """The error for a readable checkpoint whose weights do not fit the model being trained."""
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        shown = " ".join(lines[:2]) + (f" ... ({len(lines) - 2} more)" if len(lines) > 2 else "")
        return ValueError(f"checkpoint {path} does not fit this run's model ({type(error).__name__}: {shown}): it "
                          "was trained from another base model (--pretrained_model_name_or_path) or model layout. "
                          "Resume with the base it was trained from, or start a new run in a new --output_dir.")

    def _read_checkpoint_state(self, path: str) -> dict:
        """A checkpoint's ``trainer_state.json``; an unreadable one is reported as a damaged checkpoint."""
        try:
            with open(os.path.join(path, TRAINER_STATE_NAME)) as handle:
                state = json.load(handle)
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            for key in ("global_step", "epoch", "next_batch"):
                if not isinstance(state.get(key), int):
                    raise ValueError(f"{key!r} is missing or not an integer")
        except (OSError, ValueError) as error:
            raise self._damaged_checkpoint(path, ValueError(f"{TRAINER_STATE_NAME}: {error}")) from error
        return state

    def _maybe_resume(self) -> tuple[int, int, int]:
        choice = self.config.resume_from_checkpoint
        if choice is None:
            return 0, 0, 0
        if choice == "latest":
            found = self._checkpoints()
            if not found:
                logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s; starting from "
                               "scratch (the first launch of a restartable job)", self.config.output_dir)
                return 0, 0, 0
            path = found[-1][1]
        else:
            path = choice
            if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
                raise ValueError(f"{path} is not a complete SmPO checkpoint (no {TRAINER_STATE_NAME}).")
        state = self._read_checkpoint_state(path)
        self._check_resumable(path, state)

        def load():
            try:
                self.accelerator.load_state(path)
            except Exception as error:
                if isinstance(error, RuntimeError) and _LOAD_MISMATCH.search(str(error)):
                    raise self._checkpoint_does_not_fit(path, error) from error
                raise self._damaged_checkpoint(path, error) from error

        on_every_process(load, self.accelerator, f"read {path}")  # none trains on while another failed to load
        self.last_metrics = dict(state.get("last_metrics") or {})
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        # The checkpoint holds totals over processes: the main process carries them on, the others count afresh
        # (per-process counts are summed again when written).
        if self.accelerator.is_main_process:
            self.unet_evaluations = dict(state.get("unet_evaluations", self.unet_evaluations))
            self.skipped.update(state.get("skipped", {}))
            self.data_counts.update(state.get("data_counts", {}))
        else:
            self.skipped.update({key: value for key, value in state.get("skipped", {}).items()
                                 if key not in PER_PROCESS_SKIPS})
        epoch, next_batch = state["epoch"], state["next_batch"]
        if next_batch >= len(self.train_dataloader):
            epoch, next_batch = epoch + 1, 0
        logger.info("resumed from %s at update %d", path, state["global_step"])
        return state["global_step"], epoch, next_batch

    # ------------------------------------------------------------------ outputs
    def build_pipeline(self, sampler: str = "ddim"):
        """A diffusers pipeline around the current (unwrapped) UNet and the parts in memory: with a DDIM sampler
        (``sampler="ddim"``, for validation, no safety checker) or the base model's own scheduler class and the
        in-process components training does not use (``"base"``)."""
        import diffusers
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        parts = self.parts
        if sampler == "base" and parts.sampler_config.get("_class_name"):
            name = parts.sampler_config["_class_name"]
            if not hasattr(diffusers, name):
                raise ValueError(f"diffusers has no scheduler {name!r} (the base model's); update diffusers.")
            scheduler = getattr(diffusers, name).from_config(parts.sampler_config)
        else:
            scheduler = DDIMScheduler.from_config(parts.scheduler.config)
        others = parts.other_components if sampler == "base" else {}
        common = dict(vae=parts.vae, unet=self.unwrapped_unet, scheduler=scheduler,
                      feature_extractor=others.get("feature_extractor"), image_encoder=others.get("image_encoder"))
        if parts.is_sdxl:
            return StableDiffusionXLPipeline(text_encoder=parts.text_encoders[0], text_encoder_2=parts.text_encoders[1],
                                             tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1],
                                             add_watermarker=False, **common)
        return StableDiffusionPipeline(text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0],
                                       safety_checker=others.get("safety_checker"),
                                       requires_safety_checker="safety_checker" in others, **common)

    def pipeline_to_save(self):
        """What ``--save_full_pipeline`` writes: the trained UNet in the base's own pipeline, whose other
        components (VAE, text encoders, tokenizers, scheduler and, for SD 1.x/2.x, the safety checker) are read
        again from the base as it stores them, since training holds them cast to the weight dtype. In-process
        parts (no base folder) are saved as held, with a warning where training cast them below fp32."""
        from diffusers import AutoencoderKL, DiffusionPipeline

        config, parts = self.config, self.parts
        if parts.source is not None:
            replaced = {"unet": self.unwrapped_unet}
            if config.pretrained_vae_model_name_or_path:
                replaced["vae"] = AutoencoderKL.from_pretrained(config.pretrained_vae_model_name_or_path,
                                                                cache_dir=config.cache_dir)
            return DiffusionPipeline.from_pretrained(parts.source, revision=config.revision, variant=config.variant,
                                                     cache_dir=config.cache_dir, **replaced)
        lowered = [type(module).__name__ for module in (parts.vae, *parts.text_encoders)
                   if module.dtype != torch.float32]
        if lowered:
            logger.warning("saving the in-process %s as training holds them (cast to %s); build the trainer from a "
                           "model folder to save the base's own weights", ", ".join(lowered), self.weight_dtype)
        return self.build_pipeline(sampler="base")

    def log_validation(self, global_step: int, final: bool = False):
        """Render ``--validation_prompts`` with fixed seeds; save a PNG grid and log it. Main process only."""
        config, accelerator = self.config, self.accelerator
        if not config.validation_prompts or not accelerator.is_main_process:
            return None
        pipeline = self.build_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        was_training = self.unet.training
        self.unet.eval()
        images = []
        with torch.no_grad(), accelerator.autocast(), self._encoders_on_accelerator(), self.averaged_weights():
            for index, prompt in enumerate(config.validation_prompts):
                generator = torch.Generator(device="cpu").manual_seed(config.seed + index)
                images.append(pipeline(prompt, num_inference_steps=config.validation_num_inference_steps,
                                       height=config.resolution, width=config.resolution,
                                       generator=generator).images[0])
        self.unet.train(was_training)
        grid = image_grid(images)
        name = "validation.png" if final else f"validation-step{global_step}.png"
        path = os.path.join(config.output_dir, name)
        with atomic_output(path) as temporary:
            grid.save(temporary, format="PNG")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), global_step,
                                          dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(i, caption=p) for i, p in
                                            zip(images, config.validation_prompts)]}, step=global_step)
        return path

    def save_model(self, output_dir: str | None = None) -> None:
        """Write diffusers-loadable weights (LoRA safetensors, ``unet/`` or the whole pipeline; with ``--use_ema``
        the average's), ``training_config.json`` and ``training_metrics.json``; safetensors only. Every process
        calls it (the counts are summed over processes); the main process writes, and a failure there stops every
        process.
        With several processes, call it before :meth:`train` returns (train saves the final model itself, then
        closes the process group)."""
        if self.accelerator.num_processes > 1 and not torch.distributed.is_initialized():
            raise RuntimeError(
                "save_model() sums its counts over the processes, but their group was closed at the end of train(), "
                f"which already saved the final model in {self.config.output_dir}. Copy that folder instead, or "
                "call save_model() during training (e.g. from a subclass).")
        output_dir = output_dir or self.config.output_dir
        check_inputs_outside_output(output_dir, self._local_inputs())
        totals = self.count_totals()
        computed_on_main(lambda: self._write_model(output_dir, *totals), self.accelerator,
                         f"save the trained model in {output_dir}")

    def _write_model(self, output_dir: str, evaluations: dict, skipped: dict, data_counts: dict) -> None:
        """:meth:`save_model`'s writes (main process), with the counts summed over processes. The weights are
        written to a hidden staging folder, fsynced, then renamed into place, and the JSON records are replaced
        atomically: a crash or a full disk mid-save never leaves a truncated file under a final name."""
        accelerator = self.accelerator
        unet = self.unwrapped_unet
        os.makedirs(output_dir, exist_ok=True)
        for name in os.listdir(output_dir):  # what a save killed midway left
            path = os.path.join(output_dir, name)
            if name.startswith(FINAL_STAGING_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith(".") and name.endswith(".old") and os.path.isdir(path):
                replaced = os.path.join(output_dir, name[1:-len(".old")])
                if os.path.lexists(replaced):  # its successor was published
                    shutil.rmtree(path, ignore_errors=True)
                else:  # killed between the two renames: put the earlier folder back
                    os.replace(path, replaced)
        staging = tempfile.mkdtemp(prefix=FINAL_STAGING_PREFIX, dir=output_dir)
        try:
            with self.averaged_weights():  # --use_ema: the average is what is saved
                if self.config.train_method == "lora":
                    save_lora(staging, unet, self.parts.is_sdxl)
                elif self.config.save_full_pipeline:
                    self.pipeline_to_save().save_pretrained(staging, safe_serialization=True)
                else:
                    unet.save_pretrained(os.path.join(staging, "unet"), safe_serialization=True)
            self._remove_other_weight_layouts(output_dir)
            publish_entries(staging, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        from .hub import LOCAL_INPUTS, local_input_names

        summary = self.config.to_dict() | {
            "model_family": "sdxl" if self.parts.is_sdxl else "sd",
            "prediction_type": self.parts.prediction_type,
            "reward_columns": list(self.reward_columns) if self.reward_columns else None,
            "reward_scale": self.reward_scale,
            "reward_scale_source": self.reward_scale_source,
            "reward_model": self.reward_model_name if self.config.loss_type == "smpo" else None,  # for the card
            "effective_learning_rate": self.learning_rate,
            "effective_batch_size": self.config.train_batch_size * self.config.gradient_accumulation_steps
            * accelerator.num_processes,
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "pairs": self.pair_statistics.as_dict(),
            LOCAL_INPUTS: local_input_names(self.config),  # the card tells local folders from Hub ids by it
        }
        # Local inputs as absolute paths, so that evaluate.py finds the base from any directory (the card and the
        # uploaded record name local folders by their last component only).
        for name in [*summary[LOCAL_INPUTS], "cache_dir", "latent_cache_dir"]:
            if summary.get(name):
                summary[name] = os.path.abspath(os.path.expanduser(str(summary[name])))
        atomic_write_json(os.path.join(output_dir, "training_config.json"), summary, default=str)
        metrics = {"global_step": getattr(self, "global_step", None), "final_metrics": self.last_metrics,
                   "unet_evaluations": evaluations, "skipped": skipped, "data": data_counts,
                   "latent_cache": self.latent_cache_stats.as_dict() if self.latent_cache_stats else None,
                   "ema": self._ema_record()}
        atomic_write_json(os.path.join(output_dir, "training_metrics.json"), finite_or_none(metrics),
                          allow_nan=False)

    def _ema_record(self) -> dict | None:
        """``--use_ema``: the average's largest decay, the updates averaged and the last update's decay."""
        if self.ema is None:
            return None
        return {"decay": self.ema.decay, "updates": self.ema.optimization_step,
                "last_decay": getattr(self.ema, "cur_decay_value", None)}

    def _remove_other_weight_layouts(self, output_dir: str) -> None:
        """A folder holds one run's weights: drop those of another layout (a LoRA file, ``unet/``, a pipeline)
        that an earlier run left, so that loading, the card and an upload cannot pick the stale ones."""
        from .hub import LORA_WEIGHTS_NAME

        layout = ("lora" if self.config.train_method == "lora"
                  else "pipeline" if self.config.save_full_pipeline else "unet")
        stale = []
        if layout != "lora":
            stale.append(LORA_WEIGHTS_NAME)
        if layout != "pipeline" and os.path.isfile(os.path.join(output_dir, "model_index.json")):
            with open(os.path.join(output_dir, "model_index.json")) as handle:
                components = [name for name in json.load(handle) if not name.startswith("_")]
            stale += ["model_index.json", *components]
        if layout == "lora":
            stale.append("unet")
        for name in dict.fromkeys(stale):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.isfile(path):
                os.remove(path)
            else:
                continue
            logger.warning("removed %s left in %s by an earlier run of another kind", name, output_dir)

    # ------------------------------------------------------------------ Hub
    @property
    def reward_model_name(self) -> str | None:
        return (self.reward_statistics or {}).get("reward_model")

    def _write_model_card(self, required: bool) -> None:
        """:meth:`create_model_card`, leaving a README.md the user wrote alone (an error when ``required``)."""
        try:
            self.create_model_card()
        except FileExistsError as error:
            if required:
                raise
            logger.warning("model card not written: %s", error)

    def create_model_card(self):
        """Write ``output_dir/README.md`` (metadata, hyper-parameters, metrics, validation grid, usage, citation)."""
        from .hub import create_model_card

        return create_model_card(self.config.output_dir, repo_id=self.config.hub_model_id,
                                 reward_model=self.reward_model_name)

    def push_to_hub(self, repo_id: str | None = None, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload SmPO-aligned weights") -> str:
        """Upload the final output (card included; no checkpoints or logs) to ``repo_id``, default
        ``--hub_model_id``, else the output folder's name. The token comes from ``token``, ``HF_TOKEN`` or the
        saved login and is never written anywhere. On failure the local output is kept and the error says how
        to retry the push alone."""
        from .hub import push_to_hub

        return push_to_hub(self.config.output_dir, repo_id or self.config.hub_model_id,
                           private=self.config.hub_private if private is None else private, token=token,
                           commit_message=commit_message, reward_model=self.reward_model_name)

    def _push_trained_output(self) -> None:
        """``--push_to_hub`` after the final save (main process): the card, then the upload. Any failure is a
        :class:`~smpo_diffusers.hub.HubUploadError` saying that the weights are saved and how to push them alone."""
        from .hub import HubAuthenticationError, HubUploadError, retry_command, training_repo_id

        config = self.config
        try:
            self._write_model_card(required=True)
            repo_id = training_repo_id(config.output_dir, config.hub_model_id)
            self.push_to_hub(repo_id)
        except (HubAuthenticationError, HubUploadError, ValueError, OSError) as error:
            try:
                repo_id = training_repo_id(config.output_dir, config.hub_model_id)
            except ValueError:
                repo_id = "your-name/model-name"
            retry = "" if isinstance(error, HubUploadError) else (
                "\nPush them when the problem is fixed with\n"
                + retry_command(config.output_dir, repo_id, bool(config.hub_private)))
            raise HubUploadError(f"Training finished and the trained weights are saved in {config.output_dir}, but "
                                 f"pushing them to the Hub failed: {error}{retry}") from error


def image_grid(images: list, columns: int | None = None):
    """Paste equally sized PIL images into one grid image (row-major)."""
    from PIL import Image

    columns = columns or len(images)
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
