#!/usr/bin/env python
"""Label a preference set with reward-model scores for SmPO's smoothed preferences.

    python examples/label_rewards.py --dataset_name yuvalkirstain/pickapic_v2 --dataset_split_name train \
        --reward_model pickscore --output_dir ./pickapic_labelled --batch_size 16 --fp16

Multi-GPU: ``accelerate launch examples/label_rewards.py ...`` (one process per GPU).
Rerunning the same command resumes: finished shards in ``output_dir/.shards`` are not re-scored.
Writes ``output_dir`` (``datasets.load_from_disk``), ``output_dir/reward_stats.json`` and
``output_dir/labeling_summary.json``; see ``smpo_diffusers.rewards.job`` for details. All flags:
``python examples/label_rewards.py --help`` (installed as ``smpo-label-rewards``).
"""

import sys

from smpo_diffusers.cli import label_main, run_cli

if __name__ == "__main__":
    run_cli(label_main, sys.argv[1:])
