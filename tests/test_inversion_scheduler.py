import json
import math

import pytest
import torch
from diffusers import DDIMInverseScheduler, EulerDiscreteScheduler

from smpo_diffusers import InversionScheduler

SD_SCHEDULER_CONFIG = {  # the values real SD 1.x / SDXL scheduler folders hold
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
    "interpolation_type": "linear", "prediction_type": "epsilon", "sample_max_value": 1.0,
    "timestep_spacing": "leading", "use_karras_sigmas": False,
}

PARENT_CONFIGS = [
    {},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"set_alpha_to_one": False},
    {"clip_sample": False},
    {"clip_sample": True, "clip_sample_range": 0.5},
    {"prediction_type": "v_prediction"},
    {"prediction_type": "sample"},
    {"timestep_spacing": "trailing"},
    {"steps_offset": 1},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    {"num_train_timesteps": 500},
]


def sd_scheduler(**overrides):
    config = {k: v for k, v in SD_SCHEDULER_CONFIG.items() if not k.startswith("_")}
    config.update(overrides)
    return InversionScheduler.from_config(config)


@pytest.mark.parametrize("config", PARENT_CONFIGS)
@pytest.mark.parametrize("num_inference_steps", [1, 7, 10, 50])
def test_bit_identical_to_parent(config, num_inference_steps):
    parent = DDIMInverseScheduler(**config)
    ours = InversionScheduler(**config)
    parent.set_timesteps(num_inference_steps)
    ours.set_timesteps(num_inference_steps)
    assert torch.equal(parent.timesteps, ours.timesteps)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, 4, 4, generator=g) * 1.5
    p_sample, o_sample = sample.clone(), sample.clone()
    for t in parent.timesteps:
        model_output = torch.randn(2, 3, 4, 4, generator=g)
        p_sample = parent.step(model_output, t, p_sample).prev_sample
        o_sample = ours.step(model_output, t, o_sample).prev_sample
        assert torch.equal(p_sample, o_sample)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(ours.config) == public(parent.config)


@pytest.mark.parametrize("config", PARENT_CONFIGS)
def test_vector_step_equals_parent_per_sample(config):
    parent = DDIMInverseScheduler(**config)
    ours = InversionScheduler(**config)
    parent.set_timesteps(10)
    ours.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(4, 3, 4, 4, generator=g) * 1.5
    model_output = torch.randn(4, 3, 4, 4, generator=g)
    timesteps = parent.timesteps[torch.tensor([0, 3, 9, 5])]
    vector = ours.step(model_output, timesteps, sample)
    for i in range(4):
        single = parent.step(model_output[i:i + 1], timesteps[i], sample[i:i + 1])
        torch.testing.assert_close(vector.prev_sample[i:i + 1], single.prev_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(vector.pred_original_sample[i:i + 1], single.pred_original_sample,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vector_step_in_half_precision_is_no_less_accurate_than_the_parent(dtype):
    """ā and 1 - ā stay fp32 (at small t, 1 - ā cancels in half precision); only the result is cast."""
    config = {k: v for k, v in SD_SCHEDULER_CONFIG.items() if not k.startswith("_")}
    parent, ours = DDIMInverseScheduler(**config), InversionScheduler(**config)
    parent.set_timesteps(500)
    ours.set_timesteps(500)
    g = torch.Generator().manual_seed(2)
    sample, model_output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([3, 5])
    exact = ours.step(model_output, timesteps, sample).prev_sample
    half = ours.step(model_output.to(dtype), timesteps, sample.to(dtype))
    assert half.prev_sample.dtype == dtype and half.pred_original_sample.dtype == dtype
    ours_error = (half.prev_sample.float() - exact).abs().max()
    parent_error = max((parent.step(model_output[i:i + 1].to(dtype), timesteps[i], sample[i:i + 1].to(dtype))
                        .prev_sample.float() - exact[i:i + 1]).abs().max() for i in range(2))
    assert ours_error <= parent_error


@pytest.mark.parametrize("folder_config", [SD_SCHEDULER_CONFIG, SDXL_SCHEDULER_CONFIG])
def test_from_pretrained_from_config_and_save_round_trip(tmp_path, folder_config):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(folder_config))
    loaded = InversionScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
    assert isinstance(loaded, InversionScheduler)
    assert loaded.config.set_alpha_to_one is False and loaded.config.clip_sample is False
    assert loaded.config.beta_schedule == "scaled_linear"
    if folder_config["_class_name"] == "EulerDiscreteScheduler":
        pipe_scheduler = EulerDiscreteScheduler.from_config(
            {k: v for k, v in folder_config.items() if not k.startswith("_")})
        from_cfg = InversionScheduler.from_config(pipe_scheduler.config)
        assert torch.equal(from_cfg.alphas_cumprod, loaded.alphas_cumprod)
    loaded.save_config(str(tmp_path / "saved"))
    again = InversionScheduler.from_pretrained(str(tmp_path / "saved"))
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(loaded.config)
    assert torch.equal(again.alphas_cumprod, loaded.alphas_cumprod)


def constant_model(e):
    def model_fn(latents, timesteps):
        assert timesteps.min() >= 0
        return e.index_select(0, torch.zeros(latents.shape[0], dtype=torch.long)) if e.shape[0] == 1 else e
    return model_fn


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("renoise,window", [(0, None), (1, None), (3, None), (3, (1, 2)), (2, (2, 2))])
def test_constant_epsilon_closed_form(set_alpha_to_one, renoise, window):
    sched = sd_scheduler(set_alpha_to_one=set_alpha_to_one)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 4, 8, 8, generator=g).expand(5, -1, -1, -1).clone() + torch.arange(5.0).view(5, 1, 1, 1)
    e = torch.randn(1, 4, 8, 8, generator=g)
    timesteps = torch.tensor([0, 17, 500, 999, 250])

    def model_fn(latents, t):
        assert (t >= 0).all()
        return e.expand(latents.shape[0], -1, -1, -1)

    out = sched.invert(model_fn, x0, timesteps, 10, renoise, renoise_average_window=window)
    # The inversion starts from the clean latent at ā = 1 whatever set_alpha_to_one says (real SD/SDXL configs set
    # it false): starting at ā_0 would make the target at t = 0 about 0.015 x0 instead of e.
    a_t = sched.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(out.latents, a_t.sqrt() * x0 + (1 - a_t).sqrt() * e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.epsilon, e.expand_as(x0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sched.add_noise(x0, out.epsilon, timesteps), out.latents, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.reached_timesteps, timesteps)
    assert out.latents.dtype == torch.float32 and out.epsilon.dtype == torch.float32


def nonlinear_model(latents, timesteps, cond=None):
    t = timesteps.float().view(-1, 1, 1, 1) / 1000
    out = torch.tanh(0.7 * latents + t) * 0.5 + 0.1 * latents.flip(-1)
    if cond is not None:
        out = out + cond.view(-1, 1, 1, 1)
    return out


def test_mixed_batch_equals_each_sample_alone():
    sched = sd_scheduler()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    cond = torch.randn(6, generator=g)
    timesteps = torch.tensor([999, 3, 420, 101, 0, 777])
    batched = sched.invert(nonlinear_model, x0, timesteps, 10, 1, model_kwargs={"cond": cond})
    for i in range(6):
        alone = sched.invert(nonlinear_model, x0[i:i + 1], timesteps[i:i + 1], 10, 1,
                             model_kwargs={"cond": cond[i:i + 1]})
        torch.testing.assert_close(batched.latents[i:i + 1], alone.latents, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched.epsilon[i:i + 1], alone.epsilon, rtol=1e-5, atol=1e-5)
        assert batched.num_steps[i] == alone.num_steps[0]


@pytest.mark.parametrize("grid", ["exact", "reference"])
@pytest.mark.parametrize("renoise", [0, 1, 2])
def test_exact_count_of_model_evaluations_and_levels(grid, renoise):
    sched = sd_scheduler()
    calls = []

    def model_fn(latents, timesteps):
        calls.append((latents.shape[0], timesteps.clone()))
        assert latents.shape[0] == timesteps.shape[0]
        assert (timesteps >= 0).all(), "never evaluated at a negative level"
        assert torch.is_inference_mode_enabled()
        return torch.zeros_like(latents)

    timesteps = torch.tensor([0, 1, 99, 100, 101, 550, 999, 998])
    out = sched.invert(model_fn, torch.randn(8, 4, 2, 2), timesteps, 10, renoise, grid=grid)
    levels, steps = sched.inversion_schedule(timesteps, 10, grid)
    assert torch.equal(out.num_steps, steps)
    assert out.num_model_evaluations == int(steps.sum()) * (renoise + 1)
    assert sum(n for n, _ in calls) == out.num_model_evaluations
    if grid == "exact":
        expected = [max(1, math.ceil(10 * (int(t) + 1) / 1000)) for t in timesteps]
        assert steps.tolist() == expected
        assert torch.equal(out.reached_timesteps, timesteps)
        # every step spans at most T/N levels and ends exactly at t
        for row, n, t in zip(levels, steps, timesteps):
            path = [-1] + row[:n].tolist()
            assert path[-1] == t and all(0 < b - a <= 100 for a, b in zip(path, path[1:]))
    else:
        assert (out.reached_timesteps < timesteps).all()
        assert out.reached_timesteps[0] == -1  # nothing below level 0 on the reference grid
        torch.testing.assert_close(sched.add_noise(torch.zeros(1), torch.zeros(1), torch.tensor([5])), torch.zeros(1))
    # uniform t: mean steps is (N+1)/2 on the exact grid
    all_steps = sched.inversion_schedule(torch.arange(1000), 10, "exact")[1]
    assert all_steps.float().mean().item() == pytest.approx(5.5)


def gaussian_data_epsilon(sigma):
    """Exact ε(z, t) for data x0 ~ N(0, σ² I): a linear model whose DDIM ODE is curved for σ != 1."""
    def model_fn(latents, timesteps, scheduler):
        a = scheduler.alphas_cumprod_at(timesteps).view(-1, 1, 1, 1)
        return latents * (1 - a).sqrt() / (a * sigma ** 2 + 1 - a)
    return model_fn


def ddim_sample_back(sched, model_fn, latents, levels, steps):
    x = latents.clone()
    for i in range(x.shape[0]):
        path = [-1] + levels[i, : steps[i]].tolist()
        for target, source in zip(reversed(path[:-1]), reversed(path[1:])):
            t = torch.tensor([source])
            e = model_fn(x[i:i + 1], t, sched)
            x[i:i + 1] = sched.step_to(e, t, torch.tensor([target]), x[i:i + 1])
    return x


def test_invert_then_sample_round_trip_improves_with_finer_grid():
    sched = sd_scheduler(set_alpha_to_one=True)
    model = gaussian_data_epsilon(sigma=0.3)
    x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(4)) * 0.3
    timesteps = torch.tensor([999, 600, 300])
    errors = []
    for n in (2, 5, 20, 100):
        out = sched.invert(lambda z, t: model(z, t, sched), x0, timesteps, n, 0)
        levels, steps = sched.inversion_schedule(timesteps, n)
        back = ddim_sample_back(sched, model, out.latents, levels, steps)
        errors.append((back - x0).pow(2).mean().sqrt().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1 * errors[0]


def test_renoise_lowers_fixed_point_residual_on_contractive_affine_model():
    sched = sd_scheduler(set_alpha_to_one=True)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(4, 4, 4, 4, generator=g)
    bias = torch.randn(1, 4, 4, 4, generator=g)
    timesteps = torch.tensor([50, 200, 400, 700])

    def affine(z, t):
        return 0.5 * z + bias

    def residual(out):  # one step (N = 1) from the clean level: x_t must equal DDIMInv(x0, ε(x_t, t))
        again = sched.step_to(affine(out.latents, timesteps), torch.full((4,), -1), timesteps, x0)
        return (again - out.latents).flatten(1).pow(2).mean(1).sqrt()

    r0 = residual(sched.invert(affine, x0, timesteps, 1, 0))
    r1 = residual(sched.invert(affine, x0, timesteps, 1, 1))
    r1_last = residual(sched.invert(affine, x0, timesteps, 1, 1, renoise_average_window=(1, 1)))
    r4_last = residual(sched.invert(affine, x0, timesteps, 1, 4, renoise_average_window=(4, 4)))
    assert torch.all(r1 < r0) and torch.all(r1_last < r0) and torch.all(r4_last < 0.5 * r1_last)
    out = sched.invert(affine, x0, timesteps, 1, 2)
    assert torch.all(torch.isfinite(out.renoise_residual)) and torch.all(out.renoise_residual > 0)
    assert torch.all(torch.isnan(sched.invert(affine, x0, timesteps, 1, 0).renoise_residual))


def test_v_prediction_model_equals_epsilon_model():
    sched = sd_scheduler()
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(3, 4, 4, 4, generator=g)
    timesteps = torch.tensor([10, 500, 990])

    def eps_model(z, t):
        return nonlinear_model(z, t)

    def v_model(z, t):
        a = sched.alphas_cumprod_at(t).view(-1, 1, 1, 1)
        eps = eps_model(z, t)
        x0_hat = (z - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0_hat

    a = sched.invert(eps_model, x0, timesteps, 10, 1)
    b = sched.invert(v_model, x0, timesteps, 10, 1, prediction_type="v_prediction")
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sched.get_velocity(x0, a.epsilon, timesteps),
                               sched.alphas_cumprod_at(timesteps).view(-1, 1, 1, 1).sqrt() * a.epsilon
                               - (1 - sched.alphas_cumprod_at(timesteps).view(-1, 1, 1, 1)).sqrt() * x0)


def test_latents_never_clipped_and_warning_when_config_clips():
    sched = InversionScheduler(clip_sample=True)  # the class default, wrong for latents
    x0 = torch.full((2, 4, 2, 2), 3.0)
    e = torch.zeros(2, 4, 2, 2)
    with pytest.warns(UserWarning, match="clip_sample"):
        out = sched.invert(lambda z, t: e[: z.shape[0]], x0, torch.tensor([100, 900]), 10, 1)
    a = sched.alphas_cumprod[torch.tensor([100, 900])].view(-1, 1, 1, 1)
    torch.testing.assert_close(out.latents, a.sqrt() * x0)  # clipped latents would be capped at sqrt(ā)


def test_outputs_usable_in_a_graph_and_fp16_model():
    sched = sd_scheduler()
    weight = torch.nn.Parameter(torch.ones(1))
    x0 = torch.randn(2, 4, 4, 4)

    def half_model(z, t):
        assert z.dtype == torch.float32
        return (z.half() * 0.1).to(torch.float16)

    out = sched.invert(half_model, x0, torch.tensor([300, 30]), 5, 1)
    assert out.latents.dtype == torch.float32 and not out.latents.requires_grad
    loss = ((weight * out.latents - out.epsilon) ** 2).mean()
    loss.backward()
    assert weight.grad is not None


def test_bad_arguments():
    sched = sd_scheduler()
    x0 = torch.randn(2, 4, 2, 2)
    zero = lambda z, t: torch.zeros_like(z)  # noqa: E731
    with pytest.raises(ValueError, match="renoise_average_window"):
        sched.invert(zero, x0, torch.tensor([1, 2]), 10, 1, renoise_average_window=(0, 2))
    with pytest.raises(ValueError, match="timesteps"):
        sched.invert(zero, x0, torch.tensor([1, 1000]), 10, 1)
    with pytest.raises(ValueError, match="one timestep per sample"):
        sched.invert(zero, x0, torch.tensor([1, 2, 3]), 10, 1)
    with pytest.raises(ValueError, match="grid"):
        sched.invert(zero, x0, torch.tensor([1, 2]), 10, 1, grid="fancy")
    with pytest.raises(ValueError, match="num_inversion_steps"):
        sched.invert(zero, x0, torch.tensor([1, 2]), 0, 1)


def test_invert_hands_the_model_contiguous_level_tensors():
    """The levels of one step are a column of the (batch, width) grid; handing the model that strided view would
    make a torch.compile'd model recompile whenever the grid width changes (it guards on strides)."""
    sched = sd_scheduler(set_alpha_to_one=True)
    seen = []

    def model(z, t):
        seen.append((t.is_contiguous(), t.stride(), tuple(t.shape)))
        return torch.zeros_like(z)

    x0 = torch.zeros(3, 4, 4, 4)
    sched.invert(model, x0, torch.tensor([999, 600, 300]), 10, 1)
    assert seen and all(contiguous and stride == (1,) for contiguous, stride, _ in seen)
    assert {shape for _, _, shape in seen} == {(3,), (2,), (1,)}  # finished samples are not evaluated
