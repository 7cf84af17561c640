"""Process-group details shared by the training and labelling jobs."""

import os

import torch


def use_cpu_process_group() -> bool:
    """True when several processes were launched (``accelerate launch --multi_gpu``/``torchrun``) on a machine
    without GPUs. accelerate only joins such processes into one (gloo) group when told to use the CPU;
    otherwise every process would silently run the whole job alone."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
