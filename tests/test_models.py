"""Model helpers: SDXL micro-conditioning and the inversion's weight-dtype policy copy."""

import os

import numpy as np
import pytest
import torch

from smpo_diffusers import SmPOConfig, SmPOTrainer
from smpo_diffusers.models import InversionWeightCopy, add_lora_adapters, sdxl_time_ids
from smpo_diffusers.testing import tiny_sdxl_components


def test_sdxl_time_ids_layout_and_device():
    sizes = torch.tensor([[64, 48], [32, 32]])
    crops = torch.tensor([[8, 0], [0, 0]])
    assert sdxl_time_ids(sizes, crops, 32).tolist() == [[64, 48, 8, 0, 32, 32], [32, 32, 0, 0, 32, 32]]
    # The result lives where the inputs live (the batch is on the accelerator's device): building the target
    # size on the CPU broke every SDXL step on CUDA. The meta device stands in for a GPU here.
    meta = sdxl_time_ids(sizes.to("meta"), crops.to("meta"), 32)
    assert meta.device.type == "meta" and meta.shape == (2, 6)


def tiny_unet_inputs(unet, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return dict(
        sample=torch.randn(batch, config.in_channels, 8, 8, generator=generator),
        timestep=torch.tensor([10, 700][:batch]),
        encoder_hidden_states=torch.randn(batch, 7, config.cross_attention_dim, generator=generator),
        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=generator),
                           "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * batch)},
    )


def randomise_lora(unet, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


def test_lora_copy_merges_the_adapters_and_refreshes_only_when_stale():
    unet = tiny_sdxl_components(seed=0)["unet"].eval()
    add_lora_adapters(unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    randomise_lora(unet, seed=1)  # B = 0 at initialisation would make merging invisible
    inputs = tiny_unet_inputs(unet)
    copy = InversionWeightCopy(unet, torch.float32)
    assert not any("lora" in name for name, _ in copy.module.named_parameters())
    assert not any(p.requires_grad for p in copy.module.parameters())
    with torch.no_grad():
        expected = unet(**inputs).sample
        unet.disable_adapters()
        base = unet(**inputs).sample
        unet.enable_adapters()
        got = copy.current(unet)(**inputs).sample
    assert (expected - base).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    randomise_lora(unet, seed=2)  # an "update"
    with torch.no_grad():
        updated = unet(**inputs).sample
        torch.testing.assert_close(copy.current(unet)(**inputs).sample, got)  # not stale yet: lazily kept
        copy.mark_stale()
        torch.testing.assert_close(copy.current(unet)(**inputs).sample, updated, rtol=1e-4, atol=1e-5)


def test_full_copy_is_the_policy_rounded_to_the_weight_dtype():
    unet = tiny_sdxl_components(seed=0)["unet"]
    copy = InversionWeightCopy(unet, torch.bfloat16).current(unet)
    for (name, source), (copy_name, target) in zip(unet.state_dict().items(), copy.state_dict().items()):
        assert name == copy_name and target.dtype == torch.bfloat16
        assert torch.equal(target, source.to(torch.bfloat16)), name


def record_inversion_residuals(trainer) -> list:
    """Wrap ``trainer.compute_loss`` to keep every micro-batch's inversion residuals; returns the list it fills."""
    residuals, original = [], trainer.compute_loss

    def recording(batch, generator):
        step = original(batch, generator)
        residuals.append(step.inversion_residual.clone())
        return step

    trainer.compute_loss = recording
    return residuals


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_with_the_inversion_copy_matches_training_without(tmp_path, demo_inputs, method):
    """Same seed, same pairs: the copy changes where the inversion's weights live, not what it computes (fp32 on
    the CPU: merged LoRA weights differ from adapter layers by rounding only). Three updates, so the copy has to
    be refreshed after each update to keep up with the policy."""
    model, data = demo_inputs["sdxl"]
    results = {}
    for use_copy in (False, True):
        config = SmPOConfig(pretrained_model_name_or_path=model, dataset_name=data, train_method=method,
                            output_dir=str(tmp_path / f"out-{use_copy}"), resolution=32, train_batch_size=2,
                            max_train_steps=3, report_to="none", learning_rate=1e-3, seed=0,
                            inversion_weight_copy=use_copy)
        trainer = SmPOTrainer(config)
        assert (trainer.inversion_copy is not None) == use_copy
        residuals = record_inversion_residuals(trainer)
        calls, refreshes = [], []
        if use_copy:
            copy = trainer.inversion_copy
            copy.module.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
            original_current = copy.current
            copy.current = lambda policy: (refreshes.append(copy.stale), original_current(policy))[1]
        metrics = trainer.train()
        assert np.isfinite(metrics["loss"])
        results[use_copy] = (torch.cat(residuals), [p.detach().clone() for p in trainer.trainable_params])
        if use_copy:  # the copy ran every inversion forward and was rebuilt once per update
            assert sum(calls) == trainer.unet_evaluations["inversion"] > 0  # sample-evaluations
            assert refreshes == [True, True, True]
    residual_plain, params_plain = results[False]
    residual_copy, params_copy = results[True]
    torch.testing.assert_close(residual_copy, residual_plain, rtol=1e-3, atol=1e-5)
    for a, b in zip(params_copy, params_plain):  # Adam scales a rounding-size gradient difference up to lr-size
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_copy_needs_inversion_by_the_policy():
    with pytest.raises(ValueError, match="--inversion_weight_copy"):
        SmPOConfig(inversion_weight_copy=True, noise_source="random", report_to="none")
    with pytest.raises(ValueError, match="--inversion_weight_copy"):
        SmPOConfig(inversion_weight_copy=True, inversion_model="reference", report_to="none")


def test_compiled_inversion_copy_matches_and_compiles_at_most_twice(tmp_path, demo_inputs, monkeypatch):
    """--compile_inversion_copy: dynamo traces the copy's forward (the ``eager`` backend here: inductor's code
    generation takes minutes on two CPU cores and is covered by the ``cuda`` tests) and the run equals the eager
    copy. Refreshing the copy after each update writes into the same tensors and the changing number of rows the
    inversion evaluates turns dynamic on the second size, so three updates compile at most two graphs, no breaks."""
    from torch._dynamo.utils import counters

    real_compile, compiled = torch.compile, []

    def eager_backend_compile(function, **kwargs):
        compiled.append(function)
        return real_compile(function, backend="eager", **kwargs)

    model, data = demo_inputs["sdxl"]
    results = {}
    for use_compile in (False, True):
        torch._dynamo.reset()
        counters.clear()
        monkeypatch.setattr(torch, "compile", eager_backend_compile)
        config = SmPOConfig(pretrained_model_name_or_path=model, dataset_name=data,
                            output_dir=str(tmp_path / f"o{use_compile}"), resolution=32, train_batch_size=2,
                            max_train_steps=3, report_to="none", learning_rate=1e-3,
                            seed=0, inversion_weight_copy=True, compile_inversion_copy=use_compile)
        trainer = SmPOTrainer(config)
        rows, residuals = [], record_inversion_residuals(trainer)
        trainer.inversion_copy.module.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
        assert np.isfinite(trainer.train()["loss"])
        assert sum(rows) == trainer.unet_evaluations["inversion"] > 0  # hooks still see every call
        results[use_compile] = (torch.cat(residuals), [p.detach().clone() for p in trainer.trainable_params])
        if use_compile:
            assert compiled == [trainer.inversion_copy.module.forward._torchdynamo_orig_callable]
            assert counters["stats"]["unique_graphs"] == min(2, len(set(rows))), (dict(counters["stats"]), rows)
            assert not counters["graph_break"], dict(counters["graph_break"])
        else:
            assert compiled == [] and counters["stats"]["unique_graphs"] == 0
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_variant_files_and_a_separate_vae_are_what_gets_loaded(tmp_path):
    """--variant picks the variant's weight files (a folder holding only fp16-named files loads with it and not
    without it); --pretrained_vae_model_name_or_path replaces the pipeline's VAE."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from smpo_diffusers.models import load_diffusion_parts
    from smpo_diffusers.testing import save_tiny_pipeline

    base = save_tiny_pipeline(str(tmp_path / "base"), kind="sd", seed=0)
    StableDiffusionPipeline.from_pretrained(base).save_pretrained(str(tmp_path / "variant"), variant="ema")
    config = SmPOConfig(pretrained_model_name_or_path=str(tmp_path / "variant"), variant="ema", report_to="none")
    parts = load_diffusion_parts(config)
    reference = StableDiffusionPipeline.from_pretrained(base)
    for loaded, saved in ((parts.unet, reference.unet), (parts.vae, reference.vae),
                          (parts.text_encoders[0], reference.text_encoder)):
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
    with pytest.raises((OSError, ValueError)):
        load_diffusion_parts(SmPOConfig(pretrained_model_name_or_path=str(tmp_path / "variant"), report_to="none"))

    other_vae = os.path.join(save_tiny_pipeline(str(tmp_path / "other"), kind="sd", seed=1), "vae")
    parts = load_diffusion_parts(SmPOConfig(pretrained_model_name_or_path=base, report_to="none",
                                            pretrained_vae_model_name_or_path=other_vae))
    wanted = AutoencoderKL.from_pretrained(other_vae).state_dict()
    assert all(torch.equal(parts.vae.state_dict()[name], value) for name, value in wanted.items())
    assert not torch.equal(parts.vae.state_dict()["encoder.conv_in.weight"],
                           reference.vae.state_dict()["encoder.conv_in.weight"])


def test_revision_and_cache_dir_read_that_snapshot_of_a_hub_model(tmp_path, demo_inputs):
    """--revision (a branch, tag or commit) and --cache_dir select what is read for a Hub id, offline here from a
    Hub cache laid out as huggingface_hub writes it: the training parts and --save_full_pipeline's re-read of the
    base both come from the requested snapshot, not from the default branch or the default cache."""
    from diffusers import StableDiffusionPipeline

    from smpo_diffusers.models import load_diffusion_parts
    from smpo_diffusers.testing import add_to_hub_cache, save_tiny_pipeline
    from smpo_diffusers.trainer import SmPOTrainer

    cache, repo_id = str(tmp_path / "hub-cache"), "someone/tiny-sd"
    main_commit, v1_commit = "a" * 40, "b" * 40
    for seed, commit, refs in ((0, main_commit, ("main",)), (1, v1_commit, ("v1",))):
        add_to_hub_cache(save_tiny_pipeline(str(tmp_path / f"seed{seed}"), kind="sd", seed=seed), cache, repo_id,
                         commit, refs=refs)
    snapshots = {revision: StableDiffusionPipeline.from_pretrained(str(tmp_path / f"seed{seed}"))
                 for revision, seed in ((None, 0), ("v1", 1))}

    def same_weights(module, wanted):
        return all(torch.equal(module.state_dict()[name], value) for name, value in wanted.state_dict().items())

    for revision, expected in ((None, None), ("v1", "v1"), (v1_commit, "v1"), ("main", None)):
        parts = load_diffusion_parts(SmPOConfig(pretrained_model_name_or_path=repo_id, cache_dir=cache,
                                                revision=revision, report_to="none"))
        assert same_weights(parts.unet, snapshots[expected].unet), revision
        assert same_weights(parts.vae, snapshots[expected].vae), revision
        assert same_weights(parts.text_encoders[0], snapshots[expected].text_encoder), revision
    with pytest.raises(OSError):  # the default cache does not hold it: cache_dir is what found it
        load_diffusion_parts(SmPOConfig(pretrained_model_name_or_path=repo_id, report_to="none"))
    with pytest.raises(OSError):
        load_diffusion_parts(SmPOConfig(pretrained_model_name_or_path=repo_id, cache_dir=cache, revision="v2",
                                        report_to="none"))

    _, data = demo_inputs["sd"]
    trainer = SmPOTrainer(SmPOConfig(pretrained_model_name_or_path=repo_id, cache_dir=cache, revision="v1",
                                     dataset_name=data, output_dir=str(tmp_path / "out"), resolution=32,
                                     train_method="full", save_full_pipeline=True, report_to="none"))
    trainer.save_model()
    saved = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    assert same_weights(saved.vae, snapshots["v1"].vae) and same_weights(saved.text_encoder,
                                                                         snapshots["v1"].text_encoder)


def test_parameters_swapped_exchanges_storages_and_always_swaps_back():
    from smpo_diffusers.models import parameters_swapped

    params = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([3.0]))]
    others = [torch.tensor([10.0, 20.0]), torch.tensor([30.0])]
    storage = params[0].data_ptr()
    with parameters_swapped(params, others):
        assert params[0].tolist() == [10.0, 20.0] and params[1].tolist() == [30.0]
        assert others[0].tolist() == [1.0, 2.0] and others[0].data_ptr() == storage  # moved, not copied
    assert params[0].tolist() == [1.0, 2.0] and others[1].tolist() == [30.0] and params[0].data_ptr() == storage
    with pytest.raises(RuntimeError, match="inside"), parameters_swapped(params, others):
        raise RuntimeError("a failure inside")
    assert params[1].tolist() == [3.0] and others[0].tolist() == [10.0, 20.0]
    with pytest.raises(ValueError):  # one replacement per parameter
        with parameters_swapped(params, others[:1]):
            pass
    assert params[0].tolist() == [1.0, 2.0] and params[1].tolist() == [3.0]
