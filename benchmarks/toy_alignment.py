#!/usr/bin/env python
"""Toy-world ablation: Diffusion-DPO vs the parts of SmPO, on the same pairs, updates and seeds.

Every variant trains a LoRA on the shipped toy pipeline (``smpo_diffusers.toy``) with the same toy preference
pairs (training captions only), the same number of updates and the same training seeds, then renders the
*held-out* captions (never in a training pair) from fixed seeds. Per variant it reports the toy reward of
those generations (mean ± standard error over training seeds), the win rate over the base model on the same
seeds (pooled over training seeds, 95 % Wilson interval, ties half), the drift from the base (mean absolute
pixel difference of same-seed generations, 0..1) and the UNet sample-evaluations spent in training
(``trainer.unet_evaluations``: inversion + policy + reference).

Variants: base; Diffusion-DPO (hard human labels, random noise); SmPO smoothing only (reward-smoothed
labels, random noise); SmPO inversion only (hard labels, ReNoise inversion); full SmPO (exact grid, K=1);
full SmPO with the reference script's grid; full SmPO with K=0 (plain DDIM inversion).

    OMP_NUM_THREADS=1 python benchmarks/toy_alignment.py                 # full study -> benchmarks/results/
    OMP_NUM_THREADS=1 python benchmarks/toy_alignment.py --quick --output_dir /tmp/toy-quick

``--quick`` trains base vs full SmPO only, one seed; ``tests/test_toy.py`` runs it and checks that full SmPO
raises the held-out reward by more than its noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import torch

from smpo_diffusers.evaluation import (compare_scores, generate_images, image_drift, load_pipeline, mean_and_stderr,
                                       score_images, win_rate)
from smpo_diffusers.toy import (TOY_GUIDANCE_SCALE, TOY_INFERENCE_STEPS, TOY_RESOLUTION, ToyRewardModel,
                                build_toy_preferences, toy_caption_split, toy_model_path, train_toy_model)

FULL_SMPO = "SmPO (exact grid, K=1)"
VARIANTS = {
    "Diffusion-DPO": dict(loss_type="dpo", noise_source="random"),
    "SmPO: smoothing only": dict(loss_type="smpo", noise_source="random"),
    "SmPO: inversion only": dict(loss_type="dpo", noise_source="inversion"),
    FULL_SMPO: dict(loss_type="smpo", noise_source="inversion", inversion_grid="exact", num_renoise_steps=1),
    "SmPO (reference grid, K=1)": dict(loss_type="smpo", noise_source="inversion", inversion_grid="reference",
                                       num_renoise_steps=1),
    "SmPO (exact grid, K=0)": dict(loss_type="smpo", noise_source="inversion", inversion_grid="exact",
                                   num_renoise_steps=0),
}
QUICK_VARIANTS = (FULL_SMPO,)


PAIRS_SEED = 0
"""Seed of the toy preference pairs (fixed: every training seed trains on the same pairs)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Base vs full SmPO, one seed, 2 eval seeds per prompt.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Training seeds (default 0 1 2; quick: 0).")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Updates per run (default 60).")
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--beta_dpo", type=float, default=2000.0)
    parser.add_argument("--pairs_per_caption", type=int, default=1)
    parser.add_argument("--eval_seeds_per_prompt", type=int, default=None, help="Default 4; quick: 2.")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="Runs in parallel (one torch thread each).")
    parser.add_argument("--output_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--work_dir", default=None,
                        help="Where pairs and LoRAs go (default: a temporary folder). Its pairs/ is reused when "
                             "built with the same --pairs_per_caption, refused otherwise.")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.max_train_steps is None:
        args.max_train_steps = 60
    if args.eval_seeds_per_prompt is None:
        args.eval_seeds_per_prompt = 2 if args.quick else 4
    if args.variants is None:
        args.variants = list(QUICK_VARIANTS if args.quick else VARIANTS)
    for flag in ("max_train_steps", "train_batch_size", "pairs_per_caption", "eval_seeds_per_prompt", "jobs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    bad_seeds = [seed for seed in args.seeds if not 0 <= seed < 2**32]
    if bad_seeds:
        parser.error(f"--seeds must each be in [0, 2**32), got {bad_seeds}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has repeats {args.seeds}: each training seed runs once; give distinct seeds")
    if len(set(args.variants)) != len(args.variants):
        parser.error(f"--variants has repeats {args.variants}: give each variant once")
    if args.work_dir:
        try:
            check_existing_pairs(pairs_dir(args.work_dir), args.pairs_per_caption)
        except ValueError as error:
            parser.error(str(error))
    return args


def pairs_dir(work_dir: str) -> str:
    return os.path.join(work_dir, "pairs")


def check_existing_pairs(dataset_dir: str, pairs_per_caption: int) -> dict | None:
    """The summary of the finished pair set in ``dataset_dir`` (None when there is none yet); ``ValueError`` when
    it was built with another ``--pairs_per_caption`` (or pair seed) than this study asks for."""
    summary_path = os.path.join(dataset_dir, "toy_preferences.json")
    if not (os.path.isfile(os.path.join(dataset_dir, "reward_stats.json")) and os.path.isfile(summary_path)):
        return None
    with open(summary_path) as handle:
        summary = json.load(handle)
    wanted = len(toy_caption_split()[0]) * pairs_per_caption
    if summary.get("num_pairs") != wanted or summary.get("seed") != PAIRS_SEED:
        raise ValueError(
            f"{dataset_dir} holds {summary.get('num_pairs')} toy pairs (pair seed {summary.get('seed')}), not the "
            f"{wanted} of --pairs_per_caption {pairs_per_caption} (pair seed {PAIRS_SEED}): pass the "
            "--pairs_per_caption it was built with, another --work_dir, or delete that folder to rebuild it")
    return summary


def _slug(text: str) -> str:
    """A folder name of letters, digits, '-', '_' (the trainer's model card wants a Hub-valid name)."""
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-")


def _render(pipeline, prompts, seeds):
    return generate_images(pipeline, prompts, seeds, num_inference_steps=TOY_INFERENCE_STEPS,
                           guidance_scale=TOY_GUIDANCE_SCALE, height=TOY_RESOLUTION, width=TOY_RESOLUTION)


def _train_and_render(item):
    """One (variant, seed) run: train the LoRA, render the evaluation prompts. Picklable for worker processes."""
    name, seed, out, dataset_dir, options, prompts, eval_seeds = item
    torch.set_num_threads(1)
    started = time.perf_counter()
    trainer = train_toy_model(out, dataset_dir, seed=seed, **options, **VARIANTS[name])
    train_seconds = time.perf_counter() - started
    evaluations, final = dict(trainer.unet_evaluations), dict(trainer.last_metrics)
    del trainer
    images = _render(load_pipeline(toy_model_path(), out), prompts, eval_seeds)
    return evaluations, final, train_seconds, np.stack([np.asarray(image.convert("RGB")) for image in images])


def run_study(args) -> dict:
    """Train and evaluate every variant; returns the JSON-ready results."""
    started = time.perf_counter()
    work = args.work_dir or tempfile.mkdtemp(prefix="toy-alignment-")
    reward = ToyRewardModel()
    dataset_dir = pairs_dir(work)
    pair_summary = check_existing_pairs(dataset_dir, args.pairs_per_caption)  # reused only when they match
    if pair_summary is None:
        build_toy_preferences(dataset_dir, pairs_per_caption=args.pairs_per_caption, seed=PAIRS_SEED)
        pair_summary = check_existing_pairs(dataset_dir, args.pairs_per_caption)
    _, heldout = toy_caption_split()
    prompts = heldout * args.eval_seeds_per_prompt
    eval_seeds = [50_000 + k for k in range(len(prompts))]
    base_images = _render(load_pipeline(toy_model_path()), prompts, eval_seeds)
    base_scores = score_images([reward], base_images, prompts)["toy"]
    base_mean, base_se = mean_and_stderr(base_scores, groups=prompts)  # one prompt's seeds are one cluster
    results = {"base": {"reward_mean": base_mean, "reward_stderr_images": base_se, "scores": base_scores.tolist()},
               "variants": {}, "prompts": prompts,
               "pairs": pair_summary, "num_eval_images": len(prompts), "heldout_captions": len(heldout)}
    jobs = [(name, seed) for name in args.variants for seed in args.seeds]
    options = dict(max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size,
                   learning_rate=args.learning_rate, beta_dpo=args.beta_dpo)
    work_items = [(name, seed, os.path.join(work, _slug(f"{name}-seed{seed}")),
                   dataset_dir, options, prompts, eval_seeds) for name, seed in jobs]
    if args.jobs > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            outputs = list(pool.map(_train_and_render, work_items))
    else:
        outputs = [_train_and_render(item) for item in work_items]
    by_variant: dict = {}
    for (name, seed), (evaluations, final, train_seconds, pixels) in zip(jobs, outputs):
        from PIL import Image

        images = [Image.fromarray(p) for p in pixels]
        scores = score_images([reward], images, prompts)["toy"]
        run = {"seed": seed, "scores": scores.tolist(), "reward_mean": float(scores.mean()),
               "comparison": compare_scores(base_scores, scores, groups=prompts),
               "pixel_drift": image_drift(base_images, images),
               "unet_evaluations": evaluations, "unet_evaluations_total": int(sum(evaluations.values())),
               "train_seconds": train_seconds, "final_metrics": final}
        by_variant.setdefault(name, []).append(run)
        print(f"{name} seed {seed}: reward {run['reward_mean']:.4f} (base {base_mean:.4f}), "
              f"drift {run['pixel_drift']:.4f}, UNet evals {run['unet_evaluations_total']}, "
              f"{train_seconds:.0f}s", flush=True)
    for name in args.variants:
        results["variants"][name] = summarise_variant(name, by_variant[name], base_scores, prompts)
    results["seconds"] = time.perf_counter() - started
    return results


def summarise_variant(name: str, runs: list[dict], base_scores, prompts: list[str]) -> dict:
    """A variant's row from its runs (one per training seed, each with per-image ``scores`` in ``prompts``
    order): reward and gain with standard errors over the training seeds, the per-run image-level error of the
    gain, and the win rate pooled over runs. All runs render the same prompts from the same seeds against the same
    base images, so image-level errors and the pooled interval count each prompt as one cluster."""
    per_seed = [run["reward_mean"] for run in runs]
    mean, seed_se = mean_and_stderr(per_seed)
    pooled = win_rate(np.concatenate([run["scores"] for run in runs]), np.tile(base_scores, len(runs)),
                      groups=list(prompts) * len(runs))
    gain_mean, gain_se = mean_and_stderr([run["comparison"]["difference"]["mean"] for run in runs])
    return {
        "config": VARIANTS[name], "reward_mean": mean, "reward_stderr_seeds": seed_se,
        "gain_mean": gain_mean, "gain_stderr_seeds": gain_se,
        "gain_stderr_images": float(np.mean([run["comparison"]["difference"]["stderr"] for run in runs])),
        "win_rate": pooled, "pixel_drift": float(np.mean([run["pixel_drift"] for run in runs])),
        "unet_evaluations": float(np.mean([run["unet_evaluations_total"] for run in runs])),
        "runs": runs,
    }


def _fmt(mean, se):
    return f"{mean:.4f} ± {se:.4f}" if se is not None and math.isfinite(se) else f"{mean:.4f}"


def format_table(results: dict) -> str:
    lines = ["| variant | held-out reward (± s.e. over seeds) | gain over base | win rate vs base [95 % Wilson, "
             "prompt-clustered] "
             "| pixel drift | UNet evals / run |", "|---|---|---|---|---|---|",
             f"| base | {results['base']['reward_mean']:.4f} | - | - | 0 | 0 |"]
    for name, row in results["variants"].items():
        rate = row["win_rate"]
        gain_se = row["gain_stderr_seeds"] if math.isfinite(row["gain_stderr_seeds"]) else row["gain_stderr_images"]
        lines.append(f"| {name} | {_fmt(row['reward_mean'], row['reward_stderr_seeds'])} | "
                     f"{_fmt(row['gain_mean'], gain_se)} | "
                     f"{rate['rate']:.3f} [{rate['ci_low']:.3f}, {rate['ci_high']:.3f}] | "
                     f"{row['pixel_drift']:.4f} | {row['unet_evaluations']:.0f} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: str) -> str:
    """Held-out reward vs UNet evaluations per variant (one dot per training seed, bar = mean ± s.e.);
    matplotlib when installed, otherwise drawn with PIL."""
    points = {name: (row["unet_evaluations"], row["reward_mean"], row["reward_stderr_seeds"],
                     [(run["unet_evaluations_total"], run["reward_mean"]) for run in row["runs"]])
              for name, row in results["variants"].items()}
    base = results["base"]["reward_mean"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_with_pil(points, base, path)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.axhline(base, color="gray", linestyle="--", label="base")
    for name, (x, y, se, runs) in points.items():
        axis.errorbar([x], [y], yerr=[se if math.isfinite(se) else 0.0], marker="o", capsize=3, label=name)
        axis.scatter([r[0] for r in runs], [r[1] for r in runs], s=8, alpha=0.5)
    axis.set_xlabel("UNet sample-evaluations per training run")
    axis.set_ylabel("held-out toy reward")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (23, 190, 207)]


def _plot_with_pil(points: dict, base: float, path: str) -> str:
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 760, 460, 70, 250, 20, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = [p[0] for p in points.values()] + [r[0] for p in points.values() for r in p[3]] + [0.0]
    ys = [base] + [p[1] + (p[2] if math.isfinite(p[2]) else 0) for p in points.values()] + \
         [p[1] - (p[2] if math.isfinite(p[2]) else 0) for p in points.values()] + \
         [r[1] for p in points.values() for r in p[3]]
    x_low, x_high = 0.0, max(xs) * 1.08 or 1.0
    y_pad = (max(ys) - min(ys)) * 0.1 or 0.01
    y_low, y_high = min(ys) - y_pad, max(ys) + y_pad

    def to_pixel(x, y):
        return (left + (x - x_low) / (x_high - x_low) * (width - left - right),
                top + (y_high - y) / (y_high - y_low) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):
        yv = y_low + (y_high - y_low) * k / 4
        _, py = to_pixel(0, yv)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((5, py - 6), f"{yv:.3f}", fill="black")
        xv = x_low + (x_high - x_low) * k / 4
        px, _ = to_pixel(xv, y_low)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 15, height - bottom + 6), f"{xv:.0f}", fill="black")
    draw.text((left + 60, height - 20), "UNet sample-evaluations per training run", fill="black")
    draw.text((5, 2), "held-out toy reward", fill="black")
    _, by = to_pixel(0, base)
    for x in range(left, width - right, 8):
        draw.line([x, by, x + 4, by], fill=(120, 120, 120))
    draw.text((width - right + 10, 10), "--- base", fill=(120, 120, 120))
    for index, (name, (x, y, se, runs)) in enumerate(points.items()):
        colour = _PALETTE[index % len(_PALETTE)]
        for rx, ry in runs:
            px, py = to_pixel(rx, ry)
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], outline=colour)
        px, py = to_pixel(x, y)
        if math.isfinite(se):
            _, low = to_pixel(x, y - se)
            _, high = to_pixel(x, y + se)
            draw.line([px, low, px, high], fill=colour, width=2)
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour)
        draw.text((width - right + 10, 30 + 18 * index), f"o {name}", fill=colour)
    image.save(path)
    return path


def write_report(results: dict, output_dir: str, quick: bool, note: str = "") -> str:
    """Write ``toy_alignment[_quick].{json,md,png}`` in ``output_dir`` (``note``: a paragraph under the header);
    returns the table."""
    stem = "toy_alignment_quick" if quick else "toy_alignment"
    table = format_table(results)
    plot = _plot(results, os.path.join(output_dir, f"{stem}.png"))
    with open(os.path.join(output_dir, f"{stem}.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    settings = results["settings"]
    pairs = results["pairs"]
    with open(os.path.join(output_dir, f"{stem}.md"), "w") as handle:
        handle.write(f"# Toy alignment study{' (quick)' if quick else ''}\n\n")
        handle.write(f"Command: `{results['command']}`  \nTotal time: {results['seconds']:.0f} s "
                     f"(torch {torch.__version__}, {torch.get_num_threads()} thread(s)).\n\n")
        if note:
            handle.write(f"{note}\n\n")
        handle.write(f"Pairs: {pairs['num_pairs']} toy pairs of base generations (training captions), "
                     f"{pairs['num_human_ties']} human ties dropped, human label agrees with the reward on "
                     f"{pairs['human_agrees_with_reward']:.1%} of decided pairs. Training: LoRA rank 8, "
                     f"{settings['max_train_steps']} updates x {settings['train_batch_size']} pairs, "
                     f"lr {settings['learning_rate']}, beta {settings['beta_dpo']}, seeds {settings['seeds']}. "
                     f"Evaluation: {results['num_eval_images']} generations of {results['heldout_captions']} held-out "
                     "captions from fixed seeds, toy reward. Every run renders the same prompts from the same seeds "
                     "against the same base images: the win-rate interval counts each prompt as one cluster "
                     "(its Wilson interval uses the effective sample size); it pools the runs, so the variation "
                     "between training seeds is in the ± over seeds, not in it.\n\n")
        handle.write(table)
        handle.write(f"\n![reward vs UNet evaluations]({os.path.basename(plot)})\n")
    return table


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.makedirs(args.output_dir, exist_ok=True)
    results = run_study(args)
    arguments = argv if argv is not None else sys.argv[1:]
    command = "OMP_NUM_THREADS=%s python benchmarks/toy_alignment.py %s" % (
        os.environ.get("OMP_NUM_THREADS", "?"), " ".join(shlex.quote(a) for a in arguments))
    results["command"] = command.strip()
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("output_dir", "work_dir")}
    table = write_report(results, args.output_dir, quick=args.quick)
    print(table)
    return results


if __name__ == "__main__":
    main()
