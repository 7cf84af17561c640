"""Command-line entry points: the ``main`` functions behind the scripts in ``examples/`` and the commands that
``pip install smpo-diffusers`` installs (``smpo-train-sdxl``, ``smpo-train-sd``, ``smpo-label-rewards``,
``smpo-evaluate``, ``smpo-push-to-hub``; same flags as the scripts)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import NoReturn

import torch
from transformers import HfArgumentParser

from .config import SmPOConfig
from .distributed import OtherProcessFailed, leave_process_group, main_process_first, process_state
from .hub import HubAuthenticationError, HubUploadError

logger = logging.getLogger(__name__)

__all__ = ["DemoArguments", "evaluate_main", "label_main", "parse_evaluate_args", "parse_training_args", "train_main"]


@dataclass
class DemoArguments:
    """Options of the example scripts that are not training options."""

    demo: bool = field(
        default=False,
        metadata={"help": "Train on an embedded default (no downloads); model/dataset flags may be omitted."},
    )
    demo_world: str = field(
        default="toy",
        metadata={"help": "'toy': the bundled toy text-to-image world in this script's layout (a trained tiny "
                          "SD or SDXL pipeline, its own generations as pairs, a programmatic reward), evaluated "
                          "before/after on held-out prompts; 'tiny-random': a random-weights tiny model of this "
                          "script's family with generated pairs, for a quick pipeline check."},
    )

    def __post_init__(self):
        if self.demo_world not in ("toy", "tiny-random"):
            raise ValueError(f"--demo_world {self.demo_world!r} is not supported; choose 'toy' or 'tiny-random'.")
        if self.demo_world != "toy" and not self.demo:
            raise ValueError("--demo_world only applies with --demo; add --demo or drop it.")


INPUT_ERRORS = (ValueError, OSError, ImportError, FloatingPointError, OtherProcessFailed, HubAuthenticationError,
                HubUploadError)
"""What bad flags, paths, datasets or settings raise, each with a message that names the fix (``OSError`` covers
missing files, unreachable Hub ids and full disks; ``OtherProcessFailed``: such an error on another process; the Hub
errors: no usable token for ``--push_to_hub``, or a push that failed, with the command to push again). Only the
message is printed, never the chained client error (which could quote request headers)."""


def run_cli(main, *args, **kwargs):
    """Run a CLI entry point: an input error prints ``error: <message>`` and exits with status 2 instead of a
    traceback. ``SMPO_DEBUG=1`` in the environment re-raises it (with the traceback). After a run that finished,
    the process leaves its process group (``accelerate launch`` with several processes)."""
    try:
        result = main(*args, **kwargs)
    except INPUT_ERRORS as error:
        leave_process_group(wait=False)  # every process stops (the others raised too, or were told to)
        exit_with_input_error(error)
    leave_process_group()
    return result


def exit_with_input_error(error: BaseException) -> NoReturn:
    """Call inside ``except``: print ``error: <message>`` and exit with status 2 (argparse's status for bad
    input), or re-raise ``error`` with its traceback when ``SMPO_DEBUG=1`` is set."""
    if os.environ.get("SMPO_DEBUG"):
        raise error
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None


def parse_training_args(argv: list[str] | None = None) -> tuple[SmPOConfig, DemoArguments]:
    """Parse ``argv`` into :class:`SmPOConfig` and :class:`DemoArguments`; unknown flags are an error."""
    parser = HfArgumentParser((SmPOConfig, DemoArguments))
    config, demo = parser.parse_args_into_dataclasses(args=argv)
    return config, demo


def given_flags(argv: list[str]) -> set[str]:
    """The options typed on a command line, as field names, resolved by the parser itself: ``--train_batch_size
    1``, ``--train_batch_size=1``, ``--train-batch-size 1`` and an abbreviation such as ``--train_batch 1`` all
    give ``train_batch_size``."""
    import argparse

    parser = HfArgumentParser((SmPOConfig, DemoArguments))
    for action in parser._actions:  # only what is typed lands in the namespace
        action.default = argparse.SUPPRESS
        action.required = False
    namespace, _ = parser.parse_known_args(args=argv)
    return set(vars(namespace))


def prepare_demo(config: SmPOConfig, demo: DemoArguments, family: str, given: set[str] | None = None) -> SmPOConfig:
    """Build the demo's base model and labelled dataset under ``output_dir/demo-inputs`` and point the config
    at them. The toy demo's training defaults replace every option not in ``given`` (the flags typed, see
    :func:`given_flags`; without it, every option still at its default). Both worlds log to no tracker unless
    ``--report_to`` is typed (tensorboard is not among the package's requirements). Returns the config (modified
    in place)."""
    folder = os.path.join(config.output_dir, "demo-inputs")
    defaults = SmPOConfig()

    def typed(name):
        return name in given if given is not None else getattr(config, name) != getattr(defaults, name)

    if demo.demo_world == "toy":
        from .toy import build_toy_demo_inputs, toy_training_defaults

        model_dir, dataset_dir = build_toy_demo_inputs(folder, seed=config.seed, layout=family)
        for name, value in toy_training_defaults(family).items():
            if name == "max_train_steps" and typed("num_train_epochs"):
                continue  # the typed epochs set the run's length
            if not typed(name):
                setattr(config, name, value)
    else:
        from .demo import build_demo_inputs

        model_dir, dataset_dir = build_demo_inputs(folder, family=family, num_pairs=64, seed=config.seed)
        if config.resolution is None:
            config.resolution = 32
        if not typed("report_to"):  # a pipeline check after a plain pip install: no tracker to install first
            config.report_to = "none"
    if config.pretrained_model_name_or_path is None:
        config.pretrained_model_name_or_path = model_dir
    if config.dataset_name is None:
        config.dataset_name = dataset_dir
    return config


def evaluate_toy_demo(config: SmPOConfig) -> dict:
    """Before/after comparison of the toy demo on held-out prompts (``output_dir/evaluation``); prints the table."""
    from .evaluation import format_results_table
    from .toy import evaluate_toy_model

    results = evaluate_toy_model(config.pretrained_model_name_or_path, config.output_dir, seed=config.seed)
    print(format_results_table(results))
    print(f"before/after grid: {os.path.join(config.output_dir, 'evaluation', 'grid.png')}")
    return results


def train_main(argv: list[str] | None = None, family: str = "sdxl") -> dict:
    """Parse flags, train, save. ``family`` (``"sd"`` or ``"sdxl"``) only selects what ``--demo`` trains on;
    real models are detected from their files."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    argv = sys.argv[1:] if argv is None else list(argv)
    config, demo = parse_training_args(argv)
    if demo.demo:
        # under accelerate launch the main process builds the inputs; the others then find them built
        given = given_flags(argv)
        main_process_first(lambda: prepare_demo(config, demo, family, given=given),
                           process_state(config.ddp_timeout), "prepare the demo inputs")
        config = dataclasses.replace(config)  # validated again with the demo's values in place
    missing = [flag for flag, value in (("--pretrained_model_name_or_path", config.pretrained_model_name_or_path),
                                        ("--dataset_name", config.dataset_name)) if value is None]
    if missing:
        raise ValueError(f"{' and '.join(missing)} required (or pass --demo for the embedded default).")
    from .trainer import SmPOTrainer

    trainer = SmPOTrainer(config)
    metrics = trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"done: {trainer.global_step} updates; weights and training_config.json in {config.output_dir}")
        print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        if demo.demo and demo.demo_world == "toy":
            evaluate_toy_demo(config)
    return metrics


# ---------------------------------------------------------------------------- evaluation
EVALUATE_DESCRIPTION = """Compare an aligned model with its base: same prompts, same seeds, one or more rewards.

    smpo-evaluate --base_model path/or/hub-id --aligned_model ./smpo-model \
        --prompts toy-heldout --reward_models toy --output_dir ./eval      # or: python examples/evaluate.py ...

The sampling defaults (20 steps, guidance 3.0, batches of 64, fp32) suit the toy world; for SD/SDXL pass e.g.
``--num_inference_steps 30 --guidance_scale 7.5 --batch_size 8 --dtype fp16`` (SDXL: ``--guidance_scale 5``).

``--aligned_model``: a training --output_dir (LoRA weights or a unet/ folder), its LoRA file or a full pipeline
folder. ``--base_model`` defaults to the base the run recorded (``training_config.json``); ``toy`` and
``toy-sdxl`` name the shipped SD and SDXL toy pipelines. The base is read as training read it: the recorded
``--revision`` and ``--variant`` (when ``--base_model`` is the recorded base), the recorded separate VAE, used by
both models so that only the UNet differs, and the recorded ``--cache_dir`` (``--base_revision``,
``--base_variant``, ``--vae``, ``--cache_dir`` override them; ``--vae base`` keeps the base pipeline's own
VAE). A saved full pipeline holds the VAE training used, so ``--vae`` is refused with one: it would change the
base's VAE only.
``--prompts``: a built-in set (toy-heldout, toy-train, toy-all), a .txt file (one prompt a line) or a
dataset (save_to_disk folder or parquet/json/csv file; --prompt_column picks the column).
``--reward_models``: ``toy`` and/or registry names (pickscore, clip, hpsv2, imagereward, aesthetic) or
``module:function`` paths. Writes results.json, results.md (mean ± standard error per model and reward,
win rate of aligned over base with a 95 % Wilson interval, ties counting half) and grid.png (base row above
aligned row, same seed per column; the first 64 samples).
"""

EVALUATE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_evaluate_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of ``examples/evaluate.py`` / ``smpo-evaluate``."""
    parser = argparse.ArgumentParser(description=EVALUATE_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", default=None,
                        help="Base pipeline folder or Hub id, or 'toy' / 'toy-sdxl' for the shipped SD / SDXL toy "
                             "pipeline (default: the base recorded in the training_config.json of --aligned_model or "
                             "beside it).")
    parser.add_argument("--base_revision", default=None,
                        help="Revision of a Hub base (default: the one training used, when --base_model is its base).")
    parser.add_argument("--base_variant", default=None,
                        help="Weight-file variant of the base, e.g. fp16 (default: as training, for its base).")
    parser.add_argument("--vae", default=None,
                        help="VAE folder or Hub id for both models (default: the separate VAE training used, if any; "
                             "'base': the base pipeline's own; ./base names a folder). Not with a saved full "
                             "pipeline as --aligned_model: it keeps the VAE training saved in it.")
    parser.add_argument("--cache_dir", default=None,
                        help="Hub cache to read Hub ids from: base, VAE and reward checkpoints (default: the "
                             "--cache_dir training recorded, if any).")
    parser.add_argument("--aligned_model", required=True, help="LoRA/UNet output folder, LoRA file or pipeline.")
    parser.add_argument("--prompts", default="toy-heldout", help="Built-in set, .txt file or dataset path.")
    parser.add_argument("--prompt_column", default="caption",
                        help="Dataset column holding the prompts (datasets only; default: caption).")
    parser.add_argument("--prompt_split", default="train",
                        help="Dataset split to read the prompts from (datasets only; default: train).")
    parser.add_argument("--max_prompts", type=int, default=None,
                        help="Keep only the first N prompts read (default: all).")
    parser.add_argument("--seeds_per_prompt", type=int, default=1,
                        help="Samples per prompt and model, each from its own seed (default: 1).")
    parser.add_argument("--seed", type=int, default=0,
                        help="First seed: sample j of prompt i uses seed + j * number of prompts + i, the same for "
                             "both models (default: 0).")
    parser.add_argument("--reward_models", nargs="+", default=["toy"],
                        help="One or more rewards to score with: toy, registry names (pickscore, clip, hpsv2, "
                             "imagereward, aesthetic) or module:function paths (default: toy).")
    parser.add_argument("--num_inference_steps", type=int, default=20,
                        help="Denoising steps per image, >= 1 (default: 20).")
    parser.add_argument("--guidance_scale", type=float, default=3.0,
                        help="Classifier-free guidance scale, finite and >= 0; 1 or less renders without guidance "
                             "(default: 3.0).")
    parser.add_argument("--resolution", type=int, default=None, help="Image size (default: the model's).")
    parser.add_argument("--batch_size", type=int, default=64,
                        help="Images per pipeline call, >= 1 (default: 64; lower it when rendering runs out of "
                             "memory).")
    parser.add_argument("--device", default=None, help="Where to render (default: cuda when available, else cpu).")
    parser.add_argument("--dtype", choices=sorted(EVALUATE_DTYPES), default="fp32",
                        help="Weights' dtype for rendering (fp16/bf16 on a GPU for SD/SDXL-size models).")
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args(argv)


def evaluate_main(argv: list[str] | None = None) -> dict:
    """Entry point of ``examples/evaluate.py`` / ``smpo-evaluate``: render both models, score, write the results."""
    from . import evaluation
    from .toy import toy_model_path

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_evaluate_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("evaluate.py renders in one process; run it with `python examples/evaluate.py ...` (or "
                         "smpo-evaluate), not under accelerate launch with several processes (each would render "
                         "and write the same files).")
    layout = evaluation.aligned_layout(args.aligned_model)  # a missing or empty folder is reported as such
    if layout == "pipeline" and args.vae is not None:
        raise ValueError(f"--vae {args.vae!r} would replace the base's VAE only: --aligned_model "
                         f"{args.aligned_model} is a saved full pipeline and keeps the VAE training saved in it, so "
                         "the two models would differ in VAE as well as UNet. Drop --vae (the base then uses the "
                         "separate VAE training recorded, the one the pipeline holds).")
    recorded = evaluation.trained_base_settings(args.aligned_model) or {}
    for key, flag, given in (("base_model", "--base_model", args.base_model), ("vae", "--vae", args.vae)):
        value = recorded.get(key)
        if given is None and key in recorded.get("relative_paths", []):
            if not os.path.exists(os.path.expanduser(value)):
                raise ValueError(
                    f"the training_config.json of {args.aligned_model} records the {key.replace('_', ' ')} as "
                    f"the relative path {value!r} (an older run's record), which does not exist from here "
                    f"({os.getcwd()}): run evaluate.py from the directory training ran in, or pass {flag} with its "
                    "path.")
            logger.warning("the %s recorded as the relative path %r is read from the current directory (%s); pass "
                           "%s if training ran elsewhere", key.replace("_", " "), value, os.getcwd(), flag)
    base_model = args.base_model or recorded.get("base_model")
    if base_model is None:
        raise ValueError(f"no training_config.json in or beside {args.aligned_model} records its base model; pass "
                         "--base_model (a pipeline folder or Hub id, or 'toy' / 'toy-sdxl' for a shipped toy "
                         "pipeline).")
    if base_model in ("toy", "toy-sdxl"):
        base_model = toy_model_path("sd" if base_model == "toy" else "sdxl")
    if args.base_revision is not None and os.path.isdir(base_model):
        raise ValueError(f"--base_revision {args.base_revision!r} selects a Hub revision, but the base model "
                         f"{base_model!r} is a local folder, whose files are read as they are. Drop --base_revision "
                         "(or pass the Hub id).")
    same_base = base_model == recorded.get("base_model")
    revision = args.base_revision or (recorded.get("revision") if same_base else None)
    variant = args.base_variant or (recorded.get("variant") if same_base else None)
    vae = args.vae or recorded.get("vae")
    vae = None if vae == "base" else vae
    cache_dir = args.cache_dir or recorded.get("cache_dir")
    logger.info("base model: %s (revision %s, variant %s); VAE: %s", base_model, revision or "default",
                variant or "none", vae or "the base's own")
    prompts = evaluation.read_prompts(args.prompts, column=args.prompt_column, split=args.prompt_split,
                                      limit=args.max_prompts)
    results = evaluation.evaluate(
        base_model, args.aligned_model, prompts, output_dir=args.output_dir, reward_names=args.reward_models,
        seeds_per_prompt=args.seeds_per_prompt, seed=args.seed, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, resolution=args.resolution, batch_size=args.batch_size,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=EVALUATE_DTYPES[args.dtype],
        base_revision=revision, base_variant=variant, vae=vae, cache_dir=cache_dir)
    print(evaluation.format_results_table(results))
    print(f"wrote results.json, results.md and grid.png to {args.output_dir}")
    return results


# ---------------------------------------------------------------------------- reward labelling
def label_main(argv: list[str] | None = None) -> dict:
    """Entry point of ``examples/label_rewards.py`` / ``smpo-label-rewards``: parse
    :class:`~smpo_diffusers.rewards.LabelingArguments`, label, print the summary (main process)."""
    import json

    from accelerate import PartialState

    from .rewards import LabelingArguments, label_dataset

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(LabelingArguments).parse_args_into_dataclasses(args=argv)
    summary = label_dataset(args)
    if PartialState().is_main_process:  # the process group label_dataset joined; one report per run
        printable = {k: v for k, v in summary.items() if k != "arguments"}
        print(json.dumps(printable, indent=2, sort_keys=True))
    return summary


# ---------------------------------------------------------------------------- installed commands
# `pip install smpo-diffusers` puts these on PATH (setup.cfg [options.entry_points]); each takes the flags of the
# example script of the same name. Under several processes: accelerate launch "$(which smpo-train-sdxl)" ...
def train_sdxl_command() -> None:
    """``smpo-train-sdxl``: ``examples/train_smpo_sdxl.py``."""
    run_cli(train_main, sys.argv[1:], family="sdxl")


def train_sd_command() -> None:
    """``smpo-train-sd``: ``examples/train_smpo_sd.py``."""
    run_cli(train_main, sys.argv[1:], family="sd")


def label_rewards_command() -> None:
    """``smpo-label-rewards``: ``examples/label_rewards.py``."""
    run_cli(label_main, sys.argv[1:])


def evaluate_command() -> None:
    """``smpo-evaluate``: ``examples/evaluate.py``."""
    run_cli(evaluate_main, sys.argv[1:])


def push_to_hub_command() -> None:
    """``smpo-push-to-hub``: ``examples/push_to_hub.py``."""
    from .hub import push_main

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    push_main(sys.argv[1:])
