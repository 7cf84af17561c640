#!/usr/bin/env python
"""Compare an aligned model with its base: same prompts, same seeds, one or more rewards.

    python examples/evaluate.py --base_model path/or/hub-id --aligned_model ./smpo-model \
        --prompts toy-heldout --reward_models toy --output_dir ./eval

The sampling defaults (20 steps, guidance 3.0, batches of 64, fp32) suit the toy world; for SD/SDXL pass e.g.
``--num_inference_steps 30 --guidance_scale 7.5 --batch_size 8 --dtype fp16`` (SDXL: ``--guidance_scale 5``).

``--aligned_model``: a training --output_dir (LoRA weights or a unet/ folder), its LoRA file or a full pipeline
folder. ``--base_model`` defaults to the base the run recorded (``training_config.json``); ``toy`` names the
shipped toy pipeline. The base is read as training read it: the recorded ``--revision`` and ``--variant`` (when
``--base_model`` is the recorded base), the recorded separate VAE, used by both models so that only the UNet
differs, and the recorded ``--cache_dir`` (``--base_revision``, ``--base_variant``, ``--vae``, ``--cache_dir``
override them; ``--vae base`` keeps the base pipeline's own VAE). A saved full pipeline holds the VAE training
used, so ``--vae`` is refused with one: it would change the base's VAE only.
``--prompts``: a built-in set (toy-heldout, toy-train, toy-all), a .txt file (one prompt a line) or a
dataset (save_to_disk folder or parquet/json/csv file; --prompt_column picks the column).
``--reward_models``: ``toy`` and/or registry names (pickscore, clip, hpsv2, imagereward, aesthetic) or
``module:function`` paths. Writes results.json, results.md (mean ± standard error per model and reward,
win rate of aligned over base with a 95 % Wilson interval, ties counting half) and grid.png (base row above
aligned row, same seed per column).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from smpo_diffusers.cli import run_cli
from smpo_diffusers.evaluation import (aligned_layout, evaluate, format_results_table, read_prompts,
                                       trained_base_settings)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", default=None,
                        help="Base pipeline folder or Hub id, or 'toy' for the shipped toy pipeline (default: the "
                             "base recorded in the training_config.json of --aligned_model or beside it).")
    parser.add_argument("--base_revision", default=None,
                        help="Revision of a Hub base (default: the one training used, when --base_model is its base).")
    parser.add_argument("--base_variant", default=None,
                        help="Weight-file variant of the base, e.g. fp16 (default: as training, for its base).")
    parser.add_argument("--vae", default=None,
                        help="VAE folder or Hub id for both models (default: the separate VAE training used, if any; "
                             "'base': the base pipeline's own; ./base names a folder). Not with a saved full "
                             "pipeline as --aligned_model: it keeps the VAE training saved in it.")
    parser.add_argument("--cache_dir", default=None,
                        help="Hub cache to read Hub ids from: base, VAE and reward checkpoints (default: the "
                             "--cache_dir training recorded, if any).")
    parser.add_argument("--aligned_model", required=True, help="LoRA/UNet output folder, LoRA file or pipeline.")
    parser.add_argument("--prompts", default="toy-heldout", help="Built-in set, .txt file or dataset path.")
    parser.add_argument("--prompt_column", default="caption",
                        help="Dataset column holding the prompts (datasets only; default: caption).")
    parser.add_argument("--prompt_split", default="train",
                        help="Dataset split to read the prompts from (datasets only; default: train).")
    parser.add_argument("--max_prompts", type=int, default=None,
                        help="Keep only the first N prompts read (default: all).")
    parser.add_argument("--seeds_per_prompt", type=int, default=1,
                        help="Samples per prompt and model, each from its own seed (default: 1).")
    parser.add_argument("--seed", type=int, default=0,
                        help="First seed: sample j of prompt i uses seed + j * number of prompts + i, the same for "
                             "both models (default: 0).")
    parser.add_argument("--reward_models", nargs="+", default=["toy"],
                        help="One or more rewards to score with: toy, registry names (pickscore, clip, hpsv2, "
                             "imagereward, aesthetic) or module:function paths (default: toy).")
    parser.add_argument("--num_inference_steps", type=int, default=20,
                        help="Denoising steps per image, >= 1 (default: 20).")
    parser.add_argument("--guidance_scale", type=float, default=3.0,
                        help="Classifier-free guidance scale, finite and >= 0; 1 or less renders without guidance "
                             "(default: 3.0).")
    parser.add_argument("--resolution", type=int, default=None, help="Image size (default: the model's).")
    parser.add_argument("--batch_size", type=int, default=64,
                        help="Images per pipeline call, >= 1 (default: 64; lower it when rendering runs out of "
                             "memory).")
    parser.add_argument("--device", default=None, help="Where to render (default: cuda when available, else cpu).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="Weights' dtype for rendering (fp16/bf16 on a GPU for SD/SDXL-size models).")
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("evaluate.py renders in one process; run it with `python examples/evaluate.py ...`, not "
                         "under accelerate launch with several processes (each would render and write the same files).")
    layout = aligned_layout(args.aligned_model)  # a missing or empty folder is reported as such
    if layout == "pipeline" and args.vae is not None:
        raise ValueError(f"--vae {args.vae!r} would replace the base's VAE only: --aligned_model "
                         f"{args.aligned_model} is a saved full pipeline and keeps the VAE training saved in it, so "
                         "the two models would differ in VAE as well as UNet. Drop --vae (the base then uses the "
                         "separate VAE training recorded, the one the pipeline holds).")
    recorded = trained_base_settings(args.aligned_model) or {}
    base_model = args.base_model or recorded.get("base_model")
    if base_model is None:
        raise ValueError(f"no training_config.json in or beside {args.aligned_model} records its base model; pass "
                         "--base_model (a pipeline folder or Hub id, or 'toy' for the shipped toy pipeline).")
    if base_model == "toy":
        from smpo_diffusers.toy import toy_model_path

        base_model = toy_model_path()
    same_base = base_model == recorded.get("base_model")
    revision = args.base_revision or (recorded.get("revision") if same_base else None)
    variant = args.base_variant or (recorded.get("variant") if same_base else None)
    vae = args.vae or recorded.get("vae")
    vae = None if vae == "base" else vae
    cache_dir = args.cache_dir or recorded.get("cache_dir")
    logging.getLogger(__name__).info("base model: %s (revision %s, variant %s); VAE: %s", base_model,
                                     revision or "default", variant or "none", vae or "the base's own")
    prompts = read_prompts(args.prompts, column=args.prompt_column, split=args.prompt_split, limit=args.max_prompts)
    results = evaluate(base_model, args.aligned_model, prompts, output_dir=args.output_dir,
                       reward_names=args.reward_models, seeds_per_prompt=args.seeds_per_prompt, seed=args.seed,
                       num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                       resolution=args.resolution, batch_size=args.batch_size,
                       device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                       dtype=DTYPES[args.dtype], base_revision=revision, base_variant=variant, vae=vae,
                       cache_dir=cache_dir)
    print(format_results_table(results))
    print(f"wrote results.json, results.md and grid.png to {args.output_dir}")
    return results


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
