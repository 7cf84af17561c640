"""`accelerate launch` end to end: the example CLIs, and two CPU processes (gloo) with resume."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


def launch(args, processes=1, timeout=600):
    extra = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with subprocess.Popen(LAUNCH + extra + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=ROOT) as launcher:
        try:
            stdout, stderr = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the launcher passes it on to its workers (they run in sessions of their own, so
            # killing the launcher alone would leave a hung pair running)
            launcher.terminate()
            try:
                launcher.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                launcher.kill()
            raise
    result = subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def common_flags(model, data, out, **extra):
    flags = {"pretrained_model_name_or_path": model, "dataset_name": data, "output_dir": out, "resolution": 32,
             "train_batch_size": 2, "report_to": "none", "learning_rate": 1e-3, "seed": 3}
    flags.update(extra)
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def labelling_inputs(tmp_path, num_pairs):
    """A tiny CLIP reward model and a raw preference set of ``num_pairs`` under tmp_path; their label_rewards flags."""
    from smpo_diffusers.testing import make_preference_dataset, tiny_clip_model

    clip, processor = tiny_clip_model()
    clip.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    make_preference_dataset(num_pairs=num_pairs, seed=2).save_to_disk(str(tmp_path / "raw"))
    return ["--dataset_name", tmp_path / "raw", "--reward_model", "pickscore", "--reward_model_name_or_path",
            tmp_path / "clip", "--batch_size", "4"]


def read_endings(folder):
    """What each of the 2 processes of tests/scripts/fail_on_one_process.py ended each scenario with."""
    return [json.loads((folder / f"rank{rank}.json").read_text())["ended"] for rank in (0, 1)]


@pytest.mark.slow
def test_accelerate_launch_sdxl_lora_example(tmp_path, demo_inputs):
    from diffusers import StableDiffusionXLPipeline

    model, data = demo_inputs["sdxl"]
    out = tmp_path / "sdxl-lora"
    result = launch([ROOT / "examples" / "train_smpo_sdxl.py",
                     *common_flags(model, data, out, max_train_steps=2, checkpointing_steps=1)])
    assert "done: 2 updates" in result.stdout
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a blue square", num_inference_steps=2, height=32, width=32, output_type="np")
    before = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")  # diffusers 0.34: offline
    after = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert np.abs(before - after).max() > 1e-4


@pytest.mark.slow
def test_accelerate_launch_sd_full_example(tmp_path, demo_inputs):
    from diffusers import UNet2DConditionModel

    model, data = demo_inputs["sd"]
    out = tmp_path / "sd-full"
    launch([ROOT / "examples" / "train_smpo_sd.py",
            *common_flags(model, data, out, max_train_steps=1, train_method="full", learning_rate=1e-4)])
    trained = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))
    config = json.loads((out / "training_config.json").read_text())
    assert config["model_family"] == "sd" and config["train_method"] == "full"


def read_records(folder):
    records = [json.loads(p.read_text()) for p in sorted(pathlib.Path(folder).glob("rank*.json"))]
    assert [r["rank"] for r in records] == [0, 1] and all(r["num_processes"] == 2 for r in records)
    return records


@pytest.mark.slow
def test_two_processes_disjoint_data_identical_weights_and_resume(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    script = ROOT / "tests" / "scripts" / "record_training.py"
    # Uninterrupted: 6 updates on 2 processes, a checkpoint after 5 (in the second epoch), keeping an --use_ema
    # average (each process steps its own from the same weights; the main process checkpoints it).
    full_out = tmp_path / "full"
    average = dict(use_ema=True, ema_decay=0.5)
    result = launch([script, tmp_path / "rec-full", *common_flags(model, data, full_out, max_train_steps=6,
                                                                  checkpointing_steps=5, **average)], processes=2)
    full = read_records(tmp_path / "rec-full")
    for step in range(6):  # each micro-batch: the two ranks hold different pairs
        assert not set(full[0]["seen"][step]) & set(full[1]["seen"][step])
    assert full[0]["weights_sha256"] == full[1]["weights_sha256"]
    assert full[0]["ema_sha256"] == full[1]["ema_sha256"] and full[0]["ema_updates"] == 6
    assert (full_out / "checkpoint-5" / "ema.safetensors").is_file()
    # Only the main process writes: one save line per checkpoint, no per-rank output files.
    assert result.stderr.count(f"saved {full_out / 'checkpoint-5'}") == 1
    assert sorted(p.name for p in full_out.iterdir()) == [
        "README.md", "checkpoint-5", "pytorch_lora_weights.safetensors", "training_config.json",
        "training_metrics.json"]
    assert json.loads((full_out / "training_config.json").read_text())["num_processes"] == 2

    # Interrupted after 5 updates, inside the second epoch (the uninterrupted run's checkpoint-5 alone, as a run
    # killed after writing it leaves it), then resumed on 2 processes: same final weights, bit for bit.
    state = json.loads((full_out / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["next_batch"] > 0, state  # mid-epoch, after the first epoch
    resumed_out = tmp_path / "resumed"
    shutil.copytree(full_out / "checkpoint-5", resumed_out / "checkpoint-5")
    launch([script, tmp_path / "rec-b", *common_flags(model, data, resumed_out, max_train_steps=6,
                                                      checkpointing_steps=5, resume_from_checkpoint="latest",
                                                      **average)],
           processes=2)
    resumed = read_records(tmp_path / "rec-b")
    assert resumed[0]["global_step"] == 6
    # the resumed run trained exactly the micro-batches the uninterrupted run had left, in the epoch's order
    for rank in (0, 1):
        assert resumed[rank]["seen"] == full[rank]["seen"][5:]
    assert resumed[0]["weights_sha256"] == resumed[1]["weights_sha256"] == full[0]["weights_sha256"]
    assert resumed[0]["ema_sha256"] == resumed[1]["ema_sha256"] == full[0]["ema_sha256"]
    assert resumed[0]["ema_updates"] == 6


@pytest.mark.slow
def test_two_processes_survive_micro_batches_that_decode_to_nothing(tmp_path, demo_inputs):
    """Half the pairs are corrupt and each process trains one pair per micro-batch: whenever one process's pair
    fails to decode while the other's does not, the empty process still joins the gradient all-reduce (a zero
    contribution) and the metrics all-reduce. Skips and UNet evaluations are reported summed over processes."""
    from datasets import load_from_disk

    model, data = demo_inputs["sd"]
    rows = load_from_disk(data).to_dict()
    for row in range(0, len(rows["jpg_0"]), 2):
        rows["jpg_0"][row] = rows["jpg_0"][row][:40]  # truncated: undecodable
    from datasets import Dataset

    Dataset.from_dict(rows, features=load_from_disk(data).features).save_to_disk(str(tmp_path / "half-corrupt"))
    out = tmp_path / "out"
    script = ROOT / "tests" / "scripts" / "record_training.py"
    launch([script, tmp_path / "rec", *common_flags(model, tmp_path / "half-corrupt", out, train_batch_size=1,
                                                    loss_type="dpo", noise_source="random", num_train_epochs=1)],
           processes=2)
    records = read_records(tmp_path / "rec")
    sizes = list(zip(records[0]["micro_batch_sizes"], records[1]["micro_batch_sizes"]))
    assert any(sorted(pair) == [0, 1] for pair in sizes), sizes  # an update where only one side was empty
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]
    metrics = json.loads((out / "training_metrics.json").read_text())
    empty = sum(size == 0 for pair in sizes for size in pair)
    trained = sum(size for pair in sizes for size in pair)
    assert empty > 0 and metrics["skipped"]["undecodable_pairs"] == metrics["skipped"]["empty_batches"] == empty
    assert metrics["unet_evaluations"] == {"inversion": 0, "policy": 2 * trained, "reference": 2 * trained}
    assert metrics["global_step"] == len(sizes) and metrics["final_metrics"]
    empty_updates = sum(pair == (0, 0) for pair in sizes)
    assert metrics["skipped"]["empty_updates"] == empty_updates > 0, sizes
    # an update no process trained takes no optimiser step (AdamW's decay and momentum would move the weights)
    assert records[0]["optimizer_steps"] == records[1]["optimizer_steps"] == len(sizes) - empty_updates


@pytest.mark.slow
def test_two_processes_draw_each_pair_once_an_epoch(tmp_path, demo_inputs):
    """13 pairs, batches of 3, 2 processes: the epoch's end is padded (not filled with repeated pairs, as
    accelerate's even batches would), so each pair is trained exactly once, both processes take the same number
    of micro-batches, and the padding is not reported as a skip. Every pair weighs the same: each update steps
    with the mean gradient over the pairs trained in it, the last one (one pair, the rest padding) included."""
    model, data = demo_inputs["sd"]
    out = tmp_path / "out"
    launch([ROOT / "tests" / "scripts" / "record_training.py", tmp_path / "rec", "--probe_loss",
            *common_flags(model, data, out, train_batch_size=3, max_train_samples=13, loss_type="dpo",
                          noise_source="random", num_train_epochs=1, max_grad_norm=0)], processes=2)
    records = read_records(tmp_path / "rec")
    kept = json.loads((out / "training_config.json").read_text())["pairs"]["kept"]
    seen = [index for record in records for micro_batch in record["seen"] for index in micro_batch]
    assert kept == 13 and sorted(seen) == list(range(13))
    assert [len(r["micro_batch_sizes"]) for r in records] == [3, 3]
    assert sorted(size for r in records for size in r["micro_batch_sizes"]) == [0, 1, 3, 3, 3, 3]
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["skipped"]["empty_batches"] == metrics["skipped"]["undecodable_pairs"] == 0
    assert metrics["global_step"] == 3 and records[0]["optimizer_steps"] == 3
    # the probe's gradient is the mean of (pair index + 1) over the update's pairs, on both processes
    rounds = [records[0]["seen"][update] + records[1]["seen"][update] for update in range(3)]
    expected = [np.mean(np.array(pairs) + 1) for pairs in rounds]
    assert [len(pairs) for pairs in rounds] == [6, 6, 1]
    for record in records:
        np.testing.assert_allclose(record["step_gradients"], expected, rtol=1e-6)


@pytest.mark.slow
def test_two_processes_accumulate_micro_batches_into_one_update(tmp_path, demo_inputs):
    """Gradient accumulation on 2 processes (13 pairs, batches of 2, 2 micro-batches per update): DDP's
    accumulation without all-reduce, then one synchronised step, gives each update the mean gradient over all the
    pairs both processes trained in its micro-batches; the padded end of the epoch (empty micro-batches before the
    last) weighs nothing."""
    model, data = demo_inputs["sd"]
    out = tmp_path / "out"
    launch([ROOT / "tests" / "scripts" / "record_training.py", tmp_path / "rec", "--probe_loss",
            *common_flags(model, data, out, train_batch_size=2, gradient_accumulation_steps=2, max_train_samples=13,
                          loss_type="dpo", noise_source="random", num_train_epochs=1, max_grad_norm=0)],
           processes=2)
    records = read_records(tmp_path / "rec")
    seen = [index for record in records for micro_batch in record["seen"] for index in micro_batch]
    assert sorted(seen) == list(range(13))
    assert [len(r["micro_batch_sizes"]) for r in records] == [4, 4]
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["global_step"] == 2 and records[0]["optimizer_steps"] == records[1]["optimizer_steps"] == 2
    rounds = [[index for record in records for micro_batch in record["seen"][2 * update:2 * update + 2]
               for index in micro_batch] for update in range(2)]
    assert [len(pairs) for pairs in rounds] == [8, 5]
    expected = [np.mean(np.array(pairs) + 1) for pairs in rounds]
    for record in records:
        np.testing.assert_allclose(record["step_gradients"], expected, rtol=1e-6)


@pytest.mark.slow
def test_two_process_labelling_equals_one_process(tmp_path):
    from datasets import load_from_disk

    args = labelling_inputs(tmp_path, num_pairs=12) + ["--shard_size", "3"]
    script = ROOT / "examples" / "label_rewards.py"
    launch([script, *args, "--output_dir", tmp_path / "one"])
    result = launch([script, *args, "--output_dir", tmp_path / "two"], processes=2)
    summary = json.loads((tmp_path / "two" / "labeling_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["num_pairs"] == 12
    # the 4 shards were split between the processes, each scored once (not all by one, not twice)
    assert (summary["num_shards"], summary["num_shards_scored"], summary["num_shards_resumed"]) == (4, 4, 0)
    from smpo_diffusers.rewards.job import SHARDS_DIRNAME

    reports = [json.loads((tmp_path / "two" / SHARDS_DIRNAME / f"run-rank-0000{rank}-of-00002.json").read_text())
               for rank in (0, 1)]
    assert [(report["shards_scored"], report["pairs_scored"]) for report in reports] == [(2, 6), (2, 6)]
    one, two = load_from_disk(str(tmp_path / "one")), load_from_disk(str(tmp_path / "two"))
    assert two["caption"] == one["caption"]
    np.testing.assert_allclose(two["reward_0"], one["reward_0"], rtol=1e-6)
    np.testing.assert_allclose(two["reward_1"], one["reward_1"], rtol=1e-6)
    assert result.stdout.count('"num_pairs": 12') == 1  # only the main process reports


@pytest.mark.slow
def test_two_processes_build_one_latent_cache_together(tmp_path, demo_inputs):
    """Each rank encodes a disjoint share of the pairs into its own shards; the result is one complete cache that
    a later single-process run reuses without encoding anything."""
    from safetensors import safe_open

    model, data = demo_inputs["sdxl"]
    cache = tmp_path / "cache"
    flags = dict(max_train_steps=2, cache_latents=True, latent_cache_dir=cache)
    launch([ROOT / "examples" / "train_smpo_sdxl.py", *common_flags(model, data, tmp_path / "two", **flags)],
           processes=2)
    (folder,) = cache.iterdir()
    shards = sorted(folder.glob("pairs-*.safetensors"))
    assert len(shards) == 2  # one per rank (16 pairs fit one shard each)
    keys = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            keys += [name for name in handle.keys() if name.endswith(".mean")]
    two = json.loads((tmp_path / "two" / "training_metrics.json").read_text())["latent_cache"]
    assert len(keys) == len(set(keys)) == two["pairs_needed"] == two["pairs_built"]  # disjoint and complete

    launch([ROOT / "examples" / "train_smpo_sdxl.py", *common_flags(model, data, tmp_path / "one", **flags)])
    one = json.loads((tmp_path / "one" / "training_metrics.json").read_text())["latent_cache"]
    assert one["key"] == two["key"] and one["pairs_built"] == 0 and one["prompts_built"] == 0


def test_values_computed_on_main_and_checked_on_every_process(tmp_path):
    """computed_on_main: only rank 0 computes, both ranks hold its value; same_on_every_process: a value that
    differs by rank raises on every rank (one rank raising alone would leave the other waiting)."""
    launch([ROOT / "tests" / "scripts" / "shared_values.py", tmp_path / "rec"], processes=2)
    records = [json.loads((tmp_path / "rec" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["calls"] for r in records] == [[0], []]
    assert records[0]["shared"] == records[1]["shared"] == {"computed_by": 0, "stems": ["0-abc", "1-abc", "2-abc"]}
    for record in records:
        assert record["error"].startswith("the processes disagree on a per-rank value: ['rank-0', 'rank-1']")
    # a computation that fails on the main process stops every process (none waits in the broadcast)
    assert records[0]["failure"] == "OSError: disk gone"
    assert records[1]["failure"] == ("OtherProcessFailed: the main process failed to compute a shared value: "
                                     "OSError: disk gone")
    assert all(record["left_group"] for record in records)


FULL_DISK = "OSError: [Errno 28] No space left on device"
TORCH_SAVE_FAILED = "RuntimeError: [enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file"


@pytest.mark.slow
def test_a_failure_on_one_process_stops_every_process(tmp_path, demo_inputs):
    """One launch, eight failures in turn (tests/scripts/fail_on_one_process.py), each on one process alone: both
    processes raise, the one that did not fail naming the other's failure (it used to wait for it at the next
    collective), and nothing half-written is left.

    * process 1's model load, while the trainer is built;
    * checkpoint-1: the main process finishing it, or process 1 in accelerate's save_state (both give the advice);
    * process 1's latent-cache entries;
    * the main process's final weights, or its final validation rendering;
    * process 1's reward-label shard, or the main process's dataset load (the others wait for it to load first).
    """
    model, data = demo_inputs["sd"]
    fast = dict(loss_type="dpo", noise_source="random")
    labelling = [str(a) for a in labelling_inputs(tmp_path, num_pairs=8)] + ["--shard_size", "2"]
    scenarios = [
        ("model-load", common_flags(model, data, tmp_path / "load", max_train_steps=1, **fast)),
        ("checkpoint-publish", common_flags(model, data, tmp_path / "publish", max_train_steps=2,
                                            checkpointing_steps=1, **fast)),
        ("checkpoint-save", common_flags(model, data, tmp_path / "save", max_train_steps=2, checkpointing_steps=1,
                                         **fast)),
        ("latent-cache", common_flags(model, data, tmp_path / "cached", max_train_steps=1, cache_latents=True,
                                      latent_cache_dir=tmp_path / "cache")),
        ("final-save", common_flags(model, data, tmp_path / "final", max_train_steps=1, **fast)),
        ("final-validation", common_flags(model, data, tmp_path / "rendered", max_train_steps=1,
                                          validation_prompts="red", **fast)),
        ("labelling", labelling + ["--output_dir", str(tmp_path / "labelled")]),
        ("labelling-load", labelling + ["--output_dir", str(tmp_path / "labelled-load")]),
    ]
    plan = tmp_path / "scenarios.json"
    plan.write_text(json.dumps([{"name": mode, "mode": mode, "argv": argv} for mode, argv in scenarios]))
    launch([ROOT / "tests" / "scripts" / "fail_on_one_process.py", tmp_path / "rec", plan], processes=2,
           timeout=400)
    endings = read_endings(tmp_path / "rec")

    def ended(mode):
        return [endings[rank][mode] for rank in (0, 1)]

    advice = "; no earlier checkpoint exists. Free disk space or point --output_dir somewhere writable"
    for mode, failed_rank, failure in [("checkpoint-publish", 0, FULL_DISK), ("checkpoint-save", 1, TORCH_SAVE_FAILED)]:
        out = tmp_path / mode.removeprefix("checkpoint-")
        texts = ended(mode)
        failed, other = texts[failed_rank], texts[1 - failed_rank]
        assert failed.startswith(f"OSError: could not write checkpoint-1 in {out} ({failure.removeprefix('OSError: ')}")
        cause = ("the main process failed to write checkpoint-1: " if failed_rank == 0 else
                 "another process failed to write checkpoint-1 (process 1: ")
        assert other.startswith(f"OSError: could not write checkpoint-1 in {out} ({cause}{failure}")
        assert all(advice in text for text in texts)
        assert not [p.name for p in out.iterdir() if "checkpoint" in p.name]

    missing = "OSError: no file named model_index.json found in this node's copy of the model"
    assert ended("model-load") == [
        f"OtherProcessFailed: another process failed to load the data and the models (process 1: {missing})", missing]

    cache = ended("latent-cache")
    assert cache[1] == FULL_DISK
    assert cache[0].startswith("OtherProcessFailed: another process failed to write its latent-cache entries in ")
    assert cache[0].endswith(f"(process 1: {FULL_DISK})")

    final = ended("final-save")
    assert final[0] == FULL_DISK
    assert final[1] == (f"OtherProcessFailed: the main process failed to save the trained model in "
                        f"{tmp_path / 'final'}: {FULL_DISK}")

    rendered = ended("final-validation")
    assert rendered[0] == FULL_DISK
    assert rendered[1] == ("OtherProcessFailed: the main process failed to render the final validation images: "
                           f"{FULL_DISK}")
    assert (tmp_path / "rendered" / "pytorch_lora_weights.safetensors").is_file()  # saved before the rendering

    for mode, failed_rank, what in [("labelling", 1, "score its shards"), ("labelling-load", 0, "load the dataset")]:
        texts = ended(mode)
        assert texts[failed_rank] == FULL_DISK
        assert texts[1 - failed_rank].startswith(f"OtherProcessFailed: another process failed to {what}")
        assert texts[1 - failed_rank].endswith(f"(process {failed_rank}: {FULL_DISK})")
    assert not (tmp_path / "labelled" / "labeling_summary.json").exists()
    assert not (tmp_path / "labelled-load" / "labeling_summary.json").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ddp_timeout_is_how_long_the_others_wait_for_the_main_process(tmp_path):
    """--ddp_timeout reaches the process group: while the main process works alone for 8 s, the other process
    gives up after a 3 s timeout and waits it out with a 60 s one (torch's NCCL default, 10 minutes, used to stop
    multi-GPU labelling while the main process wrote a large dataset)."""
    script = ROOT / "tests" / "scripts" / "slow_main_process.py"
    runs = {}
    for timeout in (3, 60):
        folder = tmp_path / f"timeout-{timeout}"
        folder.mkdir()
        port = str(_free_port())
        runs[timeout] = folder, [
            subprocess.Popen([sys.executable, str(script), str(folder), str(timeout), "8"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port))
            for rank in (0, 1)]
    for folder, processes in runs.values():
        for process in processes:
            try:
                process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                raise

    def ended(timeout, rank):
        return json.loads((runs[timeout][0] / f"rank{rank}.json").read_text())

    assert [ended(60, rank) for rank in (0, 1)] == [{"phase": "wait", "ended": "computed"}] * 2
    waited = ended(3, 1)  # both joined the group; then process 1 gave up waiting for the main one
    assert waited["phase"] == "wait" and waited["ended"].startswith("RuntimeError"), waited
    assert re.search("timed? ?out", waited["ended"], re.IGNORECASE), waited


def test_cpu_process_group_only_where_there_is_no_accelerator_device(monkeypatch):
    """Several launched processes join a gloo (CPU) group only on a machine without GPUs or other accelerator
    devices: on an Intel XPU node, asking accelerate for the CPU would have trained every process on the CPU."""
    import accelerate.utils

    from smpo_diffusers.distributed import use_cpu_process_group

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("xpu", "npu", "mlu", "musa", "sdaa", "hpu", "neuron"):
        monkeypatch.setattr(accelerate.utils, f"is_{name}_available", lambda *args, **kwargs: False, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert use_cpu_process_group()
    monkeypatch.setattr(accelerate.utils, "is_xpu_available", lambda *args, **kwargs: True)
    assert not use_cpu_process_group()
    monkeypatch.setattr(accelerate.utils, "is_xpu_available", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not use_cpu_process_group()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not use_cpu_process_group()


def test_save_model_after_train_names_the_closed_process_group():
    """train() closes the process group at its end; a later save_model() under several processes, which sums its
    counts over them, says so and points at the model train() saved (instead of a torch error from the reduce)."""
    import types

    from smpo_diffusers.trainer import SmPOTrainer

    finished = types.SimpleNamespace(accelerator=types.SimpleNamespace(num_processes=2),
                                     config=types.SimpleNamespace(output_dir="out"))
    with pytest.raises(RuntimeError, match="group was closed at the end of train\\(\\), which already saved the "
                                           "final model in out"):
        SmPOTrainer.save_model(finished)
