"""The SmPO objective as pure tensor functions.

Conventions (README.md, "The method in one screen", has the derivation in brief):

* Every per-image error is the mean squared error between a UNet's prediction and its regression
  target, averaged over the latent elements of one image: a tensor of shape ``(B,)`` for ``B`` pairs.
  Lower is better (higher likelihood).
* ``margin = (policy_err_w - policy_err_l) - (ref_err_w - ref_err_l)``: negative when the policy
  improved the preferred image relative to the reference more than the rejected one.
* The loss follows diffusers' SDXL Diffusion-DPO convention ``-log σ(-0.5 · β · margin)`` and SmPO
  multiplies the logit by the smoothed-preference weight ``γ · (2p - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["SmPOLossOutput", "dpo_loss", "per_sample_mse", "preference_probability", "preference_weight", "smpo_loss"]


def preference_probability(reward_w, reward_l, scale):
    """Probability that the first image is preferred, ``σ((reward_w - reward_l) / scale)``.

    Element-wise over any broadcastable shapes (tensors or Python floats). ``scale`` is the reward
    normalising scale ``s`` (e.g. ``r_max - r_min`` of the labelled rewards) and must be positive.
    """
    if not torch.is_tensor(reward_w):
        reward_w = torch.as_tensor(reward_w, dtype=torch.float32)
    if not torch.is_tensor(reward_l):
        reward_l = torch.as_tensor(reward_l, dtype=torch.float32, device=reward_w.device)
    scale_values = scale.double() if torch.is_tensor(scale) else torch.tensor(float(scale), dtype=torch.float64)
    if not bool(torch.isfinite(scale_values).all() and (scale_values > 0).all()):
        raise ValueError(f"reward scale must be positive and finite, got {scale!r}")
    return torch.sigmoid((reward_w - reward_l) / scale)


def preference_weight(prob_w: torch.Tensor, gamma: float) -> torch.Tensor:
    """The smoothed-preference weight ``γ · (2p - 1)`` that multiplies the DPO logit, shape of ``prob_w``."""
    return gamma * (2.0 * prob_w - 1.0)


@dataclass
class SmPOLossOutput:
    """Result of :func:`smpo_loss`.

    ``loss`` is the scalar mean over pairs; every other field has shape ``(B,)`` and is detached.
    """

    loss: torch.Tensor
    implicit_accuracy: torch.Tensor
    """1.0 where the policy ranks the pair like the label (``weight · margin < 0``), 0.5 for exact ties."""
    reward_margin: torch.Tensor
    """``-0.5 · β · margin``: the implicit reward of the preferred image minus the rejected one."""
    weight: torch.Tensor
    """``γ · (2p - 1)``."""
    margin: torch.Tensor
    """``(policy_err_w - policy_err_l) - (ref_err_w - ref_err_l)``."""


def smpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    prob_w: torch.Tensor | float,
    beta: float,
    gamma: float = 10.0,
) -> SmPOLossOutput:
    """SmPO loss ``mean(-log σ(-0.5 · β · γ(2p-1) · margin))`` for a batch of ``B`` pairs.

    Args:
        policy_err_w, policy_err_l: ``(B,)`` per-image errors of the trained UNet (with grad).
        ref_err_w, ref_err_l: ``(B,)`` per-image errors of the frozen reference (no grad needed).
        prob_w: ``(B,)`` probability in [0, 1] that image ``w`` is preferred (``1`` = hard label), or a float.
        beta: the DPO temperature β ("beta_dpo"; thousands, since errors are element means).
        gamma: the smoothing scale γ; ``γ = 1`` with ``p = 1`` is exactly Diffusion-DPO.

    Computed in fp32 whatever the errors' dtype (fp64 if any of them is fp64).
    """
    shapes = {tuple(error.shape) for error in (policy_err_w, policy_err_l, ref_err_w, ref_err_l)}
    if len(shapes) != 1 or policy_err_w.ndim != 1:
        raise ValueError(f"the four per-pair errors must all have shape (B,), got shapes {sorted(shapes)}")
    if not torch.is_tensor(prob_w) or prob_w.device.type == "cpu":  # checked where it costs no device sync
        values = torch.as_tensor(prob_w, dtype=torch.float64)
        if not bool(((values >= 0) & (values <= 1)).all()):
            raise ValueError(f"prob_w must be probabilities in [0, 1], got {prob_w!r}")
    # at least fp32 arithmetic: γ(2p - 1) and β · margin lose the label in half precision
    dtype = torch.float32
    for error in (policy_err_w, policy_err_l, ref_err_w, ref_err_l):
        dtype = torch.promote_types(dtype, error.dtype)
    policy_err_w, policy_err_l, ref_err_w, ref_err_l = (
        error.to(dtype) for error in (policy_err_w, policy_err_l, ref_err_w, ref_err_l))
    prob_w = torch.as_tensor(prob_w, dtype=dtype, device=policy_err_w.device)
    if prob_w.ndim > 1 or prob_w.numel() not in (1, policy_err_w.numel()):
        raise ValueError(f"prob_w must be a float or have shape (B,) = {tuple(policy_err_w.shape)}, "
                         f"got {tuple(prob_w.shape)}")
    prob_w = prob_w.expand_as(policy_err_w)
    margin = (policy_err_w - policy_err_l) - (ref_err_w - ref_err_l)
    weight = preference_weight(prob_w, gamma)
    logits = -0.5 * beta * weight * margin
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        signed = (weight * margin).detach()
        accuracy = (signed < 0).to(margin.dtype) + 0.5 * (signed == 0).to(margin.dtype)
    return SmPOLossOutput(
        loss=loss,
        implicit_accuracy=accuracy,
        reward_margin=(-0.5 * beta * margin).detach(),
        weight=weight.detach(),
        margin=margin.detach(),
    )


def dpo_loss(policy_err_w, policy_err_l, ref_err_w, ref_err_l, beta: float) -> SmPOLossOutput:
    """Diffusion-DPO (hard labels): :func:`smpo_loss` with ``p = 1`` and ``γ = 1``."""
    return smpo_loss(policy_err_w, policy_err_l, ref_err_w, ref_err_l, 1.0, beta, gamma=1.0)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample over all its elements: ``(N, ...) -> (N,)``, computed in fp32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
