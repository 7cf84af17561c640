"""SmPO-Diffusion for Diffusers: smoothed preference optimisation with ReNoise inversion."""

__version__ = "0.1.0.dev0"

from .losses import SmPOLossOutput, dpo_loss, preference_probability, smpo_loss
from .schedulers import InversionOutput, InversionScheduler

__all__ = [
    "InversionOutput",
    "InversionScheduler",
    "SmPOLossOutput",
    "dpo_loss",
    "preference_probability",
    "smpo_loss",
]
