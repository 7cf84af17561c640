"""Tests of smpo_diffusers.rewards: backends, labelling callback, statistics, CLI job and resume."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import sys
import types

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from smpo_diffusers import rewards as R
from smpo_diffusers.testing import make_preference_dataset, tiny_clip_model


# ----------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def clip_parts():
    """The in-process tiny CLIP model/processor (hand computations use these)."""
    model, processor = tiny_clip_model(seed=0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, clip_parts):
    path = tmp_path_factory.mktemp("tiny_clip")
    model, processor = clip_parts
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pickscore(clip_dir):
    return R.load_reward_model("pickscore", clip_dir, device="cpu")


def decoded(dataset, column):
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in dataset[column]]


def embedding(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def hand_cosine(model, processor, images, prompts):
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image = embedding(model.get_image_features(pixel_values=pixels))
        rows = []
        for prompt in prompts:
            tokens = processor(text=[prompt], return_tensors="pt")
            rows.append(embedding(model.get_text_features(**tokens))[0])
        text = torch.stack(rows)
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (image * text).sum(-1)


def corrupt(dataset, row, column):
    """Copy of ``dataset`` with ``dataset[row][column]`` truncated to half its bytes."""
    rows = dataset.to_dict()
    data = rows[column][row]
    rows[column][row] = data[: len(data) // 2]
    return datasets.Dataset.from_dict(rows, features=dataset.features)


def mean_pixel(images, prompts):
    """Deterministic toy reward: mean RGB value in [0, 1] plus a small prompt-length term."""
    return [
        float(np.asarray(im, dtype=np.float64).mean() / 255.0 + 0.001 * len(p))
        for im, p in zip(images, prompts)
    ]


class CountingScorer:
    """Callable reward counting its calls and images; raises ``RuntimeError`` on call ``fail_on_call``."""

    def __init__(self, fail_on_call=None):
        self.calls = 0
        self.images = 0
        self.sizes = []  # images per call
        self.fail_on_call = fail_on_call

    def __call__(self, images, prompts):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("simulated interruption")
        self.images += len(images)
        self.sizes.append(len(images))
        return mean_pixel(images, prompts)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- CLIP backends


def test_pickscore_loaded_by_path_equals_hand_cosine(pickscore, clip_parts):
    dataset = make_preference_dataset(num_pairs=6, seed=1)
    images = decoded(dataset, "jpg_0") + decoded(dataset, "jpg_1")
    prompts = list(dataset["caption"]) * 2
    scores = pickscore.score(images, prompts)
    expected = hand_cosine(*clip_parts, images, prompts)
    assert scores.shape == (12,) and scores.dtype == torch.float32
    assert scores.device.type == "cpu" and not scores.requires_grad
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert pickscore.name == "pickscore" and float(scores.std()) > 0


def test_scores_are_batch_invariant(clip_dir):
    dataset = make_preference_dataset(num_pairs=5, seed=2)
    images = decoded(dataset, "jpg_0")
    prompts = ["a red circle", "a blue square on a big dark green background", "a cat", "", "a red circle"]
    model = R.load_reward_model("pickscore", clip_dir, device="cpu", max_batch_size=2)
    together = model.score(images, prompts)
    one_by_one = torch.cat([model.score([im], [p]) for im, p in zip(images, prompts)])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)


def test_preprocess_threads_do_not_change_scores(clip_dir, pickscore):
    dataset = make_preference_dataset(num_pairs=7, seed=10)
    threaded = R.load_reward_model("pickscore", clip_dir, device="cpu", preprocess_threads=3)
    assert threaded.preprocess_threads == 3
    labelled = {
        threads: dataset.map(R.RewardLabeler(model), batched=True, batch_size=7)
        for threads, model in ((1, pickscore), (3, threaded))
    }
    for column in ("reward_0", "reward_1", "label_valid"):
        assert labelled[1][column][:] == labelled[3][column][:]
    assert R.base.split_contiguous(list(range(7)), 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert R.base.map_in_threads(lambda x: x * x, range(5), threads=4) == [0, 1, 4, 9, 16]
    with pytest.raises(ValueError, match="preprocess_threads must be >= 1"):
        R.CallableRewardModel(mean_pixel, preprocess_threads=0)


def test_clip_score_is_100_times_clamped_cosine(clip_dir, pickscore):
    dataset = make_preference_dataset(num_pairs=8, seed=3)
    images, prompts = decoded(dataset, "jpg_0"), list(dataset["caption"])
    clip = R.load_reward_model("clip", clip_dir, device="cpu")
    cosine = pickscore.score(images, prompts)
    assert clip.name == "clip"
    torch.testing.assert_close(clip.score(images, prompts), 100 * cosine.clamp(min=0), atol=1e-4, rtol=0)


def test_fp16_dtype_is_honoured(clip_dir, pickscore):
    dataset = make_preference_dataset(num_pairs=4, seed=4)
    images, prompts = decoded(dataset, "jpg_0"), list(dataset["caption"])
    half = R.load_reward_model("pickscore", clip_dir, device="cpu", dtype="float16")
    assert half.dtype == torch.float16
    scores = half.score(images, prompts)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, pickscore.score(images, prompts), atol=2e-2, rtol=0)


def test_score_rejects_mismatched_inputs(pickscore):
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="one prompt per image"):
        pickscore.score([image, image], ["a"])
    with pytest.raises(TypeError, match="strings"):
        pickscore.score([image], [None])
    assert pickscore.score([], []).shape == (0,)


def test_clip_reward_rejects_non_clip_models(clip_parts):
    with pytest.raises(TypeError, match="get_image_features"):
        R.CLIPRewardModel(torch.nn.Linear(2, 2), clip_parts[1])


class ProcessorSpy:
    """Wraps a CLIP processor and records the size of every image it is given."""

    def __init__(self, processor):
        self.processor = processor
        self.sizes = []

    def __call__(self, images=None, **kwargs):
        self.sizes.extend(image.size for image in images or [])
        return self.processor(images=images, **kwargs)


def noise(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_clip_crops_very_elongated_images_before_the_processor(clip_parts):
    """The processor resizes the short side (to 224 for real CLIP models): a 1x40000 image would become 224x8960000.
    Images beyond 4:1 are centre-cropped to 4:1 first; the processor keeps only the central square anyway. The
    other backends that resize the short side and centre-crop do the same; HPSv2 letterboxes instead."""
    assert R.AestheticRewardModel.max_aspect_ratio == R.ImageRewardRewardModel.max_aspect_ratio == 4.0
    assert R.HPSv2RewardModel.max_aspect_ratio is None
    bounded = R.PickScoreRewardModel(*clip_parts)
    unbounded = R.PickScoreRewardModel(*clip_parts)
    unbounded.max_aspect_ratio = None
    bounded.processor = spy = ProcessorSpy(clip_parts[1])
    assert bounded.max_aspect_ratio == 4.0

    normal = [noise(40, 10, 1), noise(10, 40, 2), noise(30, 20, 3)]  # up to exactly 4:1: untouched, same scores
    assert torch.equal(bounded.score(normal, ["a", "b", "c"]), unbounded.score(normal, ["a", "b", "c"]))

    thin = [noise(2, 400, 4), noise(400, 2, 5)]
    precropped = [thin[0].crop((0, 196, 2, 204)), thin[1].crop((196, 0, 204, 2))]
    spy.sizes.clear()
    scores = bounded.score(thin, ["a", "b"])
    assert spy.sizes == [(2, 8), (8, 2)]  # what the processor saw
    assert torch.equal(scores, unbounded.score(precropped, ["a", "b"]))

    spy.sizes.clear()
    assert torch.isfinite(bounded.score([noise(1, 40000, 6)], ["a"])).all() and spy.sizes == [(1, 4)]
    with pytest.raises(ValueError, match="zero-size image \\(0x5\\)"):
        bounded.score([Image.new("RGB", (0, 5))], ["a"])
    with pytest.raises(ValueError, match="max_ratio must be >= 1"):
        R.images.crop_to_aspect_ratio(normal[0], 0.5)


def test_labeler_counts_zero_size_images_as_unreadable(pickscore):
    rows = {"caption": ["empty", "fine"], "jpg_0": [Image.new("RGB", (0, 5)), noise(8, 8)],
            "jpg_1": [noise(8, 8, 1), noise(40000, 1, 2)]}
    labeler = R.RewardLabeler(pickscore)
    labelled = labeler(rows)
    assert labelled["label_valid"].tolist() == [False, True] and labeler.num_invalid_pairs == 1
    assert np.isnan(labelled["reward_0"][0]) and np.isfinite(labelled["reward_1"][1])


# ----------------------------------------------------------------------------- registry, callables, optional


def test_registry_lists_backends_and_rejects_unknown_names():
    assert {"pickscore", "clip", "hpsv2", "imagereward", "aesthetic"} <= set(R.available_reward_models())
    with pytest.raises(ValueError, match="Unknown reward model 'nope'.*pickscore"):
        R.load_reward_model("nope")
    with pytest.raises(ValueError, match="Unknown dtype"):
        R.load_reward_model("pickscore", dtype="int8")


def test_register_reward_model(clip_dir):
    R.register_reward_model(
        "toy-mean", lambda path, processor, **kw: R.CallableRewardModel(mean_pixel, name="toy-mean")
    )
    try:
        model = R.load_reward_model("TOY-MEAN")
        assert model.name == "toy-mean"
        with pytest.raises(ValueError, match="already registered"):
            R.register_reward_model("toy-mean", lambda *a, **k: None)
    finally:
        R.registry._REGISTRY.pop("toy-mean")


def test_callable_backend(tmp_path, monkeypatch, caplog):
    images = [Image.new("RGB", (4, 4), (v, v, v)) for v in (0, 51, 255)]
    prompts = ["a", "bb", "ccc"]
    expected = torch.tensor(mean_pixel(images, prompts), dtype=torch.float32)

    direct = R.load_reward_model(mean_pixel, device="cpu")
    assert isinstance(direct, R.CallableRewardModel) and direct.name == "mean_pixel"
    assert R.load_reward_model(direct) is direct
    torch.testing.assert_close(direct.score(images, prompts), expected)

    (tmp_path / "my_rewards.py").write_text(
        "import numpy as np\n"
        "def brightness(images, prompts):\n"
        "    return np.array([[np.asarray(i, dtype=float).mean() / 255 + 0.001 * len(p)]\n"
        "                     for i, p in zip(images, prompts)])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    imported = R.load_reward_model("my_rewards:brightness", device="cpu")
    assert imported.name == "my_rewards:brightness"
    torch.testing.assert_close(imported.score(images, prompts), expected)  # (N, 1) output accepted

    wrong = R.CallableRewardModel(lambda ims, ps: [0.0] * (len(ims) + 1))
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        wrong.score(images, prompts)
    with pytest.raises(ValueError, match="no model or processor path"):
        R.load_reward_model(mean_pixel, "some/path")
    with caplog.at_level("WARNING", logger="smpo_diffusers.rewards.registry"):  # --fp16 cannot reach a function
        R.load_reward_model("my_rewards:brightness", device="cpu", dtype="fp16")
    assert "does not apply to the reward function my_rewards:brightness" in caplog.text


def test_mistyped_import_paths_name_the_fix(tmp_path, monkeypatch):
    """A 'module:function' spec naming a missing attribute, a value that cannot score or a missing module: a
    ValueError naming the spec, what is wrong and the expected form (close names suggested), not a traceback."""
    form = r"name 'package\.module:function' \(a function fn\(images, prompts\) returning one score per image\)"
    with pytest.raises(ValueError, match=r"reward model 'smpo_diffusers\.toy:toy_reward_scorez': module "
                                         r"'smpo_diffusers\.toy' has no attribute 'toy_reward_scorez' \(close "
                                         rf"matches: toy_reward_scores\); {form}"):
        R.load_reward_model("smpo_diffusers.toy:toy_reward_scorez", device="cpu")
    with pytest.raises(ValueError, match=r"'smpo_diffusers\.toy:toy_reward_scores' has no attribute 'nope'; name"):
        R.load_reward_model("smpo_diffusers.toy:toy_reward_scores.nope", device="cpu")
    with pytest.raises(ValueError, match=r"reward model 'smpo_diffusers\.toy:TOY_COLOURS' is a tuple \(\('red', "
                                         rf".*neither a RewardModel nor a callable; {form} or "
                                         r"'package\.module:INSTANCE' \(a RewardModel\)"):
        R.load_reward_model("smpo_diffusers.toy:TOY_COLOURS", device="cpu")
    for spec, missing in (("nonexist_mod:fn", "nonexist_mod"),
                          ("smpo_diffusers.nonexist:fn", "smpo_diffusers.nonexist")):
        with pytest.raises(ValueError, match=rf"reward model '{spec}': no module named '{missing}' .*{form}"):
            R.load_reward_model(spec, device="cpu")
    # a module that exists but imports a missing package keeps Python's error, which names that package
    (tmp_path / "needs_a_package.py").write_text("import package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="package_that_is_not_installed"):
        R.load_reward_model("needs_a_package:fn", device="cpu")
    assert R.load_reward_model("smpo_diffusers.toy:toy_reward_scores", device="cpu").name == (
        "smpo_diffusers.toy:toy_reward_scores")


@pytest.mark.parametrize(
    "name, module, pip_package",
    [
        ("hpsv2", "hpsv2", "hpsv2"),
        ("imagereward", "ImageReward", "image-reward"),
        ("aesthetic", "aesthetics_predictor", "simple-aesthetics-predictor"),
    ],
)
def test_optional_backend_missing_package_names_pip_package(monkeypatch, name, module, pip_package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    if name == "hpsv2":
        monkeypatch.setitem(sys.modules, "hpsv2.src.open_clip", None)
    with pytest.raises(ImportError, match=f"pip install {pip_package}"):
        R.load_reward_model(name, device="cpu")


class _FakeOpenClip(torch.nn.Module):
    """Stand-in for HPSv2's OpenCLIP model: linear image and text encoders."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.visual = torch.nn.Linear(3 * 4 * 4, 8)
        self.text = torch.nn.Embedding(50, 8)

    def encode_image(self, pixels):
        return self.visual(pixels.flatten(1))

    def encode_text(self, tokens):
        return self.text(tokens).mean(1)


def _fake_preprocess(image):
    return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1) / 255


def _fake_tokenizer(prompts):
    return torch.tensor([[len(p) % 50, (len(p) * 7) % 50] for p in prompts])


def test_hpsv2_backend_wiring_with_a_stand_in_package(monkeypatch, tmp_path):
    open_clip = types.ModuleType("hpsv2.src.open_clip")
    trained = _FakeOpenClip()
    with torch.no_grad():
        trained.visual.weight.mul_(3)  # the checkpoint differs from the fresh model
    checkpoint = tmp_path / "hps.pt"
    torch.save({"state_dict": trained.state_dict()}, checkpoint)
    open_clip.create_model_and_transforms = lambda name, pretrained, **kw: (
        _FakeOpenClip(),
        None,
        _fake_preprocess,
    )
    open_clip.get_tokenizer = lambda name: _fake_tokenizer
    monkeypatch.setitem(sys.modules, "hpsv2", types.ModuleType("hpsv2"))
    monkeypatch.setitem(sys.modules, "hpsv2.src", types.ModuleType("hpsv2.src"))
    monkeypatch.setitem(sys.modules, "hpsv2.src.open_clip", open_clip)

    model = R.load_reward_model("hpsv2", str(checkpoint), device="cpu")
    images = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    prompts = ["red", "a blue one"]
    with torch.no_grad():
        image = trained.encode_image(torch.stack([_fake_preprocess(i) for i in images]))
        text = trained.encode_text(_fake_tokenizer(prompts))
    expected = torch.nn.functional.cosine_similarity(image, text)
    torch.testing.assert_close(model.score(images, prompts), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="own preprocessing"):
        R.load_reward_model("hpsv2", str(checkpoint), "a/processor", device="cpu")
    with pytest.raises(ValueError, match="checkpoint file or one of"):
        R.load_reward_model("hpsv2", "v9", device="cpu")


def test_imagereward_backend_wiring_with_a_stand_in_package(monkeypatch):
    class Tokens(dict):
        __getattr__ = dict.__getitem__

        def to(self, device):
            return self

    class Blip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(3, 6)
            self.embed = torch.nn.Embedding(40, 6)

        def tokenizer(self, prompts, padding, truncation, max_length, return_tensors):
            ids = torch.tensor([[len(p) % 40] * max_length for p in prompts])
            return Tokens(input_ids=ids, attention_mask=torch.ones_like(ids))

        def visual_encoder(self, pixels):  # (N, 3, 4, 4) -> (N, 16, 6) "patch" embeddings
            return self.visual(pixels.flatten(2).transpose(1, 2))

        def text_encoder(
            self, ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict
        ):
            hidden = self.embed(ids) + encoder_hidden_states.mean(1, keepdim=True)
            return types.SimpleNamespace(last_hidden_state=hidden)

    class FakeImageReward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.blip = Blip()
            self.mlp = torch.nn.Linear(6, 1)
            self.preprocess = _fake_preprocess
            self.mean, self.std = 0.25, 2.0

    package = types.ModuleType("ImageReward")
    fake = FakeImageReward()
    package.load = lambda name, device, download_root: fake
    monkeypatch.setitem(sys.modules, "ImageReward", package)

    model = R.load_reward_model("imagereward", device="cpu")
    images = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (10, 200, 30), (0, 0, 255))]
    prompts = ["red", "green!", "a blue one"]
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):  # one pair at a time, as the package's own loop does
            tokens = fake.blip.tokenizer([prompt], "max_length", True, 35, "pt")
            embeds = fake.blip.visual_encoder(_fake_preprocess(image)[None])
            hidden = fake.blip.text_encoder(tokens.input_ids, None, embeds, None, True).last_hidden_state
            expected.append((fake.mlp(hidden[:, 0]).item() - 0.25) / 2.0)
    torch.testing.assert_close(model.score(images, prompts), torch.tensor(expected), atol=1e-6, rtol=0)


def test_aesthetic_backend_wiring_with_a_stand_in_package(monkeypatch, clip_dir):
    class MeanPixelPredictor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(2.0))

        @classmethod
        def from_pretrained(cls, path, cache_dir=None):
            assert path == clip_dir
            return cls()

        def forward(self, pixel_values):
            return types.SimpleNamespace(logits=self.scale * pixel_values.mean(dim=(1, 2, 3))[:, None])

    package = types.ModuleType("aesthetics_predictor")
    package.AestheticsPredictorV2Linear = MeanPixelPredictor
    monkeypatch.setitem(sys.modules, "aesthetics_predictor", package)

    model = R.load_reward_model("aesthetic", clip_dir, device="cpu")  # processor defaults to the model path
    images = [Image.new("RGB", (40, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    pixels = model.processor(images=images, return_tensors="pt")["pixel_values"]
    expected = 2.0 * pixels.mean(dim=(1, 2, 3))
    torch.testing.assert_close(model.score(images, ["x", "ignored"]), expected)
    assert (
        R.AestheticRewardModel.predictor_class_name("org/aesthetics-predictor-v1-vit")
        == "AestheticsPredictorV1"
    )
    assert R.AestheticRewardModel.predictor_class_name("org/x-v2-reluMSE") == "AestheticsPredictorV2ReLU"


# ----------------------------------------------------------------------------- ensemble


def test_ensemble_z_score_normalisation():
    bright = R.CallableRewardModel(mean_pixel, name="bright")
    scaled = R.CallableRewardModel(lambda ims, ps: [10 * v + 3 for v in mean_pixel(ims, ps)], name="scaled")
    dark = R.CallableRewardModel(lambda ims, ps: [-v for v in mean_pixel(ims, ps)], name="dark")
    images = [Image.new("RGB", (4, 4), (v, v // 2, 0)) for v in (0, 40, 90, 160, 250)]
    prompts = ["p"] * 5
    raw = np.array([mean_pixel(images, prompts)], dtype=np.float64)[0]

    ensemble = R.EnsembleRewardModel([bright, scaled, dark], weights=[1.0, 1.0, 2.0])
    assert ensemble.name == "bright+scaled+dark"
    with pytest.raises(RuntimeError, match="calibrate"):
        ensemble.score(images, prompts)
    stats = ensemble.calibrate(images, prompts)
    assert stats[1]["mean"] == pytest.approx(10 * raw.mean() + 3)
    assert stats[1]["std"] == pytest.approx(10 * raw.std(), rel=1e-6)
    z = (raw - raw.mean()) / raw.std()
    expected = (z + z + 2 * (-z)) / 4  # scaled member has the same z-scores as bright; dark flips them
    np.testing.assert_allclose(ensemble.score(images, prompts).numpy(), expected, atol=1e-5)
    # Fixed statistics: scoring one pair alone gives the same value as in the batch.
    np.testing.assert_allclose(ensemble.score(images[:1], prompts[:1]).numpy(), expected[:1], atol=1e-5)

    explicit = R.EnsembleRewardModel(
        [bright, scaled], statistics=[{"mean": 0.5, "std": 0.25}, {"mean": 8.0, "std": 2.5}]
    )
    want = ((raw - 0.5) / 0.25 + (10 * raw + 3 - 8.0) / 2.5) / 2
    np.testing.assert_allclose(explicit.score(images, prompts).numpy(), want, atol=1e-5)
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        ensemble.calibrate([images[0]] * 3, prompts[:3])
    with pytest.raises(ValueError, match="at least 2"):
        R.EnsembleRewardModel([bright])
    # an image a member cannot score (NaN) is left out of the calibration, not fatal to it
    flaky = R.CallableRewardModel(lambda ims, ps: [float("nan") if v > 0.4 else v for v in mean_pixel(ims, ps)],
                                  name="flaky")
    partial = R.EnsembleRewardModel([bright, flaky]).calibrate(images, prompts)
    assert partial[0]["mean"] == pytest.approx(raw[:4].mean())  # the brightest image left out for both members
    with pytest.raises(ValueError, match="at least 2 images that every member scores finite"):
        R.EnsembleRewardModel([bright, flaky]).calibrate(images[3:], prompts[3:])


def test_factory_builds_an_uncalibrated_ensemble(clip_dir):
    ensemble = R.load_reward_model("pickscore, clip", f"{clip_dir},{clip_dir}", device="cpu")
    assert isinstance(ensemble, R.EnsembleRewardModel)
    assert [m.name for m in ensemble.models] == ["pickscore", "clip"] and ensemble.statistics is None
    with pytest.raises(ValueError, match="align"):
        R.load_reward_model(["pickscore", "clip"], [clip_dir], device="cpu")


# ----------------------------------------------------------------------------- images and labelling


def test_load_image_handles_modes_containers_and_corruption(tmp_path, monkeypatch):
    rgba = Image.new("RGBA", (6, 6), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent pixel -> white background
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    cases = {
        "rgba": png_bytes(rgba),
        "grey": png_bytes(Image.new("L", (6, 6), 77)),
        "grey_alpha": png_bytes(Image.new("LA", (6, 6), (77, 255))),
        "palette": png_bytes(palette),
        "grey16": png_bytes(Image.new("I;16", (6, 6), 100)),
    }
    cmyk = io.BytesIO()
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    cases["cmyk"] = cmyk.getvalue()
    for name, data in cases.items():
        image = R.load_image(data)
        assert image.mode == "RGB" and image.size == (6, 6), name
    decoded_rgba = R.load_image(cases["rgba"])
    assert decoded_rgba.getpixel((0, 0)) == (255, 255, 255) and decoded_rgba.getpixel((1, 1)) == (255, 0, 0)
    assert R.load_image(cases["grey"]).getpixel((2, 2)) == (77, 77, 77)
    assert R.load_image(cases["palette"]).getpixel((2, 2)) == (0, 200, 0)

    path = tmp_path / "img.png"
    path.write_bytes(cases["grey"])
    assert R.load_image({"bytes": None, "path": str(path)}).getpixel((0, 0)) == (77, 77, 77)
    assert R.load_image({"bytes": cases["rgba"], "path": None}).mode == "RGB"
    assert R.load_image(Image.new("LA", (3, 3))).mode == "RGB"

    jpeg = make_preference_dataset(num_pairs=1)[0]["jpg_0"]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # a library might have set this
    for bad in (
        jpeg[: len(jpeg) // 2],
        jpeg[: int(len(jpeg) * 0.8)],
        b"not an image",
        b"",
        None,
        {"bytes": None, "path": str(tmp_path / "gone.png")},
    ):
        with pytest.raises(R.UnreadableImageError):
            R.load_image(bad)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    truncated = [jpeg[: int(len(jpeg) * 0.8)]] * 16 + [jpeg] * 16  # concurrent decoding keeps strictness

    def outcome(data):
        try:
            return R.load_image(data).mode
        except R.UnreadableImageError:
            return "unreadable"

    assert R.base.map_in_threads(outcome, truncated, threads=8) == ["unreadable"] * 16 + ["RGB"] * 16
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    with pytest.raises(TypeError, match="Unsupported image cell"):
        R.load_image(12)


def test_labeler_marks_corrupted_pairs_and_keeps_ties(pickscore):
    dataset = make_preference_dataset(num_pairs=8, seed=5, tie_fraction=0.25)
    ties = [i for i, label in enumerate(dataset["label_0"]) if label == 0.5]
    bad_row = next(i for i in range(8) if i not in ties)
    broken = corrupt(dataset, bad_row, "jpg_1")
    labeler = R.RewardLabeler(pickscore)

    labelled = broken.map(labeler, batched=True, batch_size=4)

    assert labelled.features["reward_0"] == datasets.Value("float32")
    assert labelled.features["label_valid"] == datasets.Value("bool")
    assert labelled.column_names[:5] == dataset.column_names
    valid = np.array(labelled["label_valid"])
    r0, r1 = np.array(labelled["reward_0"]), np.array(labelled["reward_1"])
    assert not valid[bad_row] and np.isnan(r0[bad_row]) and np.isnan(r1[bad_row])
    others = [i for i in range(8) if i != bad_row]
    assert valid[others].all() and np.isfinite(r0[others]).all() and np.isfinite(r1[others]).all()
    assert ties and all(valid[t] for t in ties)
    expected0 = pickscore.score(decoded(dataset, "jpg_0"), dataset["caption"]).numpy()
    expected1 = pickscore.score(decoded(dataset, "jpg_1"), dataset["caption"]).numpy()
    np.testing.assert_allclose(r0[others], expected0[others], atol=1e-5)
    np.testing.assert_allclose(r1[others], expected1[others], atol=1e-5)
    assert labeler.num_score_calls == 2 and labeler.num_pairs == 8 and labeler.num_invalid_pairs == 1
    assert R.summarize_labels(labelled) == {"num_pairs": 8, "num_valid_pairs": 7, "num_invalid_pairs": 1}


def test_labeler_makes_one_scoring_call_per_batch_and_chunks_inside():
    scorer = CountingScorer()
    model = R.CallableRewardModel(scorer, max_batch_size=3)
    labeler = R.RewardLabeler(model)
    dataset = make_preference_dataset(num_pairs=8, seed=6)
    labelled = dataset.map(labeler, batched=True, batch_size=4, with_rank=True)  # rank ignored without CUDA
    assert labeler.num_score_calls == 2  # one per map batch of 4 pairs (8 images)
    assert scorer.calls == 2 * 3 and scorer.images == 16  # each batch chunked into 3 + 3 + 2 images
    expected = mean_pixel(decoded(dataset, "jpg_1"), dataset["caption"])
    np.testing.assert_allclose(labelled["reward_1"], expected, rtol=1e-6)


def test_labeler_marks_non_finite_scores_invalid():
    def nan_for_dark(images, prompts):
        return [float("nan") if np.asarray(im).mean() < 60 else 1.0 for im in images]

    rows = {
        "caption": ["bright", "dark", "bright"],
        "jpg_0": [
            png_bytes(Image.new("RGB", (8, 8), v)) for v in ((200, 200, 200), (10, 10, 10), (150, 90, 90))
        ],
        "jpg_1": [png_bytes(Image.new("RGB", (8, 8), (255, 255, 255)))] * 3,
    }
    labeler = R.RewardLabeler(R.CallableRewardModel(nan_for_dark))
    labelled = datasets.Dataset.from_dict(rows).map(labeler, batched=True)
    assert labelled["label_valid"] == [True, False, True]
    assert np.isnan(labelled["reward_0"][1]) and np.isnan(labelled["reward_1"][1])  # both sides blanked
    assert labeler.num_invalid_pairs == 1


def test_labeler_accepts_rgba_greyscale_and_pil_cells(pickscore):
    rows = {
        "caption": ["a red circle", "a gray square", "a blue diamond"],
        "jpg_0": [
            png_bytes(Image.new("RGBA", (20, 20), (255, 0, 0, 128))),
            png_bytes(Image.new("L", (32, 32), 90)),
            png_bytes(Image.new("P", (32, 32), 3)),
        ],
        "jpg_1": [
            png_bytes(Image.new("LA", (32, 32), (30, 200))),
            png_bytes(Image.new("1", (32, 32), 1)),
            png_bytes(Image.new("RGB", (32, 48), (0, 0, 255))),
        ],
    }
    labelled = datasets.Dataset.from_dict(rows).map(R.RewardLabeler(pickscore), batched=True, batch_size=3)
    assert all(labelled["label_valid"]) and np.isfinite(labelled["reward_0"]).all()

    as_image_feature = datasets.Dataset.from_dict(rows).cast_column("jpg_0", datasets.Image())  # PIL cells
    assert as_image_feature.map(R.RewardLabeler(pickscore), batched=True)["label_valid"] == [True] * 3
    # a corrupt file in an Image() column: datasets would raise while decoding; undecoded, the labeler counts it
    broken = dict(rows, jpg_0=[rows["jpg_0"][0][:40], *rows["jpg_0"][1:]])
    broken = datasets.Dataset.from_dict(broken).cast_column("jpg_0", datasets.Image())
    labelled = R.undecoded_images(broken).map(R.RewardLabeler(pickscore), batched=True)
    assert labelled["label_valid"] == [False, True, True]
    with pytest.raises(KeyError, match="jpg_1"):
        R.RewardLabeler(pickscore)({"caption": ["x"], "jpg_0": [rows["jpg_0"][0]]})
    with pytest.raises(TypeError, match="CallableRewardModel"):
        R.RewardLabeler(mean_pixel)


# ----------------------------------------------------------------------------- statistics


def test_statistics_match_numpy_and_round_trip_json(tmp_path, pickscore):
    dataset = corrupt(make_preference_dataset(num_pairs=10, seed=7), 2, "jpg_0")
    labelled = dataset.map(R.RewardLabeler(pickscore), batched=True, batch_size=5)

    stats = R.compute_reward_statistics(labelled, reward_model="pickscore")

    valid = np.array(labelled["label_valid"])
    values = np.concatenate(
        [
            np.array(labelled["reward_0"], dtype=np.float32)[valid],
            np.array(labelled["reward_1"], dtype=np.float32)[valid],
        ]
    ).astype(np.float64)
    assert stats["reward_model"] == "pickscore"
    assert stats["num_pairs"] == 10 and stats["num_valid_pairs"] == 9 and stats["count"] == 18
    assert stats["min"] == values.min() and stats["max"] == values.max()
    assert stats["mean"] == values.mean() and stats["std"] == values.std()
    assert stats["suggested_scale"] == values.max() - values.min()

    folder = tmp_path / "labelled"
    labelled.save_to_disk(str(folder))
    path = R.save_reward_statistics(folder, stats)
    assert path == str(folder / "reward_stats.json")
    assert json.loads((folder / "reward_stats.json").read_text()) == stats
    assert R.load_reward_statistics(folder) == stats
    assert R.load_reward_statistics(str(folder / "reward_stats.json")) == stats
    assert R.reward_scale_from_statistics(stats) == values.max() - values.min()
    assert R.load_reward_statistics(tmp_path / "nowhere") is None
    (tmp_path / "bad.json").write_text('{"min": 0}')
    with pytest.raises(ValueError, match="not a reward statistics file"):
        R.load_reward_statistics(tmp_path / "bad.json")
    assert datasets.load_from_disk(str(folder)).num_rows == 10  # the JSON does not disturb the dataset


def test_statistics_from_columns_and_scale_errors():
    columns = {
        "reward_0": [0.2, np.nan, 0.2],
        "reward_1": [0.2, np.nan, 0.2],
        "label_valid": [True, False, True],
    }
    stats = R.compute_reward_statistics(columns, reward_model="toy")
    assert stats["count"] == 4 and stats["suggested_scale"] == 0.0
    with pytest.raises(ValueError, match="all rewards are equal.*--reward_scale"):
        R.reward_scale_from_statistics(stats)
    none_valid = R.compute_reward_statistics({**columns, "label_valid": [False] * 3})
    assert none_valid["count"] == 0 and none_valid["min"] is None
    with pytest.raises(ValueError, match="no valid rewards"):
        R.reward_scale_from_statistics(none_valid)
    with pytest.raises(ValueError, match="inconsistent"):
        R.compute_reward_statistics({**columns, "label_valid": [True, True, True]})
    with pytest.raises(ValueError, match="lack"):
        R.save_reward_statistics("unused.json", {"min": 0})


def test_pickscore_constants():
    assert R.PICKSCORE_MIN == 0.11543526500463486 and R.PICKSCORE_MAX == 0.28201571106910706
    assert R.PICKSCORE_SCALE == R.PICKSCORE_MAX - R.PICKSCORE_MIN
    stats = {"suggested_scale": R.PICKSCORE_SCALE}
    assert R.reward_scale_from_statistics(stats) == pytest.approx(0.16658044606447220)


# ----------------------------------------------------------------------------- CLI job


@pytest.fixture()
def saved_dataset(tmp_path):
    dataset = corrupt(make_preference_dataset(num_pairs=10, seed=8), 4, "jpg_1")
    path = tmp_path / "source"
    dataset.save_to_disk(str(path))
    return str(path)


def _run_example(argv):  # examples/label_rewards.py's entry point (also the smpo-label-rewards command)
    from smpo_diffusers.cli import label_main

    return label_main(argv)


@pytest.mark.parametrize("flags, message", [
    (["--reward_model", "smpo_diffusers.toy:toy_reward_scorez"],
     "error: reward model 'smpo_diffusers.toy:toy_reward_scorez': module 'smpo_diffusers.toy' has no attribute"),
    (["--reward_model", "smpo_diffusers.toy:TOY_COLOURS"],
     "error: reward model 'smpo_diffusers.toy:TOY_COLOURS' is a tuple"),
    (["--dataset_name", "EMPTY"], "error: The dataset split 'train' is empty: the data file 'EMPTY' holds no rows"),
    # a local folder that is not there (transformers would call it a malformed Hub id)
    (["--reward_model", "clip", "--reward_model_name_or_path", "/nonexistent/clip"],
     "error: the clip reward model path '/nonexistent/clip' does not exist"),
    (["--reward_model", "pickscore", "--reward_processor_name_or_path", "./missing-processor"],
     "error: the pickscore reward processor path './missing-processor' does not exist"),
])
def test_cli_reports_a_mistyped_reward_model_or_an_empty_file(tmp_path, saved_dataset, capsys, flags, message):
    """examples/label_rewards.py: `error: <message>` and status 2."""
    from smpo_diffusers.cli import label_main, run_cli

    empty = str(tmp_path / "empty.parquet")
    make_preference_dataset(num_pairs=2).select([]).to_parquet(empty)
    argv = ["--dataset_name", saved_dataset, "--reward_model", "smpo_diffusers.toy:toy_reward_scores",
            "--output_dir", str(tmp_path / "out")] + [empty if flag == "EMPTY" else flag for flag in flags]
    with pytest.raises(SystemExit) as ended:
        run_cli(label_main, argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(message.replace("EMPTY", empty)), err[-2000:]


def test_cli_labels_a_saved_dataset_end_to_end(tmp_path, saved_dataset, clip_dir, pickscore, capsys):
    output = tmp_path / "out"
    summary = _run_example(
        [
            "--dataset_name",
            saved_dataset,
            "--reward_model",
            "pickscore",
            "--reward_model_name_or_path",
            clip_dir,
            "--output_dir",
            str(output),
            "--batch_size",
            "4",
            "--shard_size",
            "6",
            "--fp16",  # fp16 falls back on CPU
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_pairs"] == 10 and printed["num_invalid_pairs"] == 1

    labelled = datasets.load_from_disk(str(output))
    source = datasets.load_from_disk(saved_dataset)
    assert labelled.column_names == source.column_names + ["reward_0", "reward_1", "label_valid"]
    assert labelled["caption"] == source["caption"] and labelled["jpg_0"] == source["jpg_0"]
    assert labelled["label_valid"] == [i != 4 for i in range(10)]
    expected = pickscore.score(
        decoded(make_preference_dataset(num_pairs=10, seed=8), "jpg_0"), source["caption"]
    )
    keep = [i for i in range(10) if i != 4]
    np.testing.assert_allclose(np.array(labelled["reward_0"])[keep], expected.numpy()[keep], atol=1e-5)

    stats = R.load_reward_statistics(str(output))
    assert stats["labels_sha256"] == R.labels_digest(labelled)
    assert stats == R.compute_reward_statistics(labelled, reward_model="pickscore") and stats["count"] == 18
    on_disk = json.loads((output / "labeling_summary.json").read_text())
    assert on_disk == summary
    assert (
        summary["num_valid_pairs"] == 9 and summary["num_shards"] == 2 and summary["num_shards_scored"] == 2
    )
    assert summary["pairs_scored"] == 10 and summary["pairs_per_second"] > 0
    assert summary["pairs_per_second"] == pytest.approx(10 / summary["scoring_seconds"])
    assert summary["elapsed_seconds"] >= summary["scoring_seconds"]
    assert summary["statistics_path"] == str(output / "reward_stats.json")
    assert summary["arguments"]["fp16"] is True
    fingerprint = json.loads((output / ".shards" / "shard-00000" / "labeling_fingerprint.json").read_text())
    assert fingerprint["fp16"] is False and fingerprint["reward_model_name_or_path"] == clip_dir


def test_cli_ensemble_run_stores_member_statistics(tmp_path, saved_dataset, clip_dir):
    args = R.LabelingArguments(
        dataset_name=saved_dataset,
        output_dir=str(tmp_path / "ens"),
        reward_model="pickscore,clip",
        reward_model_name_or_path=f"{clip_dir},{clip_dir}",
        batch_size=5,
        ensemble_calibration_pairs=4,
    )
    summary = R.label_dataset(args)
    stats = R.load_reward_statistics(args.output_dir)
    assert summary["reward_model"] == "pickscore+clip" == stats["reward_model"]
    members = stats["ensemble_member_statistics"]
    assert [m["name"] for m in members] == ["pickscore", "clip"] and all(m["std"] > 0 for m in members)
    calibration = json.loads((tmp_path / "ens" / ".shards" / "ensemble_calibration.json").read_text())
    assert calibration["num_images"] == 8 and calibration["statistics"] == members


def test_given_ensemble_statistics_are_kept_and_weights_are_part_of_the_resume_key(
        tmp_path, saved_dataset, clip_dir, caplog):
    members = R.load_reward_model("pickscore,clip", f"{clip_dir},{clip_dir}", device="cpu").models
    fixed = [{"mean": 100.0, "std": 10.0}, {"mean": 50.0, "std": 5.0}]
    args = R.LabelingArguments(dataset_name=saved_dataset, output_dir=str(tmp_path / "ens"), batch_size=5)
    first = R.label_dataset(args, reward_model=R.EnsembleRewardModel(members, weights=[1, 0], statistics=fixed))
    stats = R.load_reward_statistics(args.output_dir)
    assert [(m["mean"], m["std"]) for m in stats["ensemble_member_statistics"]] == [(100.0, 10.0), (50.0, 5.0)]
    assert not (tmp_path / "ens" / ".shards" / "ensemble_calibration.json").exists()  # nothing re-estimated
    before = datasets.load_from_disk(str(tmp_path / "ens"))["reward_0"]
    with caplog.at_level(logging.WARNING, logger="smpo_diffusers.rewards.job"):
        again = R.label_dataset(args, reward_model=R.EnsembleRewardModel(members, weights=[0, 1], statistics=fixed))
    assert first["num_shards_scored"] > 0 and again["num_shards_resumed"] == 0  # other weights: scored afresh
    assert first["num_shards_replaced"] == 0 and again["num_shards_replaced"] == first["num_shards_scored"]
    assert "shard 0 in" in caplog.text and "ensemble_weights: [1.0, 0.0] -> [0.0, 1.0]" in caplog.text
    assert datasets.load_from_disk(str(tmp_path / "ens"))["reward_0"] != before
    # --ensemble_calibration_pairs: for an ensemble that calibrates (also one given in-process), else an error
    with pytest.raises(ValueError, match="'pickscore\\+clip' has its statistics. Drop --ensemble_calibration_pairs"):
        R.label_dataset(dataclasses.replace(args, ensemble_calibration_pairs=4),
                        reward_model=R.EnsembleRewardModel(members, statistics=fixed))
    with pytest.raises(ValueError, match="'pickscore' needs no calibration. Drop --ensemble_calibration_pairs"):
        R.label_dataset(dataclasses.replace(args, ensemble_calibration_pairs=4), reward_model=members[0])
    calibrated = dataclasses.replace(args, output_dir=str(tmp_path / "given"), ensemble_calibration_pairs=4)
    R.label_dataset(calibrated, reward_model=R.EnsembleRewardModel(members))
    calibration = json.loads((tmp_path / "given" / ".shards" / "ensemble_calibration.json").read_text())
    assert calibration["num_images"] == 8


def test_labeling_arguments_validate_and_parse():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(R.LabelingArguments).parse_args_into_dataclasses(
        args=["--dataset_name", "d", "--output_dir", "o", "--max_samples", "3", "--reward_model", "clip"]
    )
    assert (args.max_samples, args.reward_model, args.reward_model_name_or_path) == (3, "clip", None)
    assert (args.batch_size, args.shard_size, args.preprocess_threads, args.fp16) == (16, 1000, 4, False)
    with pytest.raises(ValueError, match="--shard_size must be >= 1"):
        R.LabelingArguments(dataset_name="d", output_dir="o", shard_size=0)
    with pytest.raises(ValueError, match="--ddp_timeout must be >= 1"):
        R.LabelingArguments(dataset_name="d", output_dir="o", ddp_timeout=0)


def test_labelling_joins_the_process_group_with_the_ddp_timeout(monkeypatch):
    """--ddp_timeout is the timeout of the group label_dataset joins (tests/test_launch.py shows what it does)."""
    import smpo_diffusers.rewards.job as job

    asked = []

    def record(timeout_seconds):
        asked.append(timeout_seconds)
        raise InterruptedError("stop here")

    monkeypatch.setattr(job, "process_state", record)
    with pytest.raises(InterruptedError):
        R.label_dataset(R.LabelingArguments(dataset_name="d", output_dir="o", ddp_timeout=5400))
    assert asked == [5400] and R.LabelingArguments(dataset_name="d", output_dir="o").ddp_timeout == 7200


def test_load_preference_dataset_detects_formats(tmp_path):
    dataset = make_preference_dataset(num_pairs=3, seed=9)
    parquet = tmp_path / "pairs.parquet"
    dataset.to_parquet(str(parquet))
    assert R.load_preference_dataset(str(parquet))["caption"] == dataset["caption"]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"caption": c}) + "\n" for c in dataset["caption"]))
    assert R.load_preference_dataset(str(jsonl))["caption"] == dataset["caption"]
    with pytest.raises(ValueError, match="form one split, so split 'test' cannot be selected"):  # since f9457cc
        R.load_preference_dataset(str(jsonl), split="test")
    folder = tmp_path / "dict"
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(folder))
    assert R.load_preference_dataset(str(folder), split="validation").num_rows == 3
    with pytest.raises(ValueError, match="Split 'train' not found"):
        R.load_preference_dataset(str(folder))


def test_label_dataset_rejects_bad_inputs(tmp_path, saved_dataset):
    model = R.CallableRewardModel(mean_pixel)
    with pytest.raises(ValueError, match="must differ"):
        R.label_dataset(
            R.LabelingArguments(dataset_name=saved_dataset, output_dir=saved_dataset), reward_model=model
        )
    no_images = tmp_path / "no_images"
    datasets.Dataset.from_dict({"caption": ["a"]}).save_to_disk(str(no_images))
    with pytest.raises(ValueError, match="lacks column"):
        R.label_dataset(
            R.LabelingArguments(dataset_name=str(no_images), output_dir=str(tmp_path / "o")),
            reward_model=model,
        )


# ----------------------------------------------------------------------------- resume


def _columns(path):
    table = datasets.load_from_disk(str(path))
    return {name: table[name][:] for name in table.column_names}


def _assert_same_labels(folder, reference_folder):
    labelled, reference = _columns(folder), _columns(reference_folder)
    assert labelled.keys() == reference.keys()
    for name in labelled:
        if name.startswith("reward_"):
            np.testing.assert_array_equal(np.array(labelled[name]), np.array(reference[name]))  # NaN == NaN here
        else:
            assert labelled[name] == reference[name], name


def test_interrupted_run_resumes_without_rescoring(tmp_path, saved_dataset):
    def args(out, **extra):
        return R.LabelingArguments(
            dataset_name=saved_dataset, output_dir=str(out), batch_size=3, shard_size=3, **extra
        )

    reference_scorer = CountingScorer()
    R.label_dataset(
        args(tmp_path / "uninterrupted"), reward_model=R.CallableRewardModel(reference_scorer, name="toy")
    )
    assert reference_scorer.calls == 4  # shards of 3, 3, 3, 1 pairs: one call each

    failing = CountingScorer(fail_on_call=3)  # dies while scoring the 3rd shard
    with pytest.raises(RuntimeError, match="simulated interruption"):
        R.label_dataset(args(tmp_path / "resumed"), reward_model=R.CallableRewardModel(failing, name="toy"))
    shards = tmp_path / "resumed" / ".shards"
    assert sorted(p.name for p in shards.iterdir() if p.name.startswith("shard-")) == [
        "shard-00000",
        "shard-00001",
    ]

    resumed_scorer = CountingScorer()
    summary = R.label_dataset(
        args(tmp_path / "resumed"), reward_model=R.CallableRewardModel(resumed_scorer, name="toy")
    )
    assert resumed_scorer.calls == 2 and resumed_scorer.images == 2 * (3 + 1)  # only shards 2 and 3
    assert (
        summary["num_shards_resumed"] == 2
        and summary["num_shards_scored"] == 2
        and summary["pairs_scored"] == 4
    )

    _assert_same_labels(tmp_path / "resumed", tmp_path / "uninterrupted")

    idle = CountingScorer()
    again = R.label_dataset(args(tmp_path / "resumed"), reward_model=R.CallableRewardModel(idle, name="toy"))
    assert idle.calls == 0 and again["num_shards_resumed"] == 4 and again["pairs_scored"] == 0
    assert again["pairs_per_second"] == 0.0

    renamed = CountingScorer()  # other settings (reward model name) -> nothing is reused
    R.label_dataset(args(tmp_path / "resumed"), reward_model=R.CallableRewardModel(renamed, name="other"))
    assert renamed.calls == 4

    # a trial on the first pairs, then all of them: the shards holding the same rows are reused
    trial = CountingScorer()
    R.label_dataset(args(tmp_path / "grown", max_samples=7), reward_model=R.CallableRewardModel(trial, name="toy"))
    assert trial.calls == 3  # shards of 3, 3, 1 pairs
    grown = CountingScorer()
    summary = R.label_dataset(args(tmp_path / "grown"), reward_model=R.CallableRewardModel(grown, name="toy"))
    assert summary["num_shards_resumed"] == 2 and grown.calls == 2  # rows 6-8 (the old shard held 6 only), 9
    _assert_same_labels(tmp_path / "grown", tmp_path / "uninterrupted")
    assert not [p for p in shards.iterdir() if ".tmp-" in p.name or ".stale-" in p.name]


def test_labelling_warns_when_every_reward_is_equal(tmp_path, saved_dataset, caplog):
    """A reward model that gives every image the same score (e.g. a clamped CLIP score on unrelated images) leaves
    no preference signal; the labelling run says so instead of only writing suggested_scale 0."""
    constant = R.CallableRewardModel(lambda images, prompts: [0.0] * len(images), name="flat")
    with caplog.at_level("WARNING"):
        R.label_dataset(R.LabelingArguments(dataset_name=saved_dataset, output_dir=str(tmp_path / "flat")),
                        reward_model=constant)
    assert R.load_reward_statistics(str(tmp_path / "flat"))["suggested_scale"] == 0.0
    (message,) = [r.getMessage() for r in caplog.records if "every valid reward is 0.0" in r.getMessage()]
    assert "cannot derive a preference scale" in message  # and --reward_scale does not rescue the pairs:
    assert "with any --reward_scale every pair gets weight 0" in message  # equal rewards give probability 0.5


def _with_column(path, tmp_path, name, values, feature=None):
    """Copy of the saved dataset at ``path`` with the column ``name`` set to ``values``, saved under ``tmp_path``."""
    dataset = datasets.load_from_disk(path)
    if name in dataset.column_names:
        dataset = dataset.remove_columns([name])
    dataset = dataset.add_column(name, values)  # (add_column's feature= needs datasets >= 2.22)
    if feature is not None:
        dataset = dataset.cast_column(name, feature)
    target = tmp_path / f"with_{name}"
    dataset.save_to_disk(str(target))
    return str(target)


def test_source_label_valid_is_kept_and_counted(tmp_path, saved_dataset, caplog):
    """Rows the source marks invalid (False, null; row 4 also has a corrupt image) stay invalid."""
    flags = [True, False, True, True, False, True, True, None, True, True]
    flagged = _with_column(saved_dataset, tmp_path, "label_valid", flags, datasets.Value("bool"))
    with caplog.at_level(logging.WARNING, logger="smpo_diffusers.rewards.job"):
        summary = R.label_dataset(R.LabelingArguments(dataset_name=flagged, output_dir=str(tmp_path / "out")),
                                  reward_model=R.CallableRewardModel(mean_pixel, name="toy"))
    labelled = datasets.load_from_disk(str(tmp_path / "out"))
    assert labelled["label_valid"] == [i not in (1, 4, 7) for i in range(10)]
    assert np.isfinite(labelled["reward_0"][1]) and np.isnan(labelled["reward_0"][4])  # scored / unreadable
    counts = summary["num_invalid_in_source"], summary["num_unreadable_pairs"], summary["num_invalid_pairs"]
    assert counts == (3, 1, 3)
    assert R.load_reward_statistics(str(tmp_path / "out"))["count"] == 2 * 7
    assert "3 of 10 pairs are marked invalid by the dataset's own label_valid column" in caplog.text

    numeric = _with_column(saved_dataset, tmp_path, "label_valid", [1.0, float("nan")] + [0.0] * 3 + [1.0] * 5)
    summary = R.label_dataset(R.LabelingArguments(dataset_name=numeric, output_dir=str(tmp_path / "numeric")),
                              reward_model=R.CallableRewardModel(mean_pixel, name="toy"))
    assert summary["num_invalid_in_source"] == 4 and summary["num_valid_pairs"] == 6  # NaN and 0.0 are invalid
    # an ensemble calibrates its members' statistics on pairs the source did not reject
    source = datasets.load_from_disk(saved_dataset)
    images, prompts = R.job._calibration_sample(R.job._scoring_view(source), 2, np.array(flags, dtype=bool))
    assert prompts == [source["caption"][i] for i in (0, 0, 2, 2)] and len(images) == 4
    text = _with_column(saved_dataset, tmp_path, "label_valid", ["yes"] * 10)
    with pytest.raises(ValueError, match="cast_column\\('label_valid', datasets.Value\\('bool'\\)\\)"):
        R.label_dataset(R.LabelingArguments(dataset_name=text, output_dir=str(tmp_path / "text")),
                        reward_model=R.CallableRewardModel(mean_pixel))


def test_empty_captions_are_counted_and_logged(tmp_path, saved_dataset, caplog):
    captions = ["", "  \t", *datasets.load_from_disk(saved_dataset)["caption"][2:]]
    source = _with_column(saved_dataset, tmp_path, "caption", captions)
    with caplog.at_level(logging.WARNING, logger="smpo_diffusers.rewards.job"):
        summary = R.label_dataset(R.LabelingArguments(dataset_name=source, output_dir=str(tmp_path / "out")),
                                  reward_model=R.CallableRewardModel(mean_pixel))
    assert summary["num_empty_captions"] == 2
    assert datasets.load_from_disk(str(tmp_path / "out"))["label_valid"][:2] == [True, True]  # kept, but said
    assert "2 of 10 pairs have an empty or whitespace-only caption" in caplog.text


def test_image_path_columns_are_refused_before_the_reward_model_loads(tmp_path, saved_dataset, monkeypatch):
    dataset = datasets.load_from_disk(saved_dataset).select(range(3))
    paths = {}
    for column in ("jpg_0", "jpg_1"):
        paths[column] = [str(tmp_path / f"{column}-{i}.png") for i in range(3)]
        for path, data in zip(paths[column], dataset[column]):
            with open(path, "wb") as handle:
                handle.write(data)
    as_paths = dataset.remove_columns(["jpg_0", "jpg_1"]).add_column("jpg_0", paths["jpg_0"]).add_column(
        "jpg_1", paths["jpg_1"])
    as_paths.save_to_disk(str(tmp_path / "paths"))

    def not_reached(*args, **kwargs):
        raise AssertionError("the reward model was loaded")

    monkeypatch.setattr(R.job, "load_reward_model", not_reached)
    args = R.LabelingArguments(dataset_name=str(tmp_path / "paths"), output_dir=str(tmp_path / "out"),
                               reward_model="pickscore")
    fix = "cast_column\\('jpg_0', datasets.Image\\(\\)\\)"
    with pytest.raises(ValueError, match=f"'jpg_0' holds string values.*{fix}"):
        R.label_dataset(args)
    cast = as_paths.cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())  # the fix
    cast.save_to_disk(str(tmp_path / "cast"))
    summary = R.label_dataset(dataclasses.replace(args, dataset_name=str(tmp_path / "cast")),
                              reward_model=R.CallableRewardModel(mean_pixel))
    assert summary["num_valid_pairs"] == 3
    # a parquet file keeps cells that name files (save_to_disk embeds them): a file rewritten since is scored
    # again on a rerun (the dataset's fingerprint covers the parquet file, not the images), an unchanged set resumes
    from smpo_diffusers.latent_cache import path_only_file_stamps

    cast.to_parquet(str(tmp_path / "cast.parquet"))
    cast_args = dataclasses.replace(args, dataset_name=str(tmp_path / "cast.parquet"))
    assert all(path_only_file_stamps(R.load_preference_dataset(cast_args.dataset_name)))
    R.label_dataset(cast_args, reward_model=R.CallableRewardModel(mean_pixel))
    assert R.label_dataset(cast_args, reward_model=R.CallableRewardModel(mean_pixel))["num_shards_resumed"] == 1
    before = datasets.load_from_disk(str(tmp_path / "out"))["reward_0"]  # a lazy column of the memory-mapped file
    Image.new("RGB", (32, 32), (255, 255, 255)).save(paths["jpg_0"][1])
    again = R.label_dataset(cast_args, reward_model=R.CallableRewardModel(mean_pixel))
    assert again["num_shards_replaced"] == 1 and again["num_shards_resumed"] == 0
    after = datasets.load_from_disk(str(tmp_path / "out"))["reward_0"]
    assert after[1] != before[1] and after[0] == before[0]  # the old mapping still reads the old rows


def test_relabelling_never_leaves_old_statistics_beside_new_rewards(tmp_path, saved_dataset, monkeypatch):
    """A crash between writing the dataset and its statistics (or while writing the dataset) must not leave the
    previous run's statistics next to the new rewards; complete statistics name the rewards they describe."""
    out = tmp_path / "out"
    args = R.LabelingArguments(dataset_name=saved_dataset, output_dir=str(out))
    R.label_dataset(args, reward_model=R.CallableRewardModel(mean_pixel, name="first"))
    old_stats = R.load_reward_statistics(str(out))
    assert old_stats["labels_sha256"] == R.labels_digest(datasets.load_from_disk(str(out)))

    def doubled(images, prompts):
        return [2 * value for value in mean_pixel(images, prompts)]

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before the statistics")

    with monkeypatch.context() as patch:
        patch.setattr(R.job, "save_reward_statistics", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            R.label_dataset(args, reward_model=R.CallableRewardModel(doubled, name="second"))
    new = datasets.load_from_disk(str(out))
    np.testing.assert_allclose(new["reward_0"][:2], 2 * np.array(mean_pixel(decoded(new.select(range(2)), "jpg_0"),
                                                                            new["caption"][:2])), rtol=1e-6)
    assert not (out / "reward_stats.json").exists() and not (out / "labeling_summary.json").exists()
    assert old_stats["labels_sha256"] != R.labels_digest(new)  # a stale file would have been detectable

    save_to_disk = datasets.Dataset.save_to_disk

    def half_written(self, path, *args, **kwargs):  # shard writes succeed; the labelled set's write dies midway
        if os.path.abspath(path) != str(out):
            return save_to_disk(self, path, *args, **kwargs)
        (out / "data-00000-of-00001.arrow").write_bytes(b"the first bytes")
        raise OSError("simulated crash while saving the dataset")

    with monkeypatch.context() as patch:
        patch.setattr(datasets.Dataset, "save_to_disk", half_written)
        with pytest.raises(OSError, match="simulated crash while saving"):
            R.label_dataset(args, reward_model=R.CallableRewardModel(mean_pixel, name="third"))
    with pytest.raises(FileNotFoundError):  # the half-written folder does not load as a dataset
        datasets.load_from_disk(str(out))
    assert not (out / "reward_stats.json").exists()

    (out / "data-00001-of-00002.arrow").write_bytes(b"left by an earlier, larger save")
    summary = R.label_dataset(args, reward_model=R.CallableRewardModel(mean_pixel, name="third"))
    stats = R.load_reward_statistics(str(out))
    assert stats["labels_sha256"] == R.labels_digest(datasets.load_from_disk(str(out)))
    assert stats["labels_sha256"] == old_stats["labels_sha256"] and summary["num_shards_resumed"] == 1
    assert not (out / "data-00001-of-00002.arrow").exists()


class LinearReward(R.RewardModel):
    """Scores ``model(mean RGB)`` with a torch ``Linear(3, 1)``: retraining it changes the scores."""

    def __init__(self, weight):
        super().__init__("linear")
        self.model = torch.nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.model.weight.fill_(weight)

    def _score_batch(self, images, prompts):
        means = torch.tensor(np.stack([np.asarray(im, dtype=np.float32).mean((0, 1)) / 255 for im in images]))
        return self.model(means)[:, 0]


def test_retrained_reward_weights_are_not_resumed(tmp_path, saved_dataset, clip_dir, caplog):
    import shutil

    weights = tmp_path / "weights"  # the same path, retrained in between
    shutil.copytree(clip_dir, weights)
    args = R.LabelingArguments(dataset_name=saved_dataset, output_dir=str(tmp_path / "out"),
                               reward_model="pickscore", reward_model_name_or_path=str(weights), shard_size=6)
    first = R.label_dataset(args)
    before = _shard_fingerprint(tmp_path / "out")["reward_weights"]
    assert len(before) == 16 and int(before, 16) >= 0  # a short hex string
    retrained = R.load_reward_model("pickscore", str(weights), device="cpu").model
    with torch.no_grad():
        retrained.visual_projection.weight.mul_(-1)
    retrained.save_pretrained(weights)
    with caplog.at_level(logging.WARNING, logger="smpo_diffusers.rewards.job"):
        again = R.label_dataset(args)
    after = _shard_fingerprint(tmp_path / "out")["reward_weights"]
    assert first["num_shards_scored"] == 2 and again["num_shards_resumed"] == 0 and again["num_shards_replaced"] == 2
    assert f"reward_weights: {before!r} -> {after!r}" in caplog.text
    assert "holds no torch weights" not in caplog.text

    caplog.clear()  # a reward function cannot be fingerprinted: said once; an ensemble hashes each member
    ensemble = R.EnsembleRewardModel([LinearReward(1.0), R.CallableRewardModel(mean_pixel, name="fn")],
                                     statistics=[{"mean": 0.0, "std": 1.0}] * 2)
    with caplog.at_level(logging.WARNING, logger="smpo_diffusers.rewards.job"):
        R.label_dataset(dataclasses.replace(args, output_dir=str(tmp_path / "ens")), reward_model=ensemble)
    member_hashes = _shard_fingerprint(tmp_path / "ens")["reward_weights"]
    assert len(member_hashes[0]) == 16 and member_hashes[1] is None
    assert sum("'fn' holds no torch weights" in r.getMessage() for r in caplog.records) == 1
    ensemble.models[0].model.weight.data.fill_(2.0)
    rerun = R.label_dataset(dataclasses.replace(args, output_dir=str(tmp_path / "ens")), reward_model=ensemble)
    assert rerun["num_shards_replaced"] == 2

    module = torch.nn.Linear(3, 1)  # a module as the reward function, or its bound method, is hashed too
    hashes = [R.job._weights_fingerprint(R.CallableRewardModel(fn), []) for fn in (module, module.forward)]
    with torch.no_grad():
        module.weight.add_(1.0)
    assert hashes[0] == hashes[1] != R.job._weights_fingerprint(R.CallableRewardModel(module.forward), [])


# ----------------------------------------------------------------------------- options reach the run


def _shard_fingerprint(output_dir, index=0):
    return json.loads((output_dir / ".shards" / f"shard-{index:05d}" / "labeling_fingerprint.json").read_text())


class HalfPrecisionReward(R.RewardModel):
    """An instance built with float16 weights (its scores: :func:`mean_pixel`)."""

    def __init__(self):
        super().__init__("half", device="cpu")
        self.model = torch.nn.Linear(2, 1).half()

    def _score_batch(self, images, prompts):
        return torch.tensor(mean_pixel(images, prompts))


def test_load_reward_model_configures_an_instance_like_a_built_model(monkeypatch, caplog):
    model = R.CallableRewardModel(mean_pixel, device="meta", max_batch_size=5)
    ensemble = R.EnsembleRewardModel([R.CallableRewardModel(mean_pixel), R.CallableRewardModel(mean_pixel)])
    monkeypatch.setitem(sys.modules, "probe_rewards", types.SimpleNamespace(INSTANCE=model, ENSEMBLE=ensemble))
    assert R.load_reward_model("probe_rewards:INSTANCE") is model and model.device == torch.device("meta")
    with caplog.at_level("WARNING", logger="smpo_diffusers.rewards.registry"):
        loaded = R.load_reward_model("probe_rewards:INSTANCE", device="cpu", dtype="fp16", preprocess_threads=3,
                                     max_batch_size=64)
    assert loaded is model and model.device == torch.device("cpu") and model.preprocess_threads == 3
    assert model.max_batch_size == 5  # its own chunk size
    assert "does not apply to the reward model instance probe_rewards:INSTANCE" in caplog.text
    R.load_reward_model(ensemble, device="cpu", preprocess_threads=2)
    assert [m.preprocess_threads for m in (ensemble, *ensemble.models)] == [2, 2, 2]
    with pytest.raises(ValueError, match="takes no model or processor path"):
        R.load_reward_model(model, "some/path")
    with pytest.raises(ValueError, match="preprocess_threads must be >= 1"):
        R.load_reward_model(model, preprocess_threads=0)


def test_label_rewards_moves_an_instance_to_the_process_device_and_records_its_precision(
        tmp_path, saved_dataset, clip_dir, monkeypatch, caplog):
    scorer = CountingScorer()
    instance = R.CallableRewardModel(scorer, name="inst", device="meta", max_batch_size=5)  # scores on meta fail
    probe = types.SimpleNamespace(INSTANCE=instance, HALF=HalfPrecisionReward())
    monkeypatch.setitem(sys.modules, "probe_rewards", probe)
    monkeypatch.setattr(R.job, "_resolve_dtype", lambda args, device: torch.float16 if args.fp16 else torch.float32)

    def run(name, out, **extra):  # --fp16 as on a CUDA process (the patched dtype), scoring on this CPU
        args = R.LabelingArguments(dataset_name=saved_dataset, output_dir=str(tmp_path / out), reward_model=name,
                                   batch_size=4, shard_size=10, **extra)
        return R.label_dataset(args), tmp_path / out

    with caplog.at_level("WARNING", logger="smpo_diffusers.rewards.registry"):
        summary, out = run("probe_rewards:INSTANCE", "instance", fp16=True, preprocess_threads=3)
    assert instance.device == torch.device("cpu") and instance.preprocess_threads == 3
    assert summary["num_valid_pairs"] == 9
    # map batches of 4 pairs (8 images; row 4 is corrupt), each cut by the instance's own max_batch_size 5
    assert scorer.sizes == [5, 3, 5, 1, 4]
    assert "does not apply to the reward model instance probe_rewards:INSTANCE" in caplog.text
    assert _shard_fingerprint(out)["fp16"] is False and summary["fp16"] is False  # what ran
    assert summary["arguments"]["fp16"] is True  # what was asked

    summary, out = run("probe_rewards:HALF", "half")  # built in float16: recorded although --fp16 is off
    assert _shard_fingerprint(out)["fp16"] is True and summary["fp16"] is True
    summary, out = run("pickscore", "pickscore", fp16=True, reward_model_name_or_path=clip_dir)
    assert _shard_fingerprint(out)["fp16"] is True and summary["fp16"] is True  # --fp16 reached the backend
    assert summary["num_valid_pairs"] == 9


def test_label_dataset_max_samples_and_batch_size_shape_the_scoring_calls(tmp_path, saved_dataset, monkeypatch):
    scorer = CountingScorer()
    monkeypatch.setitem(sys.modules, "probe_rewards", types.SimpleNamespace(score=scorer))
    args = R.LabelingArguments(dataset_name=saved_dataset, output_dir=str(tmp_path / "out"),
                               reward_model="probe_rewards:score", max_samples=7, batch_size=3, shard_size=10)
    summary = R.label_dataset(args)
    # one shard of the first 7 pairs, scored in map batches of 3 pairs; pair 4 is corrupt (not scored)
    assert scorer.sizes == [6, 4, 2]
    labelled = datasets.load_from_disk(args.output_dir)
    assert labelled.num_rows == 7 and labelled["caption"] == datasets.load_from_disk(saved_dataset)["caption"][:7]
    assert summary["num_pairs"] == 7 and summary["pairs_scored"] == 7 and summary["num_invalid_pairs"] == 1
    assert (_shard_fingerprint(tmp_path / "out")["start"], _shard_fingerprint(tmp_path / "out")["stop"]) == (0, 7)


def test_label_dataset_split_cache_dir_processor_and_threads_reach_their_users(
        tmp_path, clip_dir, pickscore, monkeypatch):
    """--dataset_split_name picks the split, --cache_dir reaches the dataset and model loaders (parquet files are
    converted into it), --reward_processor_name_or_path loads the processor of a model folder that lacks one, and
    --preprocess_threads reaches the labeler's decoding and the backend's preprocessing."""
    import shutil

    source = tmp_path / "source"
    source.mkdir()
    validation = make_preference_dataset(num_pairs=5, seed=11)
    validation.to_parquet(str(source / "validation.parquet"))
    make_preference_dataset(num_pairs=3, seed=12).to_parquet(str(source / "train.parquet"))
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(clip_dir, name), weights_only / name)
    expected = pickscore.score(decoded(validation, "jpg_0"), validation["caption"])

    calls = {"dataset": [], "model": [], "threads": []}
    load_dataset, load_model = R.job.load_preference_dataset, R.job.load_reward_model
    monkeypatch.setattr(R.job, "load_preference_dataset",
                        lambda *a, **k: calls["dataset"].append((a, k)) or load_dataset(*a, **k))
    monkeypatch.setattr(R.job, "load_reward_model",
                        lambda *a, **k: calls["model"].append((a, k)) or load_model(*a, **k))
    for module in (R.labeling, R.base):  # the labeler decodes, the CLIP backend preprocesses, in threads
        def spy(fn, items, threads, original=module.map_in_threads, name=module.__name__):
            calls["threads"].append((name, threads))
            return original(fn, items, threads)

        monkeypatch.setattr(module, "map_in_threads", spy)

    cache = tmp_path / "cache"
    args = R.LabelingArguments(dataset_name=str(source), output_dir=str(tmp_path / "out"), reward_model="pickscore",
                               reward_model_name_or_path=str(weights_only), reward_processor_name_or_path=clip_dir,
                               dataset_split_name="validation", cache_dir=str(cache), preprocess_threads=3,
                               batch_size=2)
    summary = R.label_dataset(args)

    labelled = datasets.load_from_disk(args.output_dir)
    assert labelled["caption"] == validation["caption"] and summary["dataset_split_name"] == "validation"
    np.testing.assert_allclose(labelled["reward_0"], expected.numpy(), atol=1e-5)
    assert calls["dataset"] == [((str(source), "validation", str(cache)), {})]
    assert any(cache.rglob("*.arrow"))  # the parquet files were converted into --cache_dir
    (_, path, processor), options = calls["model"][0]
    assert (path, processor, options["cache_dir"]) == (str(weights_only), clip_dir, str(cache))
    assert options["preprocess_threads"] == 3 and options["max_batch_size"] == 4
    assert {name for name, _ in calls["threads"]} == {R.labeling.__name__, R.base.__name__}
    assert {threads for _, threads in calls["threads"]} == {3}
    fingerprint = _shard_fingerprint(tmp_path / "out")
    assert fingerprint["reward_processor_name_or_path"] == clip_dir
    assert fingerprint["dataset_split_name"] == "validation"
    with pytest.raises(OSError):  # without the processor path the weights-only folder cannot be used
        R.label_dataset(dataclasses.replace(args, output_dir=str(tmp_path / "none"),
                                            reward_processor_name_or_path=None))


def test_training_refuses_statistics_that_do_not_describe_the_rewards(tmp_path, saved_dataset, clip_dir):
    """A relabelling interrupted between writing the rewards and their statistics leaves no reward_stats.json,
    or (before that was fixed, or after a hand copy) one of other rewards: training refuses both instead of
    training with the PickScore constant or a scale that does not fit."""
    from smpo_diffusers import SmPOConfig, SmPOTrainer

    out = tmp_path / "labelled"
    R.label_dataset(R.LabelingArguments(dataset_name=saved_dataset, reward_model="pickscore",
                                        reward_model_name_or_path=clip_dir, output_dir=str(out), batch_size=5))

    def train():  # the data and its scale are checked before any model is loaded: the model path never matters
        SmPOTrainer(SmPOConfig(pretrained_model_name_or_path=str(tmp_path / "no-model"), dataset_name=str(out),
                               output_dir=str(tmp_path / "run"), resolution=32, report_to="none"))

    with pytest.raises(OSError, match="no-model"):  # the statistics fit: on to loading the (missing) model
        train()
    stats_path = out / "reward_stats.json"
    stats = json.loads(stats_path.read_text())
    stats_path.write_text(json.dumps(dict(stats, labels_sha256="0" * 64)))
    with pytest.raises(ValueError, match=r"reward_stats.json describes other rewards than the dataset beside it "
                                         r"\(10 pairs recorded, 10 present, or other values\).*Rerun label_rewards"):
        train()
    stats_path.unlink()
    with pytest.raises(ValueError, match="was labelled by label_rewards but holds no reward_stats.json"):
        train()


def test_a_label_shard_reaches_the_disk_before_the_rename_that_publishes_it(tmp_path, monkeypatch):
    """A power loss after the rename must not leave a complete-looking shard with empty files (a resume would take
    it as done): every file of the shard is fsynced before the rename, and the folder after it."""
    from smpo_diffusers.rewards import job

    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(src), str(dst)))
                        or real_replace(src, dst))
    shard = tmp_path / "shard-00000"
    job._save_shard(datasets.Dataset.from_dict({"reward_0": [0.5], "reward_1": [0.25], "label_valid": [True]}),
                    str(shard), {"shard_index": 0})
    published = events.index(("replace", f"{shard}.tmp-{os.getpid()}", str(shard)))
    synced_before = {path for kind, path, *_ in events[:published] if kind == "fsync"}
    files = {str(path).replace(str(shard), f"{shard}.tmp-{os.getpid()}") for path in shard.rglob("*")
             if path.is_file()}
    assert files and files <= synced_before, files - synced_before
    assert ("fsync", str(tmp_path)) in events[published:]  # the rename itself
    assert job._shard_is_done(str(shard), {"shard_index": 0})


def test_relabelling_a_labelled_set_replaces_its_validity_and_never_its_own_files(tmp_path, saved_dataset):
    """A labelled set given as the source: its label_valid said which pairs the earlier model could score, so it is
    replaced with the rewards (a pair it scored non-finite is valid again). A source whose files lie in
    --output_dir (a link to it) is refused before anything there is touched."""
    first = tmp_path / "first"

    def overflows_on_row_2(images, prompts):
        scores = mean_pixel(images, prompts)
        scores[0] = float("inf") if prompts[0] == source_captions[2] else scores[0]
        return scores

    source_captions = datasets.load_from_disk(saved_dataset)["caption"]
    R.label_dataset(R.LabelingArguments(dataset_name=saved_dataset, output_dir=str(first), batch_size=1),
                    reward_model=R.CallableRewardModel(overflows_on_row_2, name="flaky"))
    assert datasets.load_from_disk(str(first))["label_valid"][2] is False
    summary = R.label_dataset(R.LabelingArguments(dataset_name=str(first), output_dir=str(tmp_path / "again")),
                              reward_model=R.CallableRewardModel(mean_pixel, name="toy"))
    again = datasets.load_from_disk(str(tmp_path / "again"))
    assert again["label_valid"] == [i != 4 for i in range(10)] and summary["num_invalid_in_source"] == 0
    alias = tmp_path / "alias"
    alias.symlink_to(first)
    for dataset_name in (alias, first):
        with pytest.raises(ValueError, match="must differ from --dataset_name|holds the files of the dataset"):
            R.label_dataset(R.LabelingArguments(dataset_name=str(dataset_name), output_dir=str(first)),
                            reward_model=R.CallableRewardModel(mean_pixel, name="toy"))
    assert len(datasets.load_from_disk(str(first))) == 10 and (first / "reward_stats.json").exists()
