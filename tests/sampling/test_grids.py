"""Sigma grids: the formulas they cite, and the timesteps diffusers picks."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.diffusion import DDPM
from pipeline.sampling import ddpm_sigmas, ddpm_timesteps, karras_sigmas, logsnr_sigmas


def _valid(grid):
    return grid.dtype == torch.float64 and grid[-1] == 0 and bool((grid[:-1] > grid[1:]).all())


def test_karras_grid_has_its_ends_and_uniform_spacing_in_sigma_to_the_one_over_rho():
    grid = karras_sigmas(0.002, 80.0, 18, rho=7.0)
    assert _valid(grid) and len(grid) == 19
    assert math.isclose(float(grid[0]), 80.0) and math.isclose(float(grid[-2]), 0.002)
    steps = grid[:-1] ** (1 / 7)
    assert torch.allclose(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(17))


def test_logsnr_grid_is_uniform_in_log_sigma():
    grid = logsnr_sigmas(0.01, 50.0, 10)
    assert _valid(grid)
    logs = grid[:-1].log()
    assert torch.allclose(logs[1:] - logs[:-1], torch.full((9,), (math.log(0.01) - math.log(50.0)) / 9, dtype=torch.float64))


def test_ddpm_timesteps_uniform_and_quadratic():
    assert ddpm_timesteps(1000, 10).tolist() == list(range(900, -1, -100))
    quad = ddpm_timesteps(1000, 10, "quadratic")
    assert quad[-1] == 0 and quad[0] == int(0.8 * 1000) and bool((quad[:-1] > quad[1:]).all())
    gaps = (quad[:-1] - quad[1:]).flip(0)
    assert bool((gaps[1:] >= gaps[:-1]).all())  # spacing grows with t
    with pytest.raises(ValueError):
        ddpm_timesteps(1000, 10, "cubic")
    with pytest.raises(ValueError):
        ddpm_timesteps(10, 11)


def test_ddpm_sigmas_are_the_processes_ve_levels():
    process = DDPM.linear()
    t = ddpm_timesteps(1000, 50)
    grid = ddpm_sigmas(process, t)
    assert _valid(grid)
    abar = process.alphas_cumprod[t]
    torch.testing.assert_close(grid[:-1], ((1 - abar) / abar).sqrt())


def test_uniform_spacing_matches_diffusers_leading_timesteps():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, steps_offset=0, timestep_spacing="leading")
    for n in (10, 25, 50, 100):
        scheduler.set_timesteps(n)
        assert ddpm_timesteps(1000, n).tolist() == scheduler.timesteps.tolist()
