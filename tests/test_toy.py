import json
import math
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from repo_scripts import load_script
from smpo_diffusers import toy
from smpo_diffusers.toy import (TOY_ASSETS_DIR, TOY_COLOURS, TOY_SDXL_ASSETS_DIR, TOY_SDXL_TIME_IDS, ToyRewardModel,
                                build_toy_preferences, build_toy_sdxl_world, build_toy_world, colour_accuracy,
                                draw_toy_image, human_labels, load_toy_pipeline, parse_toy_caption, toy_caption_split,
                                toy_captions, toy_model_path, toy_reward_scores)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILDER_SCRIPT = os.path.join(REPO, "examples", "toy", "build_toy_world.py")
SDXL_BUILDER_SCRIPT = os.path.join(REPO, "examples", "toy", "build_toy_sdxl_world.py")


def test_captions_and_split():
    captions = toy_captions()
    assert len(captions) == len(set(captions)) == 8 * 4 * 7
    training, heldout = toy_caption_split()
    assert len(heldout) == 32 and not set(training) & set(heldout) and sorted(training + heldout) == sorted(captions)
    assert toy_caption_split() == (training, heldout)
    assert parse_toy_caption("a red circle on a blue background") == ("circle", "red", "blue")
    assert parse_toy_caption("something else") == (None, None, None)
    with pytest.raises(ValueError, match="name a colour"):
        draw_toy_image("a red circle", np.random.default_rng(0))


def test_reward_is_continuous_and_prefers_vivid_on_prompt_images():
    rng = np.random.default_rng(0)
    captions = toy_captions()[::7]
    scores = []
    for saturation in (0.2, 0.5, 0.8, 1.0):
        state = np.random.default_rng(1)  # same layouts, only the saturation differs
        scores.append(toy_reward_scores([draw_toy_image(c, state, saturation) for c in captions], captions))
    scores = np.stack(scores)
    assert np.all(np.diff(scores, axis=0) > 0)  # every image gains from more saturation
    assert 0.0 <= scores.min() and scores.max() <= 1.0
    # Continuous: a tiny change of the image changes the reward a little, not by a step.
    picture = draw_toy_image(captions[0], rng, 0.7)
    nudged = Image.fromarray(np.clip(np.asarray(picture).astype(int) + 2, 0, 255).astype(np.uint8))
    first, second = toy_reward_scores([picture, nudged], [captions[0]] * 2)
    assert 0 < abs(first - second) < 0.02
    # Prompt fidelity: the same picture scores lower for a caption naming other colours.
    right = "a red circle on a blue background"
    picture = draw_toy_image(right, rng, 1.0)
    on, off = toy_reward_scores([picture, picture], [right, "a green circle on a yellow background"])
    assert on > off + 0.2
    model = ToyRewardModel()
    torch.testing.assert_close(model.score([picture], [right]), torch.tensor([on]))


def test_human_labels_follow_bradley_terry_with_ties():
    rng = np.random.default_rng(0)
    r0 = np.array([0.5, 0.5, 0.9, 0.1] * 500)
    r1 = np.array([0.5005, 0.4, 0.1, 0.9] * 500)
    labels = human_labels(r0, r1, rng, temperature=0.05, tie_threshold=0.002)
    assert np.all(labels[0::4] == 0.5)
    assert np.all(labels[2::4] == 1.0) and np.all(labels[3::4] == 0.0)  # clear wins: no noise left
    assert abs(labels[1::4].mean() - 1 / (1 + np.exp(-0.1 / 0.05))) < 0.05  # sigma(2) ~ 0.88
    with pytest.raises(ValueError):
        human_labels(r0, r1, rng, temperature=0.0, tie_threshold=0.0)


@pytest.mark.parametrize("layout, folder, pipeline_class", [
    ("sd", TOY_ASSETS_DIR, "StableDiffusionPipeline"), ("sdxl", TOY_SDXL_ASSETS_DIR, "StableDiffusionXLPipeline")])
def test_shipped_pipeline_loads_and_draws_the_named_colours(layout, folder, pipeline_class):
    import diffusers

    path = toy_model_path(layout)
    assert os.path.samefile(path, folder)
    info = json.load(open(os.path.join(path, "toy_world.json")))
    assert info["heldout_captions"] == toy_caption_split()[1]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    assert size < 8 * 2**20
    pipeline = getattr(diffusers, pipeline_class).from_pretrained(path)
    assert type(load_toy_pipeline(path)) is type(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    captions = toy_captions()[::7]  # 32 captions, every colour as shape and as background
    images = pipeline(captions, num_inference_steps=10, guidance_scale=3.0, height=32, width=32,
                      generator=torch.Generator().manual_seed(0)).images
    accuracy = colour_accuracy(images, captions)
    assert accuracy["chance"] == 1 / len(TOY_COLOURS)
    assert accuracy["background_colour"] >= 0.6, accuracy
    assert accuracy["shape_colour"] >= 0.4, accuracy


def test_build_toy_preferences_labels_pairs_with_the_reward(tmp_path):
    import datasets

    captions = toy_caption_split()[0][:6]
    out = build_toy_preferences(str(tmp_path / "pairs"), captions=captions, pairs_per_caption=2, seed=3,
                                num_inference_steps=4)
    data = datasets.load_from_disk(out)
    assert data.num_rows == 12 and data["caption"] == captions * 2
    for column in ("jpg_0", "jpg_1", "reward_0", "reward_1", "label_valid", "label_0", "label_1"):
        assert column in data.column_names
    assert all(data["label_valid"]) and set(data["label_0"]) <= {0.0, 0.5, 1.0}
    reward_0 = np.asarray(data["reward_0"])
    from smpo_diffusers.rewards import load_image

    rescored = toy_reward_scores([load_image(b) for b in data["jpg_0"]], data["caption"])
    np.testing.assert_allclose(reward_0, rescored, rtol=1e-6)
    stats = json.load(open(os.path.join(out, "reward_stats.json")))
    assert stats["reward_model"] == "toy" and stats["count"] == 24
    assert stats["suggested_scale"] == pytest.approx(max(reward_0.max(), max(data["reward_1"])) -
                                                     min(reward_0.min(), min(data["reward_1"])), rel=1e-6)
    summary = json.load(open(os.path.join(out, "toy_preferences.json")))
    assert summary["num_pairs"] == 12


def _strict_json(path):
    """JSON as the standard defines it: NaN/Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant} in {path}")

    with open(path) as handle:
        return json.load(handle, parse_constant=refuse)


def test_build_toy_world_script_smoke_run(tmp_path, monkeypatch):
    """The builder script with tiny step counts, into tmp_path: every option reaches the build, the pipeline loads
    and toy_world.json records the options (a few seconds on one thread). The script scores one generation per
    caption; this run uses 8 captions instead of all 224 (which alone take about 16 s on one CPU thread)."""
    script = load_script("examples/toy/build_toy_world.py")
    captions = toy_captions()[::28]
    monkeypatch.setattr(script, "toy_captions", lambda: captions)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # the test process keeps its thread count
    shipped_info = os.path.join(TOY_ASSETS_DIR, "toy_world.json")
    shipped_stamp = os.stat(shipped_info).st_mtime_ns
    out = tmp_path / "toy"
    options = {"seed": 3, "vae_steps": 2, "unet_steps": 3, "vae_batch_size": 4, "batch_size": 5, "num_latents": 16,
               "device": "cpu"}
    argv = ["--output_dir", str(out), "--threads", "2"]
    for name, value in options.items():
        argv += [f"--{name}", str(value)]
    info = script.main(argv)

    assert threads == [2]
    assert os.stat(shipped_info).st_mtime_ns == shipped_stamp  # --output_dir was used, not the shipped folder
    recorded = _strict_json(out / "toy_world.json")
    assert recorded == json.loads(json.dumps(info))
    assert {name: recorded[name] for name in options} == options
    assert math.isfinite(recorded["vae_final_loss"]) and math.isfinite(recorded["unet_final_loss"])
    assert recorded["colour_accuracy"]["count"] == len(captions)
    pipeline = load_toy_pipeline(str(out))
    assert pipeline.vae.config.scaling_factor == pytest.approx(recorded["vae_scaling_factor"])
    images = pipeline(captions[:2], num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                      generator=torch.Generator().manual_seed(0)).images
    assert [image.size for image in images] == [(32, 32)] * 2
    # written for transformers 4.x too (scripts/check-min-versions.sh loads the shipped folder with it)
    from safetensors import safe_open

    assert {"vocab.json", "merges.txt"} <= set(os.listdir(out / "tokenizer"))
    with safe_open(str(out / "text_encoder" / "model.safetensors"), framework="pt") as handle:
        assert all(name.startswith("text_model.") for name in handle.keys())


@pytest.mark.parametrize("flag, value, message", [
    ("--vae_steps", "0", "--vae_steps must be an integer >= 1, got 0"),
    ("--unet_steps", "-2", "--unet_steps must be an integer >= 1, got -2"),
    ("--vae_batch_size", "0", "--vae_batch_size must be an integer >= 1"),
    ("--batch_size", "0", "--batch_size must be an integer >= 1"),
    ("--num_latents", "0", "--num_latents must be an integer >= 1"),
    ("--threads", "0", "--threads must be an integer >= 1"),
    ("--seed", "-1", "--seed must be an integer in \\[0, 2\\*\\*32\\)"),
    ("--device", "gpu", "--device 'gpu' is not a device"),
    ("--device", "meta", "--device 'meta' is not supported"),
    ("--device", "cuda:99", "--device 'cuda:99': "),
    ("--output_dir", "FILE", "--output_dir .* is a file"),
])
def test_build_toy_world_script_refuses_bad_options_before_writing(tmp_path, monkeypatch, capsys, flag, value, message):
    import re

    target = tmp_path / "toy"
    if value == "FILE":
        target.write_text("not a folder")
        value = str(target)
    argv = ["--output_dir", str(target), "--vae_steps", "2", "--unet_steps", "2", flag, value]
    monkeypatch.setattr(sys, "argv", [BUILDER_SCRIPT, *argv])
    monkeypatch.delenv("SMPO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(BUILDER_SCRIPT, run_name="__main__")
    assert exit_info.value.code == 2  # as the other example scripts: an input error, no traceback
    assert re.search("^error: " + message, capsys.readouterr().err, re.MULTILINE)
    assert target.is_file() if flag == "--output_dir" else not target.exists()  # nothing was written


def test_build_toy_world_refuses_bad_values_and_divergence_before_writing(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="^unet_steps must be an integer >= 1, got 0"):
        build_toy_world(tmp_path / "zero", unet_steps=0)
    with pytest.raises(ValueError, match="vae_learning_rate must be a finite number > 0"):
        build_toy_world(tmp_path / "lr", vae_learning_rate=float("nan"))
    monkeypatch.setattr(toy, "_train_unet", lambda *args: float("nan"))
    with pytest.raises(FloatingPointError, match="UNet training diverged .*nothing was written"):
        build_toy_world(tmp_path / "nan", vae_steps=1, unet_steps=1, vae_batch_size=2, batch_size=2, num_latents=4)
    assert not (tmp_path / "zero").exists() and not (tmp_path / "nan").exists()


def _load_benchmark():
    return load_script("benchmarks/toy_alignment.py")


@pytest.mark.slow
def test_quick_study_full_smpo_raises_the_heldout_reward(tmp_path, toy_pairs):
    """``benchmarks/toy_alignment.py --quick``: 192 toy pairs, 60 LoRA updates of full SmPO, 64 held-out images
    (about 2-3 minutes on one CPU thread). Measured at these settings: gain 0.031, win rate 0.86; the gain's
    independent-sample error was 0.004, the prompt-clustered one the study reports now is about 1.3 times that."""
    import shutil

    study = _load_benchmark()
    shutil.copytree(toy_pairs, tmp_path / "work" / "pairs")  # the pairs the study would build (reused when present)
    results = study.main(["--quick", "--output_dir", str(tmp_path / "results"), "--work_dir", str(tmp_path / "work")])
    row = results["variants"][study.FULL_SMPO]
    run = row["runs"][0]
    gain, noise = run["comparison"]["difference"]["mean"], run["comparison"]["difference"]["stderr"]
    # The paired gain over base on held-out captions must clear its sampling noise by a wide margin.
    assert gain > 4 * noise and gain > 0.01, (gain, noise)
    assert row["win_rate"]["ci_low"] > 0.5
    assert run["unet_evaluations"]["inversion"] > 0 and row["pixel_drift"] > 0
    for name in ("toy_alignment_quick.md", "toy_alignment_quick.json", "toy_alignment_quick.png"):
        assert os.path.isfile(tmp_path / "results" / name)


def test_train_toy_model_takes_epochs_instead_of_the_default_length(tmp_path, monkeypatch):
    """num_train_epochs given (without max_train_steps) sets the length: the toy's default max_train_steps is not
    added to it (that pair is refused). The trainer is replaced by a recorder: only the options are checked here."""
    import smpo_diffusers.trainer as trainer_module

    seen = []

    class Recorder:
        def __init__(self, config):
            seen.append(config)

        def train(self):
            return {}

    monkeypatch.setattr(trainer_module, "SmPOTrainer", Recorder)
    toy.train_toy_model(str(tmp_path / "out"), "data", num_train_epochs=2)
    assert [(c.num_train_epochs, c.max_train_steps) for c in seen] == [(2, None)]
    with pytest.raises(ValueError, match="give one of them"):  # both given by the caller: refused as usual
        toy.train_toy_model(str(tmp_path / "out"), "data", num_train_epochs=2, max_train_steps=5)


def test_toy_model_path_names_the_layout_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="layout must be one of"):
        toy_model_path("sd3")
    monkeypatch.setitem(toy.TOY_LAYOUTS, "sdxl", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="sdxl toy pipeline is missing .*build_toy_sdxl_world.py"):
        toy_model_path("sdxl")


def test_one_cycle_schedule_takes_every_step_count():
    """torch's OneCycleLR divides by ``pct_start * steps - 1``: with 5 % warm-up, 20 steps failed (both builders)."""
    for steps in range(1, 61):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = toy._one_cycle_schedule(optimizer, 1e-3, steps)
        rates = []
        for _ in range(steps):
            optimizer.step()
            schedule.step()
            rates.append(optimizer.param_groups[0]["lr"])
        assert all(math.isfinite(rate) for rate in rates)
        if steps >= 10:
            assert 5e-4 < max(rates) <= 1e-3 * (1 + 1e-9) and rates[-1] < 1e-4  # warm up to the peak, anneal


def test_build_toy_sdxl_world_script_smoke_run(tmp_path, monkeypatch):
    """The SDXL builder with tiny step counts: an SDXL pipeline folder sharing the SD world's VAE and scheduler,
    loadable by transformers 4.x too, with its options recorded."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from safetensors import safe_open

    script = load_script("examples/toy/build_toy_sdxl_world.py")
    captions = toy_captions()[::56]
    monkeypatch.setattr(script, "toy_captions", lambda: captions)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    out = tmp_path / "toy-sdxl"
    options = {"seed": 3, "unet_steps": 3, "batch_size": 5, "num_latents": 16, "device": "cpu"}
    argv = ["--output_dir", str(out), "--threads", "2", "--vae_from", str(TOY_ASSETS_DIR)]
    for name, value in options.items():
        argv += [f"--{name}", str(value)]
    info = script.main(argv)

    assert threads == [2]
    recorded = _strict_json(out / "toy_world.json")
    assert recorded == json.loads(json.dumps(info))
    assert {name: recorded[name] for name in options} == options
    assert recorded["layout"] == "sdxl" and recorded["time_ids"] == list(TOY_SDXL_TIME_IDS)
    assert math.isfinite(recorded["unet_final_loss"]) and recorded["colour_accuracy"]["count"] == len(captions)
    pipeline = load_toy_pipeline(str(out))
    assert isinstance(pipeline, StableDiffusionXLPipeline) and isinstance(pipeline.scheduler, DDIMScheduler)
    assert pipeline.unet.config.addition_embed_type == "text_time"
    shipped_vae = load_toy_pipeline(str(TOY_ASSETS_DIR)).vae.state_dict()
    assert all(torch.equal(tensor, shipped_vae[name]) for name, tensor in pipeline.vae.state_dict().items())
    images = pipeline(captions[:2], num_inference_steps=2, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(0)).images
    assert [image.size for image in images] == [(32, 32)] * 2
    for name in ("tokenizer", "tokenizer_2"):
        assert {"vocab.json", "merges.txt"} <= set(os.listdir(out / name))
    for name in ("text_encoder", "text_encoder_2"):
        with safe_open(str(out / name / "model.safetensors"), framework="pt") as handle:
            assert all(key.startswith(("text_model.", "text_projection.")) for key in handle.keys())


def test_sdxl_toy_unet_is_trained_on_what_the_pipeline_and_the_trainer_feed_it(tmp_path, monkeypatch):
    """The conditioning the SDXL toy UNet learns from equals what it is given later: by StableDiffusionXLPipeline
    when sampling (the caption's hidden states and pooled embedding, the time ids, zeros for the unconditional
    branch) and by the trainer (the same embeddings, and the encoded "" for --proportion_empty_prompts)."""
    from smpo_diffusers.models import encode_prompts, load_diffusion_parts, sdxl_time_ids

    seen = {}

    def record(unet, latents, embeddings, empty_embedding, caption_index, *args, **kwargs):
        seen.update(embeddings=embeddings, empty=empty_embedding, **kwargs)
        return 0.1

    monkeypatch.setattr(toy, "_train_unet", record)
    build_toy_sdxl_world(tmp_path / "world", unet_steps=1, num_latents=4, batch_size=2)
    zeros, empty_prompt = seen["empty"]
    zeros_pooled, empty_prompt_pooled = seen["empty_pooled"]
    assert not zeros.any() and not zeros_pooled.any()

    pipeline = load_toy_pipeline(str(tmp_path / "world"))
    fed = {}

    def capture(module, args, kwargs):
        fed.setdefault("hidden", kwargs["encoder_hidden_states"])
        fed.setdefault("added", kwargs["added_cond_kwargs"])

    pipeline.unet.register_forward_pre_hook(capture, with_kwargs=True)
    caption = toy_captions()[5]
    pipeline([caption], num_inference_steps=1, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    unconditional, conditional = fed["hidden"]
    torch.testing.assert_close(conditional, seen["embeddings"][5])
    torch.testing.assert_close(unconditional, zeros)
    torch.testing.assert_close(fed["added"]["text_embeds"], torch.stack([zeros_pooled, seen["pooled"][5]]))
    torch.testing.assert_close(fed["added"]["time_ids"], seen["time_ids"].expand(2, -1))

    parts = load_diffusion_parts(None, components=pipeline.components)
    with torch.no_grad():
        trained = encode_prompts(parts, [caption, ""], "cpu")
    torch.testing.assert_close(trained.hidden, torch.stack([seen["embeddings"][5], empty_prompt]))
    torch.testing.assert_close(trained.pooled, torch.stack([seen["pooled"][5], empty_prompt_pooled]))
    sizes = torch.tensor([[32.0, 32.0]])
    torch.testing.assert_close(sdxl_time_ids(sizes, torch.zeros(1, 2), 32).float(), seen["time_ids"])


@pytest.mark.parametrize("flag, value, message", [
    ("--unet_steps", "0", "--unet_steps must be an integer >= 1, got 0"),
    ("--threads", "0", "--threads must be an integer >= 1"),
    ("--device", "gpu", "--device 'gpu' is not a device"),
    ("--vae_from", "MISSING", "--vae_from .* holds no vae/ folder; pass the SD toy world"),
    ("--output_dir", "FILE", "--output_dir .* is a file"),
])
def test_build_toy_sdxl_world_script_refuses_bad_options_before_writing(tmp_path, monkeypatch, capsys, flag, value,
                                                                        message):
    import re

    target = tmp_path / "toy"
    if value == "FILE":
        target.write_text("not a folder")
        value = str(target)
    elif value == "MISSING":
        value = str(tmp_path / "no-world")
    monkeypatch.setattr(sys, "argv", [SDXL_BUILDER_SCRIPT, "--output_dir", str(target), "--unet_steps", "2", flag,
                                      value])
    monkeypatch.delenv("SMPO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(SDXL_BUILDER_SCRIPT, run_name="__main__")
    assert exit_info.value.code == 2
    assert re.search("^error: " + message, capsys.readouterr().err, re.MULTILINE)
    assert target.is_file() if flag == "--output_dir" else not target.exists()


def test_build_toy_sdxl_world_refuses_bad_values_and_divergence_before_writing(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unet_learning_rate must be a finite number > 0"):
        build_toy_sdxl_world(tmp_path / "lr", unet_learning_rate=0.0)
    with pytest.raises(ValueError, match="holds no vae/ folder"):
        build_toy_sdxl_world(tmp_path / "vae", vae_from=tmp_path)
    monkeypatch.setattr(toy, "_train_unet", lambda *args, **kwargs: float("inf"))
    with pytest.raises(FloatingPointError, match="UNet training diverged .*nothing was written"):
        build_toy_sdxl_world(tmp_path / "inf", unet_steps=1, batch_size=2, num_latents=4)
    assert not any((tmp_path / name).exists() for name in ("lr", "vae", "inf"))


def test_run_toy_demo_trains_and_evaluates_the_world_of_its_layout(tmp_path, monkeypatch):
    """run_toy_demo's parts see the same layout, seed and folders (each part is tested on its own elsewhere)."""
    calls = []
    monkeypatch.setattr(toy, "build_toy_demo_inputs", lambda folder, seed, layout: calls.append(
        ("inputs", folder, seed, layout)) or (f"model-{layout}", "pairs"))
    monkeypatch.setattr(toy, "train_toy_model", lambda out, data, layout, **options: calls.append(
        ("train", out, data, layout, options)))
    monkeypatch.setattr(toy, "evaluate_toy_model", lambda base, aligned, **options: calls.append(
        ("evaluate", base, aligned, options)) or {"ok": True})
    out = str(tmp_path / "demo")
    assert toy.run_toy_demo(out, max_train_steps=7, seed=2, layout="sdxl", rank=4) == {"ok": True}
    assert calls == [
        ("inputs", os.path.join(out, "demo-inputs"), 2, "sdxl"),
        ("train", out, "pairs", "sdxl", {"seed": 2, "max_train_steps": 7, "rank": 4}),
        ("evaluate", "model-sdxl", out, {"seed": 2, "seeds_per_prompt": 2, "progress": True}),
    ]


def test_each_layout_has_its_training_defaults():
    """β and N come from the model family; the SDXL world trains 120 updates (60 were within noise)."""
    sd, sdxl = toy.toy_training_defaults("sd"), toy.toy_training_defaults("sdxl")
    assert "beta_dpo" not in sd and "num_inversion_steps" not in sd
    assert sdxl == dict(sd, max_train_steps=120) and sd["max_train_steps"] == 60
    sd["rank"] = 99  # a copy
    assert toy.TOY_TRAINING_DEFAULTS["rank"] == 8
    with pytest.raises(ValueError, match="layout must be one of"):
        toy.toy_training_defaults("sd3")
