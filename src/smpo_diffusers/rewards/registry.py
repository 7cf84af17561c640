"""Name -> backend registry and the :func:`load_reward_model` factory behind ``--reward_model``."""

from __future__ import annotations

import importlib
import logging
import os
from typing import Callable, Sequence

import torch

from .base import CallableRewardModel, EnsembleRewardModel, RewardModel
from .clip import CLIPScoreRewardModel, PickScoreRewardModel
from .optional import AestheticRewardModel, HPSv2RewardModel, ImageRewardRewardModel

__all__ = ["available_reward_models", "load_reward_model", "register_reward_model", "resolve_dtype"]

logger = logging.getLogger(__name__)

RewardFactory = Callable[..., RewardModel]
"""``factory(model_name_or_path, processor_name_or_path, *, device, dtype, cache_dir, max_batch_size,
preprocess_threads)`` -> :class:`RewardModel`."""

_REGISTRY: dict[str, RewardFactory] = {
    "pickscore": PickScoreRewardModel.from_pretrained,
    "clip": CLIPScoreRewardModel.from_pretrained,
    "hpsv2": HPSv2RewardModel.from_pretrained,
    "imagereward": ImageRewardRewardModel.from_pretrained,
    "aesthetic": AestheticRewardModel.from_pretrained,
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def register_reward_model(name: str, factory: RewardFactory, overwrite: bool = False) -> None:
    """Make ``load_reward_model(name, ...)`` (and ``--reward_model name``) call ``factory``."""
    key = name.lower()
    if "," in key or ":" in key:
        raise ValueError(f"Reward model names cannot contain ',' or ':', got {name!r}.")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"Reward model {name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[key] = factory


def available_reward_models() -> list[str]:
    """Registered backend names (optional backends are listed even when their package is missing)."""
    return sorted(_REGISTRY)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``/a ``torch.dtype``/one of float32|fp32|float16|fp16|half|bfloat16|bf16 -> torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}.") from None


_EXPECTED_FORM = ("'package.module:function' (a function fn(images, prompts) returning one score per image) or "
                  "'package.module:INSTANCE' (a RewardModel)")


def _close_names(obj, name: str) -> str:
    """`` (close matches: a, b)`` for the public names of ``obj`` that look like ``name``, else ``""``."""
    import difflib

    try:
        names = [n for n in dir(obj) if not n.startswith("_")]
    except Exception:  # an object whose __dir__ fails: no suggestions
        return ""
    matches = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (close matches: {', '.join(matches)})" if matches else ""


def _import_object(spec: str):
    """The object ``spec`` (``"package.module:attribute[.attribute...]"``) names; a malformed spec or a missing
    module or attribute raises ``ValueError`` naming it (a module that fails to import for another reason, e.g. a
    package it imports is missing, raises its own error)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"Expected 'package.module:attribute', got {spec!r}.")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        prefixes = {".".join(module_name.split(".")[:n]) for n in range(1, module_name.count(".") + 2)}
        if error.name not in prefixes:  # the module exists but needs a package that is missing: Python's error says
            raise
        raise ValueError(
            f"reward model {spec!r}: no module named {error.name!r} (is the package installed, or the folder that "
            f"holds it on PYTHONPATH?); name {_EXPECTED_FORM}."
        ) from None
    parts = attribute.split(".")
    for index, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = f"module {module_name!r}" if index == 0 else repr(f"{module_name}:{'.'.join(parts[:index])}")
            raise ValueError(
                f"reward model {spec!r}: {owner} has no attribute {part!r}{_close_names(obj, part)}; name "
                f"{_EXPECTED_FORM}."
            ) from None
    return obj


def load_reward_model(
    name: str | Sequence[str] | Callable,
    model_name_or_path: str | Sequence[str | None] | None = None,
    processor_name_or_path: str | Sequence[str | None] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | None = None,
    max_batch_size: int | None = 64,
    preprocess_threads: int | None = None,
    ensemble_weights: Sequence[float] | None = None,
) -> RewardModel:
    """Build a reward model from a name.

    Args:
        name: a :class:`RewardModel` instance (see below); a registered backend
            (:func:`available_reward_models`: ``pickscore``, ``clip``,
            ``hpsv2``, ``imagereward``, ``aesthetic``, case-insensitive); a ``"module:attribute"``
            import path to a :class:`RewardModel` instance or to a callable
            ``fn(images, prompts) -> N scores``; a callable itself; or a list of such names (or one
            comma-separated string, e.g. ``"pickscore,clip"``) for an uncalibrated
            :class:`EnsembleRewardModel` (call its ``calibrate`` before scoring).
        model_name_or_path: Hub id or local folder of the checkpoint; None uses the backend default.
            For an ensemble, a list (or comma-separated string) aligned with the names; empty
            entries use defaults.
        processor_name_or_path: defaults to ``model_name_or_path`` when that is given, else to the
            backend's default processor. Ensembles: aligned list as above.
        device: defaults to ``"cuda"`` when available, else ``"cpu"``.
        dtype: weights' dtype (``torch.float16`` for fp16 inference on CUDA); default float32.
        cache_dir: ``from_pretrained`` cache folder.
        max_batch_size: images per forward pass (:meth:`RewardModel.score` chunks by it).
        preprocess_threads: threads for CPU image decoding/preprocessing (same scores, faster); default 1.
        ensemble_weights: member weights of an ensemble (default equal).

    A :class:`RewardModel` instance (given, or imported as ``"module:INSTANCE"``) is the same object afterwards,
    configured like a built model where that cannot change its scores: moved to ``device`` and given
    ``preprocess_threads`` (members of an ensemble too) when these are passed. It keeps its own weights'
    precision (a ``dtype`` other than float32 only logs a warning, as for a reward function) and its own
    ``max_batch_size`` (its author's chunk size, e.g. for memory; ``label_dataset`` still hands it map batches
    of ``--batch_size`` pairs).
    """
    dtype = resolve_dtype(dtype)
    built_threads = 1 if preprocess_threads is None else preprocess_threads  # what a built model gets
    if isinstance(name, RewardModel):
        if model_name_or_path is not None or processor_name_or_path is not None:
            raise ValueError("A RewardModel instance takes no model or processor path; drop them.")
        return _configured_instance(name, repr(name), device, dtype, preprocess_threads)
    if isinstance(name, str) and "," in name:
        name = [part.strip() for part in name.split(",")]
    if not isinstance(name, str) and not callable(name):
        names = list(name)
        paths = _aligned(model_name_or_path, len(names), "model_name_or_path")
        processors = _aligned(processor_name_or_path, len(names), "processor_name_or_path")
        members = [
            load_reward_model(
                member,
                path,
                processor,
                device=device,
                dtype=dtype,
                cache_dir=cache_dir,
                max_batch_size=max_batch_size,
                preprocess_threads=preprocess_threads,
            )
            for member, path, processor in zip(names, paths, processors)
        ]
        return EnsembleRewardModel(members, weights=ensemble_weights)
    if ensemble_weights is not None:
        raise ValueError("ensemble_weights is only used with several reward models.")
    if callable(name) or ":" in name:
        if model_name_or_path is not None or processor_name_or_path is not None:
            raise ValueError("A callable reward model or RewardModel instance ('module:attribute') takes no model "
                             "or processor path; drop --reward_model_name_or_path/--reward_processor_name_or_path.")
        label = name if isinstance(name, str) else None
        obj = _import_object(name) if isinstance(name, str) else name
        if isinstance(obj, RewardModel):
            return _configured_instance(obj, label, device, dtype, preprocess_threads)
        if not callable(obj):
            raise ValueError(
                f"reward model {name!r} is {_describe(obj)}, neither a RewardModel nor a callable; name "
                f"{_EXPECTED_FORM}.")
        if dtype not in (None, torch.float32):
            logger.warning("dtype %s does not apply to the reward function %s: it scores in whatever precision "
                           "it computes in.", dtype, label or obj)
        out_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return CallableRewardModel(
            obj,
            name=label,
            device=out_device,
            max_batch_size=max_batch_size,
            preprocess_threads=built_threads,
        )
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(
            f"Unknown reward model {name!r}. Available: {', '.join(available_reward_models())}, a "
            "'module:function' import path, or a comma-separated list for an ensemble."
        )
    for what, value in (("model", model_name_or_path), ("processor", processor_name_or_path)):
        _check_local_path(value, what, name)
    return _REGISTRY[key](
        model_name_or_path or None,
        processor_name_or_path or None,
        device=device,
        dtype=dtype,
        cache_dir=cache_dir,
        max_batch_size=max_batch_size,
        preprocess_threads=built_threads,
    )


def _check_local_path(value: str | None, what: str, name: str) -> None:
    """A reward ``what`` (model or processor) path that names a local folder (``/``, ``.`` or ``~`` first, or a
    backslash) must exist: ``from_pretrained`` would take it for a malformed Hub id and say only that."""
    text = str(value or "")
    if (text.startswith(("/", ".", "~")) or "\\" in text) and not os.path.exists(os.path.expanduser(text)):
        raise ValueError(
            f"the {name} reward {what} path {text!r} does not exist (from {os.getcwd()}): pass an existing folder "
            f"(--reward_{what}_name_or_path when labelling) or a Hub id, e.g. that of the model's default weights.")


def _describe(obj) -> str:
    """``a tuple ('red', 'green', ...)``: the type and a short repr of a value that cannot score."""
    text = repr(obj)
    return f"a {type(obj).__name__} ({text if len(text) <= 60 else text[:57] + '...'})"


def _configured_instance(model: RewardModel, label: str, device, dtype: torch.dtype | None,
                         preprocess_threads: int | None) -> RewardModel:
    """``model`` moved to ``device`` and given ``preprocess_threads`` (each when passed); warns that ``dtype`` does
    not reach it. Same object."""
    if dtype not in (None, torch.float32):
        logger.warning("dtype %s does not apply to the reward model instance %s: it scores with the weights it was "
                       "built with (build it in that dtype to change them).", dtype, label)
    if preprocess_threads is not None:
        if preprocess_threads < 1:
            raise ValueError(f"preprocess_threads must be >= 1, got {preprocess_threads}.")
        _set_preprocess_threads(model, preprocess_threads)
    if device is not None and model.device != torch.device(device):
        model.to(device)
    return model


def _set_preprocess_threads(model: RewardModel, threads: int) -> None:
    model.preprocess_threads = threads
    if isinstance(model, EnsembleRewardModel):  # its members preprocess their own images
        for member in model.models:
            _set_preprocess_threads(member, threads)


def _aligned(value, count: int, what: str) -> list:
    if value is None:
        return [None] * count
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    value = [v or None for v in value]
    if len(value) != count:
        raise ValueError(f"{what} has {len(value)} entries but {count} reward models were named; align them.")
    return value
