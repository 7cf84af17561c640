"""--cache_latents: cached items equal the pixel pipeline's, reuse across runs, invalidation, partial builds."""

import copy
import glob
import io
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from datasets import Dataset, load_from_disk
from PIL import Image

from smpo_diffusers import SmPOConfig, SmPOTrainer
from smpo_diffusers.data import PairTransform, PreferencePairDataset, collate_preference_batch
from smpo_diffusers.latent_cache import (LatentCache, cache_key, cache_settings, module_fingerprint,
                                         other_cache_entries, pair_entry_bases, remove_stale_leftovers,
                                         tokenizer_fingerprint)
from smpo_diffusers.models import encode_prompts, latent_moments
from smpo_diffusers.testing import encode_image


def make_config(tmp_path, model, data=None, name="out", **overrides):
    options = dict(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(tmp_path / name),
                   resolution=32, train_batch_size=2, max_train_steps=3, report_to="none", learning_rate=1e-3,
                   seed=0, cache_latents=True, latent_cache_dir=str(tmp_path / "cache"))
    options.update(overrides)
    return SmPOConfig(**options)


def awkward_pairs(demo_inputs):
    """8 labelled pairs: one of unequal sizes won by image 1, one undecodable, one without a caption, one wide."""
    base = load_from_disk(demo_inputs["sdxl"][1]).select(range(8))
    rows = base.to_dict()
    rows["jpg_0"][1] = encode_image(Image.open(io.BytesIO(rows["jpg_0"][1])).resize((48, 40)))
    rows["reward_0"][1], rows["reward_1"][1] = 0.1, 0.9  # image 1 wins: the loser (image 0) takes its size
    rows["jpg_1"][2] = rows["jpg_1"][2][: len(rows["jpg_1"][2]) // 3]  # truncated: undecodable
    for column in ("jpg_0", "jpg_1"):  # 69 x 32: an odd centre-crop slack, so a flip moves the crop corner
        rows[column][4] = encode_image(Image.open(io.BytesIO(rows[column][4])).resize((69, 32)))
    rows["caption"][3] = None
    return Dataset.from_dict(rows, features=base.features)


def test_cached_items_equal_the_pixel_pipeline_item_by_item(tmp_path, demo_inputs, caplog):
    trainer = SmPOTrainer(make_config(tmp_path, demo_inputs["sdxl"][0], proportion_empty_prompts=0.5),
                          dataset=awkward_pairs(demo_inputs))
    cached = trainer.train_dataset
    pixels = PreferencePairDataset(trainer.pairs, PairTransform(32, hflip=True), seed=0, proportion_empty_prompts=0.5)
    parts = trainer.parts
    assert trainer.latent_cache_stats.undecodable_pairs == 1
    unequal = int(np.flatnonzero(np.asarray(trainer.pairs["source_row"]) == 1)[0])
    wide, wide_lefts = int(np.flatnonzero(np.asarray(trainer.pairs["source_row"]) == 4)[0]), set()
    assert trainer.pairs["winner_index"][unequal] == 1
    seen_flips = set()
    for epoch in range(3):
        cached.set_epoch(epoch)
        pixels.set_epoch(epoch)
        for i in range(len(cached)):
            got, want = cached[i], pixels[i]
            if want is None:
                assert got is None
                continue
            for key in ("prob_w", "caption", "index", "empty_prompt", "missing_caption", "resized_pair",
                        "upscaled", "flipped"):
                assert got[key] == want[key], (epoch, i, key)
            assert torch.equal(got["original_sizes"], want["original_sizes"])
            assert torch.equal(got["crop_top_lefts"], want["crop_top_lefts"])
            mean, std = latent_moments(parts.vae, want["pixel_values"])
            torch.testing.assert_close(got["latent_mean"], mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got["latent_std"], std, rtol=1e-4, atol=1e-5)
            prompt = encode_prompts(parts, [want["caption"]], "cpu", dtype=trainer.weight_dtype)
            torch.testing.assert_close(got["prompt_hidden"], prompt.hidden[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got["prompt_pooled"], prompt.pooled[0], rtol=1e-4, atol=1e-5)
            seen_flips.add(got["flipped"])
            if i == wide:
                wide_lefts.add(int(got["crop_top_lefts"][0, 1]))
            if i == unequal:
                assert got["resized_pair"] and got["original_sizes"][1].tolist() == [40, 48]
    assert seen_flips == {False, True}
    assert wide_lefts == {18, 19}  # 69 px: centre left round(18.5) = 18; flipped, 69 - 32 - 18 = 19
    again = SmPOTrainer(make_config(tmp_path, demo_inputs["sdxl"][0], name="again", proportion_empty_prompts=0.5),
                        dataset=awkward_pairs(demo_inputs))
    assert again.latent_cache_stats.pairs_built == 0 and again.latent_cache_stats.undecodable_pairs == 1
    batch = collate_preference_batch([cached[i] for i in range(4)])
    assert batch["latent_mean"].shape[:2] == (batch["batch_size"], 2) and "pixel_values" not in batch
    # a damaged shard (a crash on a file system that lost its tail) is set aside and its entries encoded again
    expected = [item and item["latent_mean"].clone() for item in map(cached.__getitem__, range(len(cached)))]
    shard = sorted(glob.glob(os.path.join(again.latent_cache_stats.path, "pairs-*.safetensors")))[0]
    with open(shard, "r+b") as handle:
        handle.truncate(100)
    os.utime(shard, (0, 0))  # written long ago
    with caplog.at_level("WARNING", logger="smpo_diffusers.latent_cache"):
        repaired = SmPOTrainer(make_config(tmp_path, demo_inputs["sdxl"][0], name="repaired",
                                           proportion_empty_prompts=0.5), dataset=awkward_pairs(demo_inputs))
    assert "is unreadable" in caplog.text and repaired.latent_cache_stats.pairs_built > 0
    assert os.path.isfile(os.path.join(os.path.dirname(shard), f".{os.path.basename(shard)}.corrupt"))
    # kept an hour from when it was set aside (not from when it was written), then removed as a leftover
    assert remove_stale_leftovers(os.path.dirname(shard)) == (0, 0)
    repaired.train_dataset.set_epoch(cached.epoch)  # the same flips
    for i, mean in enumerate(expected):  # read before the mapped file shrank
        item = repaired.train_dataset[i]
        assert (item is None) == (mean is None)
        if mean is not None:
            torch.testing.assert_close(item["latent_mean"], mean)


def test_cached_training_matches_uncached_and_reuses_the_cache(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    runs = {}
    for name, cached in (("plain", False), ("first", True), ("second", True)):
        config = make_config(tmp_path, model, data, name=name, cache_latents=cached,
                             latent_cache_dir=str(tmp_path / "cache") if cached else None)
        if name == "second":  # a write the first run's crash would have left: removed when the cache is opened
            leftover = os.path.join(runs["first"][0].latent_cache_stats.path, ".pairs-x.safetensors.tmp")
            open(leftover, "wb").close()
            os.utime(leftover, (0, 0))
        trainer = SmPOTrainer(config)
        steps, compute_loss = [], trainer.compute_loss
        trainer.compute_loss = lambda batch, generator: steps.append(compute_loss(batch, generator)) or steps[-1]
        trainer.train()
        runs[name] = (trainer, steps, torch.cat([p.detach().reshape(-1) for p in trainer.trainable_params]))
    first, second = runs["first"][0].latent_cache_stats, runs["second"][0].latent_cache_stats
    assert first.pairs_built == first.pairs_needed > 0 and first.prompts_built == first.prompts_needed
    assert second.pairs_built == 0 and second.prompts_built == 0 and second.path == first.path
    assert not os.path.exists(leftover)
    # The same draws from the same generator (timesteps, VAE posterior, noise): only the VAE/text-encoder batch
    # numerics differ, so the first step agrees closely and the losses stay together.
    plain, cached = runs["plain"][1], runs["first"][1]
    assert len(plain) == len(cached) == 3
    assert torch.equal(plain[0].timesteps, cached[0].timesteps)
    for field in ("policy_err_w", "policy_err_l", "ref_err_w", "ref_err_l", "inversion_residual"):
        torch.testing.assert_close(getattr(cached[0], field), getattr(plain[0], field), rtol=1e-4, atol=1e-6)
    for a, b in zip(cached, plain):
        assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-2)
    # Adam's first steps are ~sign(gradient): a rounding-level difference can flip a near-zero gradient's sign.
    close = torch.isclose(runs["first"][2], runs["plain"][2], rtol=1e-3, atol=1e-5)
    assert close.float().mean() > 0.98
    assert torch.equal(runs["second"][2], runs["first"][2])  # reading the cache again is deterministic
    saved = json.loads((tmp_path / "second" / "training_metrics.json").read_text())
    assert saved["latent_cache"]["pairs_built"] == 0 and saved["latent_cache"]["key"] == first.key


def test_ablations_share_the_cache_and_subsets_build_only_what_is_missing(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    small = SmPOTrainer(make_config(tmp_path, model, data, name="small", max_train_samples=6))
    assert small.latent_cache_stats.pairs_built == 6
    stray = os.path.join(small.latent_cache_stats.path, ".pairs-interrupted.safetensors.tmp")
    with open(stray, "wb") as handle:  # what a build killed mid-write leaves behind: never read
        handle.write(b"\0" * 100)
    ablation = SmPOTrainer(make_config(tmp_path, model, data, name="dpo", loss_type="dpo", noise_source="random",
                                       beta_dpo=2000.0, proportion_empty_prompts=0.0, seed=3))
    stats = ablation.latent_cache_stats
    assert stats.path == small.latent_cache_stats.path
    assert stats.pairs_needed == len(ablation.pairs)
    # only rows the small run lacked (the DPO labels may order a pair differently: only unequal sizes matter)
    assert stats.pairs_built == len(ablation.pairs) - 6
    assert np.isfinite(ablation.train()["loss"])


def test_anything_the_entries_depend_on_changes_the_key(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    trainer = SmPOTrainer(make_config(tmp_path, model, data))
    base = dict(dataset_fingerprint=trainer.dataset_fingerprint, parts=trainer.parts, resolution=32, hflip=True,
                vae_dtype=torch.float32, weight_dtype=torch.float32)
    key = cache_key(cache_settings(**base))
    assert key == trainer.latent_cache_stats.key
    for change in (dict(resolution=16), dict(hflip=False), dict(weight_dtype=torch.bfloat16),
                   dict(vae_dtype=torch.float16), dict(dataset_fingerprint="another")):
        assert cache_key(cache_settings(**(base | change))) != key, change
    vae = trainer.parts.vae
    before = module_fingerprint(vae)
    with torch.no_grad():
        next(vae.parameters()).view(-1)[1] += 1e-3  # one weight of a fine-tuned VAE
    assert module_fingerprint(vae) != before
    assert cache_key(cache_settings(**base)) != key
    # A tokenizer with the same vocabulary but another pad token pads prompts with other ids (SDXL's second
    # tokenizer pads with "!", the first with its end token): other prompt embeddings, another key.
    tokenizer = trainer.parts.tokenizers[-1]
    before = tokenizer_fingerprint(tokenizer)
    repadded = copy.deepcopy(tokenizer)
    repadded.pad_token = "!" if tokenizer.pad_token != "!" else tokenizer.eos_token
    assert repadded.get_vocab() == tokenizer.get_vocab() and tokenizer_fingerprint(repadded) != before
    assert tokenizer_fingerprint(copy.deepcopy(tokenizer)) == before

    # A re-saved dataset with one image changed is another dataset (another datasets fingerprint).
    changed = load_from_disk(data)
    rows = changed.to_dict()
    rows["jpg_0"][0] = encode_image(Image.new("RGB", (32, 32), "white"))
    other = tmp_path / "other-data"
    Dataset.from_dict(rows, features=changed.features).save_to_disk(str(other))
    shutil.copy(os.path.join(data, "reward_stats.json"), other / "reward_stats.json")
    retrained = SmPOTrainer(make_config(tmp_path, model, str(other), name="other"))
    assert retrained.latent_cache_stats.key != key and retrained.latent_cache_stats.pairs_built > 0
    # the earlier folder is kept (another run may still use it) and reported
    assert trainer.latent_cache_stats.other_entries == 0
    assert retrained.latent_cache_stats.other_entries == 1
    assert [path for path, _ in other_cache_entries(os.path.dirname(trainer.latent_cache_stats.path),
                                                    retrained.latent_cache_stats.key)] == [
        trainer.latent_cache_stats.path]
    assert retrained.latent_cache_stats.other_entries_bytes > 0
    # The folders keep their settings, readable.
    settings = json.loads(open(os.path.join(trainer.latent_cache_stats.path, "settings.json")).read())
    assert settings["resolution"] == 32 and settings["hflip"] is True


def test_cache_without_flips_stores_one_variant(tmp_path, demo_inputs):
    model, data = demo_inputs["sd"]
    trainer = SmPOTrainer(make_config(tmp_path, model, data, no_hflip=True, max_train_samples=4,
                                      validation_prompts=["a red circle"], validation_num_inference_steps=2))
    reader = trainer.train_dataset.reader
    key = next(iter(reader.pair_index))
    assert reader.pair(key, "mean").shape[0] == 1  # (variants, 2, C, h, w)
    assert "prompt_pooled" not in trainer.train_dataset[0]  # SD has no pooled embedding
    assert np.isfinite(trainer.train()["loss"])
    # validation still renders images: the VAE and text encoder come back for it (off the accelerator otherwise)
    assert (tmp_path / "out" / "validation.png").is_file()


def test_default_cache_folder_is_under_hf_home(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path))
    config = SmPOConfig(cache_latents=True, report_to="none")
    assert config.latent_cache_root == os.path.join(str(tmp_path), "smpo_diffusers", "latent_cache")
    assert SmPOConfig(cache_latents=True, latent_cache_dir="mine", report_to="none").latent_cache_root == "mine"


def test_cache_flag_errors():
    with pytest.raises(ValueError, match="--cache_latents stores centre crops"):
        SmPOConfig(cache_latents=True, random_crop=True, report_to="none")
    with pytest.raises(ValueError, match="--latent_cache_dir is only used with --cache_latents"):
        SmPOConfig(latent_cache_dir="/tmp/x", report_to="none")


def test_cache_reader_refuses_a_cache_that_lacks_entries(tmp_path, demo_inputs):
    model, data = demo_inputs["sdxl"]
    trainer = SmPOTrainer(make_config(tmp_path, model, data, max_train_samples=4))
    settings = cache_settings(dataset_fingerprint=trainer.dataset_fingerprint, parts=trainer.parts, resolution=32,
                              hflip=True, vae_dtype=torch.float32, weight_dtype=torch.float32)
    cache = LatentCache(str(tmp_path / "empty-cache"), settings)  # same settings, nothing built there
    from smpo_diffusers.latent_cache import CachedPairDataset

    with pytest.raises(RuntimeError, match="lacks 4 pair"):
        CachedPairDataset(trainer.pairs, cache.reader(), seed=0)


def test_reader_keeps_a_bounded_number_of_shards_open(tmp_path, demo_inputs, monkeypatch):
    from smpo_diffusers import latent_cache

    monkeypatch.setattr(latent_cache, "PAIRS_PER_SHARD", 2)  # 14 pairs -> 7 shards
    model, data = demo_inputs["sdxl"]
    trainer = SmPOTrainer(make_config(tmp_path, model, data))
    dataset = trainer.train_dataset
    assert len(set(dataset.reader.pair_index.values())) == 7
    monkeypatch.setattr(latent_cache.CacheReader, "MAX_OPEN_SHARDS", 3)
    items = [dataset[i] for i in range(len(dataset))] + [dataset[0]]
    assert len(dataset.reader._handles) <= 3 and all(item is not None for item in items)


def test_a_shard_reaches_the_disk_before_the_rename_that_publishes_it(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(src))) or real_replace(src, dst))
    cache = LatentCache(str(tmp_path), {"hflip": False, "format": 2})
    os.makedirs(cache.path)
    cache._write_shard("pairs", {"0/any.latent_mean": torch.zeros(2, 4)})
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace"] and events[0][1] == events[1][1]  # the temporary file, then renamed
    assert list(cache.index("pairs-")[0]) == ["0/any"]


def test_leftovers_of_interrupted_writes_are_removed_once_stale(tmp_path):
    """A write killed before its rename leaves a hidden .tmp shard (up to ~0.5 GB for SDXL), an unreadable shard
    is set aside as .corrupt: removed when stale; fresh ones may belong to another run writing now."""
    from smpo_diffusers import latent_cache

    folder = tmp_path / "key"
    folder.mkdir()
    old = time.time() - latent_cache.STALE_LEFTOVER_SECONDS - 60
    for name, age in [(".pairs-1.safetensors.tmp", old), (".prompts-2.safetensors.corrupt", old),
                      (".pairs-3.safetensors.tmp", None), ("pairs-4.safetensors", old), ("settings.json", old)]:
        (folder / name).write_bytes(b"x" * 10)
        if age is not None:
            os.utime(folder / name, (age, age))
    assert latent_cache.remove_stale_leftovers(str(folder)) == (2, 20)
    assert sorted(p.name for p in folder.iterdir()) == [".pairs-3.safetensors.tmp", "pairs-4.safetensors",
                                                        "settings.json"]
    assert latent_cache.remove_stale_leftovers(str(tmp_path / "absent")) == (0, 0)


def test_path_only_images_key_entries_by_their_files(tmp_path, demo_inputs):
    """Image cells that hold only a path: the dataset fingerprint covers the paths, not the files, so a rewritten
    file or a file that was missing and is back must give new entries, not stale latents or a stale mark."""
    from datasets import Image as ImageFeature

    model, data = demo_inputs["sdxl"]
    rows = load_from_disk(data).select(range(4)).to_dict()
    for column in ("jpg_0", "jpg_1"):
        for i, encoded in enumerate(rows[column]):
            path = tmp_path / f"{column}-{i}.png"
            path.write_bytes(encoded)
            rows[column][i] = {"bytes": None, "path": str(path)}
    dataset = Dataset.from_dict(rows).cast_column("jpg_0", ImageFeature()).cast_column("jpg_1", ImageFeature())
    os.remove(tmp_path / "jpg_1-2.png")  # missing for now (a file system that was not mounted yet)

    def build(name):
        return SmPOTrainer(make_config(tmp_path, model, name=name, reward_scale=0.1, no_hflip=True), dataset=dataset)

    first = build("first")
    assert first.latent_cache_stats.pairs_built == 4 and first.latent_cache_stats.undecodable_pairs == 1
    assert sum(first.train_dataset[i] is None for i in range(4)) == 1
    again = build("again")
    assert again.latent_cache_stats.pairs_built == 0 and again.latent_cache_stats.undecodable_pairs == 1

    (tmp_path / "jpg_1-2.png").write_bytes(load_from_disk(data)["jpg_1"][2])
    white = encode_image(Image.new("RGB", (32, 32), "white"))
    (tmp_path / "jpg_0-0.png").write_bytes(white)  # rewritten in place
    os.utime(tmp_path / "jpg_0-0.png", ns=(1, 1))  # even with an old modification time (the size differs)
    later = build("later")
    stats = later.latent_cache_stats
    assert stats.pairs_built == 2 and stats.undecodable_pairs == 0 and stats.key == first.latent_cache_stats.key
    # a same-size rewrite that keeps the modification time (cp -p, rsync -t) is a new entry too
    status = os.stat(tmp_path / "jpg_1-3.png")
    (tmp_path / "jpg_1-3.png").write_bytes((tmp_path / "jpg_1-3.png").read_bytes())
    os.utime(tmp_path / "jpg_1-3.png", ns=(status.st_atime_ns, status.st_mtime_ns))
    assert os.stat(tmp_path / "jpg_1-3.png").st_mtime_ns == status.st_mtime_ns
    assert pair_entry_bases(later.pairs)[3] != later.train_dataset.bases[3]
    # a row mapping (select/shuffle) gives each pair the stem it has without one
    mapped = later.pairs.select([3, 1, 0])
    assert mapped._indices is not None
    assert pair_entry_bases(mapped) == [pair_entry_bases(later.pairs)[i] for i in (3, 1, 0)]
    pixels = PreferencePairDataset(later.pairs, PairTransform(32, hflip=False), seed=0)
    for i in range(4):
        mean, _ = latent_moments(later.parts.vae, pixels[i]["pixel_values"])
        torch.testing.assert_close(later.train_dataset[i]["latent_mean"], mean, rtol=1e-4, atol=1e-5)
