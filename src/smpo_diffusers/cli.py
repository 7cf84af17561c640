"""Command-line entry points behind `examples/train_smpo_sdxl.py` and `examples/train_smpo_sd.py`."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .config import SmPOConfig

__all__ = ["DemoArguments", "parse_training_args", "train_main"]


@dataclass
class DemoArguments:
    """Options of the example scripts that are not training options."""

    demo: bool = field(
        default=False,
        metadata={"help": "Train on an embedded default: a tiny in-process model and a generated, reward-labelled "
                          "preference set (no downloads). Model/dataset flags may be omitted."},
    )
    demo_num_pairs: int = field(default=64, metadata={"help": "Pairs in the generated demo preference set."})


def parse_training_args(argv: list[str] | None = None) -> tuple[SmPOConfig, DemoArguments]:
    """Parse ``argv`` into :class:`SmPOConfig` and :class:`DemoArguments`; unknown flags are an error."""
    parser = HfArgumentParser((SmPOConfig, DemoArguments))
    config, demo = parser.parse_args_into_dataclasses(args=argv)
    if demo.demo_num_pairs < 2:
        raise ValueError("--demo_num_pairs must be >= 2.")
    return config, demo


def prepare_demo(config: SmPOConfig, demo: DemoArguments, family: str):
    """Build the demo's base model folder and labelled dataset under ``output_dir/demo-inputs`` and point the
    config at them. Returns the config (modified in place)."""
    from .demo import build_demo_inputs

    model_dir, dataset_dir = build_demo_inputs(
        os.path.join(config.output_dir, "demo-inputs"), family=family, num_pairs=demo.demo_num_pairs, seed=config.seed
    )
    if config.pretrained_model_name_or_path is None:
        config.pretrained_model_name_or_path = model_dir
    if config.dataset_name is None:
        config.dataset_name = dataset_dir
    return config


def train_main(argv: list[str] | None = None, family: str = "sdxl") -> dict:
    """Parse flags, train, save. ``family`` only selects what ``--demo`` builds; real models are detected."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config, demo = parse_training_args(argv)
    if demo.demo:
        prepare_demo(config, demo, family)
    missing = [flag for flag, value in (("--pretrained_model_name_or_path", config.pretrained_model_name_or_path),
                                        ("--dataset_name", config.dataset_name)) if value is None]
    if missing:
        raise SystemExit(f"error: {' and '.join(missing)} required (or pass --demo for the embedded default).")
    from .trainer import SmPOTrainer

    trainer = SmPOTrainer(config)
    metrics = trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"done: {trainer.global_step} updates; weights and training_config.json in {config.output_dir}")
        print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics


if __name__ == "__main__":  # pragma: no cover
    train_main(sys.argv[1:])
