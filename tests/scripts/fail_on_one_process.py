"""Under `accelerate launch` with 2 processes: a write fails on one process only; every process must stop with an
error instead of leaving the others waiting for it at the next collective.

Usage: accelerate launch ... tests/scripts/fail_on_one_process.py RECORD_DIR MODE [SmPOConfig flags]
       accelerate launch ... tests/scripts/fail_on_one_process.py RECORD_DIR labelling[-load] [LabelingArguments]
MODE, training: ``checkpoint-publish``: the main process's last step of writing checkpoint-N (syncing it to
disk) raises "No space left on device"; ``checkpoint-save``: process 1's accelerate save_state raises the
RuntimeError torch.save gives on a full disk; ``latent-cache``: process 1's latent-cache writes raise "No space
left on device". ``labelling``: process 1's first shard write raises it; ``labelling-load``: the main process's
dataset load (the first, before the others load) raises it. Writes RECORD_DIR/rank{R}.json with the
exception each process ended with, then leaves the process group without waiting for the others.
"""

import json
import os
import sys

import accelerate
import torch.distributed
from transformers import HfArgumentParser

import smpo_diffusers.latent_cache as latent_cache
import smpo_diffusers.rewards.job as job
import smpo_diffusers.trainer as trainer_module
from smpo_diffusers.cli import parse_training_args
from smpo_diffusers.rewards import LabelingArguments, label_dataset

RANK = int(os.environ["RANK"])


def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def torch_save_on_a_full_disk(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0")


def main():
    record_dir, mode, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    if not mode.startswith("labelling"):
        if mode == "checkpoint-publish" and RANK == 0:
            trainer_module._fsync_tree = disk_full
        elif mode == "checkpoint-save" and RANK == 1:
            accelerate.Accelerator.save_state = torch_save_on_a_full_disk
        elif mode == "latent-cache" and RANK == 1:
            latent_cache.LatentCache._build_pairs = disk_full
        config, _ = parse_training_args(argv)

        def run():
            return trainer_module.SmPOTrainer(config).train()
    else:
        if mode == "labelling" and RANK == 1:
            job._save_shard = disk_full
        elif mode == "labelling-load" and RANK == 0:
            job.load_preference_dataset = disk_full
        (args,) = HfArgumentParser(LabelingArguments).parse_args_into_dataclasses(args=argv)

        def run():
            return label_dataset(args)
    try:
        run()
        ended = None
    except Exception as error:
        ended = f"{type(error).__name__}: {error}"
    os.makedirs(record_dir, exist_ok=True)
    with open(os.path.join(record_dir, f"rank{RANK}.json"), "w") as handle:
        json.dump({"rank": RANK, "ended": ended}, handle)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
