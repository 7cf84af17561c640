"""Tiny end-to-end training on a CUDA GPU: mixed precision x optimiser x method. Skipped without a GPU.

Run on a GPU box with `pytest -m cuda tests/test_cuda.py` and record the result in benchmarks/results/.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from smpo_diffusers import SmPOConfig, SmPOTrainer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

OPTIMISERS = {"adamw": {}, "adamw8bit": {"use_8bit_adam": True}, "adafactor": {"use_adafactor": True}}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("optimiser", sorted(OPTIMISERS))
@pytest.mark.parametrize("method", ["lora", "full"])
def test_tiny_training_on_gpu(tmp_path, demo_inputs, precision, optimiser, method):
    if optimiser == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install smpo-diffusers[bnb])")
    model, data = demo_inputs["sdxl"]
    config = SmPOConfig(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(tmp_path / "out"),
                        resolution=32, train_batch_size=2, max_train_steps=3, report_to="none",
                        mixed_precision=precision, train_method=method, learning_rate=1e-4,
                        **OPTIMISERS[optimiser])
    trainer = SmPOTrainer(config)
    assert trainer.accelerator.device.type == "cuda"
    if optimiser == "adamw":
        assert trainer.optimizer.optimizer.defaults["fused"] is True
    expected = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "adafactor": "Adafactor"}[optimiser]
    assert type(trainer.optimizer.optimizer).__name__ == expected
    if method == "lora":
        lora = [p for n, p in trainer.unwrapped_unet.named_parameters() if "lora" in n]
        assert lora and all(p.dtype == torch.float32 for p in lora)
    metrics = trainer.train()
    assert np.isfinite(metrics["loss"])
    if method == "lora":
        saved = load_file(os.path.join(config.output_dir, "pytorch_lora_weights.safetensors"))
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in saved.values())
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(config.output_dir, subfolder="unet")
        assert all(torch.isfinite(p).all() for p in unet.parameters())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_inversion_weight_copy_on_gpu(tmp_path, demo_inputs, method):
    model, data = demo_inputs["sdxl"]
    config = SmPOConfig(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(tmp_path / "out"),
                        resolution=32, train_batch_size=2, max_train_steps=3, report_to="none",
                        mixed_precision="bf16", train_method=method, inversion_weight_copy=True)
    trainer = SmPOTrainer(config)
    metrics = trainer.train()
    assert np.isfinite(metrics["loss"]) and metrics["inversion_residual"] == metrics["inversion_residual"]
    copy = trainer.inversion_copy.module
    assert all(p.dtype == torch.bfloat16 and p.is_cuda and not p.requires_grad for p in copy.parameters())


def test_latent_cache_on_gpu(tmp_path, demo_inputs):
    """The cache is built on the GPU, then the VAE and text encoders leave it (back only for validation)."""
    model, data = demo_inputs["sdxl"]
    config = SmPOConfig(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(tmp_path / "out"),
                        resolution=32, train_batch_size=2, max_train_steps=3, report_to="none",
                        mixed_precision="bf16", cache_latents=True, latent_cache_dir=str(tmp_path / "cache"),
                        validation_prompts=["a red circle"], validation_num_inference_steps=2)
    trainer = SmPOTrainer(config)
    encoders = [trainer.parts.vae, *trainer.parts.text_encoders]
    assert trainer.latent_cache_stats.pairs_built > 0
    assert all(module.device.type == "cpu" for module in encoders)
    metrics = trainer.train()
    assert np.isfinite(metrics["loss"]) and (tmp_path / "out" / "validation.png").is_file()
    assert all(module.device.type == "cpu" for module in encoders)


def test_compiled_inversion_copy_on_gpu(tmp_path, demo_inputs):
    """--compile_inversion_copy with inductor on the GPU: at most two graphs over three updates (the copy is
    refreshed in place), and the run tracks the eager copy's run up to bf16 rounding."""
    from torch._dynamo.utils import counters

    model, data = demo_inputs["sdxl"]
    losses = {}
    for use_compile in (False, True):
        torch._dynamo.reset()
        counters.clear()
        config = SmPOConfig(pretrained_model_name_or_path=model, dataset_name=data,
                            output_dir=str(tmp_path / f"out{use_compile}"), resolution=32, train_batch_size=2,
                            max_train_steps=3, report_to="none", mixed_precision="bf16", seed=0,
                            inversion_weight_copy=True, compile_inversion_copy=use_compile)
        metrics = SmPOTrainer(config).train()
        assert np.isfinite(metrics["loss"])
        losses[use_compile] = metrics["inversion_residual"]
        if use_compile:
            assert 1 <= counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]
    assert abs(losses[True] - losses[False]) <= 0.05 * abs(losses[False]) + 1e-3, losses


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ema_with_fp16_loss_scaling_and_resume_on_gpu(tmp_path, demo_inputs, method):
    """--use_ema under accelerate's real CUDA GradScaler (fp16): the average steps once per applied update (an
    fp16-overflow skip while the scaler calibrates is not averaged), lives on the GPU in fp32, is checkpointed
    and resumed, and is what the run saves (full: as a whole pipeline, --save_full_pipeline)."""
    model, data = demo_inputs["sdxl"]
    extra = {"save_full_pipeline": True} if method == "full" else {}
    common = dict(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(tmp_path / "out"),
                  resolution=32, train_batch_size=2, report_to="none", mixed_precision="fp16",
                  train_method=method, learning_rate=1e-4, use_ema=True, ema_decay=0.9, checkpointing_steps=2,
                  **extra)
    trainer = SmPOTrainer(SmPOConfig(**common, max_train_steps=2))
    assert trainer.accelerator.scaler is not None
    trainer.train()
    first_skips = trainer.skipped["fp16_overflow_updates"] + trainer.skipped["nonfinite_updates"]
    assert trainer.ema.optimization_step == 2 - first_skips
    assert all(p.is_cuda and p.dtype == torch.float32 for p in trainer.ema.shadow_params)
    assert (tmp_path / "out" / "checkpoint-2" / "ema.safetensors").is_file()

    resumed = SmPOTrainer(SmPOConfig(**common, max_train_steps=4, resume_from_checkpoint="latest"))
    metrics = resumed.train()
    assert np.isfinite(metrics["loss"]) and resumed.global_step == 4
    all_skips = resumed.skipped["fp16_overflow_updates"] + resumed.skipped["nonfinite_updates"]  # carried on
    assert all_skips >= first_skips and resumed.ema.optimization_step == 4 - all_skips
    if method == "lora":
        saved = load_file(os.path.join(common["output_dir"], "pytorch_lora_weights.safetensors"))
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in saved.values())
    else:
        from diffusers import StableDiffusionXLPipeline

        pipeline = StableDiffusionXLPipeline.from_pretrained(common["output_dir"])
        assert all(torch.isfinite(p).all() for p in pipeline.unet.parameters())
