#!/usr/bin/env python
"""Regenerate the shipped toy world (``src/smpo_diffusers/toy_assets``): train the tiny VAE and UNet from
scratch, seeded, and save the StableDiffusionPipeline folder plus ``toy_world.json`` (recipe, losses, timings,
colour accuracy of one generation per caption).

The shipped folder was made with

    python examples/toy/build_toy_world.py --device cuda --threads 8

(157 s on one H200: VAE 1500 steps x 64 images, UNet 3000 steps x 128 latents). The same command with
``--device cpu`` runs the same recipe on the CPU (about an hour on one thread); weights then differ in the
last bits, not in behaviour. ``--output_dir /tmp/toy --vae_steps 20 --unet_steps 20 --num_latents 256`` is a
quick smoke run (mind ``--output_dir``: the default overwrites the shipped folder).

Every option is checked before anything is trained or written; a bad one prints ``error: <message>`` and exits
with status 2 (``SMPO_DEBUG=1`` shows the traceback).
"""

import argparse
import json
import logging
import sys

import torch

from smpo_diffusers.cli import run_cli
from smpo_diffusers.toy import (TOY_ASSETS_DIR, build_toy_world, check_toy_build_options, record_colour_accuracy,
                                toy_captions)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(TOY_ASSETS_DIR),
                        help="Pipeline folder to write (default: the shipped toy_assets, overwritten).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every random draw, in [0, 2**32).")
    parser.add_argument("--vae_steps", type=int, default=1500, help="VAE training steps (>= 1).")
    parser.add_argument("--unet_steps", type=int, default=3000, help="UNet training steps (>= 1).")
    parser.add_argument("--vae_batch_size", type=int, default=64, help="Pictures per VAE step (>= 1).")
    parser.add_argument("--batch_size", type=int, default=128, help="Latents per UNet step (>= 1).")
    parser.add_argument("--num_latents", type=int, default=4096,
                        help="Pictures encoded once as the UNet's training latents (>= 1).")
    parser.add_argument("--device", default="cpu",
                        help="Where to train (cpu, cuda or cuda:N); the weights differ in the last bits.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (>= 1).")
    args = parser.parse_args(argv)
    check_toy_build_options("--", **vars(args))  # before anything is trained or written
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    info = build_toy_world(args.output_dir, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                           vae_batch_size=args.vae_batch_size, batch_size=args.batch_size,
                           num_latents=args.num_latents, device=args.device)
    record_colour_accuracy(args.output_dir, info, seed=args.seed, captions=toy_captions())
    print(json.dumps({k: v for k, v in info.items() if k != "heldout_captions"}, indent=2))
    return info


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
