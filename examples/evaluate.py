#!/usr/bin/env python
"""Compare an aligned model with its base: same prompts, same seeds, one or more rewards.

    python examples/evaluate.py --base_model path/or/hub-id --aligned_model ./smpo-model \
        --prompts toy-heldout --reward_models toy --output_dir ./eval

Writes results.json, results.md (mean ± standard error per model and reward, win rate of aligned over base) and
grid.png. All flags and their defaults: `python examples/evaluate.py --help` (installed as `smpo-evaluate`).
Library equivalent: ``smpo_diffusers.evaluation.evaluate(base, aligned, prompts, output_dir=...)``.
"""

import sys

from smpo_diffusers.cli import evaluate_main, run_cli

if __name__ == "__main__":
    run_cli(evaluate_main, sys.argv[1:])
