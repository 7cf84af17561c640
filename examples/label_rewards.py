#!/usr/bin/env python
"""Label a preference set with reward-model scores for SmPO's smoothed preferences.

    python examples/label_rewards.py --dataset_name yuvalkirstain/pickapic_v2 --dataset_split_name train \
        --reward_model pickscore --output_dir ./pickapic_labelled --batch_size 16 --fp16

Multi-GPU: ``accelerate launch examples/label_rewards.py ...`` (one process per GPU).
Rerunning the same command resumes: finished shards in ``output_dir/.shards`` are not re-scored.
Writes ``output_dir`` (``datasets.load_from_disk``), ``output_dir/reward_stats.json`` and
``output_dir/labeling_summary.json``; see ``smpo_diffusers.rewards.job`` for details.
"""

from __future__ import annotations

import json
import logging
import sys

from accelerate import PartialState
from transformers import HfArgumentParser

from smpo_diffusers.cli import run_cli
from smpo_diffusers.rewards import LabelingArguments, label_dataset


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(LabelingArguments).parse_args_into_dataclasses(args=argv)
    summary = label_dataset(args)
    if PartialState().is_main_process:  # the process group label_dataset joined; one report per run
        printable = {k: v for k, v in summary.items() if k != "arguments"}
        print(json.dumps(printable, indent=2, sort_keys=True))
    return summary


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
