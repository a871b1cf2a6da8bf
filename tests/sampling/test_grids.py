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
    assert torch.allclose(
        logs[1:] - logs[:-1], torch.full((9,), (math.log(0.01) - math.log(50.0)) / 9, dtype=torch.float64)
    )


def test_ddpm_timesteps_leading_trailing_linspace_and_quadratic():
    assert ddpm_timesteps(1000, 10).tolist() == list(range(900, -1, -100))
    assert ddpm_timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    assert ddpm_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
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


@pytest.mark.parametrize("n", [30, 50, 100, 500, 801])
def test_quadratic_spacing_stays_distinct_at_many_steps(n):
    # F6: floor((i sqrt(0.8 T) / (n - 1))^2) repeats small timesteps from n = 30 at T = 1000.
    quad = ddpm_timesteps(1000, n, "quadratic")
    assert len(quad) == n and quad[0] == 800 and quad[-1] == 0 and bool((quad[:-1] > quad[1:]).all())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T", [100, 1000])
def test_spacings_match_diffusers_timestep_spacing(spacing, T):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, steps_offset=0, timestep_spacing=spacing)
    compared = 0
    for n in range(1, T + 1, 1 if T == 100 else 7):
        scheduler.set_timesteps(n)
        if len(scheduler.timesteps) != n:  # diffusers' "trailing" np.arange can overshoot by one step (t = -1)
            continue
        assert ddpm_timesteps(T, n, spacing).tolist() == scheduler.timesteps.tolist(), n
        compared += 1
    assert compared > 0.9 * len(range(1, T + 1, 1 if T == 100 else 7))


def test_the_default_process_grid_starts_at_the_largest_noise_level():
    # F6: "leading" 10 steps of the cosine schedule start at t = 900 (sigma 6.4), not at T - 1.
    process = DDPM.cosine()
    assert process.sigmas(10)[0] == process.sigma_ve(process.T - 1)
    assert float(ddpm_sigmas(process, ddpm_timesteps(1000, 10, "leading"))[0]) < 7
