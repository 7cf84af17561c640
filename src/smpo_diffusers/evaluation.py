"""Generate, score, compare: does the aligned model beat its base?

``evaluate(base_model, aligned_model, prompts, reward_names)`` renders every prompt with both models from
the same seeds, scores both sets with each reward backend, and writes

* ``results.json`` - per-image scores and, per reward: mean and standard error of each model, the
  paired difference, and the win rate of aligned over base with a 95 % **Wilson score** interval
  (ties count half a win). The samples of one prompt (several seeds) are correlated: errors and the interval
  treat each prompt as one cluster (cluster-robust standard errors; the interval's sample size is the
  effective one);
* ``results.md`` - the same as a markdown table;
* ``grid.png`` - base images on the top row(s), aligned images under them, same prompt/seed per column (the
  first :data:`GRID_MAX_SAMPLES` samples).

The statistics helpers (:func:`mean_and_stderr`, :func:`wilson_interval`, :func:`win_rate`,
:func:`compare_scores`) are pure functions on score arrays.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Sequence

import numpy as np
import torch

from .files import atomic_output, atomic_write_text
from .json_records import finite_or_none, read_json_record

__all__ = [
    "BUILTIN_PROMPT_SETS",
    "GRID_MAX_SAMPLES",
    "UNET_INTERFACE_FIELDS",
    "compare_scores",
    "evaluate",
    "format_results_table",
    "generate_images",
    "image_drift",
    "load_pipeline",
    "mean_and_stderr",
    "read_prompts",
    "resolve_reward_models",
    "save_comparison_grid",
    "score_images",
    "wilson_interval",
    "win_rate",
]

Z_95 = 1.959963984540054
"""Two-sided 95 % standard-normal quantile."""

BUILTIN_PROMPT_SETS = ("toy-heldout", "toy-train", "toy-all")
"""Prompt-list names :func:`read_prompts` understands besides files and datasets."""

FEW_PROMPTS = 10
"""Below this many prompts (with several seeds each) the prompt-clustered errors and intervals rest on too few
clusters to mean much: :func:`evaluate` says so."""

GRID_MAX_SAMPLES = 64
"""Samples shown in ``grid.png`` (64 SDXL pairs at 1024 px make a 16384 x 8200 image already); all are scored."""

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- statistics


def _cluster_indices(groups: Sequence | None, size: int) -> np.ndarray:
    """Cluster number of each of ``size`` samples (``groups``: any hashable label per sample, e.g. its prompt;
    None = every sample its own cluster)."""
    if groups is None:
        return np.arange(size)
    labels = list(groups)
    if len(labels) != size:
        raise ValueError(f"groups needs one label per sample: got {len(labels)} labels for {size} samples.")
    numbers: dict = {}
    return np.asarray([numbers.setdefault(label, len(numbers)) for label in labels])


def _clustered_variance_of_mean(array: np.ndarray, clusters: np.ndarray) -> float:
    """Cluster-robust variance of the sample mean: ``k / (k - 1) * sum_g (sum_{i in g} (x_i - mean))^2 / n^2``
    over ``k`` clusters (with one sample per cluster: ``var(ddof=1) / n``); NaN for fewer than 2 clusters."""
    count = int(clusters.max()) + 1
    if count < 2:
        return math.nan
    sums = np.bincount(clusters, weights=array - array.mean(), minlength=count)
    return float(count / (count - 1) * np.sum(sums ** 2) / array.size ** 2)


def mean_and_stderr(values: Sequence[float], groups: Sequence | None = None) -> tuple[float, float]:
    """Sample mean and its standard error: ``std(ddof=1) / sqrt(n)``, or with ``groups`` (one label per value,
    e.g. its prompt) the cluster-robust error that treats each group as one correlated cluster (equal groups:
    the standard error of the group means). The error is NaN for fewer than 2 values (clusters)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("mean_and_stderr needs at least one value.")
    if not np.isfinite(array).all():
        raise ValueError("mean_and_stderr got non-finite values; drop unscorable images first.")
    if groups is not None:
        return float(array.mean()), math.sqrt(_clustered_variance_of_mean(array, _cluster_indices(groups,
                                                                                                  array.size)))
    stderr = float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else math.nan
    return float(array.mean()), stderr


def wilson_interval(successes: float, trials: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for a proportion ``successes / trials`` (successes may be
    fractional, e.g. ties counted as half; trials too, for an effective sample size)."""
    if trials < 1:
        raise ValueError(f"wilson_interval needs trials >= 1, got {trials}.")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, trials={trials}], got {successes}.")
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(aligned: Sequence[float], base: Sequence[float], tie_tolerance: float = 0.0,
             groups: Sequence | None = None) -> dict:
    """How often ``aligned[i]`` beats ``base[i]`` (paired by prompt and seed).

    A pair within ``tie_tolerance`` is a tie and counts half a win. Returns ``wins``, ``ties``,
    ``losses``, ``n``, ``rate = (wins + ties / 2) / n`` and its 95 % Wilson interval ``ci_low``, ``ci_high``.

    ``groups`` (one label per pair, e.g. its prompt): pairs of one group are correlated, so the interval uses
    the effective sample size ``n_effective = n / design effect`` (the cluster-robust variance of the rate over
    the independent one), kept within [number of groups, n]; a rate of exactly 0 or 1 counts the groups. Without
    ``groups`` (or one pair per group) ``n_effective = n``. Also returns ``n_effective`` and ``groups``."""
    aligned, base = np.asarray(aligned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if aligned.shape != base.shape or aligned.ndim != 1 or aligned.size == 0:
        raise ValueError(
            f"win_rate needs two equal-length, non-empty score lists, got {aligned.shape} and {base.shape}.")
    difference = aligned - base
    tied = np.abs(difference) <= tie_tolerance
    won = difference > tie_tolerance
    ties, wins = int(tied.sum()), int(won.sum())
    losses = int(difference.size - wins - ties)
    successes = wins + 0.5 * ties
    n = int(difference.size)
    clusters = _cluster_indices(groups, n)
    count = int(clusters.max()) + 1
    n_effective = float(n)
    if count < n:
        outcome = won + 0.5 * tied
        independent = outcome.var(ddof=1) / n  # the rate's variance were the pairs independent
        clustered = _clustered_variance_of_mean(outcome, clusters)  # NaN for a single group
        if independent == 0.0 or not math.isfinite(clustered):
            n_effective = float(count)
        elif clustered > 0.0:
            n_effective = min(float(n), max(float(count), n * independent / clustered))
    low, high = wilson_interval(min(successes / n * n_effective, n_effective), n_effective)
    return {"wins": wins, "ties": ties, "losses": losses, "n": n, "rate": successes / n, "ci_low": low,
            "ci_high": high, "n_effective": n_effective, "groups": count}


def compare_scores(base: Sequence[float], aligned: Sequence[float], groups: Sequence | None = None) -> dict:
    """Summary of paired scores: ``base``/``aligned`` ``{mean, stderr}``, ``difference`` (aligned - base,
    paired) ``{mean, stderr}`` and ``win_rate`` (see :func:`win_rate`). ``groups`` (one label per pair, e.g. its
    prompt): errors and the interval treat each group as one cluster (:func:`mean_and_stderr`, :func:`win_rate`)."""
    base_mean, base_se = mean_and_stderr(base, groups)
    aligned_mean, aligned_se = mean_and_stderr(aligned, groups)
    diff_mean, diff_se = mean_and_stderr(np.asarray(aligned, dtype=np.float64) - np.asarray(base, dtype=np.float64),
                                         groups)
    return {"base": {"mean": base_mean, "stderr": base_se}, "aligned": {"mean": aligned_mean, "stderr": aligned_se},
            "difference": {"mean": diff_mean, "stderr": diff_se}, "win_rate": win_rate(aligned, base, groups=groups)}


def image_drift(base_images, aligned_images) -> float:
    """Mean absolute pixel difference (channels in 0..1) between images generated from the same seeds."""
    if len(base_images) != len(aligned_images) or not base_images:
        raise ValueError("image_drift needs two equal-length, non-empty image lists.")
    total = 0.0
    for first, second in zip(base_images, aligned_images):
        a = np.asarray(first.convert("RGB"), dtype=np.float32) / 255.0
        b = np.asarray(second.convert("RGB"), dtype=np.float32) / 255.0
        if a.shape != b.shape:
            raise ValueError(f"image sizes differ: {a.shape} vs {b.shape}.")
        total += float(np.abs(a - b).mean())
    return total / len(base_images)


# ----------------------------------------------------------------------------- models and prompts


def aligned_layout(aligned_model: str) -> str:
    """``"lora"`` for a LoRA ``.safetensors`` file, else the weights a training output folder holds
    (:func:`~smpo_diffusers.hub.weights_layout`: ``"pipeline"``, ``"unet"`` or ``"lora"``, the same order the card
    and the upload use). ``FileNotFoundError`` naming the fix when there are none."""
    from .hub import weights_layout

    if aligned_model.endswith(".safetensors") and os.path.isfile(aligned_model):
        return "lora"
    if not os.path.isdir(aligned_model):
        raise FileNotFoundError(f"--aligned_model {aligned_model!r} does not exist; pass the --output_dir of a "
                                "training run (or a LoRA .safetensors file).")
    try:
        return weights_layout(aligned_model)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{aligned_model!r} holds neither pytorch_lora_weights.safetensors, a unet/ folder nor a pipeline "
            "(model_index.json); pass the --output_dir of a training run."
        ) from None


def trained_base_settings(aligned_model: str) -> dict | None:
    """How a training run read its base, from its ``training_config.json`` (for a LoRA ``.safetensors`` file:
    the one beside it): ``base_model``, ``revision`` (as :func:`smpo_diffusers.hub.base_revision` resolves
    it), ``variant``, ``vae`` (``--pretrained_vae_model_name_or_path``), ``cache_dir`` and ``relative_paths``
    (which of ``base_model``/``vae`` are local paths recorded relative to the directory training ran in: records
    written before training made them absolute), or None without a record."""
    from .hub import LOCAL_INPUTS, base_revision

    folder = os.path.dirname(aligned_model) if os.path.isfile(aligned_model) else aligned_model
    path = os.path.join(folder, "training_config.json")
    if not os.path.isfile(path):
        return None
    config = read_json_record(path, "it was not written whole by a training run. Move it away and pass "
                                    "--base_model (with the --base_revision, --base_variant and --vae training "
                                    "used), or save the run again.")
    local = config.get(LOCAL_INPUTS) or []
    relative = [key for key, name in (("base_model", "pretrained_model_name_or_path"),
                                      ("vae", "pretrained_vae_model_name_or_path"))
                if name in local and config.get(name) and not os.path.isabs(os.path.expanduser(config[name]))]
    return {"base_model": config.get("pretrained_model_name_or_path"), "revision": base_revision(config),
            "variant": config.get("variant"), "vae": config.get("pretrained_vae_model_name_or_path"),
            "cache_dir": config.get("cache_dir"), "relative_paths": relative}


def trained_base_model(aligned_model: str) -> str | None:
    """The ``pretrained_model_name_or_path`` recorded in a training output's ``training_config.json`` (for a
    LoRA ``.safetensors`` file: the one beside it), or None."""
    return (trained_base_settings(aligned_model) or {}).get("base_model")


UNET_INTERFACE_FIELDS = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
                         "addition_time_embed_dim", "projection_class_embeddings_input_dim", "class_embed_type",
                         "encoder_hid_dim_type", "block_out_channels")
"""UNet config fields a trained UNet must share with the base pipeline's to render in it: the latent channels (the
VAE's), the text conditioning (the text encoders' width), SDXL's added size/time conditioning, and the block widths
(a full-UNet run starts from its base's UNet, so a different width means another base)."""


def _unet_kind(config) -> str:
    return "SDXL" if config.get("addition_embed_type") == "text_time" else "SD"


def _config_value(config, field: str):
    """``config[field]`` (a missing field: the class default, as diffusers reads it), lists as tuples."""
    if field in config:
        value = config[field]
    else:
        import inspect

        from diffusers import UNet2DConditionModel

        parameter = inspect.signature(UNet2DConditionModel.__init__).parameters.get(field)
        value = None if parameter is None else parameter.default
    return tuple(value) if isinstance(value, list) else value


def _base_advice(base_model: str, aligned_model: str, kind: str | None = None) -> str:
    """What to pass as ``--base_model`` for ``aligned_model``: the base its training_config.json records, if any."""
    try:
        recorded = trained_base_model(aligned_model)
    except ValueError:  # a damaged record: the advice falls back to the general one
        recorded = None
    if recorded and recorded != base_model:
        return (f"it was trained on {recorded!r} (its training_config.json): pass --base_model {recorded} (or leave "
                "--base_model out to use the recorded base).")
    if recorded:
        return ("its training_config.json records this base, so the base has changed since training or the weights "
                "come from another run: pass --base_model the pipeline the run was trained from.")
    example = {"SDXL": " (e.g. toy-sdxl, or an SDXL pipeline such as stabilityai/stable-diffusion-xl-base-1.0)",
               "SD": " (e.g. toy, or an SD 1.x/2.x pipeline)"}.get(
                   kind, " (e.g. its Hub id, or toy / toy-sdxl for a run on a shipped toy pipeline)")
    return f"pass --base_model the pipeline it was trained from{example}."


def _check_unet_fits_base(base_unet_config, aligned_unet_config, base_model: str, aligned_model: str) -> None:
    """Raise ``ValueError`` naming both models, the disagreeing :data:`UNET_INTERFACE_FIELDS` and the
    ``--base_model`` to pass, when a full-UNet run's UNet cannot stand in for the base pipeline's."""
    pairs = {field: (_config_value(aligned_unet_config, field), _config_value(base_unet_config, field))
             for field in UNET_INTERFACE_FIELDS}
    differences = [f"{field} {trained!r} vs {base!r}" for field, (trained, base) in pairs.items() if trained != base]
    if differences:
        kind, base_kind = _unet_kind(aligned_unet_config), _unet_kind(base_unet_config)
        raise ValueError(
            f"--aligned_model {aligned_model} holds an {kind} UNet that does not fit the "
            f"{base_kind} base model {base_model} ({'; '.join(differences)}; trained UNet vs base): a full-UNet run "
            f"renders in the pipeline it was trained from; {_base_advice(base_model, aligned_model, kind)}")


class _LoraLoadReport(logging.Filter):
    """Logging filter for diffusers' LoRA loading: keeps back (and records) its report of a failed load, which
    :func:`load_pipeline` turns into its own error, and its warning of LoRA keys the model has no place for (a
    LoRA loaded in part), which it refuses."""

    def __init__(self):
        super().__init__()
        self.unhandled: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Loading adapter weights from state_dict led to"):
            self.unhandled.append(message)
            return False
        return not (message.startswith("Loading ") and " was unsuccessful with the following error" in message)


def _first_reason(message: str, limit: int = 300) -> str:
    """The telling line of a loading error: torch's "Error(s) in loading state_dict..." heads a list whose first
    ``size mismatch``/``Missing``/``Unexpected`` line says what went wrong; cut at ``limit`` characters."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    telling = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    reason = (telling or lines or [""])[0]
    return reason if len(reason) <= limit else reason[:limit] + "..."


def _load_lora(pipeline, lora_file: str, base_model: str, aligned_model: str) -> None:
    """``pipeline.load_lora_weights(lora_file)``; weights that do not fit the base (other shapes, modules the base
    lacks) raise ``ValueError`` with the ``--base_model`` to pass."""
    report = _LoraLoadReport()
    loggers = [logging.getLogger(name) for name in ("diffusers.loaders.peft", "diffusers.utils.peft_utils")]
    notices = logging.getLogger("diffusers.loaders.lora_base")
    notices.addFilter(_no_text_encoder_lora_notice)  # our LoRAs adapt the UNet only
    for logger_ in loggers:
        logger_.addFilter(report)
    problem = None
    try:
        pipeline.load_lora_weights(os.path.dirname(lora_file) or ".", weight_name=os.path.basename(lora_file))
    except (RuntimeError, ValueError, KeyError) as error:
        problem, cause = _first_reason(str(error)) or type(error).__name__, error
    finally:
        notices.removeFilter(_no_text_encoder_lora_notice)
        for logger_ in loggers:
            logger_.removeFilter(report)
    if problem is None and report.unhandled:
        problem, cause = _first_reason(report.unhandled[0]), None
    if problem is not None:
        kind = f"{_unet_kind(pipeline.unet.config)} " if getattr(pipeline, "unet", None) is not None else ""
        raise ValueError(
            f"the LoRA weights {lora_file} do not fit the {kind}base model {base_model} ({problem}): a LoRA "
            f"applies to the UNet it was trained on; {_base_advice(base_model, aligned_model)}") from cause


def _no_text_encoder_lora_notice(record: logging.LogRecord) -> bool:
    """Logging filter: False for diffusers' notice that a LoRA file holds no text-encoder weights ("No LoRA keys
    associated to CLIPTextModel..."), printed once per text encoder for a UNet-only LoRA; anything else passes."""
    return not record.getMessage().startswith("No LoRA keys associated to CLIPTextModel")


def load_pipeline(base_model: str, aligned_model: str | None = None, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, revision: str | None = None, variant: str | None = None,
                  vae: str | None = None, cache_dir: str | None = None):
    """Load the base pipeline (any diffusers SD/SDXL folder or Hub id, at ``revision``, with ``variant`` weight
    files) and apply ``aligned_model``:

    * a folder or file with LoRA weights (``pytorch_lora_weights.safetensors``) -> ``load_lora_weights``;
    * a folder with ``unet/`` (a full-UNet run) -> that UNet replaces the base one;
    * a folder with ``model_index.json`` -> loaded as a pipeline of its own (``revision``/``variant`` and
      ``vae`` are the base's and do not apply: the saved pipeline holds the VAE training used).

    A LoRA or UNet that does not fit the base (another architecture: e.g. an SDXL run on an SD base) raises
    ``ValueError`` naming the ``--base_model`` to pass (the recorded one, when ``training_config.json`` has it).

    ``vae``: a separate VAE folder or Hub id that replaces the base pipeline's (training's
    ``--pretrained_vae_model_name_or_path``). ``cache_dir``: the Hub cache to read Hub ids from (default: the
    usual one). Returns the pipeline on ``device``, progress bar disabled."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    read_kwargs = ({} if dtype == torch.float32 else {"torch_dtype": dtype}) | (
        {"cache_dir": cache_dir} if cache_dir else {})
    layout = aligned_layout(aligned_model) if aligned_model is not None else None
    if layout == "pipeline":
        pipeline = DiffusionPipeline.from_pretrained(aligned_model, **read_kwargs)
    else:
        replaced = {"vae": AutoencoderKL.from_pretrained(vae, **read_kwargs)} if vae else {}
        pipeline = DiffusionPipeline.from_pretrained(base_model, revision=revision, variant=variant, **replaced,
                                                     **read_kwargs)
        if layout == "lora":
            lora_file = aligned_model if aligned_model.endswith(".safetensors") else os.path.join(
                aligned_model, "pytorch_lora_weights.safetensors")
            _load_lora(pipeline, lora_file, base_model, aligned_model)
        elif layout == "unet":
            if getattr(pipeline, "unet", None) is None:
                raise ValueError(f"the base model {base_model} has no UNet for the full-UNet run {aligned_model} to "
                                 f"replace; {_base_advice(base_model, aligned_model)}")
            _check_unet_fits_base(pipeline.unet.config,
                                  UNet2DConditionModel.load_config(aligned_model, subfolder="unet"),
                                  base_model, aligned_model)
            pipeline.unet = UNet2DConditionModel.from_pretrained(aligned_model, subfolder="unet", **read_kwargs)
    if hasattr(pipeline, "safety_checker"):
        pipeline.safety_checker = None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline if torch.device(device).type == "cpu" else pipeline.to(device)


def read_prompts(source: str, column: str = "caption", split: str = "train", limit: int | None = None) -> list[str]:
    """Prompts from a built-in set (:data:`BUILTIN_PROMPT_SETS`), a UTF-8 text file (one prompt a line, blank
    lines skipped, a byte-order mark ignored), or a dataset's ``column`` (a ``save_to_disk`` folder, or a
    parquet/json/csv file); unique prompts keep their first-seen order (repeats are dropped with a warning:
    ``--seeds_per_prompt`` samples a prompt several times). ``limit`` keeps the first ``limit``. ``column`` and
    ``split`` apply to datasets only: other values than the defaults with a built-in set or a text file are an
    error."""
    if limit is not None and limit < 1:
        raise ValueError(f"--max_prompts must be >= 1 when given, got {limit}.")
    is_text = source.lower().endswith(".txt")
    if (column != "caption" or split != "train") and (source in BUILTIN_PROMPT_SETS or is_text):
        raise ValueError(f"--prompt_column/--prompt_split select from a dataset; {source!r} is a "
                         f"{'built-in set' if source in BUILTIN_PROMPT_SETS else 'text file'}. Drop them.")
    if source in BUILTIN_PROMPT_SETS:
        from .toy import toy_caption_split, toy_captions

        training, heldout = toy_caption_split()
        prompts = {"toy-heldout": heldout, "toy-train": training, "toy-all": toy_captions()}[source]
    elif os.path.isfile(source) and is_text:
        try:
            with open(source, encoding="utf-8-sig") as handle:
                prompts = [line.strip() for line in handle if line.strip()]
        except UnicodeDecodeError as error:
            raise ValueError(f"prompts file {source!r} is not UTF-8 text ({error}); save it as UTF-8.") from None
    elif os.path.exists(source):
        from .rewards import load_preference_dataset

        try:
            dataset = load_preference_dataset(source, split)
        except ValueError as error:  # the loader names the training flag; this one is evaluate's
            raise ValueError(str(error).replace("--dataset_split_name", "--prompt_split").replace(
                "--dataset_name", "--prompts")) from error
        if column not in dataset.column_names:
            raise ValueError(
                f"{source!r} has no column {column!r} (columns: {dataset.column_names}); pass --prompt_column.")
        prompts = [p for p in dataset[column] if isinstance(p, str) and p.strip()]
    else:
        raise FileNotFoundError(
            f"prompts {source!r}: not a built-in set ({', '.join(BUILTIN_PROMPT_SETS)}), a .txt file or a dataset path."
        )
    unique = list(dict.fromkeys(prompts))
    if len(unique) < len(prompts):
        logger.warning("%s: %d repeated prompt(s) dropped, %d unique kept (use --seeds_per_prompt to sample each "
                       "prompt several times)", source, len(prompts) - len(unique), len(unique))
    prompts = unique
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"no prompts found in {source!r}.")
    return prompts


def resolve_reward_models(names: Sequence[str], device: str | torch.device | None = None,
                          cache_dir: str | None = None) -> list:
    """Reward models for ``names``: ``"toy"`` is :class:`~smpo_diffusers.toy.ToyRewardModel`; any other name goes
    through :func:`smpo_diffusers.rewards.load_reward_model` (registry names, ``module:function`` paths), its Hub
    checkpoints read from ``cache_dir`` when given (default: the usual Hub cache)."""
    from .rewards import load_reward_model
    from .toy import ToyRewardModel

    if not names:
        raise ValueError("name at least one reward model, e.g. --reward_models toy")
    for name in names:
        if "," in name:  # an ensemble needs a calibration on labelled pairs, which evaluation has not
            raise ValueError(f"--reward_models {name!r}: a comma-separated ensemble is for labelling; evaluation "
                             f"reports each reward on its own: --reward_models {' '.join(name.split(','))}")
    return [ToyRewardModel() if name == "toy" else load_reward_model(name, device=device, cache_dir=cache_dir)
            for name in names]


# ----------------------------------------------------------------------------- generation and scoring


def generate_images(pipeline, prompts: Sequence[str], seeds: Sequence[int], *, num_inference_steps: int = 20,
                    guidance_scale: float = 3.0, height: int | None = None, width: int | None = None,
                    batch_size: int = 64, progress: bool = False, desc: str = "generating") -> list:
    """Render ``prompts[i]`` from ``torch.Generator().manual_seed(seeds[i])`` (CPU generator, so the initial
    noise is the same on every device and for every model). Returns ``len(prompts)`` PIL images."""
    from tqdm.auto import tqdm

    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt.")
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[chunk]]
        with torch.no_grad():
            images.extend(pipeline(list(prompts[chunk]), num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, height=height, width=width,
                                   generator=generators).images)
    return images


def score_images(reward_models, images, prompts) -> dict[str, np.ndarray]:
    """``{reward name: float64 scores (N,)}``; raises if a reward model returns non-finite scores."""
    scores = {}
    for model in reward_models:
        values = model.score(images, prompts).detach().cpu().double().numpy()
        if not np.isfinite(values).all():
            raise ValueError(f"reward model {model.name!r} returned non-finite scores.")
        scores[model.name] = values
    return scores


# ----------------------------------------------------------------------------- outputs


def save_comparison_grid(base_images, aligned_images, path: str, columns: int = 16, scale: int | None = None):
    """Save a PNG: for each block of ``columns`` samples, a row of base images above the aligned ones, blocks
    separated by a 2 px white gap. ``scale``: nearest-neighbour upscaling (default: 2 for images narrower than
    256 px, else 1)."""
    from PIL import Image

    if len(base_images) != len(aligned_images) or not base_images:
        raise ValueError("save_comparison_grid needs two equal-length, non-empty image lists.")
    width, height = base_images[0].size
    scale = scale or (2 if width < 256 else 1)
    width, height = width * scale, height * scale
    columns = min(columns, len(base_images))
    blocks = math.ceil(len(base_images) / columns)
    gap = 2
    grid = Image.new("RGB", (columns * width, blocks * (2 * height + gap)), "white")
    for index, (base, aligned) in enumerate(zip(base_images, aligned_images)):
        x, top = (index % columns) * width, (index // columns) * (2 * height + gap)
        grid.paste(base.convert("RGB").resize((width, height), Image.NEAREST), (x, top))
        grid.paste(aligned.convert("RGB").resize((width, height), Image.NEAREST), (x, top + height))
    with atomic_output(path) as temporary:
        grid.save(temporary, format="PNG")
    return path


def _fmt(mean: float, stderr: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {stderr:.{digits}f}" if math.isfinite(stderr) else f"{mean:.{digits}f}"


def _few_prompts_note(count: int) -> str:
    return (f"Only {count} prompt{'s' if count != 1 else ''}: the seeds of one prompt are correlated, so the errors "
            f"and intervals count prompts, not images{' (one prompt: no error estimate)' if count == 1 else ''}; "
            f"evaluate on at least {FEW_PROMPTS} prompts for meaningful ones.")


def _effective(rate: dict) -> str:
    n_effective = rate.get("n_effective", rate["n"])  # absent from results written before clustering
    return f", effective n {n_effective:.1f}" if n_effective != rate["n"] else ""


def format_results_table(results: dict) -> str:
    """Markdown table of :func:`evaluate`'s ``results`` (one row per reward)."""
    names = results["models"]
    lines = [
        f"| reward | {names['base']} (mean ± s.e.) | {names['aligned']} (mean ± s.e.) | difference (paired) | "
        "win rate aligned > base [95 % Wilson] |",
        "|---|---|---|---|---|",
    ]
    for reward, summary in results["rewards"].items():
        rate = summary["win_rate"]
        lines.append(
            f"| {reward} | {_fmt(**summary['base'])} | {_fmt(**summary['aligned'])} | {_fmt(**summary['difference'])} "
            f"| {rate['rate']:.3f} [{rate['ci_low']:.3f}, {rate['ci_high']:.3f}] "
            f"({rate['wins']}W/{rate['ties']}T/{rate['losses']}L{_effective(rate)}) |"
        )
    lines.append("")
    lines.append(f"{results['num_samples']} samples ({results['num_prompts']} prompts x {results['seeds_per_prompt']} "
                 f"seeds), {results['num_inference_steps']} steps, guidance {results['guidance_scale']}; "
                 f"mean absolute pixel drift from base {results['pixel_drift']:.4f}. Ties count half a win. The "
                 "samples of one prompt are correlated: standard errors are clustered by prompt and the interval "
                 "uses the effective sample size.")
    if results["seeds_per_prompt"] > 1 and results["num_prompts"] < FEW_PROMPTS:
        lines.append(_few_prompts_note(results["num_prompts"]))
    return "\n".join(lines) + "\n"


def evaluate(base_model: str, aligned_model: str, prompts: Sequence[str], *, output_dir: str,
             reward_names: Sequence[str] = ("toy",), seeds_per_prompt: int = 1, seed: int = 0,
             num_inference_steps: int = 20, guidance_scale: float = 3.0, resolution: int | None = None,
             batch_size: int = 64, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             progress: bool = True, model_names: tuple[str, str] = ("base", "aligned"),
             grid_columns: int = 16, base_revision: str | None = None, base_variant: str | None = None,
             vae: str | None = None, cache_dir: str | None = None) -> dict:
    """Render ``prompts`` with the base and the aligned model from the same seeds, score, compare, write files.

    Sample ``j`` of prompt ``i`` uses seed ``seed + j * len(prompts) + i``. ``aligned_model`` is anything
    :func:`load_pipeline` accepts; both pipelines are loaded in ``dtype`` (rewards score the decoded images, so
    they do not depend on it), the base at ``base_revision`` with ``base_variant`` files and both with ``vae``
    in place of the base's VAE when given (a saved full pipeline keeps its own), Hub ids (of both models and of
    the reward checkpoints) read from ``cache_dir`` when given. ``guidance_scale``: classifier-free guidance,
    finite and >= 0 (diffusers guides only above 1). Writes ``results.json``, ``results.md`` and ``grid.png`` in
    ``output_dir`` and returns the results dict (``rewards[name]`` as in :func:`compare_scores`, plus ``scores``)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate needs at least one prompt.")
    for name, value in (("num_inference_steps", num_inference_steps), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}.")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"--guidance_scale must be a finite number >= 0 (<= 1 turns guidance off), got "
                         f"{guidance_scale}.")
    if resolution is not None and resolution < 8:
        raise ValueError(f"--resolution must be at least 8 pixels, got {resolution}.")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a torch device ({error}); use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu.")
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be >= 1, got {seeds_per_prompt}.")
    aligned_layout(aligned_model)  # a wrong path fails now, not after the base images are rendered
    if seeds_per_prompt > 1 and len(prompts) < FEW_PROMPTS:
        logger.warning("%s", _few_prompts_note(len(prompts)))
    reward_models = resolve_reward_models(reward_names, device=device, cache_dir=cache_dir)
    os.makedirs(output_dir, exist_ok=True)
    all_prompts = prompts * seeds_per_prompt
    seeds = [seed + index for index in range(len(all_prompts))]
    common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=resolution,
                  width=resolution, batch_size=batch_size, progress=progress)
    loading = dict(device=device, dtype=dtype, revision=base_revision, variant=base_variant, vae=vae,
                   cache_dir=cache_dir)
    # the aligned model first: weights that do not fit the base fail before any image is rendered
    aligned_images = generate_images(load_pipeline(base_model, aligned_model, **loading),
                                     all_prompts, seeds, desc=f"{model_names[1]} images", **common)
    base_images = generate_images(load_pipeline(base_model, **loading), all_prompts, seeds,
                                  desc=f"{model_names[0]} images", **common)
    base_scores = score_images(reward_models, base_images, all_prompts)
    aligned_scores = score_images(reward_models, aligned_images, all_prompts)
    results = {
        "base_model": str(base_model), "base_revision": base_revision, "base_variant": base_variant, "vae": vae,
        "aligned_model": str(aligned_model),
        "models": {"base": model_names[0], "aligned": model_names[1]},
        "num_prompts": len(prompts), "seeds_per_prompt": seeds_per_prompt, "num_samples": len(all_prompts),
        "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "interval": "95% Wilson score interval at the effective sample size of prompt clusters; ties count half a "
                    "win",
        "stderr": "cluster-robust over prompts (the samples of one prompt are one cluster)",
        "pixel_drift": image_drift(base_images, aligned_images),
        "rewards": {name: compare_scores(base_scores[name], aligned_scores[name], groups=all_prompts)
                    for name in base_scores},
        "scores": {"prompts": all_prompts, "seeds": seeds,
                   "base": {k: v.tolist() for k, v in base_scores.items()},
                   "aligned": {k: v.tolist() for k, v in aligned_scores.items()}},
    }
    shown = slice(0, GRID_MAX_SAMPLES)  # the grid first: a failure there leaves the earlier three files together
    save_comparison_grid(base_images[shown], aligned_images[shown], os.path.join(output_dir, "grid.png"),
                         columns=grid_columns)
    atomic_write_text(os.path.join(output_dir, "results.md"), format_results_table(results))
    atomic_write_text(os.path.join(output_dir, "results.json"),
                      json.dumps(finite_or_none(results), indent=2, allow_nan=False))
    return results
