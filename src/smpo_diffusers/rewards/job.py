"""Resumable, shardable labelling of a whole preference set (the logic behind ``label_rewards.py``).

Layout of ``output_dir`` after :func:`label_dataset`::

    output_dir/                     the labelled set: ``datasets.load_from_disk(output_dir)``
    output_dir/reward_stats.json    :func:`compute_reward_statistics` of the labelled set, with
                                      ``labels_sha256`` (a digest of the rewards it describes)
    output_dir/labeling_summary.json  counts, timing and throughput of the run
    output_dir/.shards/shard-XXXXX/   the reward columns of pairs [XXXXX*K, (XXXXX+1)*K), each with
                                      its settings fingerprint (``labeling_fingerprint.json``)

The set is cut into contiguous shards of ``shard_size`` (K) pairs. Each labelled shard holds only
``reward_0``, ``reward_1``, ``label_valid``; it is written under a temporary name and moved into
place with ``os.replace``, so a shard folder is either complete or absent. A rerun skips every
shard whose fingerprint (reward model, model/processor paths, a hash of the model's torch weights, dtype,
dataset name/split/fingerprint/size, shard bounds and, for images read from files, their paths, sizes and
modification stamps) matches and scores the rest; at the end the shards are
concatenated and joined column-wise to the source rows. A source ``label_valid`` column is kept: a pair is valid
when it was valid there and its images were readable.

Re-labelling into the same ``output_dir`` first deletes the old ``reward_stats.json``, ``labeling_summary.json``
and the dataset's ``state.json``/``dataset_info.json``, then saves the dataset, then writes the statistics and the
summary: a crash at any point leaves no statistics beside rewards of another run (at worst none, or a folder
``load_from_disk`` refuses).

Multi-GPU: under ``accelerate launch`` each process (``PartialState``) labels the shards with
``index % num_processes == process_index`` on its own device; after a barrier the main process
assembles and saves; after a second barrier every process returns the same summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..data import load_preference_dataset
from ..distributed import computed_on_main, main_process_first, on_every_process, process_state
from ..files import atomic_write_json, fsync_directory, fsync_tree
from ..latent_cache import module_fingerprint, path_only_file_stamps
from .base import EnsembleRewardModel, RewardModel
from .images import UnreadableImageError, load_image
from .labeling import (CAPTION_COLUMN, IMAGE_COLUMNS, RewardLabeler, reward_features, summarize_labels,
                       undecoded_images)
from .registry import load_reward_model
from .statistics import (REWARD_COLUMNS, REWARD_STATISTICS_FILENAME, VALID_COLUMN, compute_reward_statistics,
                         save_reward_statistics)

logger = logging.getLogger(__name__)

__all__ = ["LabelingArguments", "label_dataset"]

SHARDS_DIRNAME = ".shards"
SUMMARY_FILENAME = "labeling_summary.json"
FINGERPRINT_FILENAME = "labeling_fingerprint.json"
CALIBRATION_FILENAME = "ensemble_calibration.json"
_FORMAT_VERSION = 1


@dataclass
class LabelingArguments:
    """Arguments of ``examples/label_rewards.py`` (parse with ``transformers.HfArgumentParser``)."""

    dataset_name: str = field(
        metadata={
            "help": "Hub dataset id, a save_to_disk folder, or local .parquet/.json/.jsonl/.csv file(s)."
        }
    )
    output_dir: str = field(metadata={"help": "Where the labelled dataset (save_to_disk) and JSON files go."})
    dataset_split_name: str = field(default="train", metadata={"help": "Split to label."})
    reward_model: str = field(
        default="pickscore",
        metadata={
            "help": "pickscore | clip | hpsv2 | imagereward | aesthetic | 'module:function' | a "
            "comma-separated list of these for a z-score-normalised ensemble."
        },
    )
    reward_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Reward checkpoint (Hub id or folder); comma-separated for ensembles."},
    )
    reward_processor_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Processor; defaults to the model path if given, else the backend default."},
    )
    batch_size: int = field(
        default=16, metadata={"help": "Pairs per map batch (2x images per scoring call)."}
    )
    max_samples: Optional[int] = field(default=None, metadata={"help": "Label only the first N pairs."})
    shard_size: int = field(default=1000, metadata={"help": "Pairs per resumable shard."})
    preprocess_threads: int = field(
        default=4,
        metadata={"help": "Threads per process for image decoding and preprocessing (same scores)."},
    )
    fp16: bool = field(default=False, metadata={"help": "Run the reward model in float16 (CUDA only; a "
                                                        "module:function reward or module:INSTANCE model keeps "
                                                        "its own precision)."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache folder for datasets and models."})
    ensemble_calibration_pairs: int = field(
        default=256,
        metadata={"help": "Ensembles only: the first N readable pairs estimate each member's mean/std."},
    )
    ddp_timeout: int = field(
        default=7200,
        metadata={"help": "Seconds a process waits at a collective for the others before the job stops (several "
                          "processes). The others wait while the main process alone downloads the dataset and, at "
                          "the end, writes the whole labelled dataset (images included): raise it for datasets "
                          "that take longer to write (torch's NCCL default would be 10 minutes)."},
    )

    def __post_init__(self):
        for name in ("batch_size", "shard_size", "preprocess_threads", "ensemble_calibration_pairs", "ddp_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max_samples must be >= 1, got {self.max_samples}.")


def _check_image_columns(dataset) -> None:
    """Refuse image columns of plain values (e.g. file-path strings) before the reward model is loaded."""
    import datasets

    for column in IMAGE_COLUMNS:
        feature = dataset.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype not in ("binary", "large_binary"):
            fix = (f"If they are image file paths, cast the column and label the result (save_to_disk): "
                   f"dataset = dataset.cast_column({column!r}, datasets.Image())."
                   if feature.dtype in ("string", "large_string") else
                   "Store encoded image bytes (binary) or use a datasets.Image() column.")
            raise ValueError(f"Column {column!r} holds {feature.dtype} values, not images. {fix}")


def _source_flags(dataset) -> np.ndarray:
    """The source's own ``label_valid`` as bools, read as the trainer reads it (null, NaN and 0 are False)."""
    import datasets

    feature = dataset.features[VALID_COLUMN]
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("bool", "int", "uint", "float"))):
        raise ValueError(
            f"The dataset's {VALID_COLUMN!r} column has type {feature}; it must be bool (True = a usable pair). Cast "
            f"it with dataset.cast_column({VALID_COLUMN!r}, datasets.Value('bool')) or remove it."
        )
    return np.array([flag is not None and flag == flag and flag != 0 for flag in dataset[VALID_COLUMN]], dtype=bool)


def _prepare_source(dataset, max_samples: int | None) -> tuple[Any, np.ndarray | None]:
    """The rows to label without old reward/validity columns, and the source's ``label_valid`` flags (None when
    it has none)."""
    missing = [c for c in (CAPTION_COLUMN, *IMAGE_COLUMNS) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The dataset lacks column(s) {missing} (has {dataset.column_names}); a preference set needs "
            f"{CAPTION_COLUMN!r}, {IMAGE_COLUMNS[0]!r} and {IMAGE_COLUMNS[1]!r}."
        )
    _check_image_columns(dataset)
    old = [c for c in REWARD_COLUMNS if c in dataset.column_names]
    if old:  # an earlier labelling's output: its label_valid said which pairs that model could score
        old += [VALID_COLUMN] if VALID_COLUMN in dataset.column_names else []
        logger.warning("The dataset already has %s (an earlier labelling); they are replaced by the new labels.",
                       old)
        dataset = dataset.remove_columns(old)
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    if len(dataset) == 0:
        raise ValueError("The dataset split is empty; nothing to label.")
    if VALID_COLUMN not in dataset.column_names:
        return dataset, None
    flags = _source_flags(dataset)
    logger.info("The dataset has its own %s column: a labelled pair is valid only if it was valid there and its "
                "images are readable.", VALID_COLUMN)
    return dataset.remove_columns([VALID_COLUMN]), flags


def _count_empty_captions(dataset) -> int:
    return sum(1 for caption in dataset[CAPTION_COLUMN] if isinstance(caption, str) and not caption.strip())


def _scoring_view(dataset):
    """Only caption and image columns, with ``datasets.Image`` columns left undecoded so that a
    corrupted image reaches the labeler (and is counted) instead of failing inside ``datasets``."""
    return undecoded_images(dataset.select_columns([CAPTION_COLUMN, *IMAGE_COLUMNS]))


def _shard_bounds(num_pairs: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, num_pairs)) for start in range(0, num_pairs, shard_size)]


def _shard_path(shards_dir: str, index: int) -> str:
    return os.path.join(shards_dir, f"shard-{index:05d}")


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _shard_is_done(path: str, fingerprint: dict) -> bool:
    return os.path.isdir(path) and _read_json(os.path.join(path, FINGERPRINT_FILENAME)) == _normalised(
        fingerprint
    )


def _changed_settings(path: str, fingerprint: dict) -> list[str]:
    """The settings an existing shard at ``path`` was scored with that differ from ``fingerprint``, as
    ``"name: old -> new"`` strings (``["unreadable fingerprint"]`` when it has none that parses)."""
    old = _read_json(os.path.join(path, FINGERPRINT_FILENAME))
    if not isinstance(old, dict):
        return ["unreadable fingerprint"]
    new = _normalised(fingerprint)
    return [f"{name}: {old.get(name)!r} -> {new.get(name)!r}" for name in sorted(set(old) | set(new))
            if old.get(name) != new.get(name)]


def _save_shard(labelled, path: str, fingerprint: dict) -> None:
    """Write the shard under a temporary name, fsync it, then move it into place (complete or absent)."""
    import datasets

    temporary = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar per small shard write is noise next to the map bar
    try:
        labelled.save_to_disk(temporary)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    atomic_write_json(os.path.join(temporary, FINGERPRINT_FILENAME), fingerprint)
    fsync_tree(temporary)  # on disk before the rename publishes it
    if os.path.exists(path):  # a shard from other settings: set it aside, then drop it
        stale = f"{path}.stale-{os.getpid()}"
        os.replace(path, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(temporary, path)
    fsync_directory(os.path.dirname(path))


def _remove_leftovers(shards_dir: str, owned: set[int]) -> None:
    """Delete temporary/stale folders of interrupted writes for the shards this process owns."""
    if not os.path.isdir(shards_dir):
        return
    pattern = re.compile(r"^shard-(\d+)\.(tmp|stale)-\d+$")
    for entry in os.listdir(shards_dir):
        match = pattern.match(entry)
        if match and int(match.group(1)) in owned:
            shutil.rmtree(os.path.join(shards_dir, entry), ignore_errors=True)


def _clear_outputs(output_dir: str) -> None:
    """Delete the statistics and summary of an earlier run, then the dataset's own state files, so that no
    statistics describe a dataset that is being rewritten and a half-written dataset does not load; then its
    ``data-*.arrow`` files, so the save writes new files instead of truncating ones that a reader (a training run
    on the earlier labels) may still have memory-mapped: it keeps reading the old rows instead of crashing."""
    for name in (REWARD_STATISTICS_FILENAME, SUMMARY_FILENAME, "state.json", "dataset_info.json"):
        try:
            os.remove(os.path.join(output_dir, name))
        except FileNotFoundError:
            pass
    for entry in os.listdir(output_dir):
        if re.fullmatch(r"data-\d{5}-of-\d{5}\.arrow", entry):
            os.remove(os.path.join(output_dir, entry))


def _weight_modules(model: RewardModel) -> list[tuple[str, torch.nn.Module]]:
    """The ``torch.nn.Module`` attributes of ``model`` (also the module behind a bound-method reward function)."""
    modules = {}
    for name, value in sorted(vars(model).items()):
        owner = getattr(value, "__self__", None)
        for module in (value, owner):
            if isinstance(module, torch.nn.Module):
                modules.setdefault(id(module), (name, module))
    return list(modules.values())


def _weights_fingerprint(model: RewardModel, unhashed: list[str]) -> Any:
    """A 16-hex-digit hash of the torch weights ``model`` holds (a list, one per member, for an ensemble). None for
    a model without any (e.g. a reward function), whose name is appended to ``unhashed``."""
    if isinstance(model, EnsembleRewardModel):
        return [_weights_fingerprint(member, unhashed) for member in model.models]
    modules = _weight_modules(model)
    if not modules:
        unhashed.append(model.name)
        return None
    digest = hashlib.sha256()
    for name, module in modules:
        digest.update(f"{name}={module_fingerprint(module)};".encode())
    return digest.hexdigest()[:16]


def _dataset_identity(dataset_name: str) -> str:
    return os.path.abspath(dataset_name) if os.path.exists(dataset_name) else dataset_name


def _resolve_dtype(args: LabelingArguments, device: torch.device) -> torch.dtype:
    if not args.fp16:
        return torch.float32
    if device.type != "cuda":
        logger.warning("--fp16 needs CUDA; running the reward model in float32 on %s.", device)
        return torch.float32
    return torch.float16


def _runs_in_float16(model: RewardModel) -> bool:
    """Whether ``model`` (or a member of an ensemble) scores with float16 weights: what ``--fp16`` did, or how an
    instance was built. A model whose weights are not found (a reward function) counts as not float16."""
    if isinstance(model, EnsembleRewardModel):
        return any(_runs_in_float16(member) for member in model.models)
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype == torch.float16
    weights = getattr(model, "model", None)
    if isinstance(weights, torch.nn.Module):
        return any(p.dtype == torch.float16 for p in weights.parameters())
    return False


def _calibration_sample(view, num_pairs: int, source_valid: np.ndarray | None = None) -> tuple[list, list[str]]:
    """The images and captions of the first ``num_pairs`` scorable pairs (readable, captioned, and not marked
    invalid by the source's own ``label_valid``)."""
    images, prompts = [], []
    for index, row in enumerate(view):
        if len(prompts) >= 2 * num_pairs:
            break
        if source_valid is not None and not source_valid[index]:
            continue
        caption = row[CAPTION_COLUMN]
        if not isinstance(caption, str):
            continue
        try:
            pair = [load_image(row[column]) for column in IMAGE_COLUMNS]
        except UnreadableImageError:
            continue
        images.extend(pair)
        prompts.extend([caption, caption])
    return images, prompts


def _calibrate_ensemble(
    model: EnsembleRewardModel, view, args, settings: dict, shards_dir: str, state, source_valid=None
) -> None:
    """Main process estimates member statistics (or reuses those of an interrupted run with the same
    settings, stored in ``.shards/ensemble_calibration.json``) and sends them to every process."""
    path = os.path.join(shards_dir, CALIBRATION_FILENAME)

    def calibrate():  # main process; a failure stops every process
        stored = _read_json(path)
        if not (stored and stored.get("settings") == _normalised(settings)):
            images, prompts = _calibration_sample(view, args.ensemble_calibration_pairs, source_valid)
            statistics = model.calibrate(images, prompts)
            atomic_write_json(path, {"settings": settings, "statistics": statistics, "num_images": len(images)})
        return _read_json(path)["statistics"]

    model.set_statistics(computed_on_main(calibrate, state, "calibrate the reward ensemble"))


def label_dataset(args: LabelingArguments, reward_model: RewardModel | None = None) -> dict[str, Any]:
    """Label ``args.dataset_name`` into ``args.output_dir`` (see the module docstring for the layout).

    Args:
        args: the run's settings.
        reward_model: an already built model to use instead of ``load_reward_model(args.reward_model,
            ...)`` (its ``name`` then identifies it in the fingerprint and statistics). It is used as it is
            (moved to the process's device only under a launch with several processes); ``--reward_model
            module:INSTANCE`` instead goes through ``load_reward_model``: moved to the device, given
            ``--preprocess_threads``, precision kept (``--fp16`` warns).

    Returns:
        The summary also written to ``output_dir/labeling_summary.json``: ``num_pairs``,
        ``num_valid_pairs``, ``num_invalid_pairs`` (``label_valid`` False; the trainer skips them),
        ``num_unreadable_pairs`` (of these, pairs whose images or caption could not be scored, or that scored
        non-finite), ``num_invalid_in_source`` (pairs the source's own ``label_valid`` marks invalid: null, False or
        0; they stay invalid), ``num_empty_captions`` (pairs whose caption is empty or whitespace: scored against an
        empty prompt and kept valid; logged), ``num_shards``, ``num_shards_scored``, ``num_shards_resumed``,
        ``num_shards_replaced`` (shards found scored with other settings and scored again; each is also logged with
        what changed), ``pairs_scored``,
        ``elapsed_seconds`` (whole run), ``scoring_seconds`` (slowest process's shard loop: decoding,
        scoring, shard writes), ``pairs_per_second`` (``pairs_scored / scoring_seconds``; 0 when all
        shards were resumed), ``arguments`` (the :class:`LabelingArguments` as a dict),
        ``reward_model``, ``dataset_name``, ``dataset_split_name``, ``dataset_path``,
        ``statistics_path``, ``num_processes``, ``fp16`` (whether the reward model scored with float16
        weights, as in the shard fingerprints; ``arguments["fp16"]`` is what was asked).
    """
    import datasets

    state = process_state(args.ddp_timeout)
    started = time.perf_counter()
    output_dir = os.path.abspath(args.output_dir)
    if os.path.exists(args.dataset_name) and os.path.realpath(args.dataset_name) == os.path.realpath(output_dir):
        raise ValueError("--output_dir must differ from --dataset_name (the source would be overwritten).")
    shards_dir = os.path.join(output_dir, SHARDS_DIRNAME)

    source = main_process_first(
        lambda: load_preference_dataset(args.dataset_name, args.dataset_split_name, args.cache_dir), state,
        f"load the dataset {args.dataset_name}")
    source_fingerprint = getattr(source, "_fingerprint", None)
    if any(os.path.dirname(os.path.realpath(entry["filename"])) == os.path.realpath(output_dir)
           for entry in source.cache_files):  # e.g. a link to the output folder given as --dataset_name
        raise ValueError(f"--output_dir {args.output_dir} holds the files of the dataset being labelled; writing the "
                         "labelled set there would destroy its source. Choose another --output_dir.")
    source, source_valid = _prepare_source(source, args.max_samples)
    view = _scoring_view(source)

    if reward_model is None:
        reward_model = load_reward_model(
            args.reward_model,
            args.reward_model_name_or_path,
            args.reward_processor_name_or_path,
            device=state.device,
            dtype=_resolve_dtype(args, state.device),
            cache_dir=args.cache_dir,
            max_batch_size=2 * args.batch_size,
            preprocess_threads=args.preprocess_threads,
        )
    elif state.num_processes > 1:
        reward_model.to(state.device)

    unhashed: list[str] = []
    settings = {
        "format_version": _FORMAT_VERSION,
        "reward_model": reward_model.name,
        "reward_model_name_or_path": args.reward_model_name_or_path,
        "reward_processor_name_or_path": args.reward_processor_name_or_path,
        "reward_weights": _weights_fingerprint(reward_model, unhashed),  # retrained weights at the same path
        "fp16": _runs_in_float16(reward_model),  # what runs, not what was asked (CPU, functions, instances)
        "dataset_name": _dataset_identity(args.dataset_name),
        "dataset_split_name": args.dataset_split_name,
        "dataset_fingerprint": source_fingerprint,  # with each shard's start/stop: its rows, whatever --max_samples
        "shard_size": args.shard_size,
    }
    if unhashed and state.is_main_process:
        logger.warning("the reward model %s holds no torch weights to fingerprint: resuming from %s cannot detect "
                       "changes to its code or weights; delete that folder after changing it.",
                       ", ".join(repr(name) for name in unhashed), shards_dir)
    calibrate = isinstance(reward_model, EnsembleRewardModel) and reward_model.statistics is None
    default_pairs = LabelingArguments.__dataclass_fields__["ensemble_calibration_pairs"].default
    if args.ensemble_calibration_pairs != default_pairs and not calibrate:
        raise ValueError(
            "--ensemble_calibration_pairs calibrates an ensemble without given statistics (--reward_model a,b,...); "
            f"the reward model {reward_model.name!r} "
            f"{'has its statistics' if isinstance(reward_model, EnsembleRewardModel) else 'needs no calibration'}."
            " Drop --ensemble_calibration_pairs.")
    if isinstance(reward_model, EnsembleRewardModel):  # what the ensemble's scores depend on besides its name
        settings["ensemble_weights"] = list(reward_model.weights)
        if calibrate:  # its sample is drawn from all the pairs labelled: another --max_samples, other statistics
            settings.update(ensemble_calibration_pairs=args.ensemble_calibration_pairs, num_pairs=len(source))
        else:  # statistics given by the caller are used as they are
            settings["ensemble_statistics"] = [{"mean": s["mean"], "std": s["std"]} for s in reward_model.statistics]
    os.makedirs(shards_dir, exist_ok=True)
    if calibrate:
        _calibrate_ensemble(reward_model, view, args, settings, shards_dir, state, source_valid)

    bounds = _shard_bounds(len(source), args.shard_size)
    owned = {i for i in range(len(bounds)) if i % state.num_processes == state.process_index}
    _remove_leftovers(shards_dir, owned)
    labeler = RewardLabeler(reward_model)
    report = {"pairs_scored": 0, "shards_scored": 0, "shards_resumed": 0, "shards_replaced": 0}
    scoring_started = time.perf_counter()

    def score_owned_shards():
        for index in sorted(owned):
            start, stop = bounds[index]
            fingerprint = {**settings, "shard_index": index, "start": start, "stop": stop}
            files = [stamp for row in path_only_file_stamps(view.select(range(start, stop)), IMAGE_COLUMNS)
                     for stamp in row]
            if files:  # images read from files: the dataset's fingerprint covers their paths, not their contents
                fingerprint["image_files"] = hashlib.sha256(chr(0).join(files).encode()).hexdigest()
            path = _shard_path(shards_dir, index)
            if _shard_is_done(path, fingerprint):
                report["shards_resumed"] += 1
                continue
            if os.path.isdir(path):  # scored earlier with other settings: counted, said, scored again
                report["shards_replaced"] += 1
                logger.warning("shard %d in %s was scored with other settings (%s); scoring it again.",
                               index, shards_dir, "; ".join(_changed_settings(path, fingerprint)))
            labelled = view.select(range(start, stop)).map(
                labeler,
                batched=True,
                batch_size=args.batch_size,
                remove_columns=view.column_names,
                features=reward_features(),
                keep_in_memory=True,
                load_from_cache_file=False,
                new_fingerprint=datasets.fingerprint.Hasher.hash(_normalised(fingerprint)),
                desc=f"Scoring shard {index + 1}/{len(bounds)}",
            )
            _save_shard(labelled, path, fingerprint)
            report["pairs_scored"] += stop - start
            report["shards_scored"] += 1
        report["scoring_seconds"] = time.perf_counter() - scoring_started
        atomic_write_json(
            os.path.join(shards_dir, f"run-rank-{state.process_index:05d}-of-{state.num_processes:05d}.json"),
            report,
        )

    on_every_process(score_owned_shards, state, "score its shards")  # a failure stops every process

    summary_path = os.path.join(output_dir, SUMMARY_FILENAME)

    def assemble():  # main process: the shards into one labelled dataset, then its statistics, then the summary
        rewards = datasets.concatenate_datasets(
            [datasets.load_from_disk(_shard_path(shards_dir, i)) for i in range(len(bounds))]
        )
        if len(rewards) != len(source):
            raise RuntimeError(f"Shards hold {len(rewards)} rows but the dataset has {len(source)}.")
        scored = np.asarray(rewards.with_format("numpy")[VALID_COLUMN], dtype=bool)
        if source_valid is not None:
            rewards = rewards.remove_columns([VALID_COLUMN]).add_column(
                VALID_COLUMN, (scored & source_valid).tolist()).cast_column(VALID_COLUMN, datasets.Value("bool"))
        labelled = datasets.concatenate_datasets([source, rewards], axis=1)
        _clear_outputs(output_dir)
        labelled.save_to_disk(output_dir)
        statistics = compute_reward_statistics(labelled, reward_model=reward_model.name)
        if isinstance(reward_model, EnsembleRewardModel):
            statistics["ensemble_member_statistics"] = reward_model.statistics
        statistics_path = save_reward_statistics(output_dir, statistics)
        if statistics["count"] and not statistics["suggested_scale"]:
            logger.warning(
                "every valid reward is %s: the reward model %r gives these pairs no preference signal, so training "
                "on %s stops with an error: SmPO cannot derive a preference scale from these rewards, and with any "
                "--reward_scale every pair gets weight 0 (equal rewards: preference probability 0.5). Check the "
                "reward model and its weights on a few images.",
                statistics["min"], reward_model.name, output_dir)
        reports = [
            _read_json(os.path.join(shards_dir, f"run-rank-{rank:05d}-of-{state.num_processes:05d}.json"))
            for rank in range(state.num_processes)
        ]
        elapsed = time.perf_counter() - started
        pairs_scored = sum(r["pairs_scored"] for r in reports)
        scoring_seconds = max(r["scoring_seconds"] for r in reports)
        summary = {
            **summarize_labels(labelled),
            "num_unreadable_pairs": int((~scored).sum()),
            "num_invalid_in_source": 0 if source_valid is None else int((~source_valid).sum()),
            "num_empty_captions": _count_empty_captions(source),
            "num_shards": len(bounds),
            "num_shards_scored": sum(r["shards_scored"] for r in reports),
            "num_shards_resumed": sum(r["shards_resumed"] for r in reports),
            "num_shards_replaced": sum(r["shards_replaced"] for r in reports),
            "pairs_scored": pairs_scored,
            "elapsed_seconds": elapsed,
            "scoring_seconds": scoring_seconds,
            "pairs_per_second": pairs_scored / scoring_seconds if pairs_scored else 0.0,
            "reward_model": reward_model.name,
            "dataset_name": args.dataset_name,
            "dataset_split_name": args.dataset_split_name,
            "dataset_path": output_dir,
            "statistics_path": statistics_path,
            "num_processes": state.num_processes,
            "fp16": settings["fp16"],
            "arguments": asdict(args),
        }
        atomic_write_json(summary_path, summary)
        if summary["num_unreadable_pairs"]:
            logger.warning(
                "%d of %d pairs had unreadable images or captions (or a non-finite score): NaN rewards, "
                "label_valid=False (skipped in training).", summary["num_unreadable_pairs"], summary["num_pairs"])
        if summary["num_invalid_in_source"]:
            logger.warning(
                "%d of %d pairs are marked invalid by the dataset's own %s column: scored, but label_valid=False "
                "(skipped in training).", summary["num_invalid_in_source"], summary["num_pairs"], VALID_COLUMN)
        if summary["num_empty_captions"]:
            logger.warning(
                "%d of %d pairs have an empty or whitespace-only caption: they were scored against an empty prompt "
                "and stay valid. Right for a prompt-independent reward (aesthetic); for PickScore, CLIP, HPSv2 or "
                "ImageReward check the captions or drop these rows before labelling.",
                summary["num_empty_captions"], summary["num_pairs"])

    computed_on_main(assemble, state, "assemble the labelled dataset")
    return _read_json(summary_path)
