"""Train through the example CLI, but SIGKILL this process in the middle of writing checkpoint-N
(after accelerate has written its files, before the checkpoint is complete). N = argv[1]."""

import os
import signal
import sys

import accelerate

from smpo_diffusers.cli import train_main

die_at = f".checkpoint-{int(sys.argv[1])}.tmp"
original = accelerate.Accelerator.save_state


def save_state_then_die(self, output_dir=None, **kwargs):
    result = original(self, output_dir, **kwargs)
    if output_dir and os.path.basename(str(output_dir)) == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return result


accelerate.Accelerator.save_state = save_state_then_die
train_main(sys.argv[2:], family="sdxl")
