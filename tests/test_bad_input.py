"""Bad input: a clear error that names the fix (before any model loads), or a counted skip."""

import io
import json
import logging
import shutil

import numpy as np
import pytest
from datasets import Dataset, Value, load_from_disk
from PIL import Image

from smpo_diffusers import SmPOConfig, SmPOTrainer
from smpo_diffusers.models import encode_prompts, load_diffusion_parts
from smpo_diffusers.testing import encode_image

NO_MODEL = "/nonexistent/model/folder"  # any model access would fail: errors below must come from the data


def config(tmp_path, model=NO_MODEL, **overrides):
    options = dict(pretrained_model_name_or_path=model, output_dir=str(tmp_path / "out"), resolution=32,
                   train_batch_size=2, max_train_steps=2, report_to="none", reward_scale=0.1, seed=0)
    options.update(overrides)
    return SmPOConfig(**options)


def labelled(demo_inputs, family="sdxl"):
    return load_from_disk(demo_inputs[family][1])


def test_odd_images_are_converted_resized_or_skipped_and_counted(tmp_path, demo_inputs):
    base = labelled(demo_inputs)
    rows = base.select(range(8)).to_dict()
    rgb = Image.open(io.BytesIO(rows["jpg_0"][0]))
    rows["jpg_0"][0] = encode_image(rgb.convert("RGBA"))
    rows["jpg_1"][1] = encode_image(rgb.convert("L"))
    rows["jpg_0"][2] = encode_image(rgb.convert("P"))
    rows["jpg_1"][3] = encode_image(rgb.convert("CMYK"), "JPEG")
    rows["jpg_0"][4] = encode_image(rgb.resize((48, 40)))          # pair of different sizes
    rows["jpg_1"][5] = encode_image(rgb.resize((16, 16)))          # smaller than --resolution: upscaled
    rows["jpg_0"][6] = rows["jpg_0"][6][: len(rows["jpg_0"][6]) // 3]  # truncated bytes: skipped
    rows["label_0"], rows["label_1"] = [1.0] * 8, [0.0] * 8
    dataset = Dataset.from_dict(rows, features=base.features)
    trainer = SmPOTrainer(config(tmp_path, demo_inputs["sdxl"][0], max_train_steps=4, train_batch_size=2),
                          dataset=dataset)
    metrics = trainer.train()
    assert np.isfinite(metrics["loss"])
    assert trainer.skipped["undecodable_pairs"] == 1 and trainer.skipped["empty_updates"] == 0
    # rows 4 and 5 differ in size from their winner (resized); row 5 is below --resolution (upscaled)
    saved = json.loads((tmp_path / "out" / "training_metrics.json").read_text())
    assert saved["data"]["upscaled_pairs"] == 1 and saved["data"]["resized_pairs"] == 2
    assert saved["skipped"]["undecodable_pairs"] == 1


def test_a_dataset_of_undecodable_images_fails_instead_of_training_nothing(tmp_path, demo_inputs, caplog):
    """Steps whose pairs all fail to decode are counted as empty updates; when no update trained anything the
    run fails, naming the image columns, and saves no weights. Each bad pair counts once (epoch 0), not once per
    epoch."""
    rows = labelled(demo_inputs).select(range(4)).to_dict()
    rows["jpg_0"] = [b"not an image"] * 4
    dataset = Dataset.from_dict(rows, features=labelled(demo_inputs).features)
    trainer = SmPOTrainer(config(tmp_path, demo_inputs["sdxl"][0], max_train_steps=4, train_batch_size=2),
                          dataset=dataset)
    expected = r"(?s)None of the 4 updates.*4 undecodable pairs.*jpg_0/jpg_1"
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match=expected):  # an input error (CLIs: status 2)
        trainer.train()
    assert trainer.skipped["empty_updates"] == 4 and trainer.skipped["empty_batches"] == 4
    assert "update 1 trained nothing" in caplog.text
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_missing_columns_and_wrong_types_fail_before_models_load(tmp_path, demo_inputs):
    base = labelled(demo_inputs)
    with pytest.raises(ValueError, match=r"(?s)caption.*found"):
        SmPOTrainer(config(tmp_path), dataset=base.remove_columns(["caption"]))
    wrong = base.cast_column("label_0", Value("string"))
    with pytest.raises(ValueError, match="label_0"):
        SmPOTrainer(config(tmp_path), dataset=wrong)


def test_label_outside_the_allowed_set(tmp_path, demo_inputs):
    base = labelled(demo_inputs)
    bad = base.remove_columns(["label_1"]).map(
        lambda row, i: {"label_0": 0.7 if i == 3 else row["label_0"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"label_0"):
        SmPOTrainer(config(tmp_path), dataset=bad)


def test_empty_after_filtering_lists_the_reasons(tmp_path, demo_inputs):
    base = labelled(demo_inputs)
    ties = base.map(lambda row: {"label_0": 0.5, "label_1": 0.5})
    with pytest.raises(ValueError, match="tie"):
        SmPOTrainer(config(tmp_path, loss_type="dpo", reward_scale=None), dataset=ties)
    nan = base.map(lambda row: {"reward_0": float("nan")})
    with pytest.raises(ValueError, match="non-finite"):
        SmPOTrainer(config(tmp_path), dataset=nan)


def test_an_empty_data_file_is_named_before_models_load(tmp_path, demo_inputs):
    """--dataset_name a data file without rows: an error naming it (datasets said 'Instruction "train" corresponds
    to no data!')."""
    empty = str(tmp_path / "empty.parquet")
    labelled(demo_inputs).select([]).to_parquet(empty)
    with pytest.raises(ValueError, match=f"split 'train' is empty: the data file '{empty}' holds no rows"):
        SmPOTrainer(config(tmp_path, dataset_name=empty))


def test_nonfinite_rewards_are_dropped_and_counted(tmp_path, demo_inputs):
    base = labelled(demo_inputs)
    some = base.map(lambda row, i: {"reward_1": float("inf") if i < 2 else row["reward_1"]}, with_indices=True)
    trainer = SmPOTrainer(config(tmp_path, demo_inputs["sdxl"][0]), dataset=some)
    assert trainer.pair_statistics.dropped_nonfinite == 2


def test_all_equal_rewards_give_a_scale_error(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    flat = tmp_path / "flat"
    shutil.copytree(data, flat)
    stats = json.loads((flat / "reward_stats.json").read_text())
    stats.update(min=0.2, max=0.2, std=0.0, suggested_scale=0.0)
    (flat / "reward_stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="scale"):
        SmPOTrainer(config(tmp_path, model, dataset_name=str(flat), reward_scale=None))


def test_empty_and_overlong_captions(tmp_path, demo_inputs, caplog):
    import smpo_diffusers.models as models

    parts = load_diffusion_parts(config(tmp_path, demo_inputs["sdxl"][0]))
    models._TruncationWarning.warned = False
    caplog.set_level(logging.WARNING)
    long_caption = " ".join(["red circle"] * 100)
    first = encode_prompts(parts, ["", long_caption], "cpu")
    encode_prompts(parts, [long_caption], "cpu")
    assert first.hidden.shape[:2] == (2, 77) and np.isfinite(first.hidden.numpy()).all()
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1


def edit_scheduler_config(model_dir, tmp_path, **changes):
    copy = tmp_path / "model-copy"
    shutil.copytree(model_dir, copy)
    path = copy / "scheduler" / "scheduler_config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return str(copy)


@pytest.mark.parametrize("changes,message", [
    ({"clip_sample": None}, "lacks clip_sample"),
    ({"set_alpha_to_one": None}, "lacks set_alpha_to_one"),
    ({"prediction_type": "sample"}, "prediction_type 'sample' is not supported"),
])
def test_bad_scheduler_configs_are_refused(tmp_path, demo_inputs, changes, message):
    model = edit_scheduler_config(demo_inputs["sdxl"][0], tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        load_diffusion_parts(config(tmp_path, model))


def test_cli_scripts_print_input_errors_without_a_traceback(tmp_path, monkeypatch):
    """A bad flag or path ends the example scripts with `error: <message naming the fix>` and status 2;
    SMPO_DEBUG=1 keeps the traceback."""
    import pathlib
    import subprocess
    import sys

    examples = pathlib.Path(__file__).resolve().parents[1] / "examples"
    bad = subprocess.run([sys.executable, str(examples / "train_smpo_sd.py"), "--resolution", "4", "--output_dir",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --resolution must be at least 8 pixels")
    # evaluate.py's entry point (cli.evaluate_main), in-process (the start-up above is the same for every script):
    # SMPO_DEBUG=1 lets the error through with its traceback
    from smpo_diffusers.cli import evaluate_main, run_cli

    monkeypatch.setenv("SMPO_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="--aligned_model .* does not exist"):
        run_cli(evaluate_main, ["--aligned_model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "e")])
    assert not (tmp_path / "e").exists()  # failed before rendering anything


def test_a_reused_output_dir_holds_one_kind_of_weights(tmp_path, demo_inputs):
    """A full-UNet run into the folder of an earlier LoRA run (and back) removes the other kind's weights, so
    evaluation, the card and an upload cannot pick the stale ones; evaluation defaults to the recorded base.
    Metrics with nothing to average (no inversion in DPO) are left out: strict JSON, no NaN curves."""
    from smpo_diffusers.evaluation import aligned_layout, trained_base_model

    model, data = demo_inputs["sd"]
    out = tmp_path / "out"
    common = dict(dataset_name=data, max_train_steps=1, loss_type="dpo", noise_source="random", reward_scale=None)
    SmPOTrainer(config(tmp_path, model, **common)).train()
    assert aligned_layout(str(out)) == "lora" and trained_base_model(str(out)) == model

    def strict(constant):
        raise AssertionError(f"training_metrics.json holds {constant}")

    metrics = json.loads((out / "training_metrics.json").read_text(), parse_constant=strict)
    assert "inversion_residual" not in metrics["final_metrics"] and metrics["final_metrics"]["loss"] > 0
    SmPOTrainer(config(tmp_path, model, train_method="full", **common)).train()
    assert aligned_layout(str(out)) == "unet" and not (out / "pytorch_lora_weights.safetensors").exists()
    SmPOTrainer(config(tmp_path, model, **common)).train()
    assert aligned_layout(str(out)) == "lora" and not (out / "unet").exists()


def test_settings_the_model_or_a_given_accelerator_contradict_are_refused(tmp_path, demo_inputs):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    with pytest.raises(ValueError, match="accumulates 4 micro-batches but gradient_accumulation_steps is 1"):
        SmPOTrainer(config(tmp_path), dataset=labelled(demo_inputs),
                    accelerator=Accelerator(gradient_accumulation_steps=4))
    with pytest.raises(ValueError, match="mixed_precision='no' but the config says 'bf16'"):
        SmPOTrainer(config(tmp_path, mixed_precision="bf16"), dataset=labelled(demo_inputs), accelerator=Accelerator())
    with pytest.raises(ValueError, match="ddp_timeout=900 would be ignored: the given Accelerator's process group"):
        SmPOTrainer(config(tmp_path, ddp_timeout=900), dataset=labelled(demo_inputs), accelerator=Accelerator())
    # batching and the data order belong to the trainer (train_batch_size is per process; resume skips batches)
    for option in ("split_batches", "dispatch_batches", "use_stateful_dataloader"):
        try:
            given = Accelerator(dataloader_config=DataLoaderConfiguration(**{option: True}))
        except ImportError:  # use_stateful_dataloader needs torchdata
            continue
        with pytest.raises(ValueError, match=f"has {option}=True, which the trainer does not support"):
            SmPOTrainer(config(tmp_path), dataset=labelled(demo_inputs), accelerator=given)
    plugin = GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False)
    given = Accelerator(gradient_accumulation_plugin=plugin)
    with pytest.raises(ValueError, match=r"sync_with_dataloader=False\), which the trainer does not support"):
        SmPOTrainer(config(tmp_path), dataset=labelled(demo_inputs), accelerator=given)
    model = demo_inputs["sd"][0]  # 1000 noise levels
    with pytest.raises(ValueError, match="--num_inversion_steps 5000 exceeds the model's 1000 noise levels"):
        SmPOTrainer(config(tmp_path, model, num_inversion_steps=5000), dataset=labelled(demo_inputs, "sd"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_8bit_adam_without_a_gpu_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="--use_8bit_adam needs a CUDA GPU .* but this run trains on cpu"):
        SmPOTrainer(config(tmp_path, dataset_name="/nonexistent/data", use_8bit_adam=True))


def test_an_output_dir_holding_an_input_is_refused_before_anything_is_written(tmp_path, demo_inputs, monkeypatch):
    """Saving a LoRA into the base pipeline's own folder used to delete its unet/, vae/, text_encoder/...
    (taken for a layout another run left); a base inside a checkpoint-N (pruned) or a hidden temporary folder
    would go the same way. Refused before any write; an input elsewhere under --output_dir is fine."""
    from smpo_diffusers.trainer import check_inputs_outside_output

    base = tmp_path / "base"
    shutil.copytree(demo_inputs["sd"][0], base)
    before = sorted(p.name for p in base.iterdir())

    def write_probe(self):
        raise AssertionError("the output folder was written to before the check")

    monkeypatch.setattr(SmPOTrainer, "_check_output_dir_writable", write_probe)
    for flag, path in [("pretrained_model_name_or_path", base), ("dataset_name", base)]:
        with pytest.raises(ValueError, match=f"--{flag} '{base}' is --output_dir '{base}': the run would overwrite "
                                             "or delete it when it saves. Choose another --output_dir."):
            SmPOTrainer(config(tmp_path, **{"pretrained_model_name_or_path": demo_inputs["sd"][0],
                                            "dataset_name": demo_inputs["sd"][1], flag: str(base),
                                            "output_dir": str(base)}))
    assert sorted(p.name for p in base.iterdir()) == before
    out = tmp_path / "out"
    for inner in ["unet", "checkpoint-3", ".checkpoint-3.tmp", ".checkpoint-2.deleting.tmp", "vae/sub"]:
        (out / inner).mkdir(parents=True)
        with pytest.raises(ValueError, match=f"lies in '{out / inner.split('/')[0]}' of --output_dir"):
            check_inputs_outside_output(str(out), {"pretrained_vae_model_name_or_path": str(out / inner)})
    # elsewhere under --output_dir (the --demo inputs), a parent folder, a Hub id, the cache root itself or a
    # hidden folder of the user's own: nothing the run writes or clears
    (out / "demo-inputs").mkdir()
    (out / ".latent_cache").mkdir()
    check_inputs_outside_output(str(out), {"pretrained_model_name_or_path": str(out / "demo-inputs"),
                                           "dataset_name": str(tmp_path), "latent_cache_dir": str(out),
                                           "pretrained_vae_model_name_or_path": "stabilityai/sdxl-vae"})
    check_inputs_outside_output(str(out), {"latent_cache_dir": str(out / ".latent_cache")})


def test_more_accumulation_than_an_epoch_holds_is_refused(tmp_path, demo_inputs):
    """An update ends with its epoch: with fewer micro-batches per epoch than --gradient_accumulation_steps, every
    update would silently average fewer pairs than the batch size the records and the card report."""
    model, data = demo_inputs["sd"]
    with pytest.raises(ValueError, match=r"--gradient_accumulation_steps 3 is more than the 2 micro-batches an "
                                         r"epoch holds per process \(4 pairs, --train_batch_size 2, 1 process\).*"
                                         r"Use --gradient_accumulation_steps 2 or less"):
        SmPOTrainer(config(tmp_path, model, dataset_name=data, max_train_samples=4, gradient_accumulation_steps=3))
