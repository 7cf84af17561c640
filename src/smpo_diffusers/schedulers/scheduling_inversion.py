"""ReNoise (DDIM) inversion with per-sample target levels.

Levels and ``ā``: a *level* is a discrete training timestep ``t ∈ [0, T)`` of the noise schedule, with
``ā_t = alphas_cumprod[t]``. The clean latent ``x0`` sits at level ``-1`` with ``ā = 1``: the inversion starts
from the same clean latent that the target ``τ_t`` below (and ``add_noise``) is measured from, so a model that
always predicts the same ``e`` inverts to ``τ_t = e`` exactly. (The parent :class:`~diffusers.DDIMInverseScheduler`
starts from ``initial_alpha_cumprod``, i.e. ``ā_0`` when ``set_alpha_to_one`` is false, as real SD/SDXL configs
set it; that would treat ``x0`` as slightly noisy and shrink ``τ_t`` towards 0 at small ``t``: ``τ_0 ≈ 0.015 x0``.
Only the parent-compatible :meth:`InversionScheduler.step` keeps the parent's convention.)

One DDIM inversion step from level ``s`` to a higher level ``t`` with a noise estimate ``e``::

    x0^ = (x_s - sqrt(1 - ā_s) e) / sqrt(ā_s)
    x_t = sqrt(ā_t) x0^ + sqrt(1 - ā_t) e

ReNoise (Garibi et al. 2024) refines ``e`` by re-evaluating the model at the *target* level on the current
estimate of ``x_t`` ``K`` times and averaging the predictions. The inverted latent then defines the
regression target used by SmPO, the noise implied at the labelled level ``t``::

    τ_t = (x~_t - sqrt(ā_t) x0) / sqrt(1 - ā_t)       so that  add_noise(x0, τ_t, t) == x~_t
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import DDIMInverseScheduler
from diffusers.utils import BaseOutput

__all__ = ["InversionOutput", "InversionScheduler", "INVERSION_GRIDS"]

INVERSION_GRIDS = ("exact", "reference")
"""``exact``: invert to exactly each sample's level on its own evenly spaced sub-grid (the default).
``reference``: the grid of the authors' script, a fixed grid of N levels, stopping at the last grid level
strictly below ``t`` while the result is labelled ``t`` (for ablations only). Only this grid truncation and
mislabelled level are reproduced, not the script's other bugs (its evaluation at a negative timestep, its
renoise call at the source level, its fp16 ā)."""


@dataclass
class InversionOutput(BaseOutput):
    """Result of :meth:`InversionScheduler.invert`. Tensors are fp32 and carry no autograd graph.

    Attributes:
        latents: ``(B, ...)`` the inverted latents ``x~_t``, labelled at ``timesteps``.
        epsilon: ``(B, ...)`` the implied noise ``τ_t`` at the labelled level (the training target).
        timesteps: ``(B,)`` long, the labelled levels (the ``timesteps`` passed in).
        reached_timesteps: ``(B,)`` long, the level each latent actually reached (equal to ``timesteps`` in
            the ``exact`` grid; ``-1`` means no step was taken).
        num_steps: ``(B,)`` long, inversion steps taken by each sample.
        num_model_evaluations: total sample-evaluations of ``model_fn`` (a call on ``m`` samples counts ``m``).
        renoise_residual: ``(B,)`` RMS change between the last two ReNoise predictions, averaged over a
            sample's steps (how far the fixed-point iteration still moved); NaN with ``K = 0`` or no steps.
    """

    latents: torch.Tensor
    epsilon: torch.Tensor
    timesteps: torch.Tensor
    reached_timesteps: torch.Tensor
    num_steps: torch.Tensor
    num_model_evaluations: int
    renoise_residual: torch.Tensor


def _index_batch(value: Any, index: torch.Tensor | slice) -> Any:
    """Select rows of every batch-first tensor in a (nested) dict/list/tuple; other values pass through."""
    if torch.is_tensor(value):
        if isinstance(index, slice):
            return value[index]
        return value.index_select(0, index.to(value.device))
    if isinstance(value, dict):
        return {key: _index_batch(item, index) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_index_batch(item, index) for item in value)
    return value


def ddim_inverse_step(
    sample: torch.Tensor, epsilon: torch.Tensor, alpha_source: torch.Tensor, alpha_target: torch.Tensor
) -> torch.Tensor:
    """Move ``sample`` from a level with ``ā = alpha_source`` to one with ``ā = alpha_target`` along ``epsilon``.

    ``alpha_*`` broadcast against ``sample`` (shape ``(B, 1, ..., 1)`` for per-sample levels). No clipping.
    """
    pred_original = (sample - (1 - alpha_source).sqrt() * epsilon) / alpha_source.sqrt()
    return alpha_target.sqrt() * pred_original + (1 - alpha_target).sqrt() * epsilon


class InversionScheduler(DDIMInverseScheduler):
    """A :class:`~diffusers.DDIMInverseScheduler` that also inverts batches to per-sample levels with ReNoise.

    It is a drop-in replacement: the configuration, ``set_timesteps`` and scalar ``step`` are the parent's.
    Additions:

    * ``step`` also accepts a ``(B,)`` tensor of timesteps (each sample moves ``T // N`` levels up to its own
      level, with the parent's arithmetic).
    * :meth:`step_to` moves each sample from its own source level to its own target level.
    * :meth:`invert` runs a complete ReNoise inversion of clean latents to per-sample levels, evaluating the
      model only for samples that still need a step.
    * :meth:`add_noise` / :meth:`get_velocity` with per-sample levels, in fp32.
    """

    _compatibles = ["DDIMScheduler", "DDIMInverseScheduler", "DDPMScheduler", "PNDMScheduler",
                    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                    "LMSDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler"]

    # ------------------------------------------------------------------ ā look-ups
    def alphas_cumprod_at(self, levels: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """fp32 ``ā`` at integer ``levels`` (any shape); level ``-1`` is the clean latent, ``ā = 1``."""
        levels = torch.as_tensor(levels, dtype=torch.long)
        if levels.numel() and (levels.min() < -1 or levels.max() >= self.config.num_train_timesteps):
            raise ValueError(
                f"levels must lie in [-1, {self.config.num_train_timesteps - 1}], got "
                f"[{int(levels.min())}, {int(levels.max())}]"
            )
        table = torch.cat([torch.ones(1), self.alphas_cumprod.float()])
        device = device if device is not None else levels.device
        return table.to(device)[(levels + 1).to(device)]

    def _alpha_view(self, levels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        alpha = self.alphas_cumprod_at(levels, device=like.device)
        return alpha.reshape(alpha.shape + (1,) * (like.ndim - alpha.ndim))

    # ------------------------------------------------------------------ per-sample stepping
    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """The parent's ``step``; a ``(B,)`` tensor ``timestep`` steps each sample to its own level.

        With a tensor, sample ``i`` moves from ``timestep[i] - T // N`` (clamped like the parent) to
        ``timestep[i]``, using the parent's formulas for every ``prediction_type`` and ``clip_sample`` setting.
        """
        if not (torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.numel() == sample.shape[0]
                and sample.shape[0] > 1):
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        if self.num_inference_steps is None:
            raise ValueError("call `set_timesteps` before `step`")
        target = timestep.long().cpu()
        source = torch.clamp(
            target - self.config.num_train_timesteps // self.num_inference_steps,
            max=self.config.num_train_timesteps - 1,
        )
        # The parent starts any negative source from initial_alpha_cumprod (ā_0 unless set_alpha_to_one).
        negative = (source < 0).reshape((-1,) + (1,) * (sample.ndim - 1)).to(sample.device)
        # ā and 1 - ā stay fp32 like the parent's (1 - ā cancels badly in half precision at small t)
        alpha_source = torch.where(negative, self.initial_alpha_cumprod.float().to(sample.device),
                                   self._alpha_view(source.clamp(min=0), sample).float())
        alpha_target = self._alpha_view(target, sample).float()
        beta_source = 1 - alpha_source
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_original = (sample - beta_source ** 0.5 * model_output) / alpha_source ** 0.5
            pred_epsilon = model_output
        elif prediction_type == "sample":
            pred_original = model_output
            pred_epsilon = (sample - alpha_source ** 0.5 * pred_original) / beta_source ** 0.5
        elif prediction_type == "v_prediction":
            pred_original = alpha_source ** 0.5 * sample - beta_source ** 0.5 * model_output
            pred_epsilon = alpha_source ** 0.5 * model_output + beta_source ** 0.5 * sample
        else:
            raise ValueError(f"prediction_type {prediction_type!r} must be epsilon, sample or v_prediction")
        if self.config.clip_sample:
            pred_original = pred_original.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        prev_sample = (alpha_target ** 0.5 * pred_original + (1 - alpha_target) ** 0.5 * pred_epsilon).to(sample.dtype)
        pred_original = pred_original.to(sample.dtype)
        if not return_dict:
            return (prev_sample, pred_original)
        from diffusers.schedulers.scheduling_ddim_inverse import DDIMSchedulerOutput

        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)

    def step_to(
        self,
        epsilon: torch.Tensor,
        source_timesteps: torch.Tensor,
        target_timesteps: torch.Tensor,
        sample: torch.Tensor,
    ) -> torch.Tensor:
        """One DDIM inversion step per sample, ``source_timesteps[i] -> target_timesteps[i]``, in fp32.

        ``epsilon`` is a noise estimate (convert other prediction types with :meth:`epsilon_from_prediction`).
        Source ``-1`` is the clean level. Never clips. Returns an fp32 tensor shaped like ``sample``.
        """
        sample = sample.float()
        alpha_source = self._alpha_view(source_timesteps, sample)
        alpha_target = self._alpha_view(target_timesteps, sample)
        return ddim_inverse_step(sample, epsilon.float(), alpha_source, alpha_target)

    def epsilon_from_prediction(
        self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
        prediction_type: str | None = None,
    ) -> torch.Tensor:
        """fp32 noise estimate from a model output made on ``sample`` at ``timesteps`` (``(B,)`` levels)."""
        prediction_type = prediction_type or self.config.prediction_type
        model_output, sample = model_output.float(), sample.float()
        if prediction_type == "epsilon":
            return model_output
        alpha = self._alpha_view(timesteps, sample)
        if prediction_type == "v_prediction":
            return alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample
        if prediction_type == "sample":
            return (sample - alpha.sqrt() * model_output) / (1 - alpha).sqrt()
        raise ValueError(f"prediction_type {prediction_type!r} must be epsilon, sample or v_prediction")

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(ā_t) x0 + sqrt(1 - ā_t) ε`` per sample (``timesteps``: ``(B,)``), computed in fp32."""
        alpha = self._alpha_view(timesteps, original_samples)
        out = alpha.sqrt() * original_samples.float() + (1 - alpha).sqrt() * noise.float()
        return out.to(torch.promote_types(original_samples.dtype, noise.dtype))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(ā_t) ε - sqrt(1 - ā_t) x0`` per sample, computed in fp32."""
        alpha = self._alpha_view(timesteps, sample)
        out = alpha.sqrt() * noise.float() - (1 - alpha).sqrt() * sample.float()
        return out.to(torch.promote_types(sample.dtype, noise.dtype))

    def implied_noise(self, latents: torch.Tensor, original_samples: torch.Tensor, timesteps: torch.Tensor):
        """``τ_t = (x_t - sqrt(ā_t) x0) / sqrt(1 - ā_t)`` per sample, fp32: the noise that ``add_noise`` inverts."""
        alpha = self._alpha_view(timesteps, latents)
        return (latents.float() - alpha.sqrt() * original_samples.float()) / (1 - alpha).sqrt()

    # ------------------------------------------------------------------ inversion schedule
    def inversion_schedule(
        self, timesteps: torch.Tensor, num_inversion_steps: int, grid: str = "exact"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The levels each sample visits on its way from the clean level to ``timesteps[i]``.

        ``num_inversion_steps = N`` is the grid density over the whole range ``[0, T)``.

        * ``exact``: sample ``i`` takes ``n_i = ceil(N (t_i + 1) / T)`` evenly spaced steps ending exactly
          at ``t_i`` (level ``j`` of ``n_i`` is ``floor(j (t_i + 1) / n_i) - 1``); every step spans at most
          ``ceil(T / N)`` levels and the mean of ``n_i`` over uniform ``t`` is ``(N + 1) / 2`` when ``N`` divides ``T``.
        * ``reference``: the parent's ``set_timesteps(N)`` grid, truncated to levels strictly below ``t_i``.

        Returns ``(levels, num_steps)`` on the CPU: ``levels`` ``(B, max_steps)`` long, padded with ``-1``.
        """
        if grid not in INVERSION_GRIDS:
            raise ValueError(f"grid must be one of {INVERSION_GRIDS}, got {grid!r}")
        num_train = self.config.num_train_timesteps
        if not 1 <= num_inversion_steps <= num_train:
            raise ValueError(f"num_inversion_steps must be in [1, {num_train}], got {num_inversion_steps}")
        timesteps = torch.as_tensor(timesteps).long().cpu().reshape(-1)
        if timesteps.numel() and (timesteps.min() < 0 or timesteps.max() >= num_train):
            raise ValueError(f"timesteps must lie in [0, {num_train - 1}]")
        if grid == "exact":
            num_steps = torch.div(num_inversion_steps * (timesteps + 1) + num_train - 1, num_train,
                                  rounding_mode="floor").clamp(min=1)
            width = int(num_steps.max()) if timesteps.numel() else 0
            j = torch.arange(1, width + 1).unsqueeze(0)
            levels = torch.div(j * (timesteps + 1).unsqueeze(1), num_steps.unsqueeze(1), rounding_mode="floor") - 1
            levels = torch.where(j <= num_steps.unsqueeze(1), levels, torch.full_like(levels, -1))
            return levels, num_steps
        saved = (self.num_inference_steps, self.timesteps)
        try:
            self.set_timesteps(num_inversion_steps)
            grid_levels = self.timesteps.long().cpu().sort().values
        finally:
            self.num_inference_steps, self.timesteps = saved
        grid_levels = grid_levels[(grid_levels >= 0) & (grid_levels < num_train)]
        below = grid_levels.unsqueeze(0) < timesteps.unsqueeze(1)
        num_steps = below.sum(dim=1)
        levels = torch.where(below, grid_levels.unsqueeze(0).expand_as(below),
                             torch.full_like(below, -1, dtype=torch.long))
        width = int(num_steps.max()) if timesteps.numel() else 0
        return levels[:, :width], num_steps

    # ------------------------------------------------------------------ inversion
    def invert(
        self,
        model_fn: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        timesteps: torch.Tensor,
        num_inversion_steps: int,
        num_renoise_steps: int = 1,
        *,
        renoise_average_window: tuple[int, int] | None = None,
        grid: str = "exact",
        prediction_type: str = "epsilon",
        model_kwargs: dict[str, Any] | None = None,
    ) -> InversionOutput:
        """ReNoise-invert clean latents ``x0`` to each sample's own level ``timesteps[i]``.

        Args:
            model_fn: ``model_fn(latents, timesteps, **model_kwargs) -> prediction``, called on fp32 latents of
                the samples that still need a step (a prefix of the batch sorted by step count) with their
                target levels; batch-first tensors in ``model_kwargs`` (nested dicts allowed) are sliced to the
                same samples. It casts to its model's dtype itself; the output is cast back to fp32.
            x0: ``(B, ...)`` clean latents (level ``-1``).
            timesteps: ``(B,)`` integer levels in ``[0, T)``, may all differ.
            num_inversion_steps: ``N``, the grid density over ``[0, T)`` (see :meth:`inversion_schedule`).
            num_renoise_steps: ``K`` extra model evaluations per step; ``0`` is plain DDIM inversion.
            renoise_average_window: inclusive ``(first, last)`` indices into the ``K + 1`` predictions
                ``e_0 .. e_K`` that are averaged for the step; ``None`` averages all of them.
            grid: ``"exact"`` (default) or ``"reference"`` (the authors' script's grid, for ablations).
            prediction_type: what ``model_fn`` returns (``epsilon``, ``v_prediction`` or ``sample``); it is
                converted to a noise estimate with the input at the target level.
            model_kwargs: per-sample conditioning passed to ``model_fn``.

        Every model call is made at the target level of the step, never at a negative level, under
        ``torch.inference_mode``; arithmetic is fp32; the latents are never clipped.
        """
        if num_renoise_steps < 0:
            raise ValueError(f"num_renoise_steps must be >= 0, got {num_renoise_steps}")
        first, last = renoise_average_window if renoise_average_window is not None else (0, num_renoise_steps)
        if not 0 <= first <= last <= num_renoise_steps:
            raise ValueError(
                f"renoise_average_window {renoise_average_window} must satisfy 0 <= first <= last <= K "
                f"(K = num_renoise_steps = {num_renoise_steps})"
            )
        if self.config.clip_sample and not getattr(self, "_warned_clip_sample", False):
            warnings.warn(
                "The scheduler config sets clip_sample=True; latents are never clipped during inversion "
                "(clipping is only meaningful for pixel-space models). Set clip_sample=False in the config "
                "to silence this warning.",
                stacklevel=2,
            )
            self._warned_clip_sample = True
        batch = x0.shape[0]
        timesteps = torch.as_tensor(timesteps).long().reshape(-1)
        if timesteps.numel() != batch:
            raise ValueError(f"need one timestep per sample: {timesteps.numel()} timesteps for {batch} samples")
        device = x0.device
        levels, num_steps = self.inversion_schedule(timesteps, num_inversion_steps, grid)
        order = torch.argsort(num_steps, descending=True, stable=True)
        active_counts = [int((num_steps > j).sum()) for j in range(levels.shape[1])]
        levels = levels[order].to(device)
        kwargs = _index_batch(model_kwargs or {}, order)

        with torch.inference_mode():
            latents = x0.detach().float().index_select(0, order.to(device)).clone()
            reached = torch.full((batch,), -1, dtype=torch.long, device=device)
            residual_sum = torch.zeros(batch, device=device)
            evaluations = 0
            for j, active in enumerate(active_counts):
                rows = slice(0, active)
                # Dense strides: a column view's stride is the grid width, and torch.compile guards on strides.
                source, target = reached[rows], levels[rows, j].clone(memory_format=torch.contiguous_format)
                sample = latents[rows]
                step_kwargs = _index_batch(kwargs, rows)

                def predict(z):
                    out = model_fn(z, target, **step_kwargs)
                    return self.epsilon_from_prediction(out, z, target, prediction_type)

                predictions = [predict(sample)]
                for _ in range(num_renoise_steps):
                    predictions.append(predict(self.step_to(predictions[-1], source, target, sample)))
                evaluations += active * (num_renoise_steps + 1)
                epsilon = torch.stack(predictions[first:last + 1]).mean(0)
                if num_renoise_steps:
                    diff = (predictions[-1] - predictions[-2]).flatten(1)
                    residual_sum[rows] += diff.pow(2).mean(1).sqrt()
                latents[rows] = self.step_to(epsilon, source, target, sample)
                reached[rows] = target

            inverse = torch.argsort(order).to(device)
            latents = latents.index_select(0, inverse)
            reached = reached.index_select(0, inverse)
            steps = num_steps.to(device)
            residual = residual_sum.index_select(0, inverse) / steps.clamp(min=1)
            if num_renoise_steps == 0:
                residual = torch.full_like(residual, math.nan)
            residual = torch.where(steps > 0, residual, torch.full_like(residual, math.nan))
            labels = timesteps.to(device)
            epsilon = self.implied_noise(latents, x0.detach(), labels)
        # Clone out of inference mode so callers can feed the results to a graph that needs grad.
        return InversionOutput(
            latents=latents.clone(),
            epsilon=epsilon.clone(),
            timesteps=labels.clone(),
            reached_timesteps=reached.clone(),
            num_steps=steps.clone(),
            num_model_evaluations=evaluations,
            renoise_residual=residual.clone(),
        )
