import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from smpo_diffusers import SmPOConfig
from smpo_diffusers.cli import parse_training_args

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "smpo_diffusers"


def non_default_argv():
    """One non-default value for every SmPOConfig field, as CLI flags; returns (argv, expected values)."""
    values = {
        "pretrained_model_name_or_path": "model", "pretrained_vae_model_name_or_path": "vae", "revision": "r1",
        "variant": "fp16", "cache_dir": "cache", "dataset_name": "data", "dataset_split_name": "validation",
        "max_train_samples": 7, "resolution": 64, "random_crop": True, "no_hflip": True,
        "dataloader_num_workers": 2, "ddp_timeout": 600, "proportion_empty_prompts": 0.1, "tie_policy": "keep",
        "cache_latents": False, "latent_cache_dir": None,  # --cache_latents refuses --random_crop: parsed below
        "train_batch_size": 3, "gradient_accumulation_steps": 4, "max_train_steps": 9,
        "num_train_epochs": None,  # any value with --max_train_steps is refused: parsed on its own below
        "learning_rate": 3e-4, "scale_lr": True, "lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 5,
        "lr_num_cycles": 3, "lr_power": 1.0,  # the default: other values need --lr_scheduler polynomial (below)
        "use_8bit_adam": False, "use_adafactor": False,  # Adafactor refuses the adam_* options: parsed below
        "adam_beta1": 0.8, "adam_beta2": 0.99,
        "adam_weight_decay": 0.0, "adam_epsilon": 1e-6, "max_grad_norm": 2.0, "mixed_precision": "bf16",
        "gradient_checkpointing": True, "allow_tf32": True, "seed": 11, "max_consecutive_nonfinite": 3,
        "use_ema": True, "ema_decay": 0.995,
        "train_method": "lora", "rank": 4,
        "lora_alpha": 16, "lora_target_modules": ["to_q", "to_v"], "loss_type": "smpo", "beta_dpo": 3000.0,
        "gamma": 5.0, "reward_columns": ["ps_score_0", "ps_score_1"], "reward_scale": 0.2,
        "num_inversion_steps": 20, "num_renoise_steps": 2, "inversion_model": "reference",
        "inversion_grid": "reference", "noise_source": "inversion",
        "output_dir": "out", "logging_dir": "tb",
        "inversion_weight_copy": False,  # needs --inversion_model policy: parsed on its own below
        "compile_inversion_copy": False,  # needs --inversion_weight_copy: parsed on its own below
        "report_to": "all", "checkpointing_steps": 50, "checkpoints_total_limit": 3,
        "resume_from_checkpoint": "latest", "validation_prompts": ["a cat", "a dog"], "validation_steps": 10,
        "validation_num_inference_steps": 4, "save_full_pipeline": False, "push_to_hub": True,
        "hub_model_id": "me/model", "hub_private": True,
    }
    argv = []
    for name, value in values.items():
        if value is None:  # the default; the flag is parsed on its own in the test
            continue
        if isinstance(value, bool):
            if value:
                argv.append(f"--{name}")
        elif isinstance(value, list):
            argv += [f"--{name}", *map(str, value)]
        else:
            argv += [f"--{name}", str(value)]
    return argv, values


def test_every_flag_parses_from_the_command_line():
    argv, expected = non_default_argv()
    fields = {f.name for f in dataclasses.fields(SmPOConfig)}
    assert set(expected) == fields, f"untested flags: {fields - set(expected)}"
    config, demo = parse_training_args(argv + ["--demo", "--demo_world", "tiny-random"])
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    assert demo.demo and demo.demo_world == "tiny-random"
    config, _ = parse_training_args(["--inversion_weight_copy", "--compile_inversion_copy", "--cache_latents",
                                     "--latent_cache_dir", "lc"])
    assert config.inversion_weight_copy is True and config.compile_inversion_copy is True
    assert config.cache_latents is True and config.latent_cache_dir == "lc"
    config, _ = parse_training_args(["--use_adafactor", "--adam_weight_decay", "0.01"])
    assert config.use_adafactor is True and config.adam_weight_decay == 0.01
    config, _ = parse_training_args(["--lr_scheduler", "polynomial", "--lr_power", "2.5"])
    assert config.lr_power == 2.5
    config, _ = parse_training_args(["--num_train_epochs", "2"])
    assert config.num_train_epochs == 2 and config.max_train_steps is None
    config, _ = parse_training_args(["--use_8bit_adam"])
    assert config.use_8bit_adam is True
    with pytest.raises(ValueError, match="--demo_world"):
        parse_training_args(["--demo", "--demo_world", "mars"])
    with pytest.raises(ValueError, match="--demo_world only applies with --demo"):
        parse_training_args(["--demo_world", "tiny-random"])


def test_every_flag_is_used_by_the_library():
    """No dead flags: every field is read somewhere outside config.py."""
    sources = "\n".join(p.read_text() for p in SRC.rglob("*.py") if p.name != "config.py")
    config_source = (SRC / "config.py").read_text()
    unused = []
    for f in dataclasses.fields(SmPOConfig):
        if re.search(rf"\.{f.name}\b", sources):
            continue
        # used through a derived property that the library reads
        props = re.findall(rf"def (\w+)\(self\)[^:]*:\n(?:\s+\"\"\".*\"\"\"\n)?\s+return [^\n]*self\.{f.name}\b",
                           config_source)
        if any(re.search(rf"\.{p}\b", sources) for p in props):
            continue
        unused.append(f.name)
    assert not unused, f"flags never read by the library: {unused}"


def test_help_lists_every_flag():
    from transformers import HfArgumentParser

    from smpo_diffusers.cli import DemoArguments

    out = HfArgumentParser((SmPOConfig, DemoArguments)).format_help()  # the parser behind the scripts' --help
    for f in dataclasses.fields(SmPOConfig):
        assert f"--{f.name}" in out, f.name
    assert "--demo" in out


COMMANDS = {"smpo-train-sdxl": ("train_smpo_sdxl.py", "train_main"),
            "smpo-train-sd": ("train_smpo_sd.py", "train_main"),
            "smpo-label-rewards": ("label_rewards.py", "label_main"),
            "smpo-evaluate": ("evaluate.py", "evaluate_main"), "smpo-push-to-hub": ("push_to_hub.py", "push_main")}
"""Installed command -> (the example script it stands for, the entry point both call)."""


def test_installed_commands_are_the_example_scripts(capsys, monkeypatch):
    """`pip install smpo-diffusers` installs one command per example script (examples/ is not in the wheel): each
    calls the entry point its script calls, and bad input ends it like the scripts (error line, status 2)."""
    from importlib.metadata import entry_points

    root = pathlib.Path(__file__).resolve().parents[1]
    installed = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("smpo-")}
    assert sorted(installed) == sorted(COMMANDS)
    for name, (script, entry_point) in COMMANDS.items():
        code = installed[name].load().__code__
        assert entry_point in code.co_names + code.co_varnames, name
        main_block = (root / "examples" / script).read_text().split('if __name__ == "__main__":')[1]
        assert re.search(rf"\b{entry_point}\b", main_block), script
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as ended:
            installed[name].load()()
        assert ended.value.code == 0 and "--output_dir" in capsys.readouterr().out, name
    # the file pip writes on PATH (beside this interpreter), run as a user would
    bad = subprocess.run([str(pathlib.Path(sys.executable).parent / "smpo-train-sd"), "--resolution", "4"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --resolution must be at least")


@pytest.mark.parametrize("kwargs,message", [
    ({"train_method": "qlora"}, "--train_method 'qlora' is not supported"),
    ({"loss_type": "ipo"}, "--loss_type"),
    ({"noise_source": "ddim"}, "--noise_source"),
    ({"train_batch_size": 0}, "--train_batch_size must be >= 1"),
    ({"ddp_timeout": 0}, "--ddp_timeout must be >= 1"),
    ({"learning_rate": -1.0}, "--learning_rate must be a positive number"),
    ({"beta_dpo": 0.0}, "--beta_dpo must be a positive number"),
    ({"reward_scale": float("nan")}, "--reward_scale must be a positive number"),
    ({"num_renoise_steps": -1}, "--num_renoise_steps must be >= 0"),
    ({"proportion_empty_prompts": 1.5}, "--proportion_empty_prompts must be in"),
    ({"resolution": 4}, "--resolution must be at least 8"),
    ({"reward_columns": ["a"]}, "--reward_columns needs two distinct"),
    ({"use_8bit_adam": True, "use_adafactor": True}, "mutually exclusive"),
    ({"noise_source": "random", "inversion_model": "reference"}, "--inversion_model only applies"),
    ({"noise_source": "random", "inversion_grid": "reference"}, "--inversion_grid only applies"),
    ({"inversion_weight_copy": True, "noise_source": "random"}, "--inversion_weight_copy copies the policy"),
    ({"compile_inversion_copy": True}, "--compile_inversion_copy compiles the inversion's weight copy: add"),
    ({"loss_type": "dpo", "reward_scale": 0.1}, "--reward_scale is only used"),
    ({"loss_type": "dpo", "reward_columns": ["a", "b"]}, "--reward_columns is only used by --loss_type smpo"),
    ({"noise_source": "random", "num_inversion_steps": 5}, "--num_inversion_steps and --num_renoise_steps only"),
    ({"noise_source": "random", "num_renoise_steps": 0}, "--num_inversion_steps and --num_renoise_steps only"),
    ({"lr_warmup_steps": 10}, "--lr_scheduler constant ignores --lr_warmup_steps 10; use --lr_scheduler"),
    ({"lr_scheduler": "piecewise_constant"}, "--lr_scheduler 'piecewise_constant' is not supported"),
    ({"train_method": "full", "lora_alpha": 4}, "--lora_alpha only apply to --train_method lora"),
    ({"train_method": "full", "rank": 4, "lora_target_modules": ["to_q"]},
     "--rank/--lora_target_modules only apply to --train_method lora"),
    ({"loss_type": "dpo", "gamma": 2.0}, "--gamma scales SmPO's smoothed labels"),
    ({"use_adafactor": True, "adam_beta2": 0.99, "adam_epsilon": 1e-6},
     "Adafactor ignores --adam_beta2/--adam_epsilon"),
    ({"validation_steps": 5}, "--validation_steps needs --validation_prompts"),
    ({"save_full_pipeline": True}, "--save_full_pipeline applies to --train_method full"),
    ({"resume_from_checkpoint": "/no/such/checkpoint"}, "is not a folder"),
    ({"resume_from_checkpoint": "checkpoint-7"}, "'checkpoint-7' is not a folder (neither here nor in --output_dir"),
    ({"mixed_precision": "fp8"}, "--mixed_precision"),
    ({"max_grad_norm": float("nan")}, "--max_grad_norm must be a finite number >= 0"),
    ({"adam_beta1": 1.5}, "--adam_beta1 must be in [0, 1)"),
    ({"adam_beta2": -0.1}, "--adam_beta2 must be in [0, 1)"),
    ({"adam_epsilon": -1e-8}, "--adam_epsilon must be a finite number >= 0"),
    ({"adam_weight_decay": -0.01, "use_adafactor": True}, "--adam_weight_decay must be a finite number >= 0"),
    ({"seed": -1}, "--seed must be in [0, 2**32)"),
    ({"lr_num_cycles": 0, "lr_scheduler": "cosine_with_restarts"}, "--lr_num_cycles must be >= 1"),
    ({"lr_num_cycles": 2}, "--lr_num_cycles only applies to --lr_scheduler cosine_with_restarts"),
    ({"lr_power": 2.0, "lr_scheduler": "linear"}, "--lr_power only applies to --lr_scheduler polynomial"),
    ({"lr_power": 0.0, "lr_scheduler": "polynomial"}, "--lr_power must be a positive number"),
    ({"validation_num_inference_steps": 5}, "--validation_num_inference_steps needs --validation_prompts"),
    ({"logging_dir": "tb", "report_to": "none"}, "--report_to none writes no tracker logs"),
    ({"logging_dir": "tb", "report_to": "wandb"}, "wandb keeps its runs where WANDB_DIR says"),
    ({"report_to": "comet"}, "--report_to 'comet' is not supported; choose one of"),
    ({"pretrained_model_name_or_path": ".", "revision": "v1"}, "is a local folder, whose files are read as they"),
    ({"max_train_steps": 100, "num_train_epochs": 3}, "--num_train_epochs 3 would be ignored; give one of them"),
    ({"max_train_steps": 100, "num_train_epochs": 1}, "--num_train_epochs 1 would be ignored; give one of them"),
    ({"num_train_epochs": 0}, "--num_train_epochs must be >= 1 when given"),
    ({"loss_type": "dpo", "tie_policy": "keep"}, "--tie_policy keep with --loss_type dpo"),
    ({"use_ema": True, "ema_decay": 1.0}, "--ema_decay must be in (0, 1), got 1.0"),
    ({"use_ema": True, "ema_decay": float("nan")}, "--ema_decay must be in (0, 1), got nan"),
    ({"ema_decay": 0.99}, "--ema_decay sets the --use_ema average's decay; add --use_ema or drop it"),
])
def test_config_errors_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SmPOConfig(**kwargs)


def test_model_family_defaults():
    sdxl = SmPOConfig().resolve_model_defaults(is_sdxl=True)
    assert (sdxl.beta_dpo, sdxl.num_inversion_steps, sdxl.resolution) == (5000.0, 10, 1024)
    sd = SmPOConfig(beta_dpo=100.0).resolve_model_defaults(is_sdxl=False)
    assert (sd.beta_dpo, sd.num_inversion_steps, sd.resolution) == (100.0, 5, 512)
    dpo = SmPOConfig(noise_source="random").resolve_model_defaults(is_sdxl=True)
    assert dpo.num_inversion_steps is None and dpo.resolution == 1024  # nothing is inverted: no grid to report


def test_cli_requires_model_and_data_without_demo(tmp_path, capsys):
    from smpo_diffusers.cli import run_cli, train_main

    with pytest.raises(SystemExit) as exit_info:  # what examples/train_smpo_*.py run
        run_cli(train_main, ["--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    assert exit_info.value.code == 2
    assert ("error: --pretrained_model_name_or_path and --dataset_name required (or pass --demo"
            in capsys.readouterr().err)


def test_cli_leaves_its_process_group_after_a_finished_run(tmp_path):
    """A process still inside a gloo group at exit can abort (status -6): run_cli leaves it after a finished run
    and before exiting on an input error."""
    import torch.distributed as dist

    from smpo_diffusers.cli import run_cli

    def refused():
        raise ValueError("--flag is bad; pass another")

    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'finished'}", rank=0, world_size=1)
        assert run_cli(lambda value: value * 2, 21) == 42
        assert not dist.is_initialized()
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'refused'}", rank=0, world_size=1)
        with pytest.raises(SystemExit) as exit_info:  # an input error leaves it too (without waiting)
            run_cli(refused)
        assert exit_info.value.code == 2 and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_toy_demo_trains_and_reports_before_after(tmp_path):
    """README's main command (the SDXL script's --demo) with 3 updates: the SDXL toy world's pairs are built on
    this first run, SmPO trains on them, the before/after evaluation is printed and written."""
    from smpo_diffusers.toy import TOY_SDXL_ASSETS_DIR

    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, str(SRC.parents[1] / "examples" / "train_smpo_sdxl.py"), "--demo",
                             "--output_dir", str(out), "--max_train_steps", "3"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 3 updates" in result.stdout and "win rate" in result.stdout.lower()
    assert "No LoRA keys associated" not in result.stderr  # diffusers' notice for a UNet-only LoRA, filtered
    for name in ("pytorch_lora_weights.safetensors", "README.md", "evaluation/results.json",
                 "evaluation/grid.png", "demo-inputs/toy-sdxl-preferences-1x-seed0/reward_stats.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["max_train_steps"] == 3 and saved["train_batch_size"] == 8  # user flag kept, toy default used
    assert saved["model_family"] == "sdxl"
    assert os.path.samefile(saved["pretrained_model_name_or_path"], TOY_SDXL_ASSETS_DIR)
    assert (saved["num_inversion_steps"], saved["beta_dpo"]) == (10, 5000.0)  # the SDXL family's defaults


@pytest.mark.slow
def test_tiny_random_demo_of_the_sd_script(tmp_path):
    from smpo_diffusers.cli import run_cli, train_main

    out = tmp_path / "demo"
    # what examples/train_smpo_sd.py runs (in-process: the scripts' own start-up is covered by other tests)
    run_cli(train_main, ["--demo", "--demo_world", "tiny-random", "--output_dir", str(out), "--max_train_steps", "1",
                         "--report_to", "none"], family="sd")
    assert json.loads((out / "training_config.json").read_text())["model_family"] == "sd"


def test_demo_defaults_never_replace_typed_flags(tmp_path, monkeypatch):
    """Typed flags keep their values under --demo even when they equal SmPOConfig's defaults."""
    import smpo_diffusers.toy as toy
    from smpo_diffusers.cli import given_flags, prepare_demo

    layouts = []

    def fake_inputs(folder, seed, layout):
        layouts.append(layout)
        return "toy-model", "toy-data"

    monkeypatch.setattr(toy, "build_toy_demo_inputs", fake_inputs)
    argv = ["--demo", "--output_dir", str(tmp_path), "--train_batch_size", "1", "--report_to=tensorboard",
            "--checkpointing_steps", "500"]
    assert given_flags(argv) == {"demo", "output_dir", "train_batch_size", "report_to", "checkpointing_steps"}
    config, demo = parse_training_args(argv)
    prepare_demo(config, demo, "sd", given=given_flags(argv))
    assert (config.train_batch_size, config.report_to, config.checkpointing_steps) == (1, "tensorboard", 500)
    assert config.max_train_steps == toy.TOY_TRAINING_DEFAULTS["max_train_steps"] == 60  # not typed: the toy's
    assert (config.pretrained_model_name_or_path, config.dataset_name) == ("toy-model", "toy-data")
    # dashes, abbreviations and --no_ complements are the same options to the parser, so to --demo too
    other = ["--demo", "--output-dir", str(tmp_path), "--learning-rate", "0.5", "--max_train_st", "3", "--gamma=2",
             "--validation_prompts", "a", "b"]
    assert given_flags(other) == {"demo", "output_dir", "learning_rate", "max_train_steps", "gamma",
                                  "validation_prompts"}
    config, demo = parse_training_args(other)
    prepare_demo(config, demo, "sd", given=given_flags(other))
    assert (config.learning_rate, config.max_train_steps, config.gamma) == (0.5, 3, 2.0)
    # typed epochs set the length: the toy's max_train_steps is not added to them (that pair is refused)
    epochs = ["--demo", "--output_dir", str(tmp_path), "--num_train_epochs", "2"]
    config, demo = parse_training_args(epochs)
    prepare_demo(config, demo, "sdxl", given=given_flags(epochs))
    assert (config.num_train_epochs, config.max_train_steps) == (2, None)
    dataclasses.replace(config)  # validates
    plain = ["--demo", "--output_dir", str(tmp_path)]
    config, demo = parse_training_args(plain)
    prepare_demo(config, demo, "sdxl", given=given_flags(plain))
    assert (config.max_train_steps, config.beta_dpo) == (120, None)  # the SDXL world's length; β of the family
    assert layouts == ["sd", "sd", "sdxl", "sdxl"]  # each script's --demo trains the toy world of its own layout


def test_tiny_random_demo_logs_to_no_tracker_unless_report_to_is_typed(tmp_path, monkeypatch):
    """tensorboard is not a requirement of the package: --demo --demo_world tiny-random after a plain pip install
    must not need it. Only a typed --report_to turns a tracker on (as with the toy world)."""
    import smpo_diffusers.demo as demo_module
    from smpo_diffusers.cli import given_flags, prepare_demo

    monkeypatch.setattr(demo_module, "build_demo_inputs", lambda folder, family, num_pairs, seed: ("m", "d"))
    for extra, expected in (([], "none"), (["--report_to", "tensorboard"], "tensorboard")):
        argv = ["--demo", "--demo_world", "tiny-random", "--output_dir", str(tmp_path), *extra]
        config, demo = parse_training_args(argv)
        prepare_demo(config, demo, "sd", given=given_flags(argv))
        assert config.report_to == expected and config.resolution == 32
        dataclasses.replace(config)  # validates


def test_demo_values_are_validated_like_typed_ones(tmp_path, monkeypatch, capsys):
    """--logging_dir with --demo: the demo turns trackers off, so the directory would be ignored: an error, as when
    --report_to none is typed."""
    import smpo_diffusers.toy as toy
    from smpo_diffusers.cli import run_cli, train_main

    monkeypatch.setattr(toy, "build_toy_demo_inputs", lambda folder, seed, layout: ("toy-model", "toy-data"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_main, ["--demo", "--output_dir", str(tmp_path), "--logging_dir", "tb"])
    assert exit_info.value.code == 2 and "--report_to none writes no tracker logs" in capsys.readouterr().err


def test_demo_inputs_are_keyed_by_seed(tmp_path):
    """--demo --demo_world tiny-random --seed N in a reused --output_dir: the base model of seed N, not the one an
    earlier run with another seed left."""
    import torch
    from diffusers import UNet2DConditionModel

    from smpo_diffusers.demo import build_demo_inputs

    first, _ = build_demo_inputs(str(tmp_path), family="sd", num_pairs=2, seed=0)
    second, _ = build_demo_inputs(str(tmp_path), family="sd", num_pairs=2, seed=1)
    assert first != second
    weights = [next(UNet2DConditionModel.from_pretrained(path, subfolder="unet").parameters()) for path in
               (first, second)]
    assert not torch.equal(*weights)
    assert build_demo_inputs(str(tmp_path), family="sd", num_pairs=2, seed=0)[0] == first  # reused


def test_training_joins_the_process_group_with_the_ddp_timeout(tmp_path, monkeypatch):
    """--ddp_timeout reaches the group in both ways it can be created: by the trainer's Accelerator, and first by
    the --demo inputs' preparation (accelerate's state is created once; a later Accelerator's timeout is ignored)."""
    import datetime
    import types

    import smpo_diffusers.cli as cli
    from smpo_diffusers.trainer import SmPOTrainer

    import smpo_diffusers.trainer as trainer_module

    asked = []

    def record(timeout_seconds):
        asked.append(timeout_seconds)
        raise InterruptedError("stop here")

    # 600 s too: accelerate's InitProcessGroupKwargs drops a timeout equal to its own default (600 s)
    monkeypatch.setattr(trainer_module, "process_state", record)
    for seconds in (2700, 600):
        with pytest.raises(InterruptedError):
            SmPOTrainer._make_accelerator(types.SimpleNamespace(config=SmPOConfig(
                output_dir=str(tmp_path), report_to="none", ddp_timeout=seconds)))
    monkeypatch.setattr(cli, "process_state", record)
    with pytest.raises(InterruptedError):
        cli.train_main(["--demo", "--output_dir", str(tmp_path), "--ddp_timeout", "900"])
    assert asked == [2700, 600, 900] and SmPOConfig().ddp_timeout == 1800
    # the state process_state makes carries the timeout into torch.distributed.init_process_group
    import accelerate
    import smpo_diffusers.distributed as distributed

    made = []
    monkeypatch.setattr(accelerate, "PartialState", lambda **kwargs: made.append(kwargs))
    distributed.process_state(600)
    assert made[0]["timeout"] == datetime.timedelta(seconds=600)
