#!/usr/bin/env python
"""Resident bytes of parameters, gradients and optimiser state: LoRA vs full, AdamW vs 8-bit Adam vs Adafactor.

Two parts:

1. **Measured** on the tiny SDXL pipeline: an ordinary ``SmPOTrainer`` runs one step (``compute_loss``,
   ``accelerator.backward``, ``optimizer.step``), then every tensor it holds is counted exactly with
   ``accounting.trainer_resident_bytes`` (storages deduplicated by data pointer). The same set-up is also
   *computed* with ``accounting.estimate_training_bytes`` and the two must agree. 8-bit Adam is measured only
   where CUDA and bitsandbytes exist; otherwise its state is computed (2 bytes/parameter for the two 8-bit
   moments + fp32 block-wise absmax) and labelled "computed".
2. **Computed** for the real SD 1.5 and SDXL (public configs in ``accounting``, built on the meta device: no
   weights allocated), in a 2-byte weight dtype (bf16/fp16). Activations are not included.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings

import torch

from smpo_diffusers import SmPOConfig, SmPOTrainer
from smpo_diffusers.accounting import (
    RESIDENT_CATEGORIES,
    estimate_training_bytes,
    module_tensors,
    real_model_parts_on_meta,
    tensor_bytes,
    trainer_resident_bytes,
    write_report,
)
from smpo_diffusers.demo import build_demo_inputs
from smpo_diffusers.testing import tiny_sdxl_components

DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory.md")
OPTIMIZER_FLAGS = {"adamw": {}, "adafactor": {"use_adafactor": True}, "adamw8bit": {"use_8bit_adam": True}}
LORA_BOUND = 1.05
"""Target: LoRA resident UNet parameter bytes <= 1.05 x (one UNet in the weight dtype + adapters)."""
GPU_BYTES = 80e9
GB = 1e9


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real_families", nargs="*", default=["sd15", "sdxl"], choices=["sd15", "sdxl"],
                        help="Real model families to compute on the meta device (none: skip part 2).")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (the trainer's default).")
    parser.add_argument("--output", default=DEFAULT_RESULTS, help="Markdown file to write.")
    args = parser.parse_args(argv)
    if args.rank < 1:
        parser.error(f"--rank must be >= 1, got {args.rank}")
    if len(set(args.real_families)) != len(args.real_families):
        parser.error(f"--real_families has repeats {args.real_families}: give each once")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def eight_bit_measurable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


# ---------------------------------------------------------------------------------------------- part 1
def measure_tiny(work_dir: str, rank: int) -> list[dict]:
    """One real step per (method, optimiser) on the tiny SDXL pipeline; measured and computed bytes."""
    model_dir, data_dir = build_demo_inputs(work_dir, "sdxl", num_pairs=16, seed=0)
    components = tiny_sdxl_components(seed=0)  # the same architecture as the saved pipeline, as loaded
    text_encoders = [components["text_encoder"], components["text_encoder_2"]]
    one_unet = tensor_bytes(module_tensors(components["unet"]))  # fp32 here: the weight dtype on CPU
    rows = []
    for method in ("lora", "full"):
        computed = estimate_training_bytes(components["unet"], components["vae"], text_encoders, is_sdxl=True,
                                           train_method=method, optimizers=list(OPTIMIZER_FLAGS),
                                           weight_dtype=torch.float32, rank=rank)
        for optimizer, flags in OPTIMIZER_FLAGS.items():
            row = {"method": method, "optimizer": optimizer, "computed": computed[optimizer].by_category,
                   "one_unet": one_unet, "trainable_parameters": computed[optimizer].trainable_parameters}
            if optimizer == "adamw8bit" and not eight_bit_measurable():
                row.update(measured=None, source="computed (no CUDA + bitsandbytes)")
            else:
                config = SmPOConfig(pretrained_model_name_or_path=model_dir, dataset_name=data_dir,
                                    output_dir=os.path.join(work_dir, f"mem-{method}-{optimizer}"), resolution=32,
                                    train_batch_size=1, max_train_steps=10, report_to="none", train_method=method,
                                    mixed_precision="no", **flags, **({"rank": rank} if method == "lora" else {}))
                trainer = SmPOTrainer(config)
                batch = next(iter(trainer.train_dataloader))
                step = trainer.compute_loss(batch, torch.Generator().manual_seed(0))
                trainer.accelerator.backward(step.loss)
                trainer.optimizer.step()
                row.update(measured=trainer_resident_bytes(trainer), source="measured")
                trainer.optimizer.zero_grad(set_to_none=True)
                del trainer
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- part 2
def compute_real(families: list[str], rank: int) -> list[dict]:
    rows = []
    for family in families:
        parts = real_model_parts_on_meta(family)
        one_unet = sum(p.numel() for p in parts["unet"].parameters()) * 2  # in the 2-byte weight dtype
        # the two methods with every optimiser, then with --inversion_weight_copy (AdamW, as the speed runs use it),
        # then full training with --use_ema (Adafactor, the smallest full set-up)
        every = list(OPTIMIZER_FLAGS)
        for method, optimizers, copy, ema in (("lora", every, False, False), ("full", every, False, False),
                                              ("lora", ["adamw"], True, False), ("full", ["adamw"], True, False),
                                              ("full", ["adafactor"], False, True)):
            estimates = estimate_training_bytes(parts["unet"], parts["vae"], parts["text_encoders"],
                                                is_sdxl=parts["is_sdxl"], train_method=method, optimizers=optimizers,
                                                weight_dtype=torch.bfloat16, rank=rank, inversion_copy=copy, ema=ema)
            for optimizer, estimate in estimates.items():
                label = method + (" +copy" if copy else "") + (" +ema" if ema else "")
                rows.append({"family": family, "method": label, "optimizer": optimizer,
                             "computed": estimate.by_category,
                             "unet_parameters": estimate.unet_parameters,
                             "trainable_parameters": estimate.trainable_parameters, "one_unet": one_unet})
    return rows


# ---------------------------------------------------------------------------------------------- report
def unet_resident(categories: dict) -> int:
    return categories["policy_trainable"] + categories["policy_frozen"] + categories["reference_copy"]


def total(categories: dict) -> int:
    return sum(categories[c] for c in RESIDENT_CATEGORIES)


def command_line(arguments: list[str]) -> str:
    env = " ".join(f"{key}={os.environ[key]}" for key in ("OMP_NUM_THREADS", "PYTHONPATH") if key in os.environ)
    return (env + " " if env else "") + "python benchmarks/memory.py " + " ".join(shlex.quote(a) for a in arguments)


FAMILY_NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL"}


def render(tiny: list[dict], real: list[dict], elapsed: float, rank: int, arguments: list[str] = ()) -> str:
    short = {"policy_trainable": "policy trainable", "policy_frozen": "policy frozen", "gradients": "grads",
             "optimizer_state": "optimiser", "ema": "EMA", "reference_copy": "reference copy",
             "inversion_copy": "inversion copy", "vae": "VAE", "text_encoders": "text encoders"}
    lines = [
        "# Resident memory of parameters, gradients and optimiser state",
        "",
        "Produced by:",
        "",
        f"    {command_line(list(arguments))}".rstrip(),
        "",
        f"torch {torch.__version__}, {platform.machine()}; wall time {elapsed:.0f} s. Bytes count each tensor "
        "storage once (deduplicated by device and data pointer); activations are not counted.",
        "",
        "## 1. Tiny SDXL pipeline (fp32 on CPU), after one real training step",
        "",
        "Bytes. `measured`: counted from the trainer's tensors; `computed`: `estimate_training_bytes` from the "
        "model configs. UNet ratio = resident UNet parameter bytes (policy + adapters + any reference copy) "
        f"/ (one UNet + adapters); LoRA target <= {LORA_BOUND} (full holds a second, fp32-sized copy here: 2). "
        f"LoRA rank {rank}.",
        "",
        "| method | optimiser | source | " + " | ".join(short[c] for c in RESIDENT_CATEGORIES)
        + " | total | computed == measured | UNet ratio |",
        "|---|---|---|" + "---|" * len(RESIDENT_CATEGORIES) + "---|---|---|",
    ]
    for r in tiny:
        shown = r["measured"] if r["measured"] is not None else r["computed"]
        agree = "-" if r["measured"] is None else ("yes" if all(
            r["measured"][c] == r["computed"][c] for c in RESIDENT_CATEGORIES) else "NO")
        adapters = r["computed"]["policy_trainable"] if r["method"] == "lora" else 0
        ratio = unet_resident(shown) / (r["one_unet"] + adapters)
        lines.append(f"| {r['method']} | {r['optimizer']} | {r['source']} | "
                     + " | ".join(f"{shown[c]:,}" for c in RESIDENT_CATEGORIES)
                     + f" | {total(shown):,} | {agree} | {ratio:.3f} |")
    families = " and ".join(FAMILY_NAMES[f] for f in dict.fromkeys(r["family"] for r in real))
    lines += [
        "",
        f"## 2. Real {families}, computed on the meta device (weight dtype bf16/fp16, 2 bytes)",
        "",
        f"GB = 10^9 bytes. `x UNet` = total / one UNet in the weight dtype. LoRA: rank {rank}, the "
        "default target modules (to_q, to_k, to_v, to_out.0); the reference "
        "is the same UNet with adapters disabled. Full: fp32 trainable UNet + fp32 gradients + optimiser state + "
        "frozen reference copy in the weight dtype. VAE: fp32 for SDXL (its VAE overflows in fp16 unless a "
        "separate fp16-safe VAE is given), weight dtype for SD 1.5. Text encoders: weight dtype. 8-bit Adam is "
        "computed (bitsandbytes block-wise layout: 256-element blocks, fp32 state for tensors under 4096 elements). "
        "`UNet weights ratio` = resident UNet parameter bytes (policy, adapters, reference copy) / (one UNet in the "
        f"weight dtype + adapters): LoRA must stay <= {LORA_BOUND}; full holds an fp32 policy and a 2-byte reference "
        "(ratio 3). `+copy` rows add `--inversion_weight_copy`: one more UNet in the weight dtype (its own column, "
        "not in the ratio), an opt-in trade of memory for inversion speed that doubles LoRA's UNet weights. The `+ema` "
        "row adds `--use_ema`: an fp32 copy of the trainable parameters (its own column).",
        "",
        "| model | UNet params | method | trainable params | optimiser | "
        + " | ".join(short[c] for c in RESIDENT_CATEGORIES) + " | total GB | x UNet | UNet weights ratio |",
        "|---|---|---|---|---|" + "---|" * len(RESIDENT_CATEGORIES) + "---|---|---|",
    ] if real else []
    for r in real:
        c = r["computed"]
        adapters = c["policy_trainable"] if r["method"].startswith("lora") else 0
        unet_ratio = f"{unet_resident(c) / (r['one_unet'] + adapters):.3f}"
        lines.append(f"| {r['family']} | {r['unet_parameters']:,} | {r['method']} | {r['trainable_parameters']:,} | "
                     f"{r['optimizer']} | " + " | ".join(f"{c[k] / GB:.2f}" for k in RESIDENT_CATEGORIES)
                     + f" | {total(c) / GB:.2f} | {total(c) / r['one_unet']:.2f} | {unet_ratio} |")
    sdxl_full = {r["optimizer"]: r for r in real if r["family"] == "sdxl" and r["method"] == "full"}
    if sdxl_full:
        lines += ["", "## SDXL full-UNet training on one 80 GB GPU", ""]
        for optimizer, r in sdxl_full.items():
            static = total(r["computed"])
            lines.append(f"* {optimizer}: {static / GB:.1f} GB of parameters, gradients, optimiser state, reference, "
                         f"VAE and text encoders; {(GPU_BYTES - static) / GB:.1f} GB left for activations, "
                         "workspace and allocator fragmentation.")
        computed = sdxl_full["adafactor"]["computed"]
        ema_bytes = next(r["computed"]["ema"] for r in real if r["family"] == "sdxl" and r["method"] == "full +ema")
        lines += [
            "",
            "Assumptions: batch 1 pair (2 latents of 4x128x128 at 1024 px), bf16 autocast, the reference copy in "
            "bf16, gradient checkpointing on (activations then scale with one block at a time instead of the whole "
            "UNet), Adafactor or 8-bit Adam (plain AdamW's two fp32 moments alone take "
            f"{sdxl_full['adamw']['computed']['optimizer_state'] / GB:.1f} GB). Inversion and the reference forward "
            "run without autograd (no activations kept). "
            "Activations are not part of this count: `benchmarks/gpu_sdxl_step.py` measures the peak on a GPU.",
            "",
            "Options that move these numbers: `--cache_latents` precomputes VAE latents and prompt embeddings on "
            "disk and keeps the VAE and text encoders off the GPU during training "
            f"(-{(computed['vae'] + computed['text_encoders']) / GB:.1f} GB); `--inversion_weight_copy` adds one "
            "UNet in the weight dtype "
            f"(+{sdxl_full['adafactor']['one_unet'] / GB:.1f} GB) to make the inversion faster; `--use_ema` keeps an "
            f"fp32 average of the trained weights (+{ema_bytes / GB:.1f} GB). Peaks measured on "
            "an H200 with activations (`results/gpu_sdxl_step_h200.md`, VAE and text encoders not loaded): "
            "Adafactor + checkpointing 27.6 GB; fused AdamW + checkpointing + inversion copy 52.6 GB; fused AdamW "
            "without checkpointing + inversion copy 64.3 GB: all fit one 80 GB H100.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    logging.getLogger("smpo_diffusers").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        tiny = measure_tiny(work_dir, args.rank)
    real = compute_real(args.real_families, args.rank)
    text = render(tiny, real, time.perf_counter() - began, args.rank, args.argv)
    write_report(text, args.output)
    return tiny, real


if __name__ == "__main__":
    main()
