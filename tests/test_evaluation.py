import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from smpo_diffusers import evaluation
from smpo_diffusers.cli import evaluate_main, parse_evaluate_args
from smpo_diffusers.evaluation import (compare_scores, evaluate, format_results_table, image_drift, load_pipeline,
                                       mean_and_stderr, read_prompts, save_comparison_grid, trained_base_model,
                                       wilson_interval, win_rate)
from smpo_diffusers.testing import save_tiny_pipeline


def test_mean_and_stderr_by_hand():
    mean, stderr = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert stderr == pytest.approx(math.sqrt(5.0 / 3.0) / 2.0)  # sample std sqrt(5/3), n = 4
    assert math.isnan(mean_and_stderr([7.0])[1])
    with pytest.raises(ValueError):
        mean_and_stderr([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_and_stderr([1.0, float("nan")])


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    low, high = wilson_interval(50, 100)
    assert 0.5 - low == pytest.approx(high - 0.5)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_prompt_clusters_widen_errors_and_intervals():
    """Several seeds of one prompt are correlated samples: errors and intervals count prompts as clusters."""
    prompts = np.repeat(["a", "b", "c", "d"], 3)  # 4 prompts x 3 seeds
    per_prompt = np.asarray([0.1, 0.4, 0.2, 0.9])
    values = np.repeat(per_prompt, 3)  # every seed of a prompt scores alike: 4 samples' worth, not 12
    mean, stderr = mean_and_stderr(values, prompts)
    assert mean == pytest.approx(0.4) and stderr == pytest.approx(per_prompt.std(ddof=1) / 2)
    assert stderr > mean_and_stderr(values)[1] * 1.5
    assert mean_and_stderr(values, list(range(12))) == pytest.approx(mean_and_stderr(values))  # one per cluster
    uneven, labels = np.asarray([1.0, 2.0, 4.0, 7.0]), ["x", "x", "x", "y"]  # the cluster-robust formula by hand
    centred = uneven - uneven.mean()
    by_hand = math.sqrt(2 / 1 * (centred[:3].sum() ** 2 + centred[3] ** 2) / 16)
    assert mean_and_stderr(uneven, labels)[1] == pytest.approx(by_hand)
    assert math.isnan(mean_and_stderr(uneven, ["x"] * 4)[1])  # one cluster: no error estimate
    with pytest.raises(ValueError, match="one label per sample: got 1 labels for 2 samples"):
        mean_and_stderr([1.0, 2.0], ["x"])
    # 3 prompts always won, 1 always lost: the interval is the one of 4 samples (clipped at the prompt count)
    rate = win_rate([1.0] * 9 + [0.0] * 3, [0.5] * 12, groups=prompts)
    assert rate["rate"] == 0.75 and rate["n"] == 12 and rate["groups"] == 4
    assert rate["n_effective"] == pytest.approx(4.0)
    assert (rate["ci_low"], rate["ci_high"]) == pytest.approx(wilson_interval(3, 4))
    assert win_rate([1.0] * 9 + [0.0] * 3, [0.5] * 12)["n_effective"] == 12  # without groups: independent
    # every prompt won once and lost once: no between-prompt variation, the interval of 12 independent pairs
    even = win_rate([1.0, 0.0] * 6, [0.5] * 12, groups=np.repeat(list("abcdef"), 2))
    assert even["n_effective"] == 12 and (even["ci_low"], even["ci_high"]) == pytest.approx(wilson_interval(6, 12))
    # all won: as many samples as prompts
    won = win_rate([1.0] * 6, [0.0] * 6, groups=np.repeat(list("abc"), 2))
    assert won["n_effective"] == 3 and (won["ci_low"], won["ci_high"]) == pytest.approx(wilson_interval(3, 3))
    summary = compare_scores(base=[0.5] * 12, aligned=values, groups=prompts)
    assert summary["difference"]["stderr"] == pytest.approx(stderr) and summary["win_rate"]["groups"] == 4


def test_win_rate_counts_ties_as_half():
    rate = win_rate([0.2, 0.2, 0.5, 0.1], [0.1, 0.2, 0.3, 0.4])
    assert (rate["wins"], rate["ties"], rate["losses"], rate["n"]) == (2, 1, 1, 4)
    assert rate["rate"] == pytest.approx(2.5 / 4)
    assert (rate["ci_low"], rate["ci_high"]) == pytest.approx(wilson_interval(2.5, 4))
    assert win_rate([1.0, 1.05], [1.0, 1.0], tie_tolerance=0.1)["ties"] == 2
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_compare_scores_on_hand_made_scores():
    summary = compare_scores(base=[0.1, 0.2, 0.3], aligned=[0.2, 0.2, 0.5])
    assert summary["base"]["mean"] == pytest.approx(0.2)
    assert summary["aligned"]["mean"] == pytest.approx(0.3)
    assert summary["difference"]["mean"] == pytest.approx(0.1)
    assert summary["difference"]["stderr"] == pytest.approx(0.1 / math.sqrt(3))  # diffs 0.1, 0, 0.2
    assert summary["win_rate"]["rate"] == pytest.approx(2.5 / 3)


def test_grid_is_not_upscaled_for_large_images(tmp_path):
    large = Image.new("RGB", (256, 128), (9, 9, 9))
    assert Image.open(save_comparison_grid([large] * 2, [large] * 2, str(tmp_path / "g.png"))).size == (512, 258)


def test_image_drift_and_grid(tmp_path):
    black = Image.new("RGB", (4, 4), (0, 0, 0))
    white = Image.new("RGB", (4, 4), (255, 255, 255))
    assert image_drift([black, white], [black, black]) == pytest.approx(0.5)
    path = save_comparison_grid([black] * 3, [white] * 3, str(tmp_path / "grid.png"), columns=2, scale=2)
    grid = Image.open(path)
    assert grid.size == (2 * 8, 2 * (2 * 8 + 2))
    pixels = np.asarray(grid)
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[8, 0].tolist() == [255, 255, 255]


def test_read_prompts_sources(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a red circle\n\n a blue square \n")
    assert read_prompts(str(text)) == ["a red circle", "a blue square"]
    heldout = read_prompts("toy-heldout")
    assert len(heldout) == 32 and not set(heldout) & set(read_prompts("toy-train"))
    assert read_prompts("toy-all", limit=3) == read_prompts("toy-all")[:3]
    import datasets

    datasets.Dataset.from_dict({"caption": ["x one", "x two", "x one"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_prompts(str(tmp_path / "ds")) == ["x one", "x two"]
    with pytest.raises(ValueError, match="no column"):
        read_prompts(str(tmp_path / "ds"), column="prompt")
    with pytest.raises(FileNotFoundError):
        read_prompts(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--max_prompts must be >= 1"):
        read_prompts("toy-all", limit=-1)  # would silently drop the last prompt
    with pytest.raises(ValueError, match="--prompt_column/--prompt_split select from a dataset"):
        read_prompts(str(text), column="prompt")
    with pytest.raises(ValueError, match="split 'test' cannot be selected.*drop --prompt_split"):
        read_prompts(str(tmp_path / "ds"), split="test")


def test_read_prompts_text_file_from_another_editor(tmp_path, caplog):
    """A byte-order mark would be glued to the first prompt's first word (the tokenizer splits it into junk);
    CRLF endings are stripped; repeats are dropped as for datasets (--seeds_per_prompt samples repeats)."""
    windows = tmp_path / "PROMPTS.TXT"
    windows.write_bytes("a red circle\r\n\r\na red circle\r\nblue square\r\n".encode("utf-8-sig"))
    with caplog.at_level("WARNING", logger="smpo_diffusers.evaluation"):
        assert read_prompts(str(windows)) == ["a red circle", "blue square"]
    assert "1 repeated prompt(s) dropped, 2 unique kept" in caplog.text
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text.*save it as UTF-8"):
        read_prompts(str(latin))


@pytest.mark.parametrize("kwargs,message", [
    ({"num_inference_steps": 0}, "--num_inference_steps must be >= 1"),
    ({"num_inference_steps": -3}, "--num_inference_steps must be >= 1"),
    ({"batch_size": 0}, "--batch_size must be >= 1"),
    ({"resolution": 4}, "--resolution must be at least 8"),
    ({"device": "cuda"}, "no CUDA GPU is visible"),
    ({"device": "gpu"}, "--device 'gpu' is not a torch device"),
    ({"guidance_scale": float("nan")}, "--guidance_scale must be a finite number >= 0"),  # would turn guidance off
    ({"guidance_scale": float("inf")}, "--guidance_scale must be a finite number >= 0"),
    ({"guidance_scale": -1.0}, "--guidance_scale must be a finite number >= 0"),
])
def test_evaluate_refuses_bad_settings_before_loading_anything(tmp_path, kwargs, message):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ValueError, match=message):
        evaluate("no-such-base", str(tmp_path / "no-such-output"), ["a prompt"], output_dir=str(tmp_path / "e"),
                 **kwargs)
    assert not (tmp_path / "e").exists()


def test_format_results_table_shows_means_errors_and_interval():
    results = {"models": {"base": "base", "aligned": "SmPO"}, "num_samples": 3, "num_prompts": 3,
               "seeds_per_prompt": 1, "num_inference_steps": 2, "guidance_scale": 1.0, "pixel_drift": 0.25,
               "rewards": {"toy": compare_scores([0.1, 0.2, 0.3], [0.2, 0.2, 0.5])}}
    table = format_results_table(results)
    assert "| toy | 0.2000 ± 0.0577 | 0.3000 ± 0.1000 | 0.1000 ± 0.0577 | 0.833" in table
    assert "(2W/1T/0L)" in table


def test_evaluate_writes_results_table_and_grid(tmp_path, monkeypatch):
    base = save_tiny_pipeline(str(tmp_path / "base"), kind="sd", seed=0)
    other = save_tiny_pipeline(str(tmp_path / "other"), kind="sd", seed=1)
    aligned = tmp_path / "aligned"
    os.makedirs(aligned)
    os.symlink(os.path.join(other, "unet"), aligned / "unet")  # a full-UNet training output
    prompts = ["a red circle on a blue background", "a green square on a pink background"]
    monkeypatch.setattr(evaluation, "GRID_MAX_SAMPLES", 2)  # all four are scored, two are drawn
    results = evaluate(base, str(aligned), prompts, output_dir=str(tmp_path / "eval"),
                       reward_names=["toy", "smpo_diffusers.demo:colourfulness_reward"], seeds_per_prompt=2,
                       num_inference_steps=2, guidance_scale=1.0, resolution=32, progress=False, grid_columns=2)
    saved = json.load(open(tmp_path / "eval" / "results.json"))
    assert json.loads(json.dumps(results)) == saved  # what it returns is what it wrote
    assert saved["num_samples"] == 4 and saved["scores"]["seeds"] == [0, 1, 2, 3]
    assert set(saved["rewards"]) == {"toy", "smpo_diffusers.demo:colourfulness_reward"}
    for name, summary in saved["rewards"].items():
        base_scores = np.asarray(saved["scores"]["base"][name])
        aligned_scores = np.asarray(saved["scores"]["aligned"][name])
        assert summary["base"]["mean"] == pytest.approx(base_scores.mean())
        # sample j shows prompt j % 2: the error is clustered by prompt (2 prompts x 2 seeds)
        prompt_means = aligned_scores.reshape(2, 2).mean(axis=0)
        assert summary["aligned"]["stderr"] == pytest.approx(prompt_means.std(ddof=1) / math.sqrt(2))
        assert summary["win_rate"]["groups"] == 2
        assert summary["win_rate"]["rate"] == pytest.approx(
            ((aligned_scores > base_scores).sum() + 0.5 * (aligned_scores == base_scores).sum()) / 4)
    assert saved["pixel_drift"] > 0  # a different UNet draws different pictures from the same seeds
    table = open(tmp_path / "eval" / "results.md").read()
    assert "| toy |" in table and "Only 2 prompts: the seeds of one prompt are correlated" in table
    assert Image.open(tmp_path / "eval" / "grid.png").size == (2 * 64, 2 * 64 + 2)  # one block of two
    with pytest.raises(ValueError, match="comma-separated ensemble is for labelling.*--reward_models toy toy"):
        evaluate(base, str(aligned), prompts, output_dir=str(tmp_path / "ensemble"), reward_names=["toy,toy"])
    assert not (tmp_path / "ensemble").exists()  # refused before anything renders or is written
    # --seed and --batch_size reach the renders: samples 2 and 3 again (seeds 2, 3), one prompt per pipeline call
    calls, real_load = [], evaluation.load_pipeline

    class Recording:
        def __init__(self, pipeline):
            self.pipeline = pipeline

        def __call__(self, prompts, **kwargs):
            calls.append(len(prompts))
            return self.pipeline(prompts, **kwargs)

    monkeypatch.setattr(evaluation, "load_pipeline", lambda *a, **k: Recording(real_load(*a, **k)))
    again = evaluate(base, str(aligned), prompts, output_dir=str(tmp_path / "again"), reward_names=["toy"], seed=2,
                     batch_size=1, num_inference_steps=2, guidance_scale=1.0, resolution=32, progress=False)
    monkeypatch.setattr(evaluation, "load_pipeline", real_load)
    assert calls == [1, 1, 1, 1] and again["scores"]["seeds"] == [2, 3]
    for model in ("base", "aligned"):
        assert again["scores"][model]["toy"] == pytest.approx(saved["scores"][model]["toy"][2:], abs=1e-3)
    # The same seeds with the same model give the same images: zero drift.
    same = evaluate(base, base, prompts[:1], output_dir=str(tmp_path / "same"), num_inference_steps=2,
                    guidance_scale=1.0, resolution=32, progress=False)
    assert same["pixel_drift"] == 0.0 and same["rewards"]["toy"]["win_rate"]["ties"] == 1
    assert "Only 1 prompt" not in open(tmp_path / "same" / "results.md").read()  # one seed: nothing is clustered


def test_guidance_scale_reaches_the_pipeline(tmp_path, monkeypatch):
    """The value given is the one every pipeline call gets, and guidance above 1 draws other pictures than none."""
    from diffusers import StableDiffusionPipeline

    base = save_tiny_pipeline(str(tmp_path / "base"), kind="sd", seed=0)
    called = []
    real_call = StableDiffusionPipeline.__call__

    def recording_call(self, *args, **kwargs):
        called.append(kwargs["guidance_scale"])
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recording_call)
    grids = {}
    for guidance in (1.0, 4.0):
        called.clear()
        results = evaluate(base, base, ["a red circle on a blue background"], output_dir=str(tmp_path / str(guidance)),
                           num_inference_steps=2, guidance_scale=guidance, resolution=32, progress=False)
        assert called == [guidance, guidance]  # base and aligned renders
        assert results["guidance_scale"] == guidance
        grids[guidance] = np.asarray(Image.open(tmp_path / str(guidance) / "grid.png"), dtype=np.float32)
    assert np.abs(grids[1.0] - grids[4.0]).mean() > 0


def test_reward_models_are_read_from_cache_dir(tmp_path, monkeypatch):
    import smpo_diffusers.rewards

    class Loaded(Exception):
        pass

    seen = []

    def fake_load_reward_model(name, **kwargs):
        seen.append((name, kwargs))
        raise Loaded

    monkeypatch.setattr(smpo_diffusers.rewards, "load_reward_model", fake_load_reward_model)
    aligned = tmp_path / "aligned"
    os.makedirs(aligned)
    (aligned / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(Loaded):
        evaluate("no-such-base", str(aligned), ["a prompt"], output_dir=str(tmp_path / "e"),
                 reward_names=["pickscore"], cache_dir=str(tmp_path / "hub-cache"))
    assert seen == [("pickscore", {"device": torch.device("cpu"), "cache_dir": str(tmp_path / "hub-cache")})]


def test_load_pipeline_rejects_a_folder_without_weights(tmp_path):
    base = save_tiny_pipeline(str(tmp_path / "base"), kind="sd", seed=0)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        load_pipeline(base, str(tmp_path / "empty"))


def test_evaluate_cli_runs_end_to_end(tmp_path, capsys, monkeypatch):
    base = save_tiny_pipeline(str(tmp_path / "base"), kind="sd", seed=0)
    aligned = tmp_path / "aligned"
    os.makedirs(aligned)
    os.symlink(os.path.join(save_tiny_pipeline(str(tmp_path / "other"), kind="sd", seed=1), "unet"), aligned / "unet")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n")
    results = evaluate_main(["--base_model", base, "--aligned_model", str(aligned), "--prompts", str(prompts),
                             "--num_inference_steps", "2", "--guidance_scale", "1", "--resolution", "32",
                             "--output_dir", str(tmp_path / "eval")])
    assert results["num_samples"] == 1 and "| toy |" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "eval")) == ["grid.png", "results.json", "results.md"]
    assert results["base_model"] == base

    # without --base_model the base is the one the training run recorded (not the shipped toy pipeline)
    (aligned / "training_config.json").write_text(json.dumps({"pretrained_model_name_or_path": base}))
    results = evaluate_main(["--aligned_model", str(aligned), "--prompts", str(prompts), "--num_inference_steps",
                             "2", "--guidance_scale", "1", "--resolution", "32", "--output_dir",
                             str(tmp_path / "eval2")])
    assert results["base_model"] == base
    # one sample: no standard error, written as null (strict JSON), not NaN
    json.loads((tmp_path / "eval2" / "results.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    # a LoRA file: the base recorded beside it
    (aligned / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert trained_base_model(str(aligned / "pytorch_lora_weights.safetensors")) == base
    # nothing records the base: an error naming --base_model, not a silent comparison with the toy pipeline
    (aligned / "training_config.json").unlink()
    with pytest.raises(ValueError, match="pass --base_model"):
        evaluate_main(["--aligned_model", str(aligned), "--output_dir", str(tmp_path / "eval3")])
    # 'toy' names the shipped toy pipeline
    from smpo_diffusers.toy import toy_model_path

    seen = []
    monkeypatch.setattr(evaluation, "evaluate", lambda base, *args, **kwargs: seen.append((base, kwargs)) or results)
    monkeypatch.setattr(evaluation, "format_results_table", lambda results: "")
    evaluate_main(["--base_model", "toy", "--aligned_model", str(aligned), "--output_dir", str(tmp_path / "eval4")])
    assert seen[0][0] == toy_model_path()
    evaluate_main(["--base_model", "toy-sdxl", "--aligned_model", str(aligned), "--output_dir",
                   str(tmp_path / "eval4-sdxl")])
    assert seen.pop()[0] == toy_model_path("sdxl")
    assert seen[0][1]["dtype"] == torch.float32
    assert seen[0][1]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="not under accelerate launch with several processes"):
        evaluate_main(["--base_model", "toy", "--aligned_model", str(aligned), "--output_dir", str(tmp_path / "x")])
    monkeypatch.delenv("WORLD_SIZE")
    evaluate_main(["--base_model", "toy", "--aligned_model", str(aligned), "--output_dir", str(tmp_path / "eval5"),
                   "--dtype", "bf16", "--device", "meta"])
    assert seen[1][1]["dtype"] == torch.bfloat16 and seen[1][1]["device"] == "meta"


def test_evaluate_renders_in_the_requested_dtype(tmp_path, monkeypatch):
    from smpo_diffusers import evaluation

    base = save_tiny_pipeline(str(tmp_path / "base"), kind="sd", seed=0)
    loaded = []
    real_load = evaluation.load_pipeline
    monkeypatch.setattr(evaluation, "load_pipeline",
                        lambda *args, **kwargs: loaded.append(real_load(*args, **kwargs)) or loaded[-1])
    results = evaluate(base, base, ["a red circle"], output_dir=str(tmp_path / "eval"), num_inference_steps=2,
                       guidance_scale=1.0, resolution=32, progress=False, dtype=torch.bfloat16)
    assert [pipeline.unet.dtype for pipeline in loaded] == [torch.bfloat16] * 2
    assert results["dtype"] == "bfloat16" and np.isfinite(results["rewards"]["toy"]["base"]["mean"])


def test_base_is_read_as_training_read_it(tmp_path, monkeypatch):
    """The recorded --revision, --variant, separate VAE and --cache_dir reach both renders (base and aligned, so
    only the UNet differs); flags override them; another --base_model drops the recorded revision/variant;
    --vae base keeps the base pipeline's own VAE. load_pipeline obeys each of them."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from smpo_diffusers.testing import add_to_hub_cache

    cache, repo_id = str(tmp_path / "hub-cache"), "someone/tiny-sd"
    add_to_hub_cache(save_tiny_pipeline(str(tmp_path / "main"), kind="sd", seed=0), cache, repo_id, "a" * 40)
    v1 = save_tiny_pipeline(str(tmp_path / "v1"), kind="sd", seed=1)
    StableDiffusionPipeline.from_pretrained(v1).save_pretrained(str(tmp_path / "v1-ema"), variant="ema")
    add_to_hub_cache(str(tmp_path / "v1-ema"), cache, repo_id, "b" * 40, refs=("v1",))
    other_vae = os.path.join(save_tiny_pipeline(str(tmp_path / "other"), kind="sd", seed=2), "vae")
    aligned = tmp_path / "aligned"
    os.makedirs(aligned)
    os.symlink(os.path.join(v1, "unet"), aligned / "unet")
    (aligned / "training_config.json").write_text(json.dumps({
        "pretrained_model_name_or_path": repo_id, "revision": "v1", "variant": "ema",
        "pretrained_vae_model_name_or_path": other_vae, "cache_dir": cache}))

    seen = []
    monkeypatch.setattr(evaluation, "evaluate",
                        lambda base, aligned, prompts, **kwargs: seen.append((base, kwargs)) or {})
    monkeypatch.setattr(evaluation, "format_results_table", lambda results: "")
    common = ["--aligned_model", str(aligned), "--prompts", "toy-heldout", "--output_dir", str(tmp_path / "e")]
    evaluate_main(common)
    evaluate_main(common + ["--base_revision", "main", "--base_variant", "fp16", "--vae", "base"])
    evaluate_main(common + ["--base_model", str(tmp_path / "main")])
    loading = [(base, kwargs["base_revision"], kwargs["base_variant"], kwargs["vae"], kwargs["cache_dir"])
               for base, kwargs in seen]
    assert loading == [(repo_id, "v1", "ema", other_vae, cache), (repo_id, "main", "fp16", None, cache),
                       (str(tmp_path / "main"), None, None, other_vae, cache)]

    def same_weights(module, wanted):
        return all(torch.equal(module.state_dict()[name], value) for name, value in wanted.state_dict().items())

    reference = StableDiffusionPipeline.from_pretrained(v1)
    with pytest.raises(OSError):  # not in the default cache: cache_dir is what finds it
        load_pipeline(repo_id)
    pipeline = load_pipeline(repo_id, revision="v1", variant="ema", vae=other_vae, cache_dir=cache)
    assert same_weights(pipeline.unet, reference.unet) and same_weights(pipeline.text_encoder,
                                                                        reference.text_encoder)
    assert same_weights(pipeline.vae, AutoencoderKL.from_pretrained(other_vae))
    assert same_weights(load_pipeline(repo_id, cache_dir=cache).unet, StableDiffusionPipeline.from_pretrained(
        str(tmp_path / "main")).unet)
    with pytest.raises((OSError, ValueError)):  # v1 holds only ema-named files
        load_pipeline(repo_id, revision="v1", cache_dir=cache)


def test_evaluate_cli_passes_every_option_to_the_library(tmp_path, monkeypatch):
    """Each option, set to a non-default value, reaches read_prompts or evaluate; the list below must name every
    option the parser has."""
    aligned = tmp_path / "aligned"
    os.makedirs(aligned / "unet")
    (aligned / "unet" / "config.json").write_text("{}")
    options = {
        "--base_model": "someone/base", "--base_revision": "v2", "--base_variant": "fp16", "--vae": "someone/vae",
        "--cache_dir": str(tmp_path / "hub-cache"), "--aligned_model": str(aligned), "--prompts": "prompts.parquet",
        "--prompt_column": "text", "--prompt_split": "validation", "--max_prompts": "3", "--seeds_per_prompt": "2",
        "--seed": "7", "--reward_models": ["toy", "clip"], "--num_inference_steps": "5", "--guidance_scale": "6.5",
        "--resolution": "48", "--batch_size": "4", "--device": "meta", "--dtype": "fp16",
        "--output_dir": str(tmp_path / "out"),
    }
    argv = [part for flag, value in options.items() for part in [flag, *([value] if isinstance(value, str) else value)]]
    assert {"--" + name for name in vars(parse_evaluate_args(argv))} == set(options)
    read, seen = [], []
    monkeypatch.setattr(evaluation, "read_prompts", lambda *args, **kwargs: read.append((args, kwargs)) or ["p1", "p2"])
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: seen.append((args, kwargs)) or {})
    monkeypatch.setattr(evaluation, "format_results_table", lambda results: "")
    evaluate_main(argv)
    assert read == [(("prompts.parquet",), {"column": "text", "split": "validation", "limit": 3})]
    assert seen == [(("someone/base", str(aligned), ["p1", "p2"]), {
        "output_dir": str(tmp_path / "out"), "reward_names": ["toy", "clip"], "seeds_per_prompt": 2, "seed": 7,
        "num_inference_steps": 5, "guidance_scale": 6.5, "resolution": 48, "batch_size": 4, "device": "meta",
        "dtype": torch.float16, "base_revision": "v2", "base_variant": "fp16", "vae": "someone/vae",
        "cache_dir": str(tmp_path / "hub-cache")})]


def test_evaluate_cli_refuses_vae_with_a_saved_pipeline(tmp_path, monkeypatch):
    """A saved full pipeline keeps the VAE training saved in it; --vae (even 'base') would change the base's only."""
    aligned = tmp_path / "pipeline"
    os.makedirs(aligned)
    (aligned / "model_index.json").write_text("{}")
    (aligned / "training_config.json").write_text(json.dumps({
        "pretrained_model_name_or_path": "someone/base", "pretrained_vae_model_name_or_path": "someone/vae"}))
    seen = []
    monkeypatch.setattr(evaluation, "evaluate", lambda base, aligned, prompts, **kwargs: seen.append(kwargs) or {})
    monkeypatch.setattr(evaluation, "format_results_table", lambda results: "")
    common = ["--aligned_model", str(aligned), "--output_dir", str(tmp_path / "e")]
    for vae in ("base", "someone/other-vae"):
        with pytest.raises(ValueError, match="saved full pipeline.*Drop --vae"):
            evaluate_main(common + ["--vae", vae])
    assert not seen
    evaluate_main(common)  # the base gets the recorded VAE: the one the saved pipeline holds
    assert seen[0]["vae"] == "someone/vae"


def test_evaluate_cli_names_a_damaged_training_config(tmp_path):
    aligned = tmp_path / "run"
    os.makedirs(aligned / "unet")
    (aligned / "unet" / "config.json").write_text("{}")
    for damaged in ('{"pretrained_model_name_or_path": "some', '["a list"]'):
        (aligned / "training_config.json").write_text(damaged)
        with pytest.raises(ValueError, match="run/training_config.json (is not valid JSON|holds a JSON list).*"
                                             "pass --base_model"):
            evaluate_main(["--aligned_model", str(aligned), "--base_model", "toy", "--output_dir", str(tmp_path / "e")])
    os.remove(aligned / "training_config.json")
    with pytest.raises(ValueError, match="--base_revision 'v1' selects a Hub revision, but the base model .* is a "
                                         "local folder"):  # from_pretrained would ignore it
        evaluate_main(["--aligned_model", str(aligned), "--base_model", "toy", "--base_revision", "v1",
                       "--output_dir", str(tmp_path / "e")])
    assert not (tmp_path / "e").exists()


def _sdxl_run_outputs(tmp_path, sdxl_base):
    """An SDXL LoRA run and an SDXL full-UNet run (each with training_config.json recording ``sdxl_base``)."""
    from smpo_diffusers.models import add_lora_adapters, save_lora
    from smpo_diffusers.testing import tiny_sd_pipeline

    lora, full = tmp_path / "sdxl-lora", tmp_path / "sdxl-full"
    pipe = tiny_sd_pipeline("sdxl", seed=1)
    add_lora_adapters(pipe.unet, rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    save_lora(str(lora), pipe.unet, is_sdxl=True)
    os.makedirs(full)
    os.symlink(os.path.join(sdxl_base, "unet"), full / "unet")
    for run in (lora, full):
        (run / "training_config.json").write_text(json.dumps({"pretrained_model_name_or_path": sdxl_base}))
    return str(lora), str(full)


def test_weights_that_do_not_fit_the_base_name_the_base_to_pass(tmp_path, capsys):
    """An SDXL run evaluated on an SD base: a ValueError naming both models and --base_model (the recorded base
    when training_config.json has it), not a state_dict size mismatch or a crash while rendering."""
    from smpo_diffusers.cli import run_cli

    sd_base = save_tiny_pipeline(str(tmp_path / "sd"), kind="sd", seed=0)
    sdxl_base = save_tiny_pipeline(str(tmp_path / "sdxl"), kind="sdxl", seed=0)
    lora, full = _sdxl_run_outputs(tmp_path, sdxl_base)
    recorded = f"it was trained on '{sdxl_base}'.*pass --base_model {sdxl_base}"
    with pytest.raises(ValueError, match=f"the LoRA weights {lora}/pytorch_lora_weights.safetensors do not fit the SD "
                                         rf"base model {sd_base} \(size mismatch for .*{recorded}") as raised:
        load_pipeline(sd_base, lora)
    assert isinstance(raised.value.__cause__, RuntimeError)  # the loader's own error, chained
    with pytest.raises(ValueError, match=f"--aligned_model {full} holds an SDXL UNet that does not fit the SD base "
                                         f"model {sd_base} .*cross_attention_dim 64 vs 32.*addition_embed_type "
                                         f"'text_time' vs None.*{recorded}"):
        load_pipeline(sd_base, full)
    assert load_pipeline(sdxl_base, full).unet.config.addition_embed_type == "text_time"  # the right base: fine
    load_pipeline(sdxl_base, lora)
    # without a record, the advice names the kind of base to pass
    for run in (lora, full):
        os.remove(os.path.join(run, "training_config.json"))
    with pytest.raises(ValueError, match="pass --base_model the pipeline it was trained from .*toy-sdxl"):
        load_pipeline(sd_base, full)
    with pytest.raises(ValueError, match="do not fit the SD base model .*pass --base_model the pipeline it was "
                                         "trained from"):
        load_pipeline(sd_base, lora)
    # examples/evaluate.py: `error: ...`, status 2, before any image is rendered
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n")
    capsys.readouterr()
    for run in (lora, full):
        with pytest.raises(SystemExit) as ended:
            run_cli(evaluate_main, ["--base_model", sd_base, "--aligned_model", run, "--prompts", str(prompts),
                                    "--num_inference_steps", "1", "--output_dir", str(tmp_path / "eval")])
        err = capsys.readouterr().err
        assert ended.value.code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error: ") and "--base_model" in err.strip().splitlines()[-1]
    assert not os.listdir(tmp_path / "eval")


def test_an_older_record_of_a_relative_base_path_is_read_from_here_or_refused(tmp_path, monkeypatch, capsys,
                                                                              caplog):
    """Training now records local inputs as absolute paths; a record from before names the base relative to the
    directory training ran in. evaluate.py reads it from the current directory when it exists there (and says so),
    else stops naming --base_model instead of taking the path for a Hub id."""
    from smpo_diffusers.cli import run_cli

    monkeypatch.chdir(tmp_path)
    sdxl_base = save_tiny_pipeline(str(tmp_path / "work" / "base"), kind="sdxl", seed=0)
    lora, _ = _sdxl_run_outputs(tmp_path, sdxl_base)
    record = {"pretrained_model_name_or_path": os.path.join("work", "base"),
              "local_inputs": ["pretrained_model_name_or_path"]}
    (tmp_path / "sdxl-lora" / "training_config.json").write_text(json.dumps(record))
    assert evaluation.trained_base_settings(lora)["relative_paths"] == ["base_model"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        run_cli(evaluate_main, ["--aligned_model", lora, "--prompts", str(prompts), "--num_inference_steps", "1",
                                "--output_dir", str(tmp_path / "eval")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ended.value.code == 2 and last.startswith("error: ")
    assert f"base model as the relative path 'work{os.sep}base'" in last and "pass --base_model" in last
    # from the directory training ran in, the relative record is read there, with a warning
    monkeypatch.chdir(tmp_path)
    arguments = ["--aligned_model", lora, "--prompts", str(prompts), "--num_inference_steps", "1", "--guidance_scale",
                 "1", "--resolution", "32", "--output_dir", str(tmp_path / "eval")]
    with caplog.at_level("WARNING", logger="smpo_diffusers"):
        results = evaluate_main(arguments)
    assert results["base_model"] == os.path.join("work", "base") and "read from the current directory" in caplog.text
    # with an absolute record (what training writes now) the base is found from anywhere
    record["pretrained_model_name_or_path"] = sdxl_base
    (tmp_path / "sdxl-lora" / "training_config.json").write_text(json.dumps(record))
    assert evaluation.trained_base_settings(lora)["relative_paths"] == []
    monkeypatch.chdir(elsewhere)
    assert evaluate_main(arguments)["base_model"] == sdxl_base
