#!/usr/bin/env python
"""SmPO / Diffusion-DPO fine-tuning of a Stable Diffusion 1.x/2.x UNet (LoRA or full).

    accelerate launch examples/train_smpo_sd.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name ./pickapic-labelled --train_method lora --output_dir smpo-sd15-lora

    python examples/train_smpo_sd.py --demo      # the bundled SD-layout toy world, then a before/after evaluation

All flags: `python examples/train_smpo_sd.py --help` (the fields of `smpo_diffusers.SmPOConfig`,
plus --demo and --demo_world: 'tiny-random' trains a random-weights tiny model of this script's family).
"""

import sys

from smpo_diffusers.cli import run_cli, train_main

if __name__ == "__main__":
    run_cli(train_main, sys.argv[1:], family="sd")
