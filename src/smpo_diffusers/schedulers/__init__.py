from .scheduling_inversion import INVERSION_GRIDS, InversionOutput, InversionScheduler, ddim_inverse_step

__all__ = ["INVERSION_GRIDS", "InversionOutput", "InversionScheduler", "ddim_inverse_step"]
