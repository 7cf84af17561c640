"""Command-line entry points behind `examples/train_smpo_sdxl.py` and `examples/train_smpo_sd.py`."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import NoReturn

from transformers import HfArgumentParser

from .config import SmPOConfig
from .distributed import OtherProcessFailed, leave_process_group, main_process_first, use_cpu_process_group

__all__ = ["DemoArguments", "parse_training_args", "train_main"]


@dataclass
class DemoArguments:
    """Options of the example scripts that are not training options."""

    demo: bool = field(
        default=False,
        metadata={"help": "Train on an embedded default (no downloads); model/dataset flags may be omitted."},
    )
    demo_world: str = field(
        default="toy",
        metadata={"help": "'toy': the bundled toy text-to-image world (a trained tiny SD pipeline, its own "
                          "generations as pairs, a programmatic reward), evaluated before/after on held-out "
                          "prompts; 'tiny-random': a random-weights tiny model of this script's family (SD or "
                          "SDXL) with generated pairs, for a quick pipeline check."},
    )

    def __post_init__(self):
        if self.demo_world not in ("toy", "tiny-random"):
            raise ValueError(f"--demo_world {self.demo_world!r} is not supported; choose 'toy' or 'tiny-random'.")
        if self.demo_world != "toy" and not self.demo:
            raise ValueError("--demo_world only applies with --demo; add --demo or drop it.")


INPUT_ERRORS = (ValueError, OSError, ImportError, FloatingPointError, OtherProcessFailed)
"""What bad flags, paths, datasets or settings raise, each with a message that names the fix (``OSError`` covers
missing files, unreachable Hub ids and full disks; ``OtherProcessFailed``: such an error on another process)."""


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
    :func:`given_flags`; without it, every option still at its default). Returns the config (modified in place)."""
    folder = os.path.join(config.output_dir, "demo-inputs")
    if demo.demo_world == "toy":
        from .toy import TOY_TRAINING_DEFAULTS, build_toy_demo_inputs

        model_dir, dataset_dir = build_toy_demo_inputs(folder, seed=config.seed)
        defaults = SmPOConfig()

        def typed(name):
            return name in given if given is not None else getattr(config, name) != getattr(defaults, name)

        for name, value in TOY_TRAINING_DEFAULTS.items():
            if name == "max_train_steps" and typed("num_train_epochs"):
                continue  # the typed epochs set the run's length
            if not typed(name):
                setattr(config, name, value)
    else:
        from .demo import build_demo_inputs

        model_dir, dataset_dir = build_demo_inputs(folder, family=family, num_pairs=64, seed=config.seed)
        if config.resolution is None:
            config.resolution = 32
    if config.pretrained_model_name_or_path is None:
        config.pretrained_model_name_or_path = model_dir
    if config.dataset_name is None:
        config.dataset_name = dataset_dir
    return config


def evaluate_toy_demo(config: SmPOConfig) -> dict:
    """Before/after comparison of the toy demo on held-out prompts (``output_dir/evaluation``); prints the table."""
    from .evaluation import evaluate, format_results_table
    from .toy import TOY_GUIDANCE_SCALE, TOY_INFERENCE_STEPS, TOY_RESOLUTION, toy_caption_split

    _, heldout = toy_caption_split()
    results = evaluate(config.pretrained_model_name_or_path, config.output_dir, heldout,
                       output_dir=os.path.join(config.output_dir, "evaluation"), seeds_per_prompt=2,
                       seed=10_000 + config.seed, num_inference_steps=TOY_INFERENCE_STEPS,
                       guidance_scale=TOY_GUIDANCE_SCALE, resolution=TOY_RESOLUTION, model_names=("base", "SmPO"))
    print(format_results_table(results))
    print(f"before/after grid: {os.path.join(config.output_dir, 'evaluation', 'grid.png')}")
    return results


def train_main(argv: list[str] | None = None, family: str = "sdxl") -> dict:
    """Parse flags, train, save. ``family`` only selects what ``--demo_world tiny-random`` builds; real models
    are detected from their files."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    argv = sys.argv[1:] if argv is None else list(argv)
    config, demo = parse_training_args(argv)
    if demo.demo:
        from accelerate import PartialState

        # under accelerate launch the main process builds the inputs; the others then find them built
        given = given_flags(argv)
        main_process_first(lambda: prepare_demo(config, demo, family, given=given),
                           PartialState(cpu=use_cpu_process_group()), "prepare the demo inputs")
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


if __name__ == "__main__":  # pragma: no cover
    train_main(sys.argv[1:])
