"""Under `accelerate launch` with 2 processes: a write (or load) fails on one process only; every process must stop
with an error instead of leaving the others waiting for it at the next collective.

Usage: accelerate launch ... tests/scripts/fail_on_one_process.py RECORD_DIR SCENARIOS_JSON
SCENARIOS_JSON lists ``{"name": ..., "mode": MODE, "argv": [flags]}``; the scenarios run one after another in the
same process group (one launch, several failures), each with fresh accelerate state. MODE, training (SmPOConfig
flags): ``model-load``: process 1's model load raises OSError (its copy of the model is missing);
``checkpoint-publish``: the main process's last step of writing checkpoint-N (syncing it to disk) raises
"No space left on device"; ``checkpoint-save``: process 1's accelerate save_state raises the RuntimeError
torch.save gives on a full disk; ``latent-cache``: process 1's latent-cache writes raise "No space left on device";
``final-save``: the main process's write of the trained LoRA weights raises it; ``final-validation``: the main
process's final validation rendering (after the weights are saved) raises it. Labelling (LabelingArguments):
``labelling``: process 1's first shard write raises it; ``labelling-load``: the main process's dataset load (the
first, before the others load) raises it. Writes RECORD_DIR/rank{R}.json: each scenario's name -> the exception
the process ended it with (None: it finished), then leaves the process group.
"""

import json
import os
import sys

import accelerate
import torch.distributed
from accelerate.state import AcceleratorState, GradientState
from transformers import HfArgumentParser

import smpo_diffusers.latent_cache as latent_cache
import smpo_diffusers.rewards.job as job
import smpo_diffusers.trainer as trainer_module
from smpo_diffusers.cli import parse_training_args
from smpo_diffusers.rewards import LabelingArguments, label_dataset

RANK = int(os.environ["RANK"])


def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def model_missing(*args, **kwargs):
    raise OSError("no file named model_index.json found in this node's copy of the model")


def torch_save_on_a_full_disk(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0")


# mode -> (the rank that fails, the object and attribute replaced there, the replacement)
FAILURES = {
    "model-load": (1, trainer_module, "load_diffusion_parts", model_missing),
    "checkpoint-publish": (0, trainer_module, "fsync_tree", disk_full),
    "checkpoint-save": (1, accelerate.Accelerator, "save_state", torch_save_on_a_full_disk),
    "latent-cache": (1, latent_cache.LatentCache, "_build_pairs", disk_full),
    "final-save": (0, trainer_module, "save_lora", disk_full),
    "final-validation": (0, trainer_module.SmPOTrainer, "log_validation", disk_full),
    "labelling": (1, job, "_save_shard", disk_full),
    "labelling-load": (0, job, "load_preference_dataset", disk_full),
}


def run_scenario(mode, argv):
    """Run one scenario; returns ``"<ExceptionType>: <message>"`` or None."""
    failed_rank, owner, name, replacement = FAILURES[mode]
    original = getattr(owner, name)
    if RANK == failed_rank:
        setattr(owner, name, replacement)
    try:
        if mode.startswith("labelling"):
            (args,) = HfArgumentParser(LabelingArguments).parse_args_into_dataclasses(args=argv)
            label_dataset(args)
        else:
            config, _ = parse_training_args(argv)
            trainer_module.SmPOTrainer(config).train()
        return None
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    finally:
        setattr(owner, name, original)
        # fresh accelerate state for the next scenario, in the same process group
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def main():
    record_dir, scenarios_file = sys.argv[1], sys.argv[2]
    with open(scenarios_file) as handle:
        scenarios = json.load(handle)
    ended = {}
    for scenario in scenarios:
        ended[scenario["name"]] = run_scenario(scenario["mode"], scenario["argv"])
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # both processes start the next scenario together
    os.makedirs(record_dir, exist_ok=True)
    with open(os.path.join(record_dir, f"rank{RANK}.json"), "w") as handle:
        json.dump({"rank": RANK, "ended": ended}, handle)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
