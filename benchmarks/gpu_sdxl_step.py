#!/usr/bin/env python
"""SDXL-size SmPO and Diffusion-DPO training steps on one GPU: seconds per pair, peak memory, TFLOP/s.

The UNet is the real SDXL base architecture (``accounting.SDXL_UNET_CONFIG``) with random weights built on the
GPU (nothing is downloaded); text conditioning is random tensors of the real shapes (77 x 2048 hidden states,
1280-d pooled embedding, 6 time ids); latents are 4 x 128 x 128 (1024 px). One pair (2 latents) per step, as in
the reference recipe. The VAE and text encoders are not run (their cost is the same for SmPO and DPO).

A step is the trainer's step without VAE/text encoding, built from the library's pieces:
``InversionScheduler.invert`` with the policy (SmPO, N = 10, K = 1, exact grid) or random forward noising
(DPO), the policy forward with grad, the reference forward without, ``smpo_loss``, backward, gradient
clipping, the optimiser the trainer would build, ``zero_grad``. SmPO's timed pairs alternate timesteps whose
inversion step counts average exactly E[steps] = (N + 1) / 2, so the measured time per pair is the expectation
over uniform t (the sample-evaluations per pair are counted with forward hooks and printed).

Set-ups, most important first (each runs SmPO and DPO on the same models): full UNet bf16 + fused AdamW,
with and without ``--inversion_weight_copy`` (the inversion then runs a bf16 copy of the policy, rebuilt after
each update, instead of the fp32 policy under autocast) and with gradient checkpointing; LoRA bf16 with and
without the copy (the copy has the adapters merged); full + Adafactor / 8-bit Adam (if bitsandbytes imports);
fp16 variants; LoRA + checkpointing; full without checkpointing + Adafactor. A set-up is skipped (and reported)
when the time budget left is smaller than the longest set-up so far (not counting a ``+compile`` set-up's
compilation); out-of-memory is reported as OOM. Bad arguments exit 2 before torch or the package is imported.

FLOPs: one forward of one latent is counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta
device (no GPU time); a forward+backward counts 3x that for the full UNet (input and weight gradients) and 2x for
LoRA (input gradients only; the adapters' weight gradients are negligible). Achieved TFLOP/s = model FLOPs of
the step / step time (gradient-checkpointing recomputation is not counted as useful work).

    python benchmarks/gpu_sdxl_step.py --output $OUT/gpu_sdxl_step.md --time_budget_s 420
    python benchmarks/gpu_sdxl_step.py --smoke --output /tmp/smoke.md      # tiny UNet on CPU (CI)

Without CUDA (and without ``--smoke``) it prints a message, writes it to ``--output`` and exits 0.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # the time budget counts imports too

import argparse
import gc
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import warnings
import weakref
from dataclasses import dataclass

NUM_INVERSION_STEPS = 10
NUM_RENOISE_STEPS = 1
BETA_DPO = 5000.0
GAMMA = 10.0
LORA_RANK = 8
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
BACKWARD_FLOP_MULTIPLIER = {"full": 3.0, "lora": 2.0}
"""Forward+backward FLOPs as a multiple of forward FLOPs (see the module docstring)."""


@dataclass(frozen=True)
class Setup:
    method: str  # "full" or "lora"
    dtype: str  # "bf16" or "fp16"
    checkpointing: bool
    optimizer: str  # "adafactor", "adamw8bit" or "adamw" (fused on CUDA)
    inversion_copy: bool = False  # --inversion_weight_copy
    compiled: bool = False  # --compile_inversion_copy
    channels_last: bool = False  # experiment, no flag yet: every UNet in channels_last memory format

    @property
    def name(self) -> str:
        return (f"{self.method} {self.dtype}{' +ckpt' if self.checkpointing else ''} {self.optimizer}"
                f"{' +copy' if self.inversion_copy else ''}{' +compile' if self.compiled else ''}"
                f"{' +cl' if self.channels_last else ''}")


SETUPS = [
    Setup("full", "bf16", False, "adamw"),
    Setup("full", "bf16", False, "adamw", inversion_copy=True),
    Setup("full", "bf16", True, "adamw", inversion_copy=True),
    Setup("lora", "bf16", False, "adamw"),
    Setup("lora", "bf16", False, "adamw", inversion_copy=True),
    Setup("full", "bf16", True, "adafactor"),
    Setup("full", "bf16", True, "adamw8bit"),
    Setup("lora", "fp16", False, "adamw", inversion_copy=True),
    Setup("full", "fp16", True, "adafactor"),
    Setup("lora", "bf16", True, "adamw"),
    Setup("full", "bf16", False, "adafactor"),
    # Experiments towards the 1.3 s/pair goal (results/gpu_sdxl_step_h200_compile.md; or pick them with --only):
    Setup("full", "bf16", False, "adamw", inversion_copy=True, channels_last=True),
    Setup("full", "bf16", False, "adamw", inversion_copy=True, compiled=True),
]
COMPILE_ALLOWANCE_S = 180.0
"""Seconds a ``+compile`` set-up is assumed to need on top of the longest set-up so far (inductor compiling the
SDXL UNet's forward for two shapes), so that it is skipped rather than killed by the caller's timeout."""
SMOKE_SETUPS = [Setup("full", "bf16", True, "adafactor", inversion_copy=True), Setup("lora", "fp16", False, "adamw")]


def parse_args(argv=None):
    # no abbreviations: gpu_check.sh refuses --time_budget_s among the arguments it passes on (its budget is its
    # own second argument), and an abbreviation of it would slip past that check
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--output", required=True, help="Markdown file to write (a .json twin is written beside it).")
    parser.add_argument("--time_budget_s", type=float, default=420.0,
                        help="Stop starting new set-ups when less than the longest set-up so far is left.")
    parser.add_argument("--timed_pairs", type=int, default=6,
                        help="Timed pairs (steps) per mode and set-up, rounded up to a whole timestep cycle (2).")
    parser.add_argument("--smoke", action="store_true",
                        help="Tiny SDXL-shaped UNet on CPU (or GPU) at 32 px, two set-ups: checks the script runs.")
    parser.add_argument("--only", nargs="+", default=None, metavar="SETUP",
                        help="Run just these set-ups, by name (e.g. 'full bf16 adamw +copy +compile'), in this order.")
    parser.add_argument("--check_args", action="store_true",
                        help="Check the arguments (exit 2 if bad), then that the packages a run imports import (exit 1 "
                             "if not), and exit; gpu_check.sh does this first, so that neither fails after the tests "
                             "spent device time.")
    args = parser.parse_args(argv)
    if args.timed_pairs < 1 or not 0 < args.time_budget_s < float("inf"):
        parser.error("--timed_pairs must be >= 1 and --time_budget_s a finite number > 0")
    if args.only:
        known = {setup.name: setup for setup in SETUPS + SMOKE_SETUPS}
        unknown = [name for name in args.only if name not in known]
        if unknown:
            parser.error(f"unknown set-up(s) {unknown}; known: {sorted(known)}")
        args.only = [known[name] for name in args.only]
    return args


if __name__ == "__main__":
    parse_args()  # bad arguments exit 2 here, before the imports below can fail (a missing package: exit 1)

import torch

from smpo_diffusers import SmPOConfig, per_sample_mse, smpo_loss
from smpo_diffusers.accounting import (
    SDXL_UNET_CONFIG,
    ByteCounter,
    UNetEvaluationCounter,
    expected_evaluations_per_pair,
    inversion_steps,
    module_tensors,
    optimizer_state_tensors,
    write_report,
)
from smpo_diffusers.models import (
    InversionWeightCopy,
    ReferenceModel,
    add_lora_adapters,
    inversion_scheduler_from_config,
)
from smpo_diffusers.testing import SDXL_SCHEDULER_CONFIG

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RUN_MODULES = ("diffusers", "peft", "smpo_diffusers.trainer")
"""Imported lazily by a run (checked by ``--check_args``); bitsandbytes is optional."""


# ---------------------------------------------------------------------------------------------- models
def unet_config(smoke: bool) -> dict:
    if not smoke:
        return dict(SDXL_UNET_CONFIG)
    from smpo_diffusers.testing import tiny_sdxl_components

    return dict(tiny_sdxl_components(seed=0)["unet"].config)


def build_unet(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """The UNet with random weights allocated directly on ``device`` in ``dtype`` (PyTorch default inits)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet = unet.to(dtype=dtype).to_empty(device=device)
    torch.manual_seed(seed)
    initialised = set()
    with torch.no_grad():
        for module in unet.modules():
            if hasattr(module, "reset_parameters") and next(module.parameters(recurse=False), None) is not None:
                module.reset_parameters()
                initialised.update(id(p) for p in module.parameters(recurse=False))
        for parameter in unet.parameters():  # anything without a reset_parameters (none in SDXL, but be safe)
            if id(parameter) not in initialised:
                parameter.normal_(0.0, 0.02)
    return unet


def make_optimizer(setup: Setup, params: list):
    """The optimiser exactly as ``SmPOTrainer`` builds it for these flags."""
    from smpo_diffusers.trainer import make_optimizer

    config = SmPOConfig(use_adafactor=setup.optimizer == "adafactor", use_8bit_adam=setup.optimizer == "adamw8bit",
                        train_method=setup.method, report_to="none")
    return make_optimizer(config, params, config.learning_rate)


class StepModels:
    """Policy, reference handle, optimiser and grad scaler for one set-up, placed as the trainer places them."""

    def __init__(self, setup: Setup, config: dict, device: torch.device):
        self.setup, self.device = setup, device
        self.weight_dtype = DTYPES[setup.dtype]
        if setup.method == "lora":
            unet = build_unet(config, device, self.weight_dtype, seed=0).requires_grad_(False)
            add_lora_adapters(unet, LORA_RANK, LORA_RANK, LORA_TARGETS)
            from diffusers.training_utils import cast_training_params

            cast_training_params(unet, dtype=torch.float32)
            self.reference = ReferenceModel(None)
        else:
            unet = build_unet(config, device, torch.float32, seed=0).requires_grad_(True)
            frozen = build_unet(config, device, self.weight_dtype, seed=1)
            with torch.no_grad():
                for target, source in zip(frozen.parameters(), unet.parameters()):
                    target.copy_(source)
            self.reference = ReferenceModel(frozen)
        unet.train()
        if setup.checkpointing:
            unet.enable_gradient_checkpointing()
        self.policy = unet
        self.trainable = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(setup, self.trainable)
        self.inversion_copy = InversionWeightCopy(unet, self.weight_dtype) if setup.inversion_copy else None
        if setup.channels_last:
            for module in (unet, self.reference.frozen_unet, self.inversion_copy and self.inversion_copy.module):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        if setup.compiled:
            if self.inversion_copy is None:
                raise ValueError("--compile_inversion_copy compiles the inversion copy: set inversion_copy too")
            self.inversion_copy.compile_forward()  # --compile_inversion_copy; the counting hooks stay eager
        self.scaler = torch.amp.GradScaler(device.type) if setup.dtype == "fp16" else None

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.weight_dtype)

    def resident_bytes(self) -> dict:
        counter = ByteCounter()
        counter.add("policy", module_tensors(self.policy))
        counter.add("reference_copy", module_tensors(self.reference.frozen_unet))
        counter.add("inversion_copy", module_tensors(self.inversion_copy and self.inversion_copy.module))
        counter.add("optimizer_state", optimizer_state_tensors(self.optimizer))
        counter.by_category["gradients"] = sum(p.numel() * p.element_size() for p in self.trainable)
        return counter.by_category


# ---------------------------------------------------------------------------------------------- one step
class Conditioning:
    """Random SDXL conditioning of the real shapes for one pair (2 images sharing the prompt)."""

    def __init__(self, config: dict, latent_size: int, device, dtype, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        hidden = torch.randn(1, 77, config["cross_attention_dim"], generator=generator)
        pooled = torch.randn(1, pooled_dim, generator=generator)
        pixels = latent_size * 8
        self.kwargs = {
            "encoder_hidden_states": hidden.repeat(2, 1, 1).to(device, dtype),
            "added_cond_kwargs": {
                "text_embeds": pooled.repeat(2, 1).to(device, dtype),
                "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * 2).to(device, dtype),
            },
        }
        self.x0 = torch.randn(2, config["in_channels"], latent_size, latent_size, generator=generator).to(device)
        self.noise = torch.randn(1, config["in_channels"], latent_size, latent_size, generator=generator).to(device)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(models: StepModels, scheduler, cond: Conditioning, pair_timestep: int, mode: str) -> dict:
    """One SmPO (``mode="smpo"``) or Diffusion-DPO (``"dpo"``) step on one pair; returns stage seconds."""
    device, policy = models.device, models.policy
    timesteps = torch.full((2,), pair_timestep, dtype=torch.long, device=device)
    times = {}
    synchronize(device)
    start = time.perf_counter()
    if mode == "smpo":
        inverter = policy if models.inversion_copy is None else models.inversion_copy.current(policy)

        def model_fn(latents, level, encoder_hidden_states, added_cond_kwargs=None):
            with models.autocast():
                return inverter(latents.to(models.weight_dtype), level, encoder_hidden_states=encoder_hidden_states,
                                added_cond_kwargs=added_cond_kwargs).sample

        inversion = scheduler.invert(model_fn, cond.x0, timesteps, NUM_INVERSION_STEPS, NUM_RENOISE_STEPS,
                                     grid="exact", prediction_type="epsilon", model_kwargs=cond.kwargs)
        noisy, target = inversion.latents, inversion.epsilon
    else:
        target = cond.noise.repeat(2, 1, 1, 1)
        noisy = scheduler.add_noise(cond.x0, target, timesteps)
    synchronize(device)
    times["inversion"] = time.perf_counter() - start

    mark = time.perf_counter()
    with models.autocast():
        prediction = policy(noisy.to(models.weight_dtype), timesteps, **cond.kwargs).sample
    policy_err = per_sample_mse(prediction, target)
    with torch.no_grad(), models.autocast(), models.reference.active(policy) as reference:
        ref_err = per_sample_mse(reference(noisy.to(models.weight_dtype), timesteps, **cond.kwargs).sample, target)
    synchronize(device)
    times["reference_and_policy_forward"] = time.perf_counter() - mark

    mark = time.perf_counter()
    prob_w = torch.full((1,), 0.75, device=device)
    loss = smpo_loss(policy_err[:1], policy_err[1:], ref_err[:1], ref_err[1:], prob_w, BETA_DPO,
                     GAMMA if mode == "smpo" else 1.0).loss
    if models.scaler is not None:
        models.scaler.scale(loss).backward()
    else:
        loss.backward()
    synchronize(device)
    times["policy_backward"] = time.perf_counter() - mark

    mark = time.perf_counter()
    if models.scaler is not None:
        models.scaler.unscale_(models.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(models.trainable, 1.0)
    if models.scaler is not None:
        models.scaler.step(models.optimizer)
        models.scaler.update()
    else:
        models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)
    if models.inversion_copy is not None:
        models.inversion_copy.mark_stale()  # rebuilt at the next inversion (its cost is in "inversion")
    synchronize(device)
    times["optimizer"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start
    times["finite"] = bool(torch.isfinite(loss).item() and torch.isfinite(grad_norm).item())
    return times


def balanced_timesteps(scheduler, num_pairs: int) -> list[int]:
    """Pair timesteps whose exact-grid step counts average exactly E[steps] = (N + 1) / 2 over ``num_pairs``
    (rounded up to a whole cycle): step counts N/2 and N/2 + 1 alternating (N even), or (N + 1) / 2 (N odd)."""
    n, total = NUM_INVERSION_STEPS, scheduler.config.num_train_timesteps
    counts = [n // 2, n // 2 + 1] if n % 2 == 0 else [(n + 1) // 2]
    # The largest t with ceil(N (t + 1) / T) == c is t = floor(c T / N) - 1.
    levels = [c * total // n - 1 for c in counts]
    got = inversion_steps(scheduler, torch.tensor(levels), n, "exact").tolist()
    if got != counts:
        raise RuntimeError(f"timestep choice is wrong: steps {got} for levels {levels}, wanted {counts}")
    cycles = -(-num_pairs // len(levels))
    return levels * cycles


# ---------------------------------------------------------------------------------------------- FLOPs
def count_forward(config: dict, latent_size: int) -> tuple[int, int]:
    """``(FLOPs of one UNet forward on one latent, parameter count)``, counted on the meta device."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        sample = torch.empty(1, config["in_channels"], latent_size, latent_size)
        kwargs = {"encoder_hidden_states": torch.empty(1, 77, config["cross_attention_dim"]),
                  "added_cond_kwargs": {"text_embeds": torch.empty(1, pooled_dim), "time_ids": torch.empty(1, 6)}}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(sample, torch.tensor([500]), **kwargs)
    return int(counter.get_total_flops()), sum(p.numel() for p in unet.parameters())


# ---------------------------------------------------------------------------------------------- running
def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def gpu_state(device) -> dict | None:
    """The GPU's SM clock (MHz), temperature (C) and power draw (W) now, read through NVML (``nvidia-ml-py``),
    so that a slowdown across set-ups can be told from clocks or power; None without CUDA or NVML."""
    if device.type != "cuda":
        return None
    try:
        return {"sm_clock_mhz": torch.cuda.clock_rate(device), "temperature_c": torch.cuda.temperature(device),
                "power_w": torch.cuda.power_draw(device) / 1e3}
    except Exception:  # noqa: BLE001 - NVML missing or refused (e.g. in a sandbox): report nothing, time on
        return None


def run_setup(setup: Setup, config: dict, latent_size: int, device, scheduler, pair_timesteps: list[int],
              flops_forward: int, strict: bool) -> dict:
    """Build one set-up, warm up, time SmPO and DPO steps. Out-of-memory is reported as the set-up's status;
    other errors too unless ``strict`` (then they propagate)."""
    result = {"setup": setup.name, **setup.__dict__, "status": "ok", "modes": {}}
    models = None
    try:
        free_memory(device)
        started = time.perf_counter()
        models = StepModels(setup, config, device)
        cond = Conditioning(config, latent_size, device, models.weight_dtype)
        result["build_s"] = time.perf_counter() - started
        # Warm-up: one step of each mode (allocator, kernels, optimiser state, compilation). Its time is kept
        # even when it fails, so that main() can leave a +compile set-up's compilation out of its estimates.
        started = time.perf_counter()
        try:
            for mode in ("smpo", "dpo"):
                train_step(models, scheduler, cond, pair_timesteps[-1], mode)
        finally:
            result["warmup_s"] = time.perf_counter() - started
        result["resident_gb"] = {k: v / 1e9 for k, v in models.resident_bytes().items()}
        counter = copy_freed = None
        for mode in ("smpo", "dpo"):
            if mode == "dpo" and models.inversion_copy is not None:
                # Diffusion-DPO never inverts (the trainer refuses the copy with random noising): time and
                # measure the baseline without the copy's memory. The SmPO counter holds the copy's module too,
                # and compiled code may: drop both before the memory is freed and the peak reset.
                copy_module = weakref.ref(models.inversion_copy.module)
                counter = models.inversion_copy = None
                if setup.compiled:
                    torch._dynamo.reset()
                free_memory(device)
                copy_freed = copy_module() is None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            records = []
            with UNetEvaluationCounter(models.policy, models.reference.frozen_unet,
                                       models.inversion_copy and models.inversion_copy.module) as counter:
                for t in pair_timesteps:
                    records.append(train_step(models, scheduler, cond, t, mode))
            pairs = len(pair_timesteps)
            per_pair = {"grad": counter.grad / pairs, "no_grad": counter.no_grad / pairs}
            backward = BACKWARD_FLOP_MULTIPLIER[setup.method]
            step_flops = flops_forward * (per_pair["no_grad"] + backward * per_pair["grad"])
            seconds = [r["total"] for r in records]
            mean_s = statistics.fmean(seconds)
            result["modes"][mode] = {
                "timed_pairs": pairs, "s_per_pair_median": statistics.median(seconds), "s_per_pair_mean": mean_s,
                "evals_per_pair": per_pair, "tflop_per_pair": step_flops / 1e12,
                "achieved_tflops": step_flops / mean_s / 1e12, "peak_gb": peak_gb(device),
                "stage_ms": {k: 1e3 * statistics.median(r[k] for r in records)
                             for k in ("inversion", "reference_and_policy_forward", "policy_backward", "optimizer")},
                "nonfinite_steps": sum(not r["finite"] for r in records),
                "resident_gb": {k: v / 1e9 for k, v in models.resident_bytes().items()},
                "gpu_state": gpu_state(device),  # right after the timed steps
            }
            if mode == "dpo" and copy_freed is not None:
                result["modes"][mode]["inversion_copy_freed"] = copy_freed  # False: its peak includes the copy
        result["smpo_over_dpo"] = result["modes"]["smpo"]["s_per_pair_mean"] / result["modes"]["dpo"]["s_per_pair_mean"]
        result["flop_ratio"] = result["modes"]["smpo"]["tflop_per_pair"] / result["modes"]["dpo"]["tflop_per_pair"]
    except torch.cuda.OutOfMemoryError as error:
        result["status"] = f"OOM ({str(error).splitlines()[0][:120]})"
    except Exception as error:  # noqa: BLE001 - one broken set-up must not lose the others' results
        if strict:
            raise
        result["status"] = f"error ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})"
    finally:
        del models
        free_memory(device)
    return result


def command_line(argv=None) -> str:
    arguments = sys.argv if argv is None else ["benchmarks/gpu_sdxl_step.py", *argv]
    return "python " + " ".join(shlex.quote(a) for a in arguments)


def device_description(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.processor() or platform.machine()})"


def render(report: dict) -> str:
    lines = [
        "# SDXL-size SmPO vs Diffusion-DPO step on one GPU" + (" (SMOKE: tiny UNet)" if report["smoke"] else ""),
        "",
        "Produced by:",
        "",
        f"    {report['command']}",
        "",
        f"Device: {report['device']}; torch {report['torch']}; bitsandbytes "
        f"{'available' if report['bitsandbytes'] else 'not installed'}; wall time {report['wall_s']:.0f} s of a "
        f"{report['time_budget_s']:.0f} s budget.",
        "",
        f"UNet: {report['unet_parameters']:,} parameters, latents 4x{report['latent_size']}x{report['latent_size']}, "
        "one pair (2 latents) per step, random weights and conditioning. SmPO: N = "
        f"{NUM_INVERSION_STEPS}, K = {NUM_RENOISE_STEPS}, exact grid, policy inverts; after one warm-up step per "
        f"mode, the {len(report['pair_timesteps'])} timed pairs per mode (--timed_pairs {report['timed_pairs']}, "
        "rounded up to a whole cycle) use timesteps "
        f"{report['pair_timesteps']} (mean inversion steps = E[steps] = {report['mean_steps']:.2f}). Expected "
        f"sample-evaluations per pair: SmPO {report['expected_smpo']['grad']:.0f} with grad + "
        f"{report['expected_smpo']['no_grad']:.0f} without; DPO 2 + 2. FLOPs: {report['forward_tflop']:.4g} TFLOP per "
        "latent forward (FlopCounterMode, meta device); fwd+bwd = 3x (full) / 2x (LoRA); checkpoint recomputation "
        "not counted. Peak = torch.cuda.max_memory_allocated during the timed steps of that mode (includes the "
        "resident weights, optimiser state and gradients). Resident = parameters + optimiser state + gradients "
        "(counted from the tensors after the warm-up; gradients as allocated during backward). Non-finite steps: "
        "loss or gradient norm not finite (with fp16 the grad scaler then skips the update while it calibrates). "
        "Warm-up s: the untimed first SmPO and DPO steps (includes compilation for +compile). GPU state: SM clock "
        "MHz / temperature C / power W read through NVML right after the mode's timed steps ('-' without NVML).",
        "",
        "| set-up | status | mode | s/pair (mean) | s/pair (median) | evals/pair grad / no-grad | TFLOP/pair | "
        "achieved TFLOP/s | peak GB | resident GB | inversion (DPO: noising) ms | ref+policy fwd ms | backward ms | "
        "optimiser ms | non-finite steps | SmPO/DPO time | SmPO/DPO FLOPs | warm-up s | GPU state |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['setup']} | {r['status']} |" + " - |" * 17)
            continue
        for mode, m in r["modes"].items():
            resident = sum(m["resident_gb"].values())
            peak = "-" if m["peak_gb"] is None else f"{m['peak_gb']:.1f}"
            ratios = (f"{r['smpo_over_dpo']:.2f} | {r['flop_ratio']:.2f} | {r['warmup_s']:.1f}" if mode == "smpo"
                      else " | | ")
            lines.append(
                f"| {r['setup']} | ok | {mode} | {m['s_per_pair_mean']:.3f} | {m['s_per_pair_median']:.3f} | "
                f"{m['evals_per_pair']['grad']:.1f} / {m['evals_per_pair']['no_grad']:.1f} | "
                f"{m['tflop_per_pair']:.3g} | "
                f"{m['achieved_tflops']:.3g} | {peak} | {resident:.3g} | "
                + " | ".join(f"{m['stage_ms'][k]:.0f}" for k in (
                    "inversion", "reference_and_policy_forward", "policy_backward", "optimizer"))
                + f" | {m['nonfinite_steps']} | {ratios} | {render_gpu_state(m.get('gpu_state'))} |")
    kept = [r["setup"] for r in report["results"]
            if r["status"] == "ok" and r["modes"]["dpo"].get("inversion_copy_freed") is False]
    if kept:
        lines += ["", f"The inversion copy was still alive during the DPO steps of {kept}: their DPO peak includes it."]
    return "\n".join(lines) + "\n"


def render_gpu_state(state: dict | None) -> str:
    if not state:
        return "-"
    return f"{state['sm_clock_mhz']:.0f} / {state['temperature_c']:.0f} / {state['power_w']:.0f}"


def write(report: dict, output: str, echo: bool) -> None:
    write_report(render(report), output, echo=echo)
    with open(os.path.splitext(output)[0] + ".json", "w") as handle:
        json.dump(report, handle, indent=2, default=str)


def estimate_s(result: dict) -> float:
    """Seconds a run set-up took, as the estimate of what a later one needs (``longest`` in main()). A ``+compile``
    set-up's warm-up is mostly compilation, which eager set-ups do not pay and COMPILE_ALLOWANCE_S covers for
    compiled ones: it counts as an eager warm-up would, one step of each mode (from its timed steps)."""
    seconds = result["wall_s"]
    if result.get("compiled") and "warmup_s" in result:
        seconds += sum(m["s_per_pair_mean"] for m in result.get("modes", {}).values()) - result["warmup_s"]
    return seconds


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.check_args:
        for name in RUN_MODULES:
            importlib.import_module(name)  # a missing package fails here (exit 1), not in the run
        print("gpu_sdxl_step: arguments ok; torch", torch.__version__, "and", ", ".join(RUN_MODULES), "import")
        return None
    began = PROCESS_START if argv is None else time.perf_counter()
    warnings.filterwarnings("ignore")
    if not torch.cuda.is_available() and not args.smoke:
        message = ("gpu_sdxl_step: no CUDA device; nothing measured. Run it on a GPU machine, or pass --smoke for the "
                   "tiny CPU check.")
        print(message)
        write_report(f"# SDXL step benchmark\n\n{message}\n\n    {command_line(argv)}\n", args.output, echo=False)
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = unet_config(args.smoke)
    latent_size = 8 if args.smoke else 128
    scheduler = inversion_scheduler_from_config(SDXL_SCHEDULER_CONFIG)
    pair_timesteps = balanced_timesteps(scheduler, args.timed_pairs)
    expected = expected_evaluations_per_pair(scheduler, noise_source="inversion",
                                             num_inversion_steps=NUM_INVERSION_STEPS,
                                             num_renoise_steps=NUM_RENOISE_STEPS)
    flops, parameters = count_forward(config, latent_size)
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    report = {
        "command": command_line(argv), "device": device_description(device), "torch": torch.__version__,
        "bitsandbytes": have_bnb, "smoke": args.smoke, "time_budget_s": args.time_budget_s,
        "timed_pairs": args.timed_pairs,
        "unet_parameters": parameters, "latent_size": latent_size, "pair_timesteps": pair_timesteps,
        "mean_steps": float(inversion_steps(scheduler, torch.tensor(pair_timesteps),
                                            NUM_INVERSION_STEPS).double().mean()),
        "expected_smpo": expected, "forward_tflop": flops / 1e12, "results": [],
    }
    longest = 0.0
    for setup in args.only or (SMOKE_SETUPS if args.smoke else SETUPS):
        elapsed = time.perf_counter() - began
        if setup.optimizer == "adamw8bit" and not (have_bnb and device.type == "cuda"):
            report["results"].append({"setup": setup.name, **setup.__dict__,
                                      "status": "skipped (needs CUDA + bitsandbytes)"})
            continue
        # inductor compiles the SDXL UNet in its warm-up: give a compiled set-up that much more room
        needed = longest + (COMPILE_ALLOWANCE_S if setup.compiled and device.type == "cuda" else 0.0)
        if elapsed + needed > args.time_budget_s:
            report["results"].append({"setup": setup.name, **setup.__dict__,
                                      "status": f"skipped (time budget: {elapsed:.0f} s used, ~{needed:.0f} s "
                                                f"needed; run it first with --only)"})
            continue
        print(f"== {setup.name}", flush=True)
        started = time.perf_counter()
        result = run_setup(setup, config, latent_size, device, scheduler, pair_timesteps, flops, strict=args.smoke)
        result["wall_s"] = time.perf_counter() - started
        longest = max(longest, estimate_s(result))
        report["results"].append(result)
        print(f"   {result['status']} in {result['wall_s']:.0f} s", flush=True)
        report["wall_s"] = time.perf_counter() - began
        write(report, args.output, echo=False)  # keep what we have if the run is cut off
    report["wall_s"] = time.perf_counter() - began
    write(report, args.output, echo=True)
    return report


if __name__ == "__main__":
    main()
