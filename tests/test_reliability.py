"""Faults: non-finite updates, failed saves, unwritable outputs, and SIGKILL at random moments."""

import errno
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from smpo_diffusers import SmPOConfig, SmPOTrainer
from smpo_diffusers.hub import CARD_MARKER

ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_config(out, model, data, **overrides):
    options = dict(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(out), resolution=32,
                   train_batch_size=2, max_train_steps=3, report_to="none", learning_rate=1e-3, seed=0)
    options.update(overrides)
    return SmPOConfig(**options)


class NaNTrainer(SmPOTrainer):
    """Makes the loss of chosen updates NaN (1-based update numbers)."""

    nan_updates: set = set()

    def compute_loss(self, batch, generator):
        step = super().compute_loss(batch, generator)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls in self.nan_updates:
            step.loss = step.loss * float("nan")
        return step


def trainable_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.unwrapped_unet.named_parameters() if p.requires_grad}


def test_nonfinite_update_is_skipped_counted_and_weights_stay_finite(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    trainer = NaNTrainer(make_config(tmp_path / "o", model, data, max_train_steps=3))
    trainer.nan_updates = {2}
    before = trainable_state(trainer)
    trainer.train()
    assert trainer.skipped["nonfinite_updates"] == 1
    after = trainable_state(trainer)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the finite updates were applied
    metrics = (pathlib.Path(trainer.config.output_dir) / "training_metrics.json").read_text()
    assert '"nonfinite_updates": 1' in metrics


def test_too_many_consecutive_nonfinite_updates_stop_after_saving(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    trainer = NaNTrainer(make_config(tmp_path / "o", model, data, max_train_steps=6, max_consecutive_nonfinite=2))
    trainer.nan_updates = {2, 3}
    stale_card = pathlib.Path(trainer.config.output_dir, "README.md")
    stale_card.write_text(f"{CARD_MARKER}\nthe card of an earlier run's weights\n")
    with pytest.raises(FloatingPointError, match="--mixed_precision bf16"):
        trainer.train()
    card = stale_card.read_text()  # the card now describes the weights saved at the stop
    assert "earlier run" not in card and "2 updates skipped for a non-finite loss or gradient" in card
    saved = load_file(os.path.join(trainer.config.output_dir, "pytorch_lora_weights.safetensors"))
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    assert trainer.skipped["nonfinite_updates"] == 2
    metrics = json.loads(pathlib.Path(trainer.config.output_dir, "training_metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["skipped"]["nonfinite_updates"] == 2  # updates before the stop


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, demo_inputs, monkeypatch):
    model, data = demo_inputs["sdxl"]
    trainer = SmPOTrainer(make_config(tmp_path / "o", model, data, max_train_steps=3, checkpointing_steps=1))
    original = trainer.accelerator.save_state

    def disk_full(output_dir=None, **kwargs):
        if "checkpoint-2" in str(output_dir):
            os.makedirs(output_dir, exist_ok=True)
            pathlib.Path(output_dir, "half-written.bin").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(output_dir, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "save_state", disk_full)
    with pytest.raises(OSError, match="previous checkpoint .*checkpoint-1 is intact"):
        trainer.train()
    names = sorted(os.listdir(trainer.config.output_dir))
    assert "checkpoint-1" in names and not any(n.startswith(".checkpoint-") for n in names)
    assert os.path.isfile(os.path.join(trainer.config.output_dir, "checkpoint-1", "trainer_state.json"))


def test_checkpoint_files_reach_the_disk_before_the_rename_that_publishes_them(tmp_path, demo_inputs, monkeypatch):
    model, data = demo_inputs["sdxl"]
    trainer = SmPOTrainer(make_config(tmp_path / "o", model, data))
    events, real_fsync, real_rename = [], os.fsync, os.rename

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def rename(source, target):
        events.append(("rename", str(source), str(target)))
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    final = trainer.save_checkpoint(1, 0, 1)
    out = os.path.realpath(trainer.config.output_dir)
    publish = next(i for i, event in enumerate(events) if event[0] == "rename" and event[2] == final)
    synced_before = {path for kind, path, *_ in events[:publish] if kind == "fsync"}
    partial = os.path.realpath(events[publish][1])
    published = os.path.realpath(final)
    written = {os.path.relpath(os.path.join(root, name), published)
               for root, _, names in os.walk(published) for name in names}
    assert written and {os.path.join(partial, name) for name in written} <= synced_before
    assert partial in synced_before  # the folder's own entries too
    assert ("fsync", out) in events[publish + 1:]  # and the rename itself


def test_a_failed_final_save_leaves_the_earlier_weights_whole_and_the_next_save_tidies_up(
        tmp_path, demo_inputs, monkeypatch):
    """Final weights go to a hidden staging folder and are renamed into place; the JSON records are replaced
    atomically. A save that dies midway (disk full) publishes nothing truncated."""
    model, data = demo_inputs["sdxl"]
    trainer = SmPOTrainer(make_config(tmp_path / "o", model, data, train_method="full", max_train_steps=1))
    out = pathlib.Path(trainer.config.output_dir)
    trainer.save_model()
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    earlier, earlier_config = weights.read_bytes(), (out / "training_config.json").read_text()
    with torch.no_grad():
        next(trainer.unwrapped_unet.parameters()).add_(1.0)
    real_save = type(trainer.unwrapped_unet).save_pretrained

    def disk_full(self, path, **kwargs):
        real_save(self, path, **kwargs)
        target = os.path.join(path, "diffusion_pytorch_model.safetensors")
        with open(target, "r+b") as handle:
            handle.truncate(os.path.getsize(target) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(trainer.unwrapped_unet), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_model()
    assert weights.read_bytes() == earlier and (out / "training_config.json").read_text() == earlier_config
    assert not [n for n in os.listdir(out) if n.startswith(".final-") or n.endswith(".tmp")]
    os.replace(out / "unet", out / ".unet.old")  # killed between the two renames of a replacement
    with pytest.raises(OSError, match="No space left"):
        trainer.save_model()
    assert weights.read_bytes() == earlier  # put back by the next save before it writes

    monkeypatch.undo()
    (out / ".final-killed").mkdir()  # what a SIGKILL mid-save leaves
    (out / ".final-killed" / "junk").write_bytes(b"x")
    (out / ".unet.old").mkdir()  # its successor is in place: deleted
    trainer.save_model()
    assert weights.read_bytes() != earlier and load_file(str(weights))
    assert sorted(n for n in os.listdir(out) if n.startswith(".")) == []
    json.loads((out / "training_config.json").read_text())


def test_resume_latest_without_a_checkpoint_starts_from_scratch_and_says_so(tmp_path, demo_inputs, caplog):
    model, data = demo_inputs["sdxl"]
    trainer = SmPOTrainer(make_config(tmp_path / "o", model, data, max_train_steps=1, resume_from_checkpoint="latest"))
    with caplog.at_level("WARNING", logger="smpo_diffusers.trainer"):
        trainer.train()
    assert "--resume_from_checkpoint latest: no complete checkpoint in" in caplog.text
    assert trainer.global_step == 1


def test_unwritable_output_dir_is_detected_at_start(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="is not writable"):
        SmPOTrainer(make_config(blocker / "out", model, data))


def run_cli(args, script=None, wait=True):
    command = [sys.executable, str(script or ROOT / "examples" / "train_smpo_sdxl.py"), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if wait:
        out, err = process.communicate(timeout=600)
        return process.returncode, out, err
    return process


def cli_flags(model, data, out, **extra):
    flags = dict(pretrained_model_name_or_path=model, dataset_name=data, output_dir=out, resolution=32,
                 train_batch_size=2, report_to="none", learning_rate=1e-3, seed=5, max_train_steps=6,
                 checkpointing_steps=1, gradient_accumulation_steps=2, random_crop=True)
    flags.update(extra)
    return [item for key, value in flags.items() for item in (f"--{key}", value)]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    code, _, err = run_cli(cli_flags(model, data, tmp_path / "clean"))
    assert code == 0, err[-3000:]
    expected = load_file(str(tmp_path / "clean" / "pytorch_lora_weights.safetensors"))

    # 1) killed in the middle of writing checkpoint-3: the partial folder is never "latest"
    out = tmp_path / "killed"
    code, _, _ = run_cli(["3", *cli_flags(model, data, out)], script=ROOT / "tests" / "scripts" /
                         "train_then_die_in_save.py")
    assert code == -signal.SIGKILL
    assert (out / ".checkpoint-3.tmp").is_dir() and not (out / "checkpoint-3").exists()
    # 2) resumed, then killed again at a random moment
    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 3.0)
    process = run_cli(cli_flags(model, data, out, resume_from_checkpoint="latest"), wait=False)
    deadline = time.time() + 300
    while not (out / "checkpoint-3").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    # 3) resumed to the end
    code, _, err = run_cli(cli_flags(model, data, out, resume_from_checkpoint="latest"))
    assert code == 0, err[-3000:]
    assert not any(p.name.startswith(".checkpoint-") for p in out.iterdir()), f"kill delay seed {seed}"
    got = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{key} differs (kill delay seed {seed})"
