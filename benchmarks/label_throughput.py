#!/usr/bin/env python
"""Reward-labelling throughput: batched ``RewardLabeler`` vs the one-image-at-a-time loop.

The naive loop is the reference labelling script's approach: for every image, decode it, run the
processor on (caption, image) and call the model's image and text encoders separately. The batched
path is ``dataset.map(RewardLabeler(model), batched=True, batch_size=B)``: one scoring call per map
batch (2B images), each distinct caption encoded once. Both score the same pairs with the same
random CLIP weights; the script checks the scores agree to float tolerance and prints pairs/second.

Two random CLIP models (built in-process, no download):
  * ``tiny``  - smpo_diffusers.testing.tiny_clip_model (32 px, hidden 32): Python overhead dominates;
  * ``small`` - 224 px, patch 32, hidden 256, 4 layers per tower: enough compute for batching to matter.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/label_throughput.py --num_pairs 64 --batch_size 16
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from smpo_diffusers.accounting import write_report
from smpo_diffusers.rewards import PickScoreRewardModel, RewardLabeler
from smpo_diffusers.testing import (make_preference_dataset, pil_clip_image_processor, tiny_clip_model,
                                    tiny_clip_tokenizer)

DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "label_throughput.md")


def small_clip_model(seed: int = 0):
    """Random CLIP at 224 px (patch 32 -> 49 patches), hidden 256, 4 layers, projection 256."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    tokenizer = tiny_clip_tokenizer()
    common = dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        projection_dim=256,
        hidden_act="quick_gelu",
    )
    text_config = dict(
        common,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(common, image_size=224, patch_size=32, num_channels=3)
    torch.manual_seed(seed)
    model = CLIPModel(
        CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=256)
    ).eval()
    image_processor = pil_clip_image_processor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _embedding(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def naive_scores(model, processor, dataset, device) -> np.ndarray:
    """One image at a time: decode, processor(text, image), two encoder calls, cosine. ``(N, 2)``."""
    scores = np.zeros((len(dataset), 2), dtype=np.float32)
    with torch.no_grad():
        for row, example in enumerate(dataset):
            for side, column in enumerate(("jpg_0", "jpg_1")):
                image = Image.open(io.BytesIO(example[column])).convert("RGB")
                inputs = processor(
                    text=[example["caption"]],
                    images=[image],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=77,
                )
                image_embeds = _embedding(
                    model.get_image_features(pixel_values=inputs["pixel_values"].to(device))
                )
                text_embeds = _embedding(
                    model.get_text_features(
                        input_ids=inputs["input_ids"].to(device),
                        attention_mask=inputs["attention_mask"].to(device),
                    )
                )
                image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
                text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
                scores[row, side] = float((image_embeds * text_embeds).sum())
    return scores


def batched_scores(model, processor, dataset, batch_size: int, run: int, threads: int = 1) -> np.ndarray:
    reward_model = PickScoreRewardModel(
        model, processor, max_batch_size=2 * batch_size, preprocess_threads=threads
    )
    labeler = RewardLabeler(reward_model)
    labelled = dataset.map(
        labeler,
        batched=True,
        batch_size=batch_size,
        remove_columns=dataset.column_names,
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=f"bench-{run}-{time.time_ns()}",
    )
    return np.stack([np.asarray(labelled["reward_0"]), np.asarray(labelled["reward_1"])], axis=1)


def measure(name, model, processor, image_size, args):
    device = torch.device(args.device)
    model = model.to(device)
    dataset = make_preference_dataset(
        num_pairs=args.num_pairs, seed=0, image_size=image_size, tie_fraction=0.0
    )
    warmup = dataset.select(range(min(4, len(dataset))))
    naive_scores(model, processor, warmup, device)
    batched_scores(model, processor, warmup, args.batch_size, -1, args.preprocess_threads)
    naive_times, batched_times = [], []
    for run in range(args.repeats):  # interleave so both see the same machine load
        start = time.perf_counter()
        naive = naive_scores(model, processor, dataset, device)
        naive_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        batched = batched_scores(model, processor, dataset, args.batch_size, run, args.preprocess_threads)
        batched_times.append(time.perf_counter() - start)
    max_diff = float(np.abs(naive - batched).max())
    naive_rate = args.num_pairs / statistics.median(naive_times)
    batched_rate = args.num_pairs / statistics.median(batched_times)
    return {
        "model": name,
        "image_size": image_size,
        "naive": naive_rate,
        "batched": batched_rate,
        "ratio": batched_rate / naive_rate,
        "max_abs_diff": max_diff,
        "agree": max_diff <= args.tolerance,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_pairs", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16, help="pairs per map batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--preprocess_threads", type=int, default=1, help="decode/preprocess threads of the batched path"
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="max |naive - batched| score difference"
    )
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="markdown file to write ('' to skip)")
    args = parser.parse_args(argv)
    for flag in ("num_pairs", "batch_size", "repeats", "preprocess_threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        parser.error(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device; use e.g. cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} needs CUDA, which this machine lacks; use --device cpu")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None):
    args = parse_args(argv)

    import datasets

    datasets.disable_progress_bars()
    command = "OMP_NUM_THREADS={} python {}".format(
        os.environ.get("OMP_NUM_THREADS", "<unset>"),
        " ".join(["benchmarks/label_throughput.py", *(shlex.quote(a) for a in args.argv)]),
    )
    rows = [
        measure("tiny (32 px, hidden 32)", *tiny_clip_model(seed=0), 32, args),
        measure("small (224 px, patch 32, hidden 256, 4+4 layers)", *small_clip_model(seed=0), 256, args),
    ]
    header = (
        f"Command: `{command}`\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, device {args.device}; {args.num_pairs} pairs "
        f"({2 * args.num_pairs} images), map batch {args.batch_size} pairs, "
        f"median of {args.repeats} runs; batched path with {args.preprocess_threads} preprocessing "
        "thread(s), naive loop single-threaded.\n\n"
        "| random CLIP | images | naive pairs/s | batched pairs/s | speed-up | max abs score diff | agree |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    table = "".join(
        f"| {r['model']} | {r['image_size']} px | {r['naive']:.1f} | {r['batched']:.1f} | "
        f"{r['ratio']:.2f}x | "
        f"{r['max_abs_diff']:.2e} | {'yes' if r['agree'] else 'NO'} |\n"
        for r in rows
    )
    report = "# Reward-labelling throughput\n\n" + header + table
    write_report(report, args.results)
    if not all(r["agree"] for r in rows):
        raise SystemExit("batched and naive scores disagree beyond --tolerance")
    return rows


if __name__ == "__main__":
    main()
