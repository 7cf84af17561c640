"""Tests for smpo_diffusers.testing: tiny tokenizer, SD/SDXL pipelines, tiny CLIP, preference data."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from smpo_diffusers.testing import (
    CAPTION_WORDS,
    COLOURS,
    SHAPES,
    TINY_RESOLUTION,
    TINY_VAE_SCALE_FACTOR,
    make_preference_dataset,
    save_tiny_pipeline,
    tiny_clip_model,
    tiny_clip_tokenizer,
    tiny_sd_components,
    tiny_sdxl_components,
)

CAPTION = "a red circle on a blue background"


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_encodes_caption_words_as_single_tokens_and_unknown_words_by_characters():
    tokenizer = tiny_clip_tokenizer()
    ids = tokenizer(CAPTION).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>"] + [w + "</w>" for w in CAPTION.split()] + ["<|endoftext|>"]
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.eos_token == "<|endoftext|>"

    unknown = tokenizer("Zebra, 42!").input_ids
    assert tokenizer.unk_token_id not in unknown[1:-1]
    assert tokenizer.decode(unknown, skip_special_tokens=True).replace(" ", "") == "zebra,42!"

    padded = tokenizer(CAPTION, padding="max_length", max_length=tokenizer.model_max_length)
    assert len(padded.input_ids) == 77
    assert padded.input_ids[-1] == tokenizer.pad_token_id


def test_tokenizer_extra_vocab_words_and_bad_words():
    extra = ["zebra", "bra", "aa", "aaa", "abcab"]
    tokenizer = tiny_clip_tokenizer(extra, model_max_length=16)
    assert tokenizer.model_max_length == 16
    for word in list(CAPTION_WORDS) + extra:
        assert tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids)[1:-1] == [word + "</w>"], word
    with pytest.raises(ValueError, match="vocab_words"):
        tiny_clip_tokenizer(["Zebra crossing"])


def test_tokenizer_save_load_round_trip(tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer

    tokenizer = tiny_clip_tokenizer(["zebra"])
    tokenizer.save_pretrained(tmp_path)
    texts = [CAPTION, "zebra on the moon!", "an ORANGE diamond 7"]
    expected = tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids
    for loader in (CLIPTokenizer, AutoTokenizer):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded).__name__ in ("CLIPTokenizer", "CLIPTokenizerFast")  # (AutoTokenizer: fast on 4.x)
        assert len(loaded) == len(tokenizer)
        assert loaded.model_max_length == 77
        assert loaded(texts, padding="max_length", max_length=77, truncation=True).input_ids == expected


# ----------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd"), kind="sd", seed=0)


@pytest.fixture(scope="module")
def sdxl_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sdxl"), kind="sdxl", seed=0)


def _generate(pipe):
    return pipe(
        CAPTION,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_sd_pipeline_saves_loads_and_generates(sd_path):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    assert pipe.vae_scale_factor == TINY_VAE_SCALE_FACTOR
    assert isinstance(pipe.scheduler, PNDMScheduler)
    config = pipe.scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert config.skip_prk_steps and not config.set_alpha_to_one and config.steps_offset == 1
    assert config.prediction_type == "epsilon"
    images = _generate(pipe)
    assert images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(images).all()


def test_sdxl_pipeline_saves_loads_and_generates(sdxl_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    assert pipe.vae_scale_factor == TINY_VAE_SCALE_FACTOR
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.scheduler.config.timestep_spacing == "leading"
    images = _generate(pipe)
    assert images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_components_load_with_ordinary_per_component_loaders(kind, sd_path, sdxl_path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = sd_path if kind == "sd" else sdxl_path
    reference = tiny_sd_components(seed=0) if kind == "sd" else tiny_sdxl_components(seed=0)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    for name, tensor in reference["unet"].state_dict().items():
        assert torch.equal(unet.state_dict()[name], tensor), name
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    assert vae.config.latent_channels == 4
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    assert text_encoder.config.vocab_size == len(tokenizer)
    assert text_encoder.config.eos_token_id == tokenizer.eos_token_id
    assert text_encoder.config.bos_token_id == tokenizer.bos_token_id
    assert text_encoder.config.pad_token_id == tokenizer.pad_token_id
    # A different scheduler class reads the real shared config values (clip_sample=False).
    ddpm = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    assert ddpm.config.clip_sample is False
    assert ddpm.config.steps_offset == 1 and ddpm.config.beta_schedule == "scaled_linear"

    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        decoded = vae.decode(latents).sample
    assert decoded.shape == (1, 3, TINY_RESOLUTION, TINY_RESOLUTION)


def test_sdxl_unet_forward_with_added_conditions():
    components = tiny_sdxl_components(seed=0)
    unet, text_encoder_2 = components["unet"], components["text_encoder_2"]
    hidden_1 = components["text_encoder"].config.hidden_size
    hidden_2 = text_encoder_2.config.hidden_size
    assert unet.config.cross_attention_dim == hidden_1 + hidden_2
    assert unet.config.projection_class_embeddings_input_dim == (
        unet.config.addition_time_embed_dim * 6 + text_encoder_2.config.projection_dim
    )
    batch = 2
    latent = TINY_RESOLUTION // TINY_VAE_SCALE_FACTOR
    sample = torch.randn(batch, 4, latent, latent)
    encoder_hidden_states = torch.randn(batch, 77, hidden_1 + hidden_2)
    added = {
        "text_embeds": torch.randn(batch, text_encoder_2.config.projection_dim),
        "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch),
    }
    with torch.no_grad():
        out = unet(sample, torch.tensor([10, 500]), encoder_hidden_states, added_cond_kwargs=added).sample
    assert out.shape == sample.shape
    assert torch.isfinite(out).all()


def test_components_are_seeded_and_take_prediction_type():
    first = tiny_sd_components(seed=3, prediction_type="v_prediction")
    again = tiny_sd_components(seed=3)
    other = tiny_sd_components(seed=4)
    assert first["scheduler"].config.prediction_type == "v_prediction"
    for name in ("unet", "vae", "text_encoder"):
        a = torch.cat([p.flatten() for p in first[name].parameters()])
        b = torch.cat([p.flatten() for p in again[name].parameters()])
        c = torch.cat([p.flatten() for p in other[name].parameters()])
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name
    assert tiny_sdxl_components(prediction_type="v_prediction")["scheduler"].config.prediction_type == (
        "v_prediction"
    )
    with pytest.raises(ValueError, match="prediction_type"):
        tiny_sd_components(prediction_type="eps")
    with pytest.raises(ValueError, match="kind"):
        save_tiny_pipeline("unused", kind="sd3")


# ----------------------------------------------------------------------------- tiny CLIP


def test_tiny_clip_save_load_round_trip(tmp_path):
    from transformers import AutoModel, AutoProcessor

    model, processor = tiny_clip_model(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded_model = AutoModel.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)

    data = make_preference_dataset(num_pairs=2, seed=0)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in data["jpg_0"]]
    captions = list(data["caption"])
    inputs = processor(text=captions, images=images, return_tensors="pt", padding=True)
    loaded_inputs = loaded_processor(text=captions, images=images, return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    for key in inputs:
        assert torch.equal(inputs[key], loaded_inputs[key]), key
    with torch.no_grad():
        out = model(**inputs)
        loaded_out = loaded_model(**loaded_inputs)
    assert out.image_embeds.shape == (2, 16) and out.text_embeds.shape == (2, 16)
    assert torch.equal(out.image_embeds, loaded_out.image_embeds)
    assert torch.equal(out.text_embeds, loaded_out.text_embeds)


# ----------------------------------------------------------------------------- preference data


def test_preference_dataset_schema_and_labels():
    import datasets

    data = make_preference_dataset(num_pairs=16, seed=0, image_size=24, tie_fraction=0.25)
    assert data.num_rows == 16
    assert data.features["jpg_0"] == datasets.Value("binary")
    assert data.features["jpg_1"] == datasets.Value("binary")
    assert data.features["caption"] == datasets.Value("string")
    labels = np.array(data["label_0"])
    assert set(labels.tolist()) <= {0.0, 0.5, 1.0}
    assert (labels == 0.5).sum() == 4
    assert {0.0, 1.0} <= set(labels.tolist())
    np.testing.assert_array_equal(np.array(data["label_1"]), 1.0 - labels)
    for row in data:
        words = row["caption"].split()
        assert words[1] in COLOURS and words[2] in SHAPES and words[-2] in COLOURS
        assert all(word in CAPTION_WORDS for word in words)
        for key in ("jpg_0", "jpg_1"):
            image = Image.open(io.BytesIO(row[key]))
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (24, 24)


def test_preferred_image_shows_a_larger_shape_on_the_named_background():
    data = make_preference_dataset(num_pairs=8, seed=1, tie_fraction=0.0, image_format="PNG")

    def background_pixels(raw, background):
        pixels = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        return int((pixels == np.array(COLOURS[background])).all(axis=-1).sum())

    for row in data:
        assert Image.open(io.BytesIO(row["jpg_0"])).format == "PNG"
        assert row["label_0"] in (0.0, 1.0)
        background = row["caption"].split()[-2]
        preferred, other = (row["jpg_0"], row["jpg_1"]) if row["label_0"] == 1.0 else (row["jpg_1"], row["jpg_0"])
        # PNG is lossless: the shape covers more of the background in the preferred image.
        assert 0 < background_pixels(preferred, background) < background_pixels(other, background)


def test_preference_dataset_is_deterministic_per_seed():
    first = make_preference_dataset(num_pairs=6, seed=5)
    again = make_preference_dataset(num_pairs=6, seed=5)
    other = make_preference_dataset(num_pairs=6, seed=6)
    assert first.to_dict() == again.to_dict()
    assert first["jpg_0"] != other["jpg_0"]


def test_preference_dataset_custom_captions_and_tie_rounding():
    captions = ["a green triangle on a white background", "something purple", "no colour words"]
    data = make_preference_dataset(num_pairs=3, seed=0, captions=captions, tie_fraction=0.5)
    assert data["caption"] == captions
    assert sum(label == 0.5 for label in data["label_0"]) == round(3 * 0.5)
    # The named colours are drawn: in the preferred (or tied) image of the first pair the corner
    # shows the white background and the centre the green shape.
    first = data[0]
    raw = first["jpg_1"] if first["label_0"] == 0.0 else first["jpg_0"]
    pixels = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=int)
    assert (pixels[0, 0] > 200).all()
    red, green, blue = pixels[16, 16]
    assert green > red + 60 and green > blue + 60
    assert make_preference_dataset(num_pairs=5, tie_fraction=1.0)["label_0"] == [0.5] * 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_pairs": 0}, "num_pairs"),
        ({"image_size": 4}, "image_size"),
        ({"tie_fraction": 1.5}, "tie_fraction"),
        ({"image_format": "GIF"}, "image_format"),
        ({"num_pairs": 2, "captions": ["only one"]}, "captions"),
    ],
)
def test_preference_dataset_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_preference_dataset(**kwargs)
