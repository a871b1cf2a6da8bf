"""Diffusion processes, the denoiser contract, training losses, the Gaussian-mixture oracle
and exact likelihoods (see ../shared/DESIGN.md, principle 2)."""

from pipeline.diffusion.gmm import GaussianMixture
from pipeline.diffusion.parameterization import Denoiser, eps_from_denoised, score_from_denoised, v_from_denoised
from pipeline.diffusion.schedules import DDPM, NCSN, VE, VP, SubVP

__all__ = ["DDPM", "VP", "SubVP", "VE", "NCSN", "Denoiser", "GaussianMixture",
           "eps_from_denoised", "score_from_denoised", "v_from_denoised"]
