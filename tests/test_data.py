"""Tests for smpo_diffusers.data: loading, validation, pair preparation, decoding, transforms, collate."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from smpo_diffusers.data import (
    PairStatistics,
    PairTransform,
    PreferencePairDataset,
    collate_preference_batch,
    decode_image,
    load_preference_dataset,
    prepare_preference_pairs,
    resolve_reward_columns,
    validate_preference_columns,
)
from smpo_diffusers.testing import encode_image, make_preference_dataset

SCALE = 0.1666


def _solid(colour, size=(8, 8)) -> bytes:
    return encode_image(Image.new("RGB", size, colour))


def _table(label_0, reward_0=None, reward_1=None, *, label_valid=None, captions=None, images=None):
    """Small hand-built pair table; image i of row k is a solid colour unless ``images`` given."""
    n = len(label_0)
    rows = {
        "caption": captions if captions is not None else [f"caption {k}" for k in range(n)],
        "jpg_0": [images[k][0] for k in range(n)] if images else [_solid((k, 0, 0)) for k in range(n)],
        "jpg_1": [images[k][1] for k in range(n)] if images else [_solid((0, k, 0)) for k in range(n)],
        "label_0": [float(v) for v in label_0],
    }
    features = {
        "caption": datasets.Value("string"),
        "jpg_0": datasets.Value("binary"),
        "jpg_1": datasets.Value("binary"),
        "label_0": datasets.Value("float64"),
    }
    if reward_0 is not None:
        rows["reward_0"], rows["reward_1"] = list(reward_0), list(reward_1)
        features["reward_0"] = features["reward_1"] = datasets.Value("float64")
    if label_valid is not None:
        rows["label_valid"] = list(label_valid)
        features["label_valid"] = datasets.Value("bool")
    return datasets.Dataset.from_dict(rows, features=datasets.Features(features))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- loading


def test_load_save_to_disk_dataset_folder(tmp_path):
    ds = make_preference_dataset(num_pairs=6, seed=1)
    ds.save_to_disk(str(tmp_path / "saved"))
    loaded = load_preference_dataset(str(tmp_path / "saved"))
    assert loaded.column_names == ds.column_names
    assert loaded["caption"] == ds["caption"]
    assert loaded[3]["jpg_1"] == ds[3]["jpg_1"]
    # one split in the folder: asking for another is an error, not the whole folder
    with pytest.raises(ValueError, match="holds one split.*drop --dataset_split_name"):
        load_preference_dataset(str(tmp_path / "saved"), split="validation_unique")


def test_load_dataset_dict_folder_selects_split_and_lists_missing(tmp_path):
    train = make_preference_dataset(num_pairs=5, seed=1)
    test = make_preference_dataset(num_pairs=3, seed=2)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_preference_dataset(str(tmp_path / "dd"), split="test")) == 3
    assert load_preference_dataset(str(tmp_path / "dd"), split="train")["caption"] == train["caption"]
    with pytest.raises(ValueError, match=r"validation.*available splits: \['test', 'train'\]"):
        load_preference_dataset(str(tmp_path / "dd"), split="validation")


def test_load_parquet_file_glob_and_folder(tmp_path):
    ds = make_preference_dataset(num_pairs=6, seed=3)
    folder = tmp_path / "pq"
    folder.mkdir()
    ds.select(range(4)).to_parquet(str(folder / "part-0.parquet"))
    ds.select(range(4, 6)).to_parquet(str(folder / "part-1.parquet"))
    cache = str(tmp_path / "cache")

    single = load_preference_dataset(str(folder / "part-0.parquet"), cache_dir=cache)
    assert single["caption"] == ds["caption"][:4]
    assert single[0]["jpg_0"] == ds[0]["jpg_0"]
    assert len(load_preference_dataset(str(folder / "*.parquet"), cache_dir=cache)) == 6
    assert len(load_preference_dataset(str(folder), cache_dir=cache)) == 6
    listed = load_preference_dataset(
        [str(folder / "part-1.parquet"), str(folder / "part-0.parquet")], cache_dir=cache
    )
    assert sorted(listed["caption"]) == sorted(ds["caption"])
    # explicit files are one split: another split name would have no effect
    with pytest.raises(ValueError, match="data files, which form one split, so split 'test' cannot be selected"):
        load_preference_dataset(str(folder / "*.parquet"), split="test", cache_dir=cache)


def test_load_folder_infers_splits_from_file_names(tmp_path):
    ds = make_preference_dataset(num_pairs=6, seed=3)
    ds.select(range(4)).to_parquet(str(tmp_path / "train.parquet"))
    ds.select(range(4, 6)).to_parquet(str(tmp_path / "test.parquet"))
    cache = str(tmp_path / "cache")
    test_split = load_preference_dataset(str(tmp_path), split="test", cache_dir=cache)
    assert test_split["caption"] == ds["caption"][4:]
    with pytest.raises(ValueError, match="available splits"):
        load_preference_dataset(str(tmp_path), split="validation", cache_dir=cache)


def test_load_json_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"caption": "a", "label_0": 1.0}\n{"caption": "b", "label_0": 0.5}\n')
    loaded = load_preference_dataset(str(path), cache_dir=str(tmp_path / "cache"))
    assert loaded["caption"] == ["a", "b"]
    assert loaded["label_0"] == [1.0, 0.5]


def test_load_local_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preference_dataset(str(tmp_path / "missing.parquet"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        load_preference_dataset(str(tmp_path / "*.parquet"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_preference_dataset(str(tmp_path / "notes.txt"))
    ds = make_preference_dataset(num_pairs=2)
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="Hub datasets only"):
        load_preference_dataset(str(tmp_path / "saved"), revision="main")


def test_data_files_without_rows_are_named(tmp_path, caplog):
    """A data file holding no rows (0-row parquet, CSV header alone, empty JSON) is an error naming the file and
    saying so (datasets' own error named neither); among files with rows it is skipped with a warning."""
    ds = make_preference_dataset(num_pairs=3, seed=1)
    ds.select([]).to_parquet(str(tmp_path / "empty.parquet"))
    ds.to_parquet(str(tmp_path / "full.parquet"))
    (tmp_path / "header.csv").write_text("caption,label_0\n")
    (tmp_path / "blank.json").write_text("")
    (tmp_path / "list.json").write_text("[]\n")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    cache = str(tmp_path / "cache")
    for name in ("empty.parquet", "header.csv", "blank.json", "list.json", "blank.jsonl"):
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=rf"The dataset split 'train' is empty: the data file '{path}' holds no "
                                             r"rows \(a header or schema alone, or nothing\)\. Check how it was "
                                             "written, or pass --dataset_name data that holds rows"):
            load_preference_dataset(path, cache_dir=cache)
    (tmp_path / "more.csv").write_text("caption,label_0\n\n")
    with pytest.raises(ValueError, match=r"split 'train' of '.*\*\.csv' is empty: the data files \[.*header\.csv', "
                                         r"'.*more\.csv'\] hold no rows"):
        load_preference_dataset(str(tmp_path / "*.csv"), cache_dir=cache)
    folder = tmp_path / "folder"
    folder.mkdir()
    ds.select([]).to_parquet(str(folder / "train.parquet"))
    with pytest.raises(ValueError, match=r"split 'train' of the data folder '.*folder' is empty: the data file "
                                         r"'.*train\.parquet' holds no rows"):
        load_preference_dataset(str(folder), cache_dir=cache)
    with caplog.at_level("WARNING", logger="smpo_diffusers.data"):
        mixed = load_preference_dataset([str(tmp_path / "empty.parquet"), str(tmp_path / "full.parquet")],
                                        cache_dir=cache)
    assert mixed["caption"] == ds["caption"]
    assert f"skipping 1 data file(s) that hold no rows: ['{tmp_path / 'empty.parquet'}']" in caplog.text


def test_hub_id_goes_to_load_dataset_without_remote_code(monkeypatch, tmp_path):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return make_preference_dataset(num_pairs=2)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    loaded = load_preference_dataset("someone/pick-a-pic", split="test", cache_dir="c", revision="abc")
    assert len(loaded) == 2
    assert calls == [("someone/pick-a-pic", {"split": "test", "cache_dir": "c", "revision": "abc"})]


# ----------------------------------------------------------------------------- validation


def test_validation_missing_rewards_names_labelling_command_and_dpo():
    ds = make_preference_dataset(num_pairs=4)
    validate_preference_columns(ds, loss_type="dpo", reward_columns=None)
    with pytest.raises(ValueError) as info:
        validate_preference_columns(ds, loss_type="smpo", reward_columns=("reward_0", "reward_1"))
    message = str(info.value)
    assert "examples/label_rewards.py" in message and "--reward_model pickscore" in message
    assert "--loss_type dpo" in message and "--reward_columns" in message
    assert "missing column 'reward_0'" in message
    assert "caption (string)" in message and "label_0 (float64)" in message  # columns found, with types


def test_validation_autodetects_and_disambiguates_reward_columns():
    ds = make_preference_dataset(num_pairs=4)
    ps = ds.add_column("ps_score_0", [0.2] * 4).add_column("ps_score_1", [0.1] * 4)
    assert resolve_reward_columns(ps, loss_type="smpo", reward_columns=None) == ("ps_score_0", "ps_score_1")
    assert resolve_reward_columns(ps, loss_type="dpo", reward_columns=None) is None
    validate_preference_columns(ps, loss_type="smpo", reward_columns=None)
    both = ps.add_column("reward_0", [0.0] * 4).add_column("reward_1", [0.0] * 4)
    with pytest.raises(ValueError, match="--reward_columns"):
        validate_preference_columns(both, loss_type="smpo", reward_columns=None)
    validate_preference_columns(both, loss_type="smpo", reward_columns=("reward_0", "reward_1"))


def test_validation_wrong_types_and_missing_caption():
    ds = make_preference_dataset(num_pairs=4)
    as_text = ds.cast_column("label_0", datasets.Value("string"))
    with pytest.raises(ValueError, match=r"'label_0' has type string \(expected numeric"):
        validate_preference_columns(as_text, loss_type="dpo", reward_columns=None)
    text_rewards = ds.add_column("reward_0", ["0.1"] * 4).add_column("reward_1", [0.2] * 4)
    with pytest.raises(ValueError, match=r"'reward_0' has type string"):
        validate_preference_columns(text_rewards, loss_type="smpo", reward_columns=("reward_0", "reward_1"))
    images_as_text = ds.remove_columns("jpg_0").add_column("jpg_0", ["a.png"] * 4)
    with pytest.raises(ValueError, match=r"'jpg_0' has type string"):
        validate_preference_columns(images_as_text, loss_type="dpo", reward_columns=None)
    with pytest.raises(ValueError, match=r"(?s)missing column 'caption'.*Columns found: jpg_0 \(binary\)"):
        validate_preference_columns(ds.remove_columns("caption"), loss_type="dpo", reward_columns=None)
    with pytest.raises(ValueError, match="loss_type"):
        validate_preference_columns(ds, loss_type="ipo", reward_columns=None)


def test_validation_accepts_image_feature():
    ds = make_preference_dataset(num_pairs=3).cast_column("jpg_0", datasets.Image()).cast_column(
        "jpg_1", datasets.Image()
    )
    validate_preference_columns(ds, loss_type="dpo", reward_columns=None)
    pairs, _ = prepare_preference_pairs(ds, loss_type="dpo", reward_columns=None, reward_scale=None)
    item = PreferencePairDataset(pairs, PairTransform(16), seed=0)[0]
    assert item is not None and item["pixel_values"].shape == (2, 3, 16, 16)


# ----------------------------------------------------------------------------- preparation


def test_label_outside_allowed_set_raises_with_count_and_rows():
    ds = _table([1.0, 0.7, 0.0, 2.0, float("nan")])
    with pytest.raises(ValueError, match=r"3 of 5 rows.*row 1: 0.7.*row 3: 2.0.*row 4: nan"):
        prepare_preference_pairs(ds, loss_type="dpo", reward_columns=None, reward_scale=None)


def test_inconsistent_label_1_raises():
    ds = _table([1.0, 0.0]).add_column("label_1", [0.0, 0.0])
    with pytest.raises(ValueError, match="label_1 must equal 1 - label_0; 1 of 2"):
        prepare_preference_pairs(ds, loss_type="dpo", reward_columns=None, reward_scale=None)


def test_dpo_ordering_and_tie_policies():
    ds = _table([1.0, 0.0, 0.5, 1.0])
    pairs, stats = prepare_preference_pairs(ds, loss_type="dpo", reward_columns=None, reward_scale=None)
    assert pairs["winner_index"] == [0, 1, 0]
    assert pairs["prob_w"] == [1.0, 1.0, 1.0]
    assert pairs["caption"] == ["caption 0", "caption 1", "caption 3"]
    assert (stats.total, stats.kept, stats.dropped_ties, stats.kept_ties) == (4, 3, 1, 0)
    assert pairs.features["prob_w"] == datasets.Value("float32")
    assert pairs.features["winner_index"] == datasets.Value("int8")
    assert pairs.features["source_row"] == datasets.Value("int64")

    kept, stats = prepare_preference_pairs(
        ds, loss_type="dpo", reward_columns=None, reward_scale=None, tie_policy="keep"
    )
    assert kept["winner_index"] == [0, 1, 0, 0]
    assert kept["prob_w"] == [1.0, 1.0, 0.5, 1.0]
    assert (stats.kept, stats.dropped_ties, stats.kept_ties) == (4, 0, 1)
    assert stats.mean_prob_w == pytest.approx(0.875)
    with pytest.raises(ValueError, match="tie_policy"):
        prepare_preference_pairs(ds, loss_type="dpo", reward_columns=None, reward_scale=None, tie_policy="x")


def test_smpo_ordering_probabilities_and_ties():
    reward_0 = [0.25, 0.20, 0.18, 0.21, 0.22]
    reward_1 = [0.20, 0.26, 0.23, 0.21, 0.15]
    label_0 = [1.0, 1.0, 0.5, 0.0, 0.0]  # row 1 and row 4: reward disagrees with the human
    ds = _table(label_0, reward_0, reward_1)
    pairs, stats = prepare_preference_pairs(
        ds, loss_type="smpo", reward_columns=("reward_0", "reward_1"), reward_scale=SCALE
    )
    expected_rows = [0, 1, 3, 4]  # row 2 is a human tie: dropped
    expected_winner = [0, 1, 0, 0]  # equal rewards (row 3) -> image 0
    expected_p = [_sigmoid(abs(reward_0[r] - reward_1[r]) / SCALE) for r in expected_rows]
    assert pairs["caption"] == [f"caption {r}" for r in expected_rows]
    assert pairs["winner_index"] == expected_winner
    np.testing.assert_allclose(pairs["prob_w"], expected_p, rtol=1e-6)
    assert all(p >= 0.5 for p in pairs["prob_w"])
    assert pairs["prob_w"][2] == 0.5
    assert stats.reward_disagreements == 2
    assert (stats.dropped_ties, stats.kept_ties) == (1, 0)
    assert stats.mean_prob_w == pytest.approx(np.mean(expected_p), rel=1e-6)

    kept, stats = prepare_preference_pairs(
        ds, loss_type="smpo", reward_columns=None, reward_scale=SCALE, tie_policy="keep"
    )
    assert kept["winner_index"][2] == 1  # the kept tie is ordered by reward
    assert kept["prob_w"][2] == pytest.approx(_sigmoid(0.05 / SCALE), rel=1e-6)
    assert (stats.kept, stats.kept_ties, stats.dropped_ties) == (5, 1, 0)
    assert set(kept.column_names) >= {"caption", "jpg_0", "jpg_1", "label_0", "reward_0", "reward_1"}


@pytest.mark.parametrize("scale", [None, 0.0, -1.0, float("nan"), float("inf")])
def test_smpo_requires_finite_positive_scale(scale):
    ds = _table([1.0], [0.2], [0.1])
    with pytest.raises(ValueError, match="reward_scale"):
        prepare_preference_pairs(ds, loss_type="smpo", reward_columns=None, reward_scale=scale)


def test_nonfinite_rewards_and_label_valid_are_dropped_and_counted():
    nan, inf = float("nan"), float("inf")
    ds = _table(
        [1.0, 1.0, 0.0, 0.5, 1.0, 0.0],
        [0.2, nan, 0.1, 0.2, 0.3, inf],
        [0.1, 0.1, 0.3, 0.2, nan, 0.1],
        label_valid=[True, True, True, True, False, True],
    )
    pairs, stats = prepare_preference_pairs(ds, loss_type="smpo", reward_columns=None, reward_scale=SCALE)
    assert pairs["caption"] == ["caption 0", "caption 2"]
    # row 4 is invalid (counted there only, although its reward is NaN too); rows 1 and 5 non-finite
    assert (stats.dropped_invalid, stats.dropped_nonfinite, stats.dropped_ties, stats.kept) == (1, 2, 1, 2)
    assert stats.as_dict()["total"] == 6
    assert "2/6 kept" in stats.summary()

    # DPO mode ignores rewards, label_valid still applies.
    pairs, stats = prepare_preference_pairs(ds, loss_type="dpo", reward_columns=None, reward_scale=None)
    assert (stats.dropped_invalid, stats.dropped_nonfinite, stats.kept) == (1, 0, 4)


def test_rows_marked_invalid_are_dropped_whatever_their_labels_and_float_flags_treat_nan_as_invalid():
    ds = _table([1.0, 0.0, 1.0], label_valid=[True, True, False])
    rows = ds.to_dict()
    rows["label_0"][2] = None  # a failed labelling row may carry no label at all
    ds = datasets.Dataset.from_dict(rows, features=ds.features)
    pairs, stats = prepare_preference_pairs(ds, loss_type="dpo", reward_columns=None, reward_scale=None)
    assert (stats.kept, stats.dropped_invalid) == (2, 1)
    flags = ds.cast_column("label_valid", datasets.Value("float64")).to_dict()
    flags["label_valid"] = [1.0, float("nan"), 0.0]
    as_float = datasets.Dataset.from_dict(flags, features=datasets.Features(
        {**ds.features, "label_valid": datasets.Value("float64")}))
    pairs, stats = prepare_preference_pairs(as_float, loss_type="dpo", reward_columns=None, reward_scale=None)
    assert (stats.kept, stats.dropped_invalid) == (1, 2) and pairs["caption"] == ["caption 0"]


def test_reward_nulls_count_as_nonfinite():
    ds = _table([1.0, 0.0], [0.2, None], [0.1, 0.3])
    _, stats = prepare_preference_pairs(ds, loss_type="smpo", reward_columns=None, reward_scale=SCALE)
    assert (stats.kept, stats.dropped_nonfinite) == (1, 1)


def test_empty_after_filtering_explains_what_was_dropped():
    ds = _table([0.5, 0.5, 1.0], label_valid=[True, True, False])
    with pytest.raises(ValueError, match=r"1 with label_valid False.*2 human ties.*use --loss_type smpo"):
        prepare_preference_pairs(ds, loss_type="dpo", reward_columns=None, reward_scale=None)
    rewarded = _table([0.5, 0.5, 1.0], [0.2, 0.3, 0.1], [0.1, 0.4, 0.2], label_valid=[True, True, False])
    with pytest.raises(ValueError, match=r"2 human ties.*Use tie_policy='keep' if the set is mostly ties"):
        prepare_preference_pairs(rewarded, loss_type="smpo", reward_columns=None, reward_scale=SCALE)


def test_max_train_samples_is_deterministic_and_matches_shuffle_select():
    ds = _table([1.0, 0.0, 0.5] * 10)
    common = dict(loss_type="dpo", reward_columns=None, reward_scale=None)
    a, stats = prepare_preference_pairs(ds, **common, max_train_samples=7, seed=5)
    b, _ = prepare_preference_pairs(ds, **common, max_train_samples=7, seed=5)
    c, _ = prepare_preference_pairs(ds, **common, max_train_samples=7, seed=6)
    assert a["caption"] == b["caption"]
    assert a["caption"] != c["caption"]
    assert (stats.kept, stats.dropped_ties, stats.dropped_by_max_samples) == (7, 10, 13)
    full, _ = prepare_preference_pairs(ds, **common)
    assert a["caption"] == full.shuffle(seed=5).select(range(7))["caption"]
    more, stats = prepare_preference_pairs(ds, **common, max_train_samples=100, seed=5)
    assert sorted(more["caption"]) == sorted(full["caption"]) and stats.dropped_by_max_samples == 0
    with pytest.raises(ValueError, match="max_train_samples"):
        prepare_preference_pairs(ds, **common, max_train_samples=0)


def test_indexed_input_dataset_keeps_row_alignment():
    ds = _table([1.0, 0.0, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.0, 0.5]).select([3, 1, 2])
    pairs, stats = prepare_preference_pairs(ds, loss_type="smpo", reward_columns=None, reward_scale=SCALE)
    assert pairs["caption"] == ["caption 3", "caption 1"]
    assert pairs["winner_index"] == [1, 0]
    assert stats.total == 3 and stats.dropped_ties == 1


def test_null_captions_are_counted_and_become_empty():
    ds = _table([1.0, 0.0, 1.0, 1.0], captions=[None, "ok", "", " \t "])
    pairs, stats = prepare_preference_pairs(ds, loss_type="dpo", reward_columns=None, reward_scale=None)
    assert (stats.missing_captions, stats.blank_captions) == (1, 2)  # null; empty and whitespace
    assert "1 missing and 2 blank captions" in stats.summary()
    item = PreferencePairDataset(pairs, PairTransform(8), seed=0)[0]
    assert item["caption"] == "" and item["missing_caption"] and not item["empty_prompt"]


def test_pairs_of_weight_zero_are_counted_and_a_set_of_only_those_is_refused():
    """prob_w 0.5 gives the label weight 2p - 1 = 0: no gradient. A broken reward model that scores every image
    alike (with --reward_scale given, no statistics catch it) used to train nothing without a word."""
    _, stats = prepare_preference_pairs(_table([1.0, 0.0, 1.0], [0.2, 0.3, 0.4], [0.2, 0.1, 0.4]),
                                        loss_type="smpo", reward_columns=None, reward_scale=SCALE)
    assert stats.kept == 3 and stats.zero_weight_pairs == 2 and "2 pairs of weight 0 (prob_w 0.5)" in stats.summary()
    equal = _table([1.0, 0.0, 1.0], [0.2, 0.2, 0.2], [0.2, 0.2, 0.2])
    with pytest.raises(ValueError, match=r"every one of the 3 pairs left has prob_w 0.5 \(weight 2p - 1 = 0\): "
                                         r"their two rewards are equal, so the loss has no gradient"):
        prepare_preference_pairs(equal, loss_type="smpo", reward_columns=None, reward_scale=SCALE)
    with pytest.raises(ValueError, match="they are all human ties, so the loss has no gradient"):
        prepare_preference_pairs(_table([0.5, 0.5]), loss_type="dpo", reward_columns=None, reward_scale=None,
                                 tie_policy="keep")


def test_a_set_of_already_prepared_pairs_is_refused_with_the_fix():
    pairs, _ = prepare_preference_pairs(_table([1.0, 0.0]), loss_type="dpo", reward_columns=None, reward_scale=None)
    with pytest.raises(ValueError, match=r"already has the column\(s\) \['winner_index', 'prob_w', 'source_row'\].*"
                                         r"dataset.remove_columns"):
        prepare_preference_pairs(pairs, loss_type="dpo", reward_columns=None, reward_scale=None)


def test_pair_statistics_fields():
    stats = PairStatistics(
        total=3, kept=2, dropped_ties=1, dropped_invalid=0, dropped_nonfinite=0, kept_ties=0, mean_prob_w=0.75
    )
    assert stats.as_dict()["mean_prob_w"] == 0.75
    assert "2/3 kept" in stats.summary() and "1 ties" in stats.summary()


# ----------------------------------------------------------------------------- decoding


def test_decode_rgba_composites_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    decoded = decode_image(encode_image(image, "PNG"))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((1, 1)) == (255, 255, 255)  # fully transparent -> white
    assert decoded.getpixel((0, 0)) == (0, 0, 255)


def test_decode_greyscale_palette_cmyk_and_16bit():
    grey = decode_image(encode_image(Image.new("L", (4, 4), 100), "PNG"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (100, 100, 100)
    la = decode_image(encode_image(Image.new("LA", (4, 4), (0, 0)), "PNG"))
    assert la.getpixel((0, 0)) == (255, 255, 255)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 1), 1)
    decoded = decode_image(encode_image(palette, "PNG"))
    assert decoded.getpixel((0, 0)) == (10, 20, 30) and decoded.getpixel((1, 1)) == (200, 100, 50)
    transparent = decode_image(encode_image(palette, "PNG", transparency=0))
    assert transparent.getpixel((0, 0)) == (255, 255, 255) and transparent.getpixel((1, 1)) == (200, 100, 50)

    cmyk = decode_image(encode_image(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"))
    red = cmyk.getpixel((0, 0))
    assert cmyk.mode == "RGB" and red[0] > 200 and red[1] < 60 and red[2] < 60

    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    sixteen.putpixel((0, 0), 32768)
    decoded = decode_image(encode_image(sixteen, "PNG"))
    assert decoded.getpixel((1, 1)) == (255, 255, 255)
    assert decoded.getpixel((0, 0))[0] == 128  # scaled from 16 bit, not clipped


def test_decode_accepts_dict_pil_and_paths(tmp_path):
    data = _solid((1, 2, 3))
    assert decode_image({"bytes": data, "path": None}).getpixel((0, 0)) == (1, 2, 3)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert decode_image({"bytes": None, "path": str(path)}).getpixel((0, 0)) == (1, 2, 3)
    assert decode_image({"bytes": None, "path": str(tmp_path / "gone.png")}) is None
    assert decode_image(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_decode_applies_exif_orientation():
    image = Image.new("RGB", (6, 2), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    decoded = decode_image(encode_image(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (2, 6)


def test_decode_bad_data_returns_none():
    jpeg = encode_image(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    png = _solid((1, 2, 3), size=(64, 64))
    assert decode_image(jpeg) is not None
    assert decode_image(jpeg[: len(jpeg) // 2]) is None
    assert decode_image(png[: len(png) // 2]) is None
    assert decode_image(b"not an image at all") is None
    assert decode_image(b"") is None
    assert decode_image(None) is None
    assert decode_image(12345) is None


# ----------------------------------------------------------------------------- paired transform


def _gradient(width: int, height: int) -> Image.Image:
    """An asymmetric RGB image: red grows left->right, green grows top->bottom."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 77)], -1).astype(np.uint8))


def test_pair_transform_identical_images_give_identical_outputs_and_flip_consistently():
    image = _gradient(40, 30)
    transform = PairTransform(16, random_crop=True, hflip=True)
    flipped_seen = {False: 0, True: 0}
    for seed in range(16):
        sample = transform(image, image.copy(), np.random.default_rng(seed))
        assert torch.equal(sample.pixel_values[0], sample.pixel_values[1])
        red = sample.pixel_values[0, 0]
        # red increases left->right unless the pair was flipped
        assert (red[:, -1] > red[:, 0]).all() != sample.flipped
        flipped_seen[sample.flipped] += 1
        assert torch.equal(sample.crop_top_lefts[0], sample.crop_top_lefts[1])
    assert flipped_seen[False] > 0 and flipped_seen[True] > 0


def test_pair_transform_same_crop_for_related_images():
    # Image B = 255 - image A pixelwise: outputs must stay complementary, so the crop box matched.
    a = _gradient(50, 20)
    b = Image.fromarray(255 - np.asarray(a))
    for seed in range(5):
        sample = PairTransform(20, random_crop=True)(a, b, np.random.default_rng(seed))
        torch.testing.assert_close(sample.pixel_values[0], -sample.pixel_values[1], atol=2 / 127.5, rtol=0)
        top, left = sample.crop_top_lefts[0].tolist()
        assert top == 0 and 0 <= left <= 30
    transform = PairTransform(20, random_crop=True)
    crops = [transform(a, b, np.random.default_rng(s)).crop_top_lefts[0] for s in range(10)]
    tops_lefts = {tuple(crop.tolist()) for crop in crops}
    assert len(tops_lefts) > 1  # random crops actually vary


def test_flipped_crop_corner_is_measured_in_the_mirrored_image():
    """SDXL's crop micro-conditioning describes the pixels shown: for a flipped pair, the crop's corner in the
    mirrored resized image (flip, then crop there: the same pixels)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 59, 3), dtype=np.uint8))
    seen = set()
    for seed in range(12):
        for random_crop in (True, False):
            transform = PairTransform(16, random_crop=random_crop, hflip=True)
            sample = transform(image, image, np.random.default_rng(seed))
            top, left = sample.crop_top_lefts[0].tolist()
            whole = image.resize(transform.target_size(59, 20), resample=Image.BILINEAR)
            if sample.flipped:
                whole = whole.transpose(Image.FLIP_LEFT_RIGHT)
            expected = np.asarray(whole.crop((left, top, left + 16, top + 16)), dtype=np.float32) / 127.5 - 1
            assert np.abs(sample.pixel_values[0].numpy().transpose(1, 2, 0) - expected).max() <= 1.01 / 127.5
            seen.add((random_crop, sample.flipped, left))
    centre = {left for random_crop, flipped, left in seen if not random_crop}
    assert centre == {16, 15}  # resized 47 px wide: centre left round(15.5) = 16; flipped, 47 - 16 - 16 = 15


def test_pair_transform_center_crop_values_and_sizes():
    image = _gradient(64, 32)
    sample = PairTransform(16, random_crop=False, hflip=False)(image, image, np.random.default_rng(0))
    assert sample.pixel_values.shape == (2, 3, 16, 16) and sample.pixel_values.dtype == torch.float32
    assert sample.pixel_values.min() >= -1 and sample.pixel_values.max() <= 1
    assert sample.original_sizes.tolist() == [[32, 64], [32, 64]]
    assert sample.crop_top_lefts.tolist() == [[0, 8], [0, 8]]  # resized to 16x32, centre crop
    assert not sample.flipped and not sample.upscaled and not sample.resized_pair
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    black = Image.new("RGB", (8, 8), (0, 0, 0))
    extremes = PairTransform(8, hflip=False)(white, black, np.random.default_rng(0)).pixel_values
    assert (extremes[0] == 1).all() and (extremes[1] == -1).all()


def test_pair_transform_size_mismatch_and_upscaling():
    winner = Image.new("RGB", (20, 10), (255, 0, 0))
    loser = Image.new("RGB", (7, 9), (0, 0, 255))
    sample = PairTransform(16, hflip=False)(winner, loser, np.random.default_rng(0))
    assert sample.resized_pair and sample.upscaled
    assert sample.original_sizes.tolist() == [[10, 20], [9, 7]]
    assert sample.pixel_values.shape == (2, 3, 16, 16)
    assert sample.crop_top_lefts.tolist() == [[0, 8], [0, 8]]  # winner 20x10 -> 32x16, centre crop
    torch.testing.assert_close(sample.pixel_values[1, 2], torch.ones(16, 16))  # loser still pure blue
    big = Image.new("RGB", (40, 40))
    sample = PairTransform(16)(big, big, np.random.default_rng(0))
    assert not sample.upscaled and not sample.resized_pair
    with pytest.raises(ValueError, match="resolution"):
        PairTransform(0)


def test_pair_transform_resamples_only_the_kept_region(monkeypatch):
    """Resize-then-crop computed as one resize of the source region: within one 8-bit level of resizing the whole
    image and cropping, and a 1 x 2000 px image never becomes a 32 x 64000 intermediate."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        width, height, res = int(rng.integers(10, 120)), int(rng.integers(10, 120)), int(rng.integers(4, 40))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        transform = PairTransform(res, random_crop=bool(trial % 2), hflip=False)
        sample = transform(image, image, np.random.default_rng(trial))
        top, left = sample.crop_top_lefts[0].tolist()
        whole = image.resize(transform.target_size(width, height), resample=Image.BILINEAR)
        expected = np.asarray(whole.crop((left, top, left + res, top + res)), dtype=np.float32) / 127.5 - 1
        assert np.abs(sample.pixel_values[0].numpy().transpose(1, 2, 0) - expected).max() <= 1.01 / 127.5
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(size) or resize(
        self, size, *a, **k))
    thin = Image.new("RGB", (1, 2000), (10, 200, 30))
    sample = PairTransform(32, hflip=False)(thin, thin, np.random.default_rng(0))
    assert sample.pixel_values.shape == (2, 3, 32, 32) and sample.upscaled
    assert sizes and all(size == (32, 32) for size in sizes)


# ----------------------------------------------------------------------------- torch dataset + collate


def _prepared(num_pairs=8, **kwargs):
    ds = make_preference_dataset(num_pairs=num_pairs, seed=0, image_size=24, tie_fraction=0.0, **kwargs)
    pairs, _ = prepare_preference_pairs(ds, loss_type="dpo", reward_columns=None, reward_scale=None)
    return ds, pairs


def test_dataset_items_winner_first_and_deterministic():
    ds, pairs = _prepared()
    transform = PairTransform(16, random_crop=True, hflip=True)
    first = PreferencePairDataset(pairs, transform, seed=7, proportion_empty_prompts=0.5)
    second = PreferencePairDataset(pairs, transform, seed=7, proportion_empty_prompts=0.5)
    assert len(first) == 8
    for i in reversed(range(len(first))):  # access order does not matter
        a, b = first[i], second[i]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert a["caption"] == b["caption"] and a["crop_top_lefts"].tolist() == b["crop_top_lefts"].tolist()
        assert a["index"] == i and a["prob_w"] == 1.0

    # winner first: compare with a no-randomness transform against the decoded images
    plain = PreferencePairDataset(pairs, PairTransform(24, hflip=False), seed=0)
    for i in range(len(plain)):
        item = plain[i]
        winner_column = "jpg_0" if ds[i]["label_0"] == 1.0 else "jpg_1"
        winner = np.asarray(decode_image(ds[i][winner_column]), dtype=np.float32)
        expected = torch.from_numpy(winner / 127.5 - 1)
        torch.testing.assert_close(item["pixel_values"][0], expected.permute(2, 0, 1))


def test_dataset_epochs_differ_and_set_epoch_is_reproducible():
    _, pairs = _prepared()
    dataset = PreferencePairDataset(pairs, PairTransform(16, random_crop=True), seed=1)
    epoch0 = [dataset[i]["pixel_values"] for i in range(len(dataset))]
    dataset.set_epoch(1)
    epoch1 = [dataset[i]["pixel_values"] for i in range(len(dataset))]
    assert any(not torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    dataset.set_epoch(0)
    assert all(torch.equal(a, dataset[i]["pixel_values"]) for i, a in enumerate(epoch0))
    other_seed = PreferencePairDataset(pairs, PairTransform(16, random_crop=True), seed=2)
    assert any(not torch.equal(a, other_seed[i]["pixel_values"]) for i, a in enumerate(epoch0))


def test_dataset_items_identical_through_dataloader_workers():
    _, pairs = _prepared(num_pairs=6)
    transform = PairTransform(16, random_crop=True)
    dataset = PreferencePairDataset(pairs, transform, seed=3, proportion_empty_prompts=0.5)
    dataset.set_epoch(2)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, num_workers=2, collate_fn=collate_preference_batch
    )
    batches = list(loader)
    stacked = torch.cat([b["pixel_values"] for b in batches])
    captions = [c for b in batches for c in b["captions"]]
    direct = collate_preference_batch([dataset[i] for i in range(len(dataset))])
    assert torch.equal(stacked, direct["pixel_values"])
    assert captions == direct["captions"]


def test_proportion_empty_prompts_statistics_and_determinism():
    ds = _table([1.0] * 400, images=[(_solid((1, 1, 1), (2, 2)), _solid((2, 2, 2), (2, 2)))] * 400)
    pairs, _ = prepare_preference_pairs(ds, loss_type="dpo", reward_columns=None, reward_scale=None)
    transform = PairTransform(2, hflip=False)
    dataset = PreferencePairDataset(pairs, transform, seed=11, proportion_empty_prompts=0.2)
    items = [dataset[i] for i in range(len(dataset))]
    empty = [item["caption"] == "" for item in items]
    assert empty == [item["empty_prompt"] for item in items]
    assert 0.13 < np.mean(empty) < 0.27  # binomial(400, 0.2): ±4.5 sigma
    assert empty == [dataset[i]["caption"] == "" for i in range(len(dataset))]
    never = PreferencePairDataset(pairs, transform, seed=11, proportion_empty_prompts=0.0)
    always = PreferencePairDataset(pairs, transform, seed=11, proportion_empty_prompts=1.0)
    assert never[5]["caption"] == "caption 5" and always[5]["caption"] == ""
    with pytest.raises(ValueError, match="proportion_empty_prompts"):
        PreferencePairDataset(pairs, PairTransform(2), seed=0, proportion_empty_prompts=1.5)


def test_undecodable_pair_gives_none_and_collate_counts_it():
    good = (_solid((255, 0, 0)), _solid((0, 0, 255)))
    broken = (_solid((255, 0, 0)), b"\x89PNG broken")
    ds = _table([1.0, 0.0, 1.0], images=[good, broken, good])
    pairs, _ = prepare_preference_pairs(ds, loss_type="dpo", reward_columns=None, reward_scale=None)
    dataset = PreferencePairDataset(pairs, PairTransform(8, hflip=False), seed=0)
    items = [dataset[i] for i in range(3)]
    assert items[1] is None
    batch = collate_preference_batch(items)
    assert batch["num_skipped"] == 1 and batch["batch_size"] == 2
    assert batch["pixel_values"].shape == (2, 2, 3, 8, 8)
    assert batch["indices"].tolist() == [0, 2] and batch["indices"].dtype == torch.long
    assert batch["prob_w"].dtype == torch.float32 and batch["prob_w"].tolist() == [1.0, 1.0]
    assert batch["original_sizes"].shape == (2, 2, 2) and batch["crop_top_lefts"].shape == (2, 2, 2)
    assert batch["captions"] == ["caption 0", "caption 2"]
    torch.testing.assert_close(batch["pixel_values"][:, 0, 0], torch.ones(2, 8, 8))  # red winner first

    nothing = collate_preference_batch([None, None])
    assert nothing["num_skipped"] == 2 and nothing["batch_size"] == 0
    assert nothing["pixel_values"] is None and nothing["prob_w"] is None and nothing["captions"] == []


def test_dataset_requires_prepared_pairs():
    with pytest.raises(ValueError, match="prepare_preference_pairs"):
        PreferencePairDataset(make_preference_dataset(num_pairs=2), PairTransform(8), seed=0)


def test_padding_index_is_dropped_without_counting_as_a_skip():
    """The sampler's end-of-epoch padding: an item marked as padding, dropped by the collate, no skip counted; the
    sampler pads its permutation to a multiple (each real index still exactly once)."""
    from smpo_diffusers.data import PADDING_INDEX
    from smpo_diffusers.trainer import EpochShuffleSampler

    pairs, _ = prepare_preference_pairs(make_preference_dataset(num_pairs=3, seed=0), loss_type="dpo",
                                        reward_columns=None, reward_scale=None)
    dataset = PreferencePairDataset(pairs, PairTransform(16), seed=0)
    batch = collate_preference_batch([dataset[0], dataset[PADDING_INDEX], None])
    assert batch["batch_size"] == 1 and batch["num_skipped"] == 1 and batch["indices"].tolist() == [0]
    only_padding = collate_preference_batch([dataset[PADDING_INDEX]] * 2)
    assert only_padding["batch_size"] == 0 and only_padding["num_skipped"] == 0
    with pytest.raises(IndexError):
        dataset[-2]
    sampler = EpochShuffleSampler(13, seed=0, pad_to_multiple=6)
    order = list(sampler)
    assert len(sampler) == len(order) == 18 and order[13:] == [PADDING_INDEX] * 5
    assert sorted(order[:13]) == list(range(13))
    assert list(EpochShuffleSampler(13, seed=0)) == order[:13]  # padding leaves the order as it is
