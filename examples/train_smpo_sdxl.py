#!/usr/bin/env python
"""SmPO / Diffusion-DPO fine-tuning of an SDXL UNet (LoRA or full).

    accelerate launch examples/train_smpo_sdxl.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --dataset_name ./pickapic-labelled --train_method lora --output_dir smpo-sdxl-lora

    python examples/train_smpo_sdxl.py --demo      # the bundled SDXL-layout toy world, then a before/after evaluation
    python examples/train_smpo_sdxl.py --demo --demo_world tiny-random   # the SDXL path on a tiny random model

All flags: `python examples/train_smpo_sdxl.py --help` (the fields of `smpo_diffusers.SmPOConfig`,
plus --demo and --demo_world: 'tiny-random' trains a random-weights tiny model of this script's family).
"""

import sys

from smpo_diffusers.cli import run_cli, train_main

if __name__ == "__main__":
    run_cli(train_main, sys.argv[1:], family="sdxl")
