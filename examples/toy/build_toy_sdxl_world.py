#!/usr/bin/env python
"""Regenerate the shipped SDXL-layout toy world (``src/smpo_diffusers/toy_assets_sdxl``): the SD toy world's
trained VAE, two frozen tiny CLIP text encoders, and a ``text_time`` UNet trained from scratch, seeded; saves the
StableDiffusionXLPipeline folder plus ``toy_world.json`` (recipe, loss, timings, colour accuracy of one
generation per caption).

The shipped folder was made with

    python examples/toy/build_toy_sdxl_world.py --threads 2

(18 minutes on two CPU threads: 3000 UNet steps x 128 latents). ``--device cuda`` runs the same recipe on
a GPU; weights then differ in the last bits, not in behaviour. ``--output_dir /tmp/toy-sdxl --unet_steps 40
--num_latents 256`` is a quick smoke run (mind ``--output_dir``: the default overwrites the shipped folder).

Every option is checked before anything is trained or written; a bad one prints ``error: <message>`` and exits
with status 2 (``SMPO_DEBUG=1`` shows the traceback).
"""

import argparse
import json
import logging
import os
import sys

import torch

from smpo_diffusers.cli import run_cli
from smpo_diffusers.toy import (TOY_ASSETS_DIR, TOY_SDXL_ASSETS_DIR, build_toy_sdxl_world, check_toy_build_options,
                                record_colour_accuracy, toy_captions)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(TOY_SDXL_ASSETS_DIR),
                        help="Pipeline folder to write (default: the shipped toy_assets_sdxl, overwritten).")
    parser.add_argument("--vae_from", default=str(TOY_ASSETS_DIR),
                        help="The SD toy world whose trained VAE (and scheduler) the SDXL layout shares "
                             "(default: the shipped toy_assets).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every random draw, in [0, 2**32).")
    parser.add_argument("--unet_steps", type=int, default=3000, help="UNet training steps (>= 1).")
    parser.add_argument("--batch_size", type=int, default=128, help="Latents per UNet step (>= 1).")
    parser.add_argument("--num_latents", type=int, default=4096,
                        help="Pictures encoded once as the UNet's training latents (>= 1).")
    parser.add_argument("--device", default="cpu",
                        help="Where to train (cpu, cuda or cuda:N); the weights differ in the last bits.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (>= 1).")
    args = parser.parse_args(argv)
    check_toy_build_options("--", **{k: v for k, v in vars(args).items() if k != "vae_from"})
    if not os.path.isfile(os.path.join(args.vae_from, "vae", "config.json")):
        raise ValueError(f"--vae_from {args.vae_from!r} holds no vae/ folder; pass the SD toy world (build it with "
                         "examples/toy/build_toy_world.py).")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    info = build_toy_sdxl_world(args.output_dir, vae_from=args.vae_from, seed=args.seed, unet_steps=args.unet_steps,
                                num_latents=args.num_latents, batch_size=args.batch_size, device=args.device)
    record_colour_accuracy(args.output_dir, info, seed=args.seed, captions=toy_captions())
    print(json.dumps({k: v for k, v in info.items() if k != "heldout_captions"}, indent=2))
    return info


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
