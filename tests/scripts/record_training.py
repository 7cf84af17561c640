"""Run SmPO training under `accelerate launch` and record, per rank, what that rank trained on.

Usage: accelerate launch ... tests/scripts/record_training.py RECORD_DIR [--probe_loss] [SmPOConfig flags]
Writes RECORD_DIR/rank{R}.json with the pair indices of every micro-batch ([] when it held none) and a digest
of the final trainable weights as that rank holds them (and of its --use_ema average). Everything else is the
ordinary library code path.

--probe_loss adds to each micro-batch's loss a term whose gradient is known: on the first trainable tensor,
ones times the mean over the micro-batch's pairs of (pair index + 1); the SmPO loss itself is kept at weight
zero (it still runs, so the wrapped model's gradient all-reduce is the real one). The first element of the
gradient each optimiser step applies is recorded ("step_gradients"): an update that weighs every pair the same
steps with the mean of (index + 1) over the pairs it trained, on every process.
"""

import hashlib
import json
import logging
import os
import sys


from smpo_diffusers.cli import parse_training_args
from smpo_diffusers.trainer import SmPOTrainer


class RecordingTrainer(SmPOTrainer):
    probe_loss = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen, self.micro_batch_sizes, self.step_gradients = [], [], []
        step = self.optimizer.step

        def recorded_step(*step_args, **step_kwargs):
            self.step_gradients.append(float(self.trainable_params[0].grad.flatten()[0]))
            return step(*step_args, **step_kwargs)

        self.optimizer.step = recorded_step

    def _micro_step(self, batch, generator):
        size = int(batch.get("batch_size", 0)) if batch else 0
        self.micro_batch_sizes.append(size)
        self.seen.append(batch["indices"].tolist() if size else [])  # [] for a micro-batch with no pair
        return super()._micro_step(batch, generator)

    def compute_loss(self, batch, generator):
        step = super().compute_loss(batch, generator)
        if self.probe_loss:
            probe = self.trainable_params[0]
            index_mean = (batch["indices"].double() + 1).mean().item()
            step.loss = step.loss * 0 + index_mean * probe.sum()
        return step


def main():
    logging.basicConfig(level=logging.INFO)
    record_dir, argv = sys.argv[1], sys.argv[2:]
    RecordingTrainer.probe_loss = "--probe_loss" in argv
    config, _ = parse_training_args([arg for arg in argv if arg != "--probe_loss"])
    trainer = RecordingTrainer(config)
    trainer.train()
    digest = hashlib.sha256()
    for name, param in sorted(trainer.unwrapped_unet.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    average = None
    if trainer.ema is not None:  # --use_ema: the average as this rank holds it
        average = hashlib.sha256()
        for tensor in trainer.ema.shadow_params:
            average.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper holds it
    steps = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
    record = {"rank": trainer.accelerator.process_index, "num_processes": trainer.accelerator.num_processes,
              "optimizer_steps": max(steps, default=0),
              "seen": trainer.seen, "micro_batch_sizes": trainer.micro_batch_sizes,
              "step_gradients": trainer.step_gradients,
              "weights_sha256": digest.hexdigest(), "global_step": trainer.global_step,
              "ema_sha256": average.hexdigest() if average else None,
              "ema_updates": trainer.ema.optimization_step if trainer.ema is not None else None}
    os.makedirs(record_dir, exist_ok=True)
    with open(os.path.join(record_dir, f"rank{record['rank']}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
