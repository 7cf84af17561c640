import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from repo_scripts import load_script
from smpo_diffusers import SmPOConfig, SmPOTrainer
from smpo_diffusers.testing import save_tiny_pipeline


def make_config(tmp_path, model, data, **overrides):
    options = dict(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(tmp_path / "out"),
                   resolution=32, train_batch_size=2, max_train_steps=2, report_to="none", learning_rate=1e-3,
                   checkpointing_steps=1000, proportion_empty_prompts=0.2, seed=0)
    options.update(overrides)
    return SmPOConfig(**options)


def lora_weights(path):
    return load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))


def test_sdxl_lora_trains_saves_and_loads_into_the_pipeline(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    config = make_config(tmp_path, model, data, validation_prompts=["a red circle on a blue background"],
                         validation_num_inference_steps=2, rank=4, lora_alpha=16)
    trainer = SmPOTrainer(config)
    # One UNet in memory: the reference is the policy with adapters disabled.
    assert trainer.reference.frozen_unet is None
    unets = [m for m in vars(trainer).values() if isinstance(m, UNet2DConditionModel)]
    assert len(unets) <= 1 and trainer.parts.unet is trainer.unwrapped_unet
    trainable = [p for p in trainer.unwrapped_unet.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert sum(p.numel() for p in trainable) < 0.2 * sum(p.numel() for p in trainer.unwrapped_unet.parameters())
    metrics = trainer.train()
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["implicit_acc"] <= 1
    out = config.output_dir
    for name in ("pytorch_lora_weights.safetensors", "training_config.json", "training_metrics.json",
                 "validation.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    saved = json.load(open(os.path.join(out, "training_config.json")))
    assert saved["model_family"] == "sdxl" and saved["reward_scale_source"].endswith("reward_stats.json")
    labelled_with = json.load(open(os.path.join(data, "reward_stats.json")))["reward_model"]
    assert labelled_with and saved["reward_model"] == labelled_with  # the card names it from any folder
    assert saved["num_inversion_steps"] == 10 and saved["beta_dpo"] == 5000.0

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np")
    before = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")  # diffusers 0.34 needs the name offline
    after = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(before - after).max() > 1e-4
    # the loaded adapter is the trained one, lora_alpha included (it scales the update by alpha / rank)
    trained = StableDiffusionXLPipeline.from_pretrained(model, unet=trainer.unwrapped_unet)
    trained.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(trained(generator=torch.Generator().manual_seed(0), **kwargs).images, after,
                               atol=1e-5)


def test_sd_full_unet_with_reference_inversion_and_full_pipeline(tmp_path, demo_inputs):
    model, data = demo_inputs["sd"]
    config = make_config(tmp_path, model, data, train_method="full", inversion_model="reference",
                         learning_rate=1e-4, save_full_pipeline=True, use_adafactor=True)
    trainer = SmPOTrainer(config)
    assert trainer.reference.frozen_unet is not None
    assert not any(p.requires_grad for p in trainer.reference.frozen_unet.parameters())
    initial = {k: v.clone() for k, v in trainer.reference.frozen_unet.state_dict().items()}
    trainer.train()
    # the reference stays frozen while the policy moves
    assert all(torch.equal(v, trainer.reference.frozen_unet.state_dict()[k]) for k, v in initial.items())
    unet = UNet2DConditionModel.from_pretrained(config.output_dir, subfolder="unet")
    moved = max((unet.state_dict()[k] - v).abs().max().item() for k, v in initial.items())
    assert moved > 0
    pipe = StableDiffusionPipeline.from_pretrained(config.output_dir, safety_checker=None)
    # the saved pipeline samples like the base: its own scheduler class and options (not the DDIM of validation)
    saved, base = (json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
                   for folder in (config.output_dir, model))
    assert {k: v for k, v in saved.items() if k != "_diffusers_version"} == {
        k: v for k, v in base.items() if k != "_diffusers_version"}
    assert type(pipe.scheduler).__name__ == base["_class_name"]
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    assert trainer.parts.is_sdxl is False and config.num_inversion_steps == 5 and config.beta_dpo == 2000.0


@pytest.mark.parametrize("loss_type,noise_source,grid,renoise,num_steps", [
    ("smpo", "inversion", "exact", 1, None),
    ("smpo", "inversion", "reference", 1, None),
    ("smpo", "inversion", "exact", 0, None),
    ("smpo", "inversion", "exact", 1, 3),  # --num_inversion_steps 3 instead of SDXL's 10
    ("smpo", "random", "exact", 1, None),
    ("dpo", "inversion", "exact", 1, None),
    ("dpo", "random", "exact", 1, None),
])
def test_modes_count_unet_evaluations_and_use_the_right_labels(tmp_path, demo_inputs, loss_type, noise_source,
                                                               grid, renoise, num_steps):
    model, data = demo_inputs["sdxl"]
    config = make_config(tmp_path, model, data, loss_type=loss_type, noise_source=noise_source,
                         inversion_grid=grid, num_renoise_steps=renoise, max_train_steps=1,
                         num_inversion_steps=num_steps)
    trainer = SmPOTrainer(config)
    calls = []
    handle = trainer.unwrapped_unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    batch = next(iter(trainer.train_dataloader))
    step = trainer.compute_loss(batch, torch.Generator().manual_seed(0))
    handle.remove()
    pairs = batch["pixel_values"].shape[0]
    t = step.timesteps
    if noise_source == "random":
        expected_inversion = 0
    else:
        steps = trainer.parts.scheduler.inversion_schedule(t.repeat(2), config.num_inversion_steps, grid)[1]
        expected_inversion = int(steps.sum()) * (renoise + 1)
    assert step.unet_evaluations == {"inversion": expected_inversion, "policy": 2 * pairs, "reference": 2 * pairs}
    # The policy is the only UNet; every sample-evaluation goes through it (LoRA: adapters toggled).
    assert sum(calls) == expected_inversion + 4 * pairs
    if loss_type == "smpo":
        torch.testing.assert_close(step.weight, 10 * (2 * batch["prob_w"] - 1))
        assert torch.all(batch["prob_w"] >= 0.5)
    else:
        assert torch.all(step.weight == 1.0)
    # At initialisation LoRA is a no-op: policy and reference errors agree, loss is log 2.
    torch.testing.assert_close(step.policy_err_w, step.ref_err_w)
    assert step.loss.item() == pytest.approx(np.log(2), abs=1e-6)


def test_v_prediction_trains_on_the_velocity_of_the_inverted_latent(tmp_path, demo_inputs):
    model = save_tiny_pipeline(str(tmp_path / "vpred"), kind="sd", prediction_type="v_prediction")
    _, data = demo_inputs["sd"]
    config = make_config(tmp_path, model, data, max_train_steps=1)
    trainer = SmPOTrainer(config)
    assert trainer.parts.prediction_type == "v_prediction"
    scheduler = trainer.parts.scheduler
    seen = {}
    original = scheduler.get_velocity

    def spy(sample, noise, timesteps):
        seen["args"] = (sample, noise, timesteps)
        return original(sample, noise, timesteps)

    scheduler.get_velocity = spy
    batch = next(iter(trainer.train_dataloader))
    step = trainer.compute_loss(batch, torch.Generator().manual_seed(0))
    x0, noise, t = seen["args"]
    assert x0.shape[0] == 2 * batch["pixel_values"].shape[0] and torch.equal(t[: len(step.timesteps)], step.timesteps)
    assert torch.isfinite(step.loss)
    metrics = trainer.train()
    assert np.isfinite(metrics["loss"])


def run_with_interrupt(config, stop_after_checkpoint=None):
    class Interrupted(Exception):
        pass

    class InterruptingTrainer(SmPOTrainer):
        def save_checkpoint(self, global_step, epoch, next_batch):
            path = super().save_checkpoint(global_step, epoch, next_batch)
            if stop_after_checkpoint is not None and global_step == stop_after_checkpoint:
                raise Interrupted
            return path

    trainer = InterruptingTrainer(config)
    try:
        trainer.train()
    except Interrupted:
        return None
    return trainer


@pytest.mark.parametrize("cached", [False, True], ids=["pixels", "latent-cache"])
def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, demo_inputs, cached):
    model, data = demo_inputs["sdxl"]
    # 14 pairs at batch 2 -> 7 micro-batches per epoch -> 4 updates (the last one a single micro-batch).
    # Stopping after update 5 resumes in the middle of the second epoch, through accelerate's
    # skip_first_batches, with random crops (cached: flips) that depend on the epoch. The cached run also reads
    # through two DataLoader workers; the pixel run keeps an --use_ema average (saved as the final weights), which
    # the checkpoint must bring back with its update count.
    augmentation = (dict(cache_latents=True, latent_cache_dir=str(tmp_path / "cache"), dataloader_num_workers=2)
                    if cached else dict(random_crop=True, use_ema=True, ema_decay=0.5))
    common = dict(max_train_steps=6, gradient_accumulation_steps=2, checkpointing_steps=5, train_batch_size=2,
                  lr_scheduler="cosine", lr_warmup_steps=1, **augmentation)
    full = make_config(tmp_path / "a", model, data, **common)
    run_with_interrupt(full)
    interrupted = make_config(tmp_path / "b", model, data, **common)
    assert run_with_interrupt(interrupted, stop_after_checkpoint=5) is None
    state = json.load(open(os.path.join(interrupted.output_dir, "checkpoint-5", "trainer_state.json")))
    assert (state["epoch"], state["next_batch"]) == (1, 2)
    checkpoint_files = os.listdir(os.path.join(interrupted.output_dir, "checkpoint-5"))
    assert ("ema.safetensors" in checkpoint_files) == (not cached)  # the average: safetensors, no pickle
    assert not [name for name in checkpoint_files if name.startswith("custom_checkpoint")]
    if not cached:  # a checkpoint without the average (or with another one) cannot resume an --use_ema run
        with pytest.raises(ValueError, match=re.escape("average settings (ema_decay 0.5 -> 0.9)")):
            SmPOTrainer(make_config(tmp_path / "b", model, data, resume_from_checkpoint="latest",
                                    **(common | {"ema_decay": 0.9}))).train()
        damaged = tmp_path / "no-average"
        shutil.copytree(os.path.join(interrupted.output_dir, "checkpoint-5"), damaged / "checkpoint-5")
        os.remove(damaged / "checkpoint-5" / "ema.safetensors")
        with pytest.raises(ValueError, match=r"with --use_ema: it holds no average \(ema\.safetensors"):
            SmPOTrainer(make_config(damaged, model, data, resume_from_checkpoint=str(damaged / "checkpoint-5"),
                                    output_dir=str(damaged), **common)).train()
    resumed = make_config(tmp_path / "b", model, data, resume_from_checkpoint="latest", **common)
    trainer = run_with_interrupt(resumed)
    assert trainer.global_step == 6
    if not cached:
        assert trainer.ema.optimization_step == 6
    a, b = lora_weights(full.output_dir), lora_weights(resumed.output_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_limit_and_partial_checkpoints_are_ignored(tmp_path, demo_inputs, monkeypatch):
    import shutil

    import smpo_diffusers.trainer as trainer_module

    model, data = demo_inputs["sdxl"]
    config = make_config(tmp_path, model, data, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=2)
    os.makedirs(os.path.join(config.output_dir, ".checkpoint-7.tmp"))
    os.makedirs(os.path.join(config.output_dir, "checkpoint-9"))  # no trainer_state.json: incomplete
    trainer = SmPOTrainer(config)
    # a crash in the middle of pruning (here: the deletion never runs) leaves no visible half checkpoint
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(trainer_module.shutil, "rmtree", lambda path, *args, **kwargs: None
                        if ".deleting" in str(path) else real_rmtree(path, *args, **kwargs))
    trainer.train()
    monkeypatch.undo()
    names = sorted(n for n in os.listdir(config.output_dir) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-3", "checkpoint-9"]
    assert not os.path.exists(os.path.join(config.output_dir, ".checkpoint-7.tmp"))
    assert sorted(n for n in os.listdir(config.output_dir) if n.startswith(".")) == [".checkpoint-1.deleting.tmp"]
    trainer._clean_partial_checkpoints()  # what the next run does first
    assert not [n for n in os.listdir(config.output_dir) if n.startswith(".")]
    assert [step for step, _ in trainer._checkpoints()] == [2, 3]
    ckpt = os.path.join(config.output_dir, "checkpoint-3")
    assert os.path.isfile(os.path.join(ckpt, "pytorch_lora_weights.safetensors"))
    assert not any(name.endswith((".bin", ".pt", ".pkl")) and "model" in name for name in os.listdir(ckpt))


def test_intervals_a_run_never_reaches_are_reported_before_training(tmp_path, demo_inputs, caplog):
    model, data = demo_inputs["sd"]
    config = make_config(tmp_path, model, data, max_train_steps=2, checkpoints_total_limit=2,
                         validation_prompts=["a red circle"], validation_steps=2)
    with caplog.at_level("WARNING", logger="smpo_diffusers"):
        SmPOTrainer(config)
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "--checkpoints_total_limit 2 has nothing to prune: --checkpointing_steps 1000 is more than this run's 2 " \
           "updates" in messages
    assert "--validation_steps 2 is not below this run's 2 updates: only the final validation images" in messages
    caplog.clear()
    with caplog.at_level("WARNING", logger="smpo_diffusers"):
        SmPOTrainer(make_config(tmp_path, model, data, max_train_steps=3, checkpointing_steps=3,
                                checkpoints_total_limit=2, validation_prompts=["a red circle"], validation_steps=2))
    assert "nothing to prune" not in caplog.text and "--validation_steps" not in caplog.text


def test_checkpoints_of_another_run_and_a_changed_data_layout_are_refused(tmp_path, demo_inputs):
    """Resuming from an older checkpoint (or starting afresh) beside a later run's checkpoints would let 'latest'
    and the checkpoint limit confuse the two runs; resuming under another batch layout would point the saved
    position at other pairs. Both fail before training, naming the fix."""
    model, data = demo_inputs["sdxl"]
    options = dict(max_train_steps=4, checkpointing_steps=2)
    first = make_config(tmp_path, model, data, **options)
    SmPOTrainer(first).train()
    final = json.load(open(os.path.join(first.output_dir, "training_metrics.json")))
    # a run killed after its last checkpoint (while saving or uploading) and resumed keeps its final metrics
    SmPOTrainer(make_config(tmp_path, model, data, resume_from_checkpoint="latest", **options)).train()
    again = json.load(open(os.path.join(first.output_dir, "training_metrics.json")))
    assert again["final_metrics"] == final["final_metrics"] and again["final_metrics"]["loss"] is not None
    assert again["global_step"] == 4
    older = os.path.join(first.output_dir, "checkpoint-2")
    with pytest.raises(ValueError, match=r"checkpoints past update 2 \(checkpoint-4\) from another run"):
        SmPOTrainer(make_config(tmp_path, model, data, resume_from_checkpoint=older, **options)).train()
    # a bare checkpoint name is looked up in --output_dir, as in diffusers' scripts
    assert make_config(tmp_path, model, data, resume_from_checkpoint="checkpoint-2").resume_from_checkpoint == older
    with pytest.raises(ValueError, match=r"checkpoints past update 2 \(checkpoint-4\) from another run"):
        SmPOTrainer(make_config(tmp_path, model, data, resume_from_checkpoint="checkpoint-2", **options)).train()
    with pytest.raises(ValueError, match=r"past update 0 \(checkpoint-2, checkpoint-4\).*--resume_from_checkpoint"):
        SmPOTrainer(make_config(tmp_path, model, data, **options)).train()
    with pytest.raises(ValueError, match=r"data layout changed \(train_batch_size 2 -> 4\)"):
        SmPOTrainer(make_config(tmp_path, model, data, max_train_steps=5, train_batch_size=4,
                                resume_from_checkpoint="latest")).train()
    with pytest.raises(ValueError, match=r"data layout changed \(pairs_sha256 [0-9a-f]{12}\.\.\. -> "
                                         r"[0-9a-f]{12}\.\.\.\)"):
        SmPOTrainer(make_config(tmp_path, model, data, max_train_steps=5, loss_type="dpo", beta_dpo=5000.0,
                                resume_from_checkpoint="latest")).train()
    with pytest.raises(ValueError, match=r"seed 0 -> 1, num_pairs"):
        SmPOTrainer(make_config(tmp_path, model, data, max_train_steps=5, seed=1, max_train_samples=10,
                                resume_from_checkpoint="latest")).train()
    # the checkpoint's optimiser state would bring back its own learning rate / Adam settings (the records would
    # show the new ones), and its adapter weights mean something else under another alpha
    for changed, listed in [(dict(learning_rate=5e-4), "effective_learning_rate 0.001 -> 0.0005"),
                            (dict(adam_weight_decay=0.5), "adam_weight_decay 0.01 -> 0.5"),
                            (dict(lora_alpha=32), "lora_alpha 8 -> 32"),
                            (dict(use_ema=True), "use_ema False -> True")]:
        with pytest.raises(ValueError, match=re.escape(f"other optimiser, adapter or average settings ({listed})")):
            SmPOTrainer(make_config(tmp_path, model, data, max_train_steps=5, resume_from_checkpoint="latest",
                                    **changed)).train()
    with pytest.raises(ValueError, match=r"at update 4, past this run's length of 3 updates\. Give a "
                                         r"--max_train_steps of at least 4"):
        SmPOTrainer(make_config(tmp_path, model, data, max_train_steps=3, resume_from_checkpoint="latest")).train()
    # A base of the same shape loads without complaint, but the policy would go on from the checkpoint's base
    # while the reference and the latents come from the other one.
    other_base = save_tiny_pipeline(tmp_path / "other-base", "sdxl", seed=1)
    with pytest.raises(ValueError, match=re.escape(f"another base model or VAE (pretrained_model_name_or_path "
                                                   f"{os.path.abspath(model)} -> {os.path.abspath(other_base)})")):
        SmPOTrainer(make_config(tmp_path, model, data, max_train_steps=5, resume_from_checkpoint="latest",
                                pretrained_model_name_or_path=other_base)).train()
    # the same base under a relative path is the same base
    resumed = SmPOTrainer(make_config(tmp_path, model, data, max_train_steps=5, resume_from_checkpoint="latest",
                                      pretrained_model_name_or_path=os.path.relpath(model)))
    resumed.train()
    assert resumed.global_step == 5
    recorded = json.load(open(os.path.join(first.output_dir, "training_config.json")))
    assert recorded["pretrained_model_name_or_path"] == os.path.abspath(model)  # evaluate.py finds it from anywhere
    assert recorded["dataset_name"] == os.path.abspath(data)
    metrics = json.load(open(os.path.join(first.output_dir, "training_metrics.json")))
    assert metrics["unet_evaluations"]["policy"] == 5 * 2 * 2  # 5 updates x 2 pairs x 2 images, carried over


def test_a_damaged_checkpoint_is_reported_with_the_one_to_resume_from(tmp_path, demo_inputs):
    """A truncated file in the latest checkpoint (a bad copy, a disk fault) gives an error naming the checkpoint
    and the earlier one to resume from, not a safetensors/pickle/JSON traceback without a path."""
    model, data = demo_inputs["sd"]
    options = dict(max_train_steps=4, checkpointing_steps=2, loss_type="dpo", noise_source="random")
    SmPOTrainer(make_config(tmp_path, model, data, **options)).train()
    out = tmp_path / "out"
    for damaged in ["pytorch_lora_weights.safetensors", "optimizer.bin", "trainer_state.json"]:
        copy = tmp_path / f"copy-{damaged}"
        shutil.copytree(out, copy)
        target = copy / "checkpoint-4" / damaged
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        latest, earlier = (re.escape(str(copy / name)) for name in ("checkpoint-4", "checkpoint-2"))
        pattern = (rf"checkpoint {latest} cannot be read \(.*\); it is damaged: move it away and resume from "
                   rf"an earlier one \(--resume_from_checkpoint {earlier}; present: checkpoint-2\)")
        with pytest.raises(OSError, match=pattern):
            SmPOTrainer(make_config(tmp_path, model, data, output_dir=str(copy), resume_from_checkpoint="latest",
                                    **options)).train()
    # an intact checkpoint of another base model is not called damaged (moving it away would lose it): its
    # record names the other base; a checkpoint written before that record fails to load, and says why
    other_base = demo_inputs["sdxl"][0]
    with pytest.raises(ValueError, match=r"checkpoint-4: it was trained from another base model or VAE"):
        SmPOTrainer(make_config(tmp_path, other_base, data, resume_from_checkpoint="latest", **options)).train()
    state_file = out / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["base_model"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint-4 does not fit this run's model \(RuntimeError: "
                                         r".*\): it was trained from another base model"):
        SmPOTrainer(make_config(tmp_path, other_base, data, resume_from_checkpoint="latest", **options)).train()
    # an explicit older checkpoint that is damaged names only earlier ones
    damaged = out / "checkpoint-2" / "optimizer.bin"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(OSError, match=r"checkpoint-2 cannot be read .* start again without --resume_from_checkpoint "
                                      r"\(no earlier checkpoint exists\)"):
        SmPOTrainer(make_config(tmp_path, model, data, max_train_steps=4, checkpointing_steps=2, loss_type="dpo",
                                noise_source="random", resume_from_checkpoint=str(out / "checkpoint-2"))).train()


class NaNLossOnce(SmPOTrainer):
    """Makes the loss of one chosen micro-batch NaN (as an fp16 blow-up would)."""

    nan_at = 3

    def compute_loss(self, batch, generator):
        step = super().compute_loss(batch, generator)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.nan_at:
            step.loss = step.loss * float("nan")
        return step


def test_fp16_loss_scaling_survives_a_skipped_update(tmp_path, demo_inputs):
    """On CUDA, --mixed_precision fp16 makes accelerate scale the loss with a GradScaler. Simulated on the CPU
    with torch's CPU GradScaler: a NaN loss in the first micro-batch of update 2 (of 2) skips that update as
    non-finite (not as an fp16 overflow), the scaler's cycle is closed (its scale backs off) and the next
    updates run; before, the next clip failed with "unscale_() has already been called"."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=2)
    accelerator.scaler = torch.amp.GradScaler("cpu")
    accelerator.native_amp = True
    accelerator.state._mixed_precision = "fp16"
    model, data = demo_inputs["sdxl"]
    trainer = NaNLossOnce(make_config(tmp_path, model, data, max_train_steps=4, gradient_accumulation_steps=2,
                                      use_ema=True), accelerator=accelerator)
    trainer.train()
    assert trainer.global_step == 4 and trainer.calls == 7  # 14 pairs: the last update has one micro-batch
    assert trainer.skipped["nonfinite_updates"] == 1  # the NaN micro-batch, not mistaken for an fp16 overflow
    assert trainer.ema.optimization_step == 3 - trainer.skipped["fp16_overflow_updates"]  # applied updates only
    # Every skipped update, ours or a genuine fp16 overflow the scaler caught, halved the scale exactly once.
    skips = trainer.skipped["nonfinite_updates"] + trainer.skipped["fp16_overflow_updates"]
    assert accelerator.scaler.get_scale() == 65536.0 * 0.5 ** skips
    assert all(torch.isfinite(p).all() for p in trainer.trainable_params)


class RecordsUpdates(SmPOTrainer):
    """Keeps the trainable parameters after every update, and those the UNet holds while it renders."""

    def __init__(self, config):
        super().__init__(config)
        self.initial = [p.detach().clone() for p in self.trainable_params]
        self.after_updates, self.rendered = [], []
        self.unwrapped_unet.register_forward_pre_hook(self._record_rendering)

    def _record_rendering(self, module, args):  # validation renders in eval mode, training runs in train mode
        if not module.training and (not self.rendered or self.rendered[-1][0] != self.global_step):
            self.rendered.append((self.global_step, [p.detach().clone() for p in self.trainable_params]))

    def _finish_update(self):
        super()._finish_update()
        self.after_updates.append([p.detach().clone() for p in self.trainable_params])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_use_ema_saves_and_renders_the_average_and_trains_on(tmp_path, demo_inputs, method):
    """--use_ema: diffusers' EMAModel takes one step per applied update, with decay min(ema_decay, (1+n)/(10+n))
    (0 for update n = 0): recomputed here from the weights after each update. The validation images (update 2)
    and the saved weights (update 3) are the average's; training itself goes on from the trained weights."""
    from smpo_diffusers.models import save_lora

    model, data = demo_inputs["sd"]
    config = make_config(tmp_path, model, data, train_method=method, use_ema=True, ema_decay=0.2,
                         max_train_steps=3, learning_rate=1e-3 if method == "lora" else 1e-4,
                         validation_prompts=["a red circle"], validation_steps=2, validation_num_inference_steps=1)
    trainer = RecordsUpdates(config)
    trainer.train()
    assert len(trainer.after_updates) == 3
    expected, averages = [p.clone() for p in trainer.initial], []
    for n, weights in enumerate(trainer.after_updates):
        decay = 0.0 if n == 0 else min(0.2, (1 + n) / (10 + n))  # update 1: 2/11 < 0.2; update 2: 0.2 (capped)
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
        averages.append(expected)

    def close(a, b):
        return all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a, b))

    assert not close(averages[-1], trainer.after_updates[-1])  # the average is not the trained weights
    # training goes on from (and ends with) the trained weights, not the average swapped in for the renders
    assert all(torch.equal(p, w) for p, w in zip(trainer.trainable_params, trainer.after_updates[-1]))
    assert [step for step, _ in trainer.rendered] == [2, 3]
    assert close(trainer.rendered[0][1], averages[1]) and close(trainer.rendered[1][1], averages[2])
    unet = trainer.unwrapped_unet
    for p, value in zip(trainer.trainable_params, averages[-1]):
        p.data.copy_(value)
    if method == "lora":
        save_lora(str(tmp_path / "wanted"), unet, is_sdxl=False)
        saved, wanted = lora_weights(config.output_dir), lora_weights(tmp_path / "wanted")
        assert saved.keys() == wanted.keys()
        assert all(torch.allclose(saved[k], wanted[k], rtol=1e-5, atol=1e-7) for k in saved)
    else:
        saved = UNet2DConditionModel.from_pretrained(config.output_dir, subfolder="unet").state_dict()
        assert all(torch.allclose(saved[k], v, rtol=1e-5, atol=1e-7) for k, v in unet.state_dict().items())
    metrics = json.load(open(os.path.join(config.output_dir, "training_metrics.json")))
    assert metrics["ema"] == {"decay": 0.2, "updates": 3, "last_decay": 0.2}
    card = open(os.path.join(config.output_dir, "README.md")).read()
    assert "exponential moving average of the trained weights (diffusers EMAModel, decay at most 0.2)" in card


def test_every_pair_weighs_the_same_in_an_update(tmp_path, demo_inputs):
    """14 pairs in micro-batches of 4, two per update: updates of 4 + 4 and of 4 + 2 pairs. With the probe loss
    (tests/scripts/record_training.py: its gradient is the mean of pair index + 1 over a micro-batch), each
    update steps with the mean over its own pairs; a mean of micro-batch means would give the 2-pair micro-batch
    the weight of 4 pairs."""
    record_training = load_script("tests/scripts/record_training.py")

    class ProbeTrainer(record_training.RecordingTrainer):
        probe_loss = True

    model, data = demo_inputs["sd"]
    trainer = ProbeTrainer(make_config(tmp_path, model, data, train_batch_size=4, gradient_accumulation_steps=2,
                                       max_train_steps=2, max_grad_norm=0, loss_type="dpo", noise_source="random"))
    trainer.train()
    assert trainer.micro_batch_sizes == [4, 4, 4, 2]
    updates = [trainer.seen[0] + trainer.seen[1], trainer.seen[2] + trainer.seen[3]]
    np.testing.assert_allclose(trainer.step_gradients, [np.mean(np.array(pairs) + 1) for pairs in updates],
                               rtol=1e-6)


def test_reward_scale_sources(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    stats = json.load(open(os.path.join(data, "reward_stats.json")))
    trainer = SmPOTrainer(make_config(tmp_path, model, data))
    assert trainer.reward_scale == pytest.approx(stats["suggested_scale"])
    trainer = SmPOTrainer(make_config(tmp_path, model, data, reward_scale=0.05))
    assert trainer.reward_scale == 0.05 and trainer.reward_scale_source == "--reward_scale"
    assert trainer.pairs["prob_w"][0] != pytest.approx(0.5)
    # Statistics of other columns (reward_0/1 of another reward model) must not set the scale of ps_score_0/1.
    from datasets import load_from_disk

    both = load_from_disk(data)
    both = both.add_column("ps_score_0", both["reward_0"]).add_column("ps_score_1", both["reward_1"])
    with pytest.raises(ValueError, match=r"describes the reward columns \['reward_0', 'reward_1'\].*--reward_scale"):
        SmPOTrainer(make_config(tmp_path, model, None, reward_columns=["ps_score_0", "ps_score_1"]), dataset=both,
                    reward_statistics=stats)


def test_missing_reward_columns_fail_before_any_model_is_loaded(tmp_path, demo_inputs):
    from smpo_diffusers.testing import make_preference_dataset

    raw = make_preference_dataset(num_pairs=4, seed=1)
    config = SmPOConfig(pretrained_model_name_or_path=str(tmp_path / "does-not-exist"), output_dir=str(tmp_path / "o"),
                        report_to="none")
    with pytest.raises(ValueError, match="label_rewards.py"):
        SmPOTrainer(config, dataset=raw)
    config = SmPOConfig(pretrained_model_name_or_path=str(tmp_path / "does-not-exist"), output_dir=str(tmp_path / "o"),
                        report_to="none", reward_columns=["ps_score_0", "ps_score_1"])
    with pytest.raises(ValueError, match="ps_score_0"):
        SmPOTrainer(config, dataset=raw)


def test_reference_script_reward_column_names_work(tmp_path, demo_inputs):
    from datasets import load_from_disk

    model, data = demo_inputs["sdxl"]
    renamed = load_from_disk(data).rename_columns({"reward_0": "ps_score_0", "reward_1": "ps_score_1"})
    trainer = SmPOTrainer(make_config(tmp_path, model, None, reward_scale=0.1), dataset=renamed)
    assert trainer.reward_columns == ("ps_score_0", "ps_score_1")


def test_bad_resolution_for_the_model(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    with pytest.raises(ValueError, match="--resolution 30 must be divisible by the VAE downsampling factor 4"):
        SmPOTrainer(make_config(tmp_path, model, data, resolution=30))


@pytest.mark.parametrize("how", ["flag", "accelerate-config"])
def test_lora_parameters_stay_fp32_under_bf16(tmp_path, demo_inputs, monkeypatch, how):
    model, data = demo_inputs["sdxl"]
    if how == "flag":
        config = make_config(tmp_path, model, data, mixed_precision="bf16", max_train_steps=1)
    else:  # what `accelerate config` / `accelerate launch --mixed_precision bf16` hands the process
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        config = make_config(tmp_path, model, data, max_train_steps=1)
    trainer = SmPOTrainer(config)
    assert trainer.weight_dtype == torch.bfloat16
    unet = trainer.unwrapped_unet
    lora = [p for n, p in unet.named_parameters() if "lora" in n]
    frozen = [p for n, p in unet.named_parameters() if "lora" not in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    metrics = trainer.train()
    assert np.isfinite(metrics["loss"])
    assert all(p.dtype == torch.float32 for p in lora)


def test_saved_full_sd_pipeline_holds_the_base_components_as_stored(tmp_path, demo_inputs, caplog):
    """The VAE, text encoder and safety checker come from the base as stored (fp32 here), not the bf16 copies
    training casts."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from smpo_diffusers.testing import tiny_clip_model, tiny_sd_components

    _, data = demo_inputs["sd"]
    clip_config = tiny_clip_model()[0].config
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=clip_config.text_config.to_dict(),
                                                      vision_config=clip_config.vision_config.to_dict(),
                                                      projection_dim=16)).eval()
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    base = str(tmp_path / "base-with-checker")
    StableDiffusionPipeline(**(tiny_sd_components() | {"safety_checker": checker, "feature_extractor": extractor})
                            ).save_pretrained(base, safe_serialization=True)
    config = make_config(tmp_path, base, data, train_method="full", save_full_pipeline=True, max_train_steps=1,
                         mixed_precision="bf16")
    trainer = SmPOTrainer(config)
    assert trainer.parts.vae.dtype == torch.bfloat16 and trainer.parts.text_encoders[0].dtype == torch.bfloat16
    trainer.save_model()
    saved = StableDiffusionPipeline.from_pretrained(config.output_dir)
    assert isinstance(saved.safety_checker, StableDiffusionSafetyChecker) and saved.feature_extractor is not None
    assert saved.config.requires_safety_checker is True
    assert torch.equal(saved.safety_checker.concept_embeds, checker.concept_embeds)
    reloaded_base = StableDiffusionPipeline.from_pretrained(base)
    for name in ("vae", "text_encoder"):
        for key, value in getattr(reloaded_base, name).state_dict().items():
            assert torch.equal(getattr(saved, name).state_dict()[key], value), (name, key)
    assert saved.unet.dtype == torch.float32
    # validation renders without the checker; a base without one saves none (the other full-pipeline test)
    assert trainer.build_pipeline().safety_checker is None

    # in-process components: saved as held (the checker too), with a warning for the bf16 copies
    components = StableDiffusionPipeline.from_pretrained(base).components
    config = make_config(tmp_path, base, data, train_method="full", save_full_pipeline=True, max_train_steps=1,
                         mixed_precision="bf16", output_dir=str(tmp_path / "in-process"))
    trainer = SmPOTrainer(config, pipeline_components=components)
    with caplog.at_level("WARNING", logger="smpo_diffusers.trainer"):
        trainer.save_model()
    assert "saving the in-process AutoencoderKL, CLIPTextModel as training holds them" in caplog.text
    saved = StableDiffusionPipeline.from_pretrained(config.output_dir)
    assert isinstance(saved.safety_checker, StableDiffusionSafetyChecker)


def test_scale_lr_multiplies_by_the_effective_batch_and_is_recorded(tmp_path, demo_inputs):
    model, data = demo_inputs["sd"]
    config = make_config(tmp_path, model, data, scale_lr=True, learning_rate=1e-4, train_batch_size=2,
                         gradient_accumulation_steps=2, max_train_steps=1)
    trainer = SmPOTrainer(config)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(4e-4)
    trainer.train()
    saved = json.load(open(os.path.join(config.output_dir, "training_config.json")))
    assert saved["learning_rate"] == 1e-4 and saved["effective_learning_rate"] == pytest.approx(4e-4)


def test_non_default_options_reach_the_components(tmp_path, demo_inputs, caplog):
    """Options whose effect no other test observes: each must change what the trainer builds or computes."""
    import math

    from smpo_diffusers.losses import smpo_loss

    model, data = demo_inputs["sd"]
    config = make_config(tmp_path, model, data, rank=2, lora_alpha=6, lora_target_modules=["to_q", "to_k"],
                         adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, adam_weight_decay=0.05,
                         lr_scheduler="cosine_with_restarts", lr_warmup_steps=1, lr_num_cycles=2, max_train_steps=4,
                         gamma=2.0, beta_dpo=500.0, max_grad_norm=0.5, gradient_checkpointing=True,
                         random_crop=True, resolution=16, validation_prompts=["a red circle"], validation_steps=2,
                         validation_num_inference_steps=2, allow_tf32=True)
    with caplog.at_level("WARNING", logger="smpo_diffusers.trainer"):
        trainer = SmPOTrainer(config)
    if not torch.cuda.is_available():  # TF32 is a CUDA matmul mode: said, not silently ignored
        assert "--allow_tf32 has no effect without a CUDA GPU" in caplog.text
    else:
        assert torch.backends.cuda.matmul.allow_tf32
    unet = trainer.unwrapped_unet
    lora = unet.peft_config["default"]
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (2, 6, {"to_q", "to_k"})
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, _ in unet.named_parameters() if "lora_" in name} == {
        "to_q", "to_k"}
    defaults = trainer.optimizer.optimizer.defaults
    assert (defaults["betas"], defaults["eps"], defaults["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.05)
    assert unet.is_gradient_checkpointing
    # cosine with 2 hard restarts after 1 warm-up update over 4 updates (diffusers' formula)
    factor = trainer.lr_scheduler.scheduler.lr_lambdas[0]
    expected = [0.0] + [0.5 * (1 + math.cos(math.pi * ((2 * (s - 1) / 3) % 1.0))) for s in range(1, 4)]
    assert [factor(s) for s in range(4)] == pytest.approx(expected)
    transform = trainer.train_dataset.transform  # (tests/test_data.py checks what a random crop draws)
    assert (transform.random_crop, transform.hflip, transform.resolution) == (True, True, 16)
    # gamma and beta_dpo reach the loss (adapters moved off zero, so policy and reference differ)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    batch = next(iter(trainer.train_dataloader))
    step = trainer.compute_loss(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(step.weight, 2.0 * (2 * batch["prob_w"] - 1))
    expected_loss = smpo_loss(step.policy_err_w, step.policy_err_l, step.ref_err_w, step.ref_err_l, batch["prob_w"],
                              500.0, 2.0).loss
    torch.testing.assert_close(step.loss.detach(), expected_loss)
    assert abs(step.loss.item() - math.log(2)) > 1e-4
    # max_grad_norm reaches the clipping; validation renders every --validation_steps updates
    clipped = []
    real_clip = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda params, norm: clipped.append(norm) or real_clip(params, norm)
    trainer.train()
    assert clipped == [0.5] * 4
    assert sorted(name for name in os.listdir(config.output_dir) if name.startswith("validation")) == [
        "validation-step2.png", "validation.png"]  # step 4 is the last: the final image
    calls = []  # --validation_num_inference_steps 2: two (guidance-batched) UNet calls per prompt
    hook = unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    trainer.log_validation(99)
    hook.remove()
    assert calls == [2, 2]
    # num_train_epochs sets the length when max_train_steps is not given (2 pairs per update); tie_policy keep
    # keeps the 2 human ties the default drops (16 pairs instead of 14)
    epochs = SmPOTrainer(make_config(tmp_path, model, data, max_train_steps=None, num_train_epochs=3,
                                     tie_policy="keep", output_dir=str(tmp_path / "epochs")))
    assert epochs.pair_statistics.kept_ties == 2 and trainer.pair_statistics.dropped_ties == 2
    assert epochs.max_train_steps == 3 * math.ceil(len(epochs.train_dataset) / 2) == 24


def test_data_and_schedule_options_reach_the_pixel_path(tmp_path, demo_inputs):
    """--dataset_split_name, --no_hflip, --proportion_empty_prompts, --dataloader_num_workers and --lr_power as the
    trainer uses them without --cache_latents (tests/test_latent_cache.py covers the cached path)."""
    from datasets import DatasetDict, load_from_disk

    model, data = demo_inputs["sd"]
    DatasetDict({"holdout": load_from_disk(data).select(range(8))}).save_to_disk(str(tmp_path / "split"))
    trainer = SmPOTrainer(make_config(tmp_path, model, str(tmp_path / "split"), dataset_split_name="holdout",
                                      no_hflip=True, proportion_empty_prompts=0.5, dataloader_num_workers=1,
                                      lr_scheduler="polynomial", lr_power=2.0, max_train_steps=4))
    assert trainer.pair_statistics.total == 8  # the split's 8 rows, not the folder's default split
    assert trainer.train_dataset.transform.hflip is False
    assert trainer.train_dataset.proportion_empty_prompts == 0.5
    assert trainer.train_dataloader.num_workers == 1
    factor = trainer.lr_scheduler.scheduler.lr_lambdas[0]  # (1 - step / 4) ** 2, down to diffusers' lr_end 1e-7
    assert [factor(s) for s in range(5)] == pytest.approx([1.0, 0.5625, 0.25, 0.0625, 1e-4], abs=1e-4)


def test_update_metrics_average_per_pair_across_micro_batches():
    """A micro-batch of 1 pair and one of 3 pairs: the update's accuracy is 3 of 4 pairs, not the mean of the two
    micro-batch means; the residual averages its finite entries only; a metric no pair produced is left out."""
    import types

    from smpo_diffusers.trainer import StepOutput

    def step(correct, residual, loss):
        pairs = len(correct)
        ones = torch.ones(pairs)
        return StepOutput(loss=torch.tensor(loss), implicit_accuracy=torch.tensor(correct, dtype=torch.float32),
                          reward_margin=ones, weight=ones, policy_err_w=ones, policy_err_l=ones, ref_err_w=ones,
                          ref_err_l=ones, inversion_residual=torch.tensor(residual), timesteps=ones.long(),
                          unet_evaluations={})

    window = [step([0.0], [float("nan")], 4.0).metrics(),
              step([1.0, 1.0, 1.0], [1.0, 2.0, float("nan")], 0.0).metrics()]
    fake = types.SimpleNamespace(accelerator=types.SimpleNamespace(num_processes=1))
    logs = SmPOTrainer._reduce_metrics(fake, window)
    assert logs["implicit_acc"] == 0.75 and logs["loss"] == 1.0 and logs["inversion_residual"] == 1.5
    logs = SmPOTrainer._reduce_metrics(fake, [step([1.0], [float("nan")], 0.5).metrics()])
    assert "inversion_residual" not in logs and logs["loss"] == 0.5


def test_inversion_residual_is_logged_for_both_images_of_a_pair(tmp_path, demo_inputs):
    """The logged ReNoise residual of a pair is the mean of its winner's and its loser's, not the winner's alone."""
    model, data = demo_inputs["sd"]
    trainer = SmPOTrainer(make_config(tmp_path, model, data, train_batch_size=3, max_train_steps=1))
    inversions, original = [], trainer._invert

    def recording(*args, **kwargs):
        inversions.append(original(*args, **kwargs))
        return inversions[-1]

    trainer._invert = recording
    batch = next(iter(trainer.train_dataloader))
    step = trainer.compute_loss(batch, torch.Generator().manual_seed(0))
    residual = inversions[0].renoise_residual.cpu()
    assert residual.shape == (6,) and torch.isfinite(residual).all() and not torch.equal(residual[:3], residual[3:])
    torch.testing.assert_close(step.inversion_residual, (residual[:3] + residual[3:]) / 2)


def test_an_update_no_process_trained_takes_no_step_and_unscales_nothing(tmp_path, demo_inputs, monkeypatch):
    """With several processes an all-empty update arrives with the placeholder's zero gradients: no optimiser step
    (AdamW's decay would move the weights) and no clipping (clipping unscales fp16 gradients, and a scaler left
    unscaled-but-not-updated fails the next update). A trained update with the same zero gradients does step."""
    model, data = demo_inputs["sd"]
    trainer = SmPOTrainer(make_config(tmp_path, model, data, adam_weight_decay=0.5))
    before = [p.detach().clone() for p in trainer.trainable_params]
    for param in trainer.trainable_params:
        param.grad = torch.zeros_like(param)

    def no_clipping(*args, **kwargs):
        raise AssertionError("clip_grad_norm_ (which unscales) ran for an update that trained nothing")

    with monkeypatch.context() as patch:
        patch.setattr(trainer.accelerator, "clip_grad_norm_", no_clipping)
        trainer._pairs_in_update = False
        trainer._finish_update()
    assert all(p.grad is None for p in trainer.trainable_params)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.trainable_params))
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    for param in trainer.trainable_params:
        param.grad = torch.zeros_like(param)
    trainer._pairs_in_update = True
    trainer._finish_update()
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.trainable_params))  # decay moved them
