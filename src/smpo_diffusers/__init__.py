"""SmPO-Diffusion for Diffusers: smoothed preference optimisation with ReNoise inversion."""

__version__ = "0.1.0.dev0"

from .config import SmPOConfig
from .losses import SmPOLossOutput, dpo_loss, per_sample_mse, preference_probability, smpo_loss
from .schedulers import InversionOutput, InversionScheduler

__all__ = [
    "InversionOutput",
    "InversionScheduler",
    "SmPOConfig",
    "SmPOLossOutput",
    "SmPOTrainer",
    "dpo_loss",
    "per_sample_mse",
    "preference_probability",
    "smpo_loss",
]


def __getattr__(name):
    # The trainer pulls in accelerate/peft; import it on first use so `import smpo_diffusers` stays light.
    if name == "SmPOTrainer":
        from .trainer import SmPOTrainer

        return SmPOTrainer
    raise AttributeError(f"module 'smpo_diffusers' has no attribute {name!r}")
