"""The accounting behind benchmarks/ (exact evaluation counts and bytes) and smoke runs of the scripts.

Timings are never asserted.
"""

import gc
import json
import math
import os
import shlex
import subprocess
import sys
import types
import weakref

import pytest
import torch

from repo_scripts import load_script
from smpo_diffusers import SmPOConfig, SmPOTrainer
from smpo_diffusers import trainer as trainer_module
from smpo_diffusers.accounting import (
    RESIDENT_CATEGORIES,
    STAGES,
    TrainerStageTimer,
    UNetEvaluationCounter,
    estimate_training_bytes,
    expected_evaluations_per_pair,
    inversion_steps,
    mean_inversion_steps,
    module_tensors,
    optimizer_state_bytes,
    real_model_parts_on_meta,
    real_unet_on_meta,
    tensor_bytes,
    trainer_resident_bytes,
)
from smpo_diffusers.models import encode_images, inversion_scheduler_from_config
from smpo_diffusers.testing import SD15_SCHEDULER_CONFIG, SDXL_SCHEDULER_CONFIG, tiny_sdxl_components

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name):
    return load_script(f"benchmarks/{name}.py")


def refusal(capsys, parse_args, argv):
    """The error message ``parse_args(argv)`` exits with."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def pair_formula(scheduler, pair_timesteps, config):
    """Per-step sample-evaluations written out independently: 4 + 2 steps(t) (K + 1) per pair."""
    pairs = len(pair_timesteps)
    if config.noise_source == "random":
        return 2 * pairs, 2 * pairs
    steps = scheduler.inversion_schedule(torch.as_tensor(pair_timesteps), config.num_inversion_steps,
                                         config.inversion_grid)[1]
    return 2 * pairs, 2 * pairs + sum(2 * int(s) * (config.num_renoise_steps + 1) for s in steps)


# ---------------------------------------------------------------------------------------------- evaluations
def test_step_cost_hook_counts_equal_the_formula_in_every_mode(tmp_path, demo_inputs):
    step_cost = load_benchmark("step_cost")
    model, data = demo_inputs["sdxl"]
    args = step_cost.parse_args(["--train_batch_size", "2", "--warmup_steps", "0", "--timed_steps", "1"])
    assert args.modes == list(step_cost.MODES)  # dpo-random, smpo exact/reference grid, K = 1 and K = 0
    trainers = step_cost.build_trainers(model, data, str(tmp_path), 32, "lora", args.modes, args)
    records = step_cost.run_group(trainers, args)
    seen_timesteps = set()
    for mode, (record,) in records.items():
        config = trainers[mode].config
        grad, no_grad = pair_formula(trainers[mode].parts.scheduler, record["timesteps"], config)
        assert (record["hook_grad"], record["hook_no_grad"]) == (grad, no_grad), mode
        assert record["exact"], mode
        assert record["pairs"] == 2
        seen_timesteps.add(tuple(record["timesteps"]))
        timed = record["seconds"]
        assert (timed["inversion"] > 0) == (config.noise_source == "inversion")
        assert all(timed[stage] > 0
                   for stage in ("policy_forward", "policy_backward", "reference_forward", "optimizer"))
        # the latent cache's twins encode nothing during the step
        encoding = timed["vae_encode"] + timed["text_encode"]
        assert encoding == 0 if mode.endswith("+cache") else (timed["vae_encode"] > 0 and timed["text_encode"] > 0)
        assert math.isclose(sum(timed[s] for s in STAGES), timed["total"], rel_tol=1e-9)
    assert set(records) == set(args.modes) | {"dpo-random+cache", "smpo-exact-K1+cache"}
    # every mode sees the same timesteps, so their times are comparable step by step
    assert len(seen_timesteps) == 1
    assert records["smpo-exact-K1"][0]["hook_no_grad"] > records["smpo-exact-K0"][0]["hook_no_grad"]
    rows = step_cost.summarise({"family": "tiny-sdxl", "resolution": 32, "method": "lora"}, records, trainers)
    text = step_cost.render(rows, args, 1.0)
    assert "| tiny-sdxl | 32 | lora | smpo-refgrid-K0 |" in text
    assert "| NO (" not in text  # the "hook == formula" column (not any "NO" in, say, a temporary path)
    assert "## Latent cache" in text and "| tiny-sdxl | 32 | lora | smpo-exact-K1 |" in text.split("## Latent cache")[1]
    # the stage timer put every wrapped callable back
    trainer = trainers["smpo-exact-K1"]
    assert "_invert" not in vars(trainer) and "_unet_call" not in vars(trainer)
    assert trainer_module.encode_images is encode_images
    assert "step" not in vars(trainer.lr_scheduler) and "backward" not in vars(trainer.accelerator)


def test_counts_with_a_frozen_reference_copy_and_the_trainers_own_report(tmp_path, demo_inputs):
    model, data = demo_inputs["sd"]
    config = SmPOConfig(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(tmp_path / "o"),
                        resolution=32, train_batch_size=3, max_train_steps=2, report_to="none", train_method="full",
                        inversion_model="reference", inversion_grid="reference", num_renoise_steps=2)
    trainer = SmPOTrainer(config)
    batch = next(iter(trainer.train_dataloader))
    with UNetEvaluationCounter(trainer.unwrapped_unet, trainer.reference.frozen_unet) as both, \
            UNetEvaluationCounter(trainer.reference.frozen_unet) as reference_only, \
            TrainerStageTimer(trainer) as timer:
        step, _ = timer.run_step(batch, torch.Generator().manual_seed(3))
    grad, no_grad = pair_formula(trainer.parts.scheduler, step.timesteps.tolist(), config)
    assert (both.grad, both.no_grad) == (grad, no_grad) == (6, 6 + step.unet_evaluations["inversion"])
    # inversion and the reference forward run on the frozen copy; the policy only with grad
    assert (reference_only.grad, reference_only.no_grad) == (0, no_grad)
    assert both.grad_calls == 1 and both.no_grad_calls >= 1
    with pytest.raises(ValueError, match="at least one module"):
        UNetEvaluationCounter(None)


def test_expected_evaluations_per_pair_for_uniform_t():
    sdxl = inversion_scheduler_from_config(SDXL_SCHEDULER_CONFIG)
    sd = inversion_scheduler_from_config(SD15_SCHEDULER_CONFIG)
    assert mean_inversion_steps(sdxl, 10, "exact") == 5.5 and mean_inversion_steps(sd, 5, "exact") == 3.0
    # reference grid, written out: the number of grid levels strictly below t, averaged over all t
    for scheduler, n in ((sdxl, 10), (sd, 5)):
        scheduler.set_timesteps(n)
        grid = scheduler.timesteps.tolist()
        brute = sum(sum(level < t for level in grid) for t in range(1000)) / 1000
        assert mean_inversion_steps(scheduler, n, "reference") == pytest.approx(brute, abs=1e-12)
    per_pair = expected_evaluations_per_pair(sdxl, noise_source="inversion", num_inversion_steps=10,
                                             num_renoise_steps=1)
    assert per_pair == {"mean_steps": 5.5, "grad": 2.0, "no_grad": 24.0, "total": 26.0}  # 4 + 2 * 5.5 * 2
    k0 = expected_evaluations_per_pair(sdxl, noise_source="inversion", num_inversion_steps=10, num_renoise_steps=0)
    assert k0["total"] == 15.0
    dpo = expected_evaluations_per_pair(sdxl, noise_source="random", num_inversion_steps=10, num_renoise_steps=1)
    assert dpo["total"] == 4.0
    assert inversion_steps(sdxl, torch.tensor([0, 99, 100, 999]), 10).tolist() == [1, 1, 2, 10]


# ---------------------------------------------------------------------------------------------- bytes
def test_byte_counting_dedupes_shared_storage():
    base = torch.zeros(100)
    view = base[10:20]
    half = torch.zeros(5, dtype=torch.float16)
    assert tensor_bytes([base, view, half, base]) == 400 + 10
    assert tensor_bytes([view]) == 400  # a view keeps its whole storage resident
    shared = torch.nn.Linear(4, 4)
    tied = torch.nn.Sequential(shared, shared)
    assert tensor_bytes(module_tensors(tied)) == (16 + 4) * 4
    meta = torch.empty(3, 7, device="meta", dtype=torch.bfloat16)
    assert tensor_bytes([meta, meta]) == 42


def test_real_model_parameter_counts_on_meta():
    assert sum(p.numel() for p in real_unet_on_meta("sd15").parameters()) == 859_520_964
    parts = real_model_parts_on_meta("sdxl")
    assert sum(p.numel() for p in parts["unet"].parameters()) == 2_567_463_684
    assert all(p.device.type == "meta" for p in parts["unet"].parameters())
    assert sum(p.numel() for p in parts["vae"].parameters()) == 83_653_863
    assert [sum(p.numel() for p in e.parameters()) for e in parts["text_encoders"]] == [123_060_480, 694_659_840]
    with pytest.raises(ValueError, match="family"):
        real_unet_on_meta("sd3")


def test_eight_bit_adam_state_is_computed_from_shapes():
    big, small = torch.empty(5000, device="meta"), torch.empty(10, 10, device="meta")
    assert optimizer_state_bytes([big, small], "adamw8bit") == 2 * 5000 + 8 * math.ceil(5000 / 256) + 8 * 100 + 2048
    with pytest.raises(ValueError, match="optimizer must be one of"):
        optimizer_state_bytes([big], "sgd")


@pytest.mark.parametrize("method,optimizer,copy,ema", [("lora", "adamw", False, False),
                                                       ("full", "adafactor", False, True),
                                                       ("lora", "adamw", True, False)])
def test_tiny_trainer_bytes_are_measured_exactly_and_lora_keeps_one_unet(tmp_path, demo_inputs, method, optimizer,
                                                                         copy, ema):
    model, data = demo_inputs["sdxl"]
    config = SmPOConfig(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(tmp_path / "o"),
                        resolution=32, train_batch_size=1, max_train_steps=2, report_to="none", train_method=method,
                        use_adafactor=optimizer == "adafactor", inversion_weight_copy=copy, use_ema=ema)
    trainer = SmPOTrainer(config)
    step = trainer.compute_loss(next(iter(trainer.train_dataloader)), torch.Generator().manual_seed(0))
    trainer.accelerator.backward(step.loss)
    trainer.optimizer.step()
    measured = trainer_resident_bytes(trainer)
    components = tiny_sdxl_components(seed=0)
    computed = estimate_training_bytes(components["unet"], components["vae"],
                                       [components["text_encoder"], components["text_encoder_2"]], is_sdxl=True,
                                       train_method=method, optimizers=[optimizer], weight_dtype=torch.float32,
                                       inversion_copy=copy, ema=ema)[optimizer].by_category
    assert {c: measured[c] for c in RESIDENT_CATEGORIES} == computed
    assert measured["ema"] == (measured["policy_trainable"] if ema else 0)  # --use_ema: an fp32 copy
    assert measured["optimizer_state"] > 0 and measured["gradients"] == measured["policy_trainable"]
    one_unet = tensor_bytes(module_tensors(components["unet"]))
    unet_resident = measured["policy_trainable"] + measured["policy_frozen"] + measured["reference_copy"]
    # --inversion_weight_copy: one more UNet in the weight dtype (fp32 here), outside the one-UNet bound
    assert measured["inversion_copy"] == (one_unet if copy else 0)
    if method == "lora":
        assert measured["reference_copy"] == 0
        assert unet_resident <= 1.05 * (one_unet + measured["policy_trainable"])
    else:
        assert measured["reference_copy"] == one_unet == measured["policy_trainable"]


def test_memory_script_computes_real_sd15_on_meta_and_renders(tmp_path, capsys):
    """main() with one real family and a non-default LoRA rank (~7 s: four real steps of the tiny trainer)."""
    memory = load_benchmark("memory")
    n, tensors = 859_520_964, len(list(real_unet_on_meta("sd15").parameters()))
    output = tmp_path / "memory.md"
    measured_tiny, real = memory.main(["--real_families", "sd15", "--rank", "4", "--output", str(output)])
    assert {r["family"] for r in real} == {"sd15"}
    assert next(r for r in real if r["method"] == "lora")["trainable_parameters"] == 797_184  # q, k, v, out at rank 4
    components = tiny_sdxl_components(seed=0)
    lora_bytes = {rank: estimate_training_bytes(
        components["unet"], components["vae"], [components["text_encoder"], components["text_encoder_2"]],
        is_sdxl=True, train_method="lora", optimizers=["adamw"], weight_dtype=torch.float32,
        rank=rank)["adamw"].by_category["policy_trainable"] for rank in (4, 8)}
    tiny_lora = next(r for r in measured_tiny if (r["method"], r["optimizer"]) == ("lora", "adamw"))
    assert tiny_lora["measured"]["policy_trainable"] == lora_bytes[4] != lora_bytes[8]
    written = output.read_text()
    assert "python benchmarks/memory.py --real_families sd15 --rank 4" in written
    assert "LoRA rank 4." in written and "LoRA: rank 4," in written and "## 2. Real SD 1.5, computed" in written
    assert "| sd15 | 859,520,964 | lora | 797,184 |" in written and "| sdxl |" not in written
    assert "--rank must be >= 1, got 0" in refusal(capsys, memory.parse_args, ["--rank", "0"])
    rows = {(r["method"], r["optimizer"]): r["computed"] for r in real}
    adamw = rows["full", "adamw"]
    assert adamw["policy_trainable"] == adamw["gradients"] == 4 * n and adamw["reference_copy"] == 2 * n
    assert adamw["policy_frozen"] == 0 and adamw["optimizer_state"] == 8 * n + 4 * tensors
    assert adamw["vae"] == 2 * 83_653_863  # SD 1.5: the VAE runs in the weight dtype
    assert rows["full", "adafactor"]["optimizer_state"] < 0.6 * 4 * n
    assert 2 * n < rows["full", "adamw8bit"]["optimizer_state"] < 2.1 * n
    for optimizer in memory.OPTIMIZER_FLAGS:
        lora = rows["lora", optimizer]
        assert lora["reference_copy"] == 0 and lora["policy_frozen"] == 2 * n
        assert memory.unet_resident(lora) <= 1.05 * (2 * n + lora["policy_trainable"])
    for method in ("lora", "full"):  # --inversion_weight_copy: one more 2-byte UNet, nothing else changes
        with_copy, without = rows[f"{method} +copy", "adamw"], rows[method, "adamw"]
        assert with_copy == without | {"inversion_copy": 2 * n} and without["inversion_copy"] == 0
    # --use_ema: an fp32 copy of the trainable (fp32) UNet, nothing else changes
    assert rows["full +ema", "adafactor"] == rows["full", "adafactor"] | {"ema": 4 * n}
    tiny = [{"method": "lora", "optimizer": "adamw8bit", "source": "computed (no CUDA + bitsandbytes)",
             "measured": None, "one_unet": 100,
             "computed": dict.fromkeys(RESIDENT_CATEGORIES, 0) | {"policy_frozen": 100, "policy_trainable": 4}}]
    text = memory.render(tiny, real, 1.0, 4)
    assert "| lora | adamw8bit | computed (no CUDA + bitsandbytes) |" in text
    assert "| sd15 | 859,520,964 | full |" in text and "LoRA: rank 4" in text


# ---------------------------------------------------------------------------------------------- GPU script
def test_gpu_sdxl_step_smoke_runs_on_cpu(tmp_path, monkeypatch):
    gpu = load_benchmark("gpu_sdxl_step")
    output = tmp_path / "gpu.md"
    # Watch the +copy set-up's inversion copy: once the DPO baseline drops it, it must be gone when the memory is
    # freed and the peak reset (free_memory), and during every later DPO step.
    copies, alive_after_free, alive_in_dpo_steps = {}, [], []
    real_train_step, real_free_memory = gpu.train_step, gpu.free_memory

    def watched_train_step(models, scheduler, cond, pair_timestep, mode):
        if models.inversion_copy is not None:
            copies.setdefault(id(models.inversion_copy), weakref.ref(models.inversion_copy.module))
        elif copies and mode == "dpo" and models.setup.inversion_copy:
            gc.collect()
            alive_in_dpo_steps.append(any(ref() is not None for ref in copies.values()))
        return real_train_step(models, scheduler, cond, pair_timestep, mode)

    def watched_free_memory(device):
        real_free_memory(device)  # collects garbage
        if copies:
            alive_after_free.append(any(ref() is not None for ref in copies.values()))

    monkeypatch.setattr(gpu, "train_step", watched_train_step)
    monkeypatch.setattr(gpu, "free_memory", watched_free_memory)
    report = gpu.main(["--smoke", "--timed_pairs", "1", "--output", str(output)])
    assert [r["status"] for r in report["results"]] == ["ok"] * len(gpu.SMOKE_SETUPS)
    assert report["timed_pairs"] == 1 and len(report["pair_timesteps"]) == 2  # rounded up to a cycle of 2
    for result in report["results"]:
        assert [m["timed_pairs"] for m in result["modes"].values()] == [2, 2]
        smpo, dpo = result["modes"]["smpo"]["evals_per_pair"], result["modes"]["dpo"]["evals_per_pair"]
        assert smpo == {"grad": 2.0, "no_grad": 24.0}  # the timed pairs average exactly E[steps] = 5.5
        assert dpo == {"grad": 2.0, "no_grad": 2.0}
        assert result["flop_ratio"] == pytest.approx((24 + 2 * gpu.BACKWARD_FLOP_MULTIPLIER[result["method"]])
                                                     / (2 + 2 * gpu.BACKWARD_FLOP_MULTIPLIER[result["method"]]))
    assert all(result["warmup_s"] > 0 for result in report["results"])
    copied = report["results"][0]  # the +copy set-up: the DPO baseline runs without the copy it cannot use
    assert copied["modes"]["smpo"]["resident_gb"]["inversion_copy"] > 0
    assert len(copies) == 1 and alive_in_dpo_steps == [False] * 2  # the timed DPO steps (the warm-up's had it)
    assert alive_after_free and not any(alive_after_free)  # already when dropped, before the DPO peak is reset
    assert copied["modes"]["dpo"]["inversion_copy_freed"] is True  # the script's own check (JSON), for the GPU
    assert "inversion_copy_freed" not in copied["modes"]["smpo"]
    assert report["forward_tflop"] > 0
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["device"].startswith("CPU") or torch.cuda.is_available()
    text = output.read_text()
    assert "| full bf16 +ckpt adafactor +copy | ok | smpo |" in text  # copy evaluations counted too
    assert "the 2 timed pairs per mode (--timed_pairs 1, rounded up to a whole cycle)" in text
    if not torch.cuda.is_available():
        assert all(m["gpu_state"] is None for r in report["results"] for m in r["modes"].values())
        rows = [line for line in text.splitlines() if line.startswith(("| full", "| lora"))]
        assert len(rows) == 2 * len(gpu.SMOKE_SETUPS)
        assert all(row.endswith("| - |") and row.count("|") == 20 for row in rows)  # 19 cells, no GPU state


def test_gpu_sdxl_step_records_the_gpu_state_when_nvml_answers(monkeypatch):
    """After each mode's timed steps the SM clock, temperature and power are read (through torch.cuda's NVML
    helpers), so that a slowdown across set-ups can be told apart from clocks or power; without NVML: nothing."""
    gpu = load_benchmark("gpu_sdxl_step")
    cuda = torch.device("cuda")
    assert gpu.gpu_state(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device: 1980)
    monkeypatch.setattr(torch.cuda, "temperature", lambda device: 47)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda device: 612_400)  # milliwatts
    state = gpu.gpu_state(cuda)
    assert state == {"sm_clock_mhz": 1980, "temperature_c": 47, "power_w": pytest.approx(612.4)}
    assert gpu.render_gpu_state(state) == "1980 / 47 / 612"

    def no_nvml(device):
        raise ModuleNotFoundError("pynvml does not seem to be installed or it can't be imported.")

    monkeypatch.setattr(torch.cuda, "temperature", no_nvml)
    assert gpu.gpu_state(cuda) is None and gpu.render_gpu_state(None) == "-"


def test_gpu_sdxl_step_runs_chosen_setups_and_refuses_unknown_names(tmp_path):
    gpu = load_benchmark("gpu_sdxl_step")
    report = gpu.main(["--smoke", "--timed_pairs", "3", "--output", str(tmp_path / "gpu.md"),
                       "--only", "lora fp16 adamw"])
    assert [r["setup"] for r in report["results"]] == ["lora fp16 adamw"]
    assert [m["timed_pairs"] for m in report["results"][0]["modes"].values()] == [4, 4]  # 3, to a whole cycle
    assert {s.name for s in gpu.SETUPS} >= {"full bf16 adamw +copy +compile", "full bf16 adamw +copy +cl"}
    with pytest.raises(SystemExit):
        gpu.parse_args(["--output", str(tmp_path / "x.md"), "--only", "full bf16 warp-drive"])
    checked = ["--output", str(tmp_path / "y.md"), "--check_args", "--only", "full bf16 adamw +copy +compile"]
    assert gpu.main(checked) is None
    assert not (tmp_path / "y.md").exists()  # checked, nothing run or written


def test_gpu_sdxl_step_without_cuda_exits_cleanly(tmp_path, monkeypatch):
    gpu = load_benchmark("gpu_sdxl_step")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    output = tmp_path / "gpu.md"
    assert gpu.main(["--output", str(output), "--timed_pairs", "2"]) is None
    assert "no CUDA device" in output.read_text()
    assert f"python benchmarks/gpu_sdxl_step.py --output {output} --timed_pairs 2" in output.read_text()


def fake_missing_torch(tmp_path):
    """A PYTHONPATH entry whose torch fails to import as a missing one does."""
    fake = tmp_path / "no_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    return str(fake)


def test_gpu_sdxl_step_checks_arguments_before_importing_torch(tmp_path, capsys):
    """A bad argument exits 2 (argparse) even where torch is missing; with good arguments --check_args then fails
    on the missing package with its own error (exit 1), so gpu_check.sh can tell the two apart."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([fake_missing_torch(tmp_path), "src"])}

    def script(*argv):
        return subprocess.run([sys.executable, "benchmarks/gpu_sdxl_step.py", "--output", str(tmp_path / "x.md"),
                               *argv], cwd=os.path.dirname(BENCHMARKS), env=env, capture_output=True, text=True,
                              timeout=120)

    bad = script("--only", "full bf16 warp-drive", "--check_args")
    assert bad.returncode == 2 and "unknown set-up(s) ['full bf16 warp-drive']" in bad.stderr, bad.stderr
    missing = script("--only", "full bf16 adamw +copy", "--check_args")
    assert missing.returncode == 1 and "No module named 'torch'" in missing.stderr, missing.stderr
    assert not (tmp_path / "x.md").exists()
    gpu = load_benchmark("gpu_sdxl_step")
    # no abbreviations (gpu_check.sh refuses --time_budget_s among the arguments it passes on); finite budgets
    assert "unrecognized arguments: --time_budget 5" in refusal(capsys, gpu.parse_args,
                                                                ["--output", "x.md", "--time_budget", "5"])
    for budget in ("nan", "inf", "0"):
        assert "--time_budget_s a finite number > 0" in refusal(capsys, gpu.parse_args,
                                                                ["--output", "x.md", "--time_budget_s", budget])


def test_gpu_sdxl_step_leaves_compilation_out_of_the_longest_setup(tmp_path, monkeypatch):
    """A +compile set-up's warm-up (compilation) does not make main() skip the eager set-ups after it: ``longest``
    counts its build and timed steps, plus an eager warm-up (one step per mode). Times come from a fake clock."""
    gpu = load_benchmark("gpu_sdxl_step")
    now = [0.0]
    monkeypatch.setattr(gpu, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def fake_run_setup(setup, *args, **kwargs):
        warmup = 55.0 if setup.compiled else 1.5
        now[0] += 3.5 + warmup + 6 * 1.0 + 6 * 0.5  # build, warm-up, 6 timed pairs of SmPO (1 s) and DPO (0.5 s)
        return {"setup": setup.name, **setup.__dict__, "status": "faked", "warmup_s": warmup,
                "modes": {"smpo": {"s_per_pair_mean": 1.0}, "dpo": {"s_per_pair_mean": 0.5}}}

    monkeypatch.setattr(gpu, "run_setup", fake_run_setup)
    names = ["full bf16 adamw +copy +compile", "full bf16 adamw +copy", "full bf16 adamw", "lora bf16 adamw"]
    report = gpu.main(["--smoke", "--time_budget_s", "100", "--output", str(tmp_path / "gpu.md"), "--only", *names])
    # compiled: 67.5 s of which 14 s count; then 14 s each: 67.5 + 14 + 14 < 100, and the fourth would pass 100
    assert [r["status"] for r in report["results"]][:3] == ["faked"] * 3, report["results"]
    assert report["results"][3]["status"].startswith("skipped (time budget: 96 s used, ~14 s needed")
    assert gpu.estimate_s({"wall_s": 10.0, "compiled": False, "warmup_s": 5.0}) == 10.0
    assert gpu.estimate_s({"wall_s": 10.0, "compiled": True, "warmup_s": 5.0, "modes": {}}) == 5.0  # failed timing


def run_gpu_check(tmp_path, *args, stub_pytest=False, pythonpath="", limit=None):
    """``bash benchmarks/gpu_check.sh ARGS`` from a folder mirroring the repository (no .whl/ wheels to install),
    with this interpreter as python3; ``stub_pytest``: the cuda tests (``python3 -m pytest``) only echo their
    arguments. Returns the finished process."""
    root = os.path.dirname(BENCHMARKS)
    mirror = tmp_path / "repo"
    if not mirror.exists():
        mirror.mkdir()
        for name in ("src", "benchmarks", "tests"):
            (mirror / name).symlink_to(os.path.join(root, name))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = 'if [ "$1 $2" = "-m pytest" ]; then echo "stub pytest $*"; exit 0; fi\n' if stub_pytest else ""
    (bin_dir / "python3").write_text(f'#!/usr/bin/env bash\n{stub}exec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": pythonpath, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("GPU_CHECK_LIMIT_S", None)
    if limit is not None:
        env["GPU_CHECK_LIMIT_S"] = limit
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=mirror, env=env, capture_output=True,
                          text=True, timeout=300)


GPU_CHECK_REFUSALS = [
    (["300s"], "BUDGET_S must be a whole number of seconds >= 0, got '300s'"),
    (["1e-9"], "got '1e-9'"),
    (["0.5"], "got '0.5'"),
    ([""], "got ''"),
    (["--only", "full bf16 adamw +copy"], "got '--only' (BUDGET_S forgotten before the benchmark arguments?)"),
    (["301"], "BUDGET_S 301 + 300 s (installs and imports 60 s, tests 150 s, the benchmark's last set-up 90 s) "
              "exceeds the 600 s limit of one command: use BUDGET_S <= 300"),
    (["300", "--timed_pairs", "2", "--time_budget_s", "100"], "--time_budget_s is BUDGET_S, the second argument"),
    (["300", "--time_budget_s=100"], "--time_budget_s is BUDGET_S"),
    (["0", "--only", "full bf16 adamw"], "BUDGET_S 0 runs the tests alone: the benchmark arguments"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's plumbing on a machine without CUDA")
@pytest.mark.parametrize("args,message", GPU_CHECK_REFUSALS,
                         ids=[" ".join(args) or "empty" for args, _ in GPU_CHECK_REFUSALS])
def test_gpu_check_script_refuses_a_bad_budget_before_anything_runs(tmp_path, args, message):
    """Each of these once ran the tests and skipped (or mis-budgeted) the benchmark, reporting success."""
    checked = run_gpu_check(tmp_path, str(tmp_path / "out"), *args, stub_pytest=True)
    assert checked.returncode == 2 and message in checked.stderr, checked.stdout + checked.stderr
    assert "usage: bash benchmarks/gpu_check.sh OUT_DIR [BUDGET_S [BENCHMARK_ARGS...]]" in checked.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's plumbing on a machine without CUDA")
def test_gpu_check_script_passes_benchmark_arguments_on(tmp_path):
    """benchmarks/gpu_check.sh OUT BUDGET [ARGS...]: ARGS reach gpu_sdxl_step.py's run (here without CUDA, which
    writes its command line and exits 0), after the cuda tests (stubbed); the limit is for one command only."""
    out = tmp_path / "out"
    only = ["full bf16 adamw +copy", "full bf16 adamw +copy +compile"]
    ran = run_gpu_check(tmp_path, str(out), "301", "--timed_pairs", "2", "--only", *only, stub_pytest=True, limit="0")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "gpu_sdxl_step: arguments ok" in ran.stdout and "cuda tests exit 0; benchmark exit 0" in ran.stdout
    assert "stub pytest -m pytest -m cuda tests/test_cuda.py" in (out / "cuda_tests.log").read_text()
    assert "torch " + torch.__version__ in (out / "environment.txt").read_text()
    assert "no CUDA device" in (out / "gpu_sdxl_step.log").read_text()
    assert (f"--output {out / 'gpu_sdxl_step.md'} --time_budget_s 301 --timed_pairs 2 --only "
            f"'{only[0]}' '{only[1]}'\n") in (out / "gpu_sdxl_step.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's plumbing on a machine without CUDA")
def test_gpu_check_script_fails_early_on_bad_arguments_or_a_missing_package(tmp_path):
    """A bad set-up name exits 2, and a missing package 1 with its own error and a word on .whl/ (once both were
    "bad benchmark arguments"), after the environment is written and before the tests spend device time."""
    out = tmp_path / "out"
    bad = run_gpu_check(tmp_path, str(out), "1", "--only", "full bf16 warp-drive")
    assert bad.returncode == 2 and "unknown set-up(s) ['full bf16 warp-drive']" in bad.stderr, bad.stdout + bad.stderr
    assert "bad benchmark arguments: --only full bf16 warp-drive" in bad.stdout
    assert (out / "environment.txt").exists() and not (out / "cuda_tests.log").exists()

    missing = run_gpu_check(tmp_path, str(out), "1", "--only", "full bf16 adamw +copy",
                            pythonpath=fake_missing_torch(tmp_path))
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "No module named 'torch'" in missing.stderr and "bad benchmark arguments" not in missing.stdout
    assert "A missing package must be carried as a wheel in .whl/ (no .whl/ was carried" in missing.stdout
    assert "torch unavailable: No module named 'torch'" in (out / "environment.txt").read_text()
    assert not (out / "cuda_tests.log").exists()


def test_gpu_sdxl_step_balanced_timesteps_and_optimizer():
    gpu = load_benchmark("gpu_sdxl_step")
    scheduler = inversion_scheduler_from_config(SDXL_SCHEDULER_CONFIG)
    levels = gpu.balanced_timesteps(scheduler, 3)
    assert len(levels) == 4 and inversion_steps(scheduler, torch.tensor(levels), 10).double().mean() == 5.5
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    from transformers.optimization import Adafactor

    assert isinstance(gpu.make_optimizer(gpu.Setup("full", "bf16", True, "adafactor"), params), Adafactor)
    assert isinstance(gpu.make_optimizer(gpu.Setup("lora", "bf16", False, "adamw"), params), torch.optim.AdamW)


def test_gpu_sdxl_step_skips_every_setup_past_the_time_budget(tmp_path):
    gpu = load_benchmark("gpu_sdxl_step")
    output = tmp_path / "gpu.md"
    report = gpu.main(["--smoke", "--time_budget_s", "1e-9", "--output", str(output)])
    assert [r["setup"] for r in report["results"]] == [s.name for s in gpu.SMOKE_SETUPS]
    assert all(r["status"].startswith("skipped (time budget:") for r in report["results"])
    assert report["time_budget_s"] == 1e-9
    text = output.read_text()
    assert f"| {gpu.SMOKE_SETUPS[0].name} | skipped (time budget:" in text
    assert "--time_budget_s 1e-9" in text  # the report's command is this call's, not the test runner's
    assert json.loads((tmp_path / "gpu.json").read_text())["results"][1]["status"].startswith("skipped (time")


# ---------------------------------------------------------------------------------- other scripts: arguments, runs
def test_toy_alignment_arguments_refuse_zero_and_bad_seeds_and_keep_given_values(capsys):
    study = load_benchmark("toy_alignment")
    defaults = study.parse_args([])
    assert defaults.seeds == [0, 1, 2] and defaults.variants == list(study.VARIANTS)
    assert (defaults.max_train_steps, defaults.eval_seeds_per_prompt, defaults.jobs) == (60, 4, 1)
    quick = study.parse_args(["--quick"])
    assert (quick.seeds, quick.eval_seeds_per_prompt, quick.variants) == ([0], 2, [study.FULL_SMPO])
    given = study.parse_args(["--seeds", "5", "0", "--max_train_steps", "3", "--eval_seeds_per_prompt", "1"])
    assert (given.seeds, given.max_train_steps, given.eval_seeds_per_prompt) == ([5, 0], 3, 1)
    for flag in ("--max_train_steps", "--eval_seeds_per_prompt", "--jobs", "--train_batch_size",
                 "--pairs_per_caption"):
        assert f"{flag} must be >= 1, got 0" in refusal(capsys, study.parse_args, [flag, "0"])
    assert "--seeds must each be in [0, 2**32), got [-1]" in refusal(capsys, study.parse_args, ["--seeds", "0", "-1"])
    assert "--seeds has repeats [1, 1]" in refusal(capsys, study.parse_args, ["--seeds", "1", "1"])
    assert "--seeds: expected at least one argument" in refusal(capsys, study.parse_args, ["--seeds"])
    assert "invalid int value: 'x'" in refusal(capsys, study.parse_args, ["--seeds", "x"])


def test_toy_alignment_refuses_pairs_built_with_other_settings(tmp_path, capsys):
    """A --work_dir's pairs/ is reused only when it holds the pairs this study asks for (checked from its summary,
    before anything is built or trained)."""
    study = load_benchmark("toy_alignment")
    from smpo_diffusers.toy import toy_caption_split

    pairs = tmp_path / "pairs"
    assert study.check_existing_pairs(str(pairs), 1) is None  # nothing there yet: the study builds it
    pairs.mkdir()
    (pairs / "reward_stats.json").write_text("{}")
    summary = {"num_pairs": len(toy_caption_split()[0]), "seed": study.PAIRS_SEED}
    (pairs / "toy_preferences.json").write_text(json.dumps(summary))
    assert study.check_existing_pairs(str(pairs), 1) == summary
    assert study.parse_args(["--work_dir", str(tmp_path)]).pairs_per_caption == 1
    message = refusal(capsys, study.parse_args, ["--work_dir", str(tmp_path), "--pairs_per_caption", "2"])
    assert f"holds {summary['num_pairs']} toy pairs" in message and "--pairs_per_caption it was built with" in message
    args = study.parse_args(["--work_dir", str(tmp_path)])
    args.pairs_per_caption = 2  # run_study checks too (for callers that skip parse_args)
    with pytest.raises(ValueError, match="another --work_dir"):
        study.run_study(args)
    (pairs / "toy_preferences.json").write_text(json.dumps(summary | {"seed": 3}))
    with pytest.raises(ValueError, match="pair seed 3"):
        study.check_existing_pairs(str(pairs), 1)


def test_step_cost_refuses_cached_modes_left_out_of_modes(capsys):
    step_cost = load_benchmark("step_cost")
    message = refusal(capsys, step_cost.parse_args, ["--modes", "smpo-exact-K0"])
    assert "--cached_modes ['smpo-exact-K1'] are not in --modes ['dpo-random', 'smpo-exact-K0']" in message
    assert step_cost.parse_args(["--modes", "smpo-exact-K0", "--cached_modes"]).cached_modes == []
    assert "--resolutions must each be >= 8" in refusal(capsys, step_cost.parse_args, ["--resolutions", "4"])
    assert "--modes has repeats" in refusal(capsys, step_cost.parse_args, ["--modes", "dpo-random", "dpo-random"])


def test_step_cost_main_writes_the_report_of_the_chosen_groups(tmp_path):
    step_cost = load_benchmark("step_cost")
    output = tmp_path / "report" / "step_cost.md"
    argv = ["--families", "sd", "--methods", "lora", "--resolutions", "32", "--modes", "smpo-exact-K0",
            "--cached_modes", "dpo-random", "--timed_steps", "1", "--warmup_steps", "0", "--seed", "7",
            "--work_dir", str(tmp_path / "work"), "--output", str(output)]
    rows = step_cost.main(argv)
    assert [(r["family"], r["resolution"], r["method"], r["mode"]) for r in rows] == [
        ("tiny-sd", 32, "lora", mode) for mode in ("dpo-random", "smpo-exact-K0", "dpo-random+cache")]
    assert all(r["steps"] == 1 and r["exact_steps"] == 1 for r in rows)
    text = output.read_text()
    assert "python benchmarks/step_cost.py --families sd" in text and "--seed 7" in text
    assert "seed 7; families sd, resolutions 32, methods lora, modes dpo-random smpo-exact-K0, cached modes " \
           "dpo-random;" in text
    assert "| tiny-sd | 32 | lora | smpo-exact-K0 |" in text and "sdxl" not in text
    assert "| tiny-sd | 32 | lora | dpo-random |" in text.split("## Latent cache")[1]


def test_label_throughput_main_writes_its_settings(tmp_path, capsys):
    labels = load_benchmark("label_throughput")
    output = tmp_path / "labels.md"
    argv = ["--num_pairs", "2", "--batch_size", "1", "--repeats", "1", "--preprocess_threads", "2",
            "--tolerance", "0.001", "--device", "cpu", "--results", str(output)]
    rows = labels.main(argv)
    assert [r["image_size"] for r in rows] == [32, 256] and all(r["agree"] for r in rows)
    assert all(r["max_abs_diff"] <= 0.001 for r in rows)
    text = output.read_text()
    assert "python benchmarks/label_throughput.py --num_pairs 2 --batch_size 1 --repeats 1" in text
    assert ("device cpu; 2 pairs (4 images), map batch 1 pairs, median of 1 runs; batched path with 2 "
            "preprocessing thread(s)") in text
    assert text.count("| yes |") == 2
    for flag in ("--num_pairs", "--batch_size", "--repeats", "--preprocess_threads"):
        assert f"{flag} must be >= 1, got 0" in refusal(capsys, labels.parse_args, [flag, "0"])
    assert "--tolerance must be a finite number >= 0" in refusal(capsys, labels.parse_args, ["--tolerance", "nan"])
    assert "is not a torch device" in refusal(capsys, labels.parse_args, ["--device", "gpu0"])
    assert labels.parse_args(["--results", ""]).results == ""  # '' skips writing
