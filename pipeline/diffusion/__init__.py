"""Diffusion processes, the denoiser contract, training losses, the Gaussian-mixture oracle
and exact likelihoods (see ../shared/DESIGN.md, principle 2).

Layering: this package may import ``pipeline.sampling`` (its grids, solvers and the VE-frame
helpers of ``pipeline.sampling.frame``); ``pipeline.sampling`` never imports this package.
Code that needs a process relies on :class:`~pipeline.diffusion.process.Process`, not on a class.
"""

from pipeline.diffusion.gmm import GaussianMixture
from pipeline.diffusion.parameterization import Denoiser, eps_from_denoised, score_from_denoised, v_from_denoised
from pipeline.diffusion.process import Process
from pipeline.diffusion.schedules import DDPM, NCSN, VE, VP, SubVP

__all__ = [
    "DDPM",
    "NCSN",
    "VE",
    "VP",
    "Denoiser",
    "GaussianMixture",
    "Process",
    "SubVP",
    "eps_from_denoised",
    "score_from_denoised",
    "v_from_denoised",
]
