"""Run SmPO training under `accelerate launch` and record, per rank, what that rank trained on.

Usage: accelerate launch ... tests/scripts/record_training.py RECORD_DIR [SmPOConfig flags]
Writes RECORD_DIR/rank{R}.json with the pair indices of every micro-batch ([] when it held none) and a digest
of the final trainable weights as that rank holds them. Everything else is the ordinary library code path.
"""

import hashlib
import json
import logging
import os
import sys


from smpo_diffusers.cli import parse_training_args
from smpo_diffusers.trainer import SmPOTrainer


class RecordingTrainer(SmPOTrainer):
    seen: list
    micro_batch_sizes: list

    def _micro_step(self, batch, generator):
        size = int(batch.get("batch_size", 0)) if batch else 0
        self.micro_batch_sizes.append(size)
        self.seen.append(batch["indices"].tolist() if size else [])  # [] for a micro-batch with no pair
        return super()._micro_step(batch, generator)


def main():
    logging.basicConfig(level=logging.INFO)
    record_dir, argv = sys.argv[1], sys.argv[2:]
    config, _ = parse_training_args(argv)
    trainer = RecordingTrainer(config)
    trainer.seen, trainer.micro_batch_sizes = [], []
    trainer.train()
    digest = hashlib.sha256()
    for name, param in sorted(trainer.unwrapped_unet.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper holds it
    steps = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
    record = {"rank": trainer.accelerator.process_index, "num_processes": trainer.accelerator.num_processes,
              "optimizer_steps": max(steps, default=0),
              "seen": trainer.seen, "micro_batch_sizes": trainer.micro_batch_sizes,
              "weights_sha256": digest.hexdigest(), "global_step": trainer.global_step}
    os.makedirs(record_dir, exist_ok=True)
    with open(os.path.join(record_dir, f"rank{record['rank']}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
