"""Samplers against the exact denoiser of a Gaussian mixture, and their contract.

Convergence thresholds come from the finite-sample floor: the sliced W1 between two fresh
mixture sample sets of the same size (mean + 3 std over repeats, ``sliced_wasserstein_floor``).
A sampler that is exact up to its discretisation lands in that band once its budget is large
enough, and its coarse budget must sit clearly above it (so the test would notice a sampler that does nothing)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from pipeline.diffusion.gmm import GaussianMixture, sliced_wasserstein, sliced_wasserstein_floor
from pipeline.sampling import METHODS, SOLVERS, karras_sigmas, logsnr_sigmas, sample
from pipeline.sampling.sde import _langevin_step, _predict, _reverse_diffusion_coefs

N = 2000
SIGMA_MAX = 80.0


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gmm() -> GaussianMixture:
    return GaussianMixture.random(dim=2, components=3, generator=_g(0))


@pytest.fixture(scope="module")
def floor(gmm) -> float:
    return sliced_wasserstein_floor(gmm, N)


def _error(gmm, method: str, sigmas, **options) -> float:
    noise = SIGMA_MAX * torch.randn(N, 2, generator=_g(2), dtype=torch.float64)
    x = sample(gmm.denoiser, noise, sigmas, method=method, generator=_g(3), **options)
    return sliced_wasserstein(x, gmm.sample(N, _g(1)), generator=_g(7))


def _grid(n: int, sigma_min: float = 0.002):
    return karras_sigmas(sigma_min, SIGMA_MAX, n)


# (coarse budget, fine budget) per method: grid sizes, plus options.
BUDGETS = {
    "ddpm": ((10, {}), (200, {})),
    "ddim": ((10, {"eta": 0.5}), (200, {"eta": 0.5})),
    "euler": ((10, {}), (200, {})),
    "heun": ((5, {}), (25, {})),
    "rk45": ((2, {"rtol": 1e-1, "atol": 1e-1}), (2, {"rtol": 1e-5, "atol": 1e-5})),
    "euler_maruyama": ((10, {}), (200, {})),
    "pc": ((10, {}), (100, {})),
    "langevin": ((10, {"steps_per_level": 10, "step_ratio": 0.2}), (20, {"steps_per_level": 20, "step_ratio": 0.2})),
    "dpmpp_2m": ((5, {}), (25, {})),
    "dpmpp_3m_sde": ((10, {}), (50, {})),
    "unipc": ((4, {}), (25, {})),
    "ipndm": ((4, {}), (25, {})),
}


def test_every_method_has_a_budget():
    assert set(BUDGETS) == set(METHODS) == set(SOLVERS)


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_the_registry_declares_each_solvers_options(method):
    entry = SOLVERS[method]
    assert METHODS[method] is entry.solver
    parameters = inspect.signature(entry.solver).parameters
    declared = set(entry.options) | ({"info"} if entry.reports else set())
    assert set(parameters) - {"denoiser", "x", "sigmas", "generator"} == declared
    if entry.noise_option is not None:
        assert entry.noise_option in entry.options
        assert entry.is_stochastic() == bool(parameters[entry.noise_option].default)


def test_sample_refuses_an_option_the_method_does_not_take(gmm):
    with pytest.raises(ValueError, match="takes the options"):
        sample(gmm.denoiser, torch.ones(2, 2, dtype=torch.float64), _grid(3), "euler", eta=0.5)


def test_sampling_never_imports_diffusion():
    # The layering: pipeline.diffusion may use pipeline.sampling, never the other way round.
    for path in (Path(__file__).resolve().parents[2] / "pipeline/sampling").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.startswith("pipeline.diffusion") for n in names), path.name


@pytest.mark.parametrize("method", sorted(BUDGETS))
def test_converges_to_the_mixture(gmm, floor, method):
    (n_coarse, coarse), (n_fine, fine) = BUDGETS[method]
    sigma_min = 0.01 if method == "langevin" else 0.002
    err_fine = _error(gmm, method, _grid(n_fine, sigma_min), **fine)
    err_coarse = _error(gmm, method, _grid(n_coarse, sigma_min), **coarse)
    assert err_fine <= floor, f"{method}: {err_fine:.4f} above the finite-sample band {floor:.4f}"
    assert err_coarse > err_fine and err_coarse > floor, f"{method}: coarse {err_coarse:.4f} vs fine {err_fine:.4f}"


def test_ddim_eta0_is_euler_and_eta1_is_ddpm_posterior(gmm):
    noise = SIGMA_MAX * torch.randn(64, 2, generator=_g(4), dtype=torch.float64)
    sigmas = _grid(12)
    assert torch.equal(
        sample(gmm.denoiser, noise, sigmas, "ddim", eta=0.0), sample(gmm.denoiser, noise, sigmas, "euler")
    )
    a = sample(gmm.denoiser, noise, sigmas, "ddim", generator=_g(5), eta=1.0)
    b = sample(gmm.denoiser, noise, sigmas, "ddpm", generator=_g(5), variance="posterior")
    assert torch.equal(a, b)


def test_euler_matches_an_independent_pf_ode_euler_in_the_vp_frame(gmm):
    # DDIM eta=0 in x_t = x / sqrt(1 + sigma^2) coordinates (DDIM eq. 13 with eps from D).
    noise = SIGMA_MAX * torch.randn(64, 2, generator=_g(4), dtype=torch.float64)
    sigmas = _grid(12)
    x_t = noise / (1 + sigmas[0] ** 2).sqrt()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        a, a_next = (1 + s**2).rsqrt(), (1 + s_next**2).rsqrt()
        x0 = gmm.denoiser(x_t / a, s)
        eps = (x_t / a - x0) / s
        x_t = a_next * x0 + (1 - a_next**2).sqrt() * eps
    torch.testing.assert_close(sample(gmm.denoiser, noise, sigmas, "euler"), x_t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_deterministic_for_a_generator_and_leaves_inputs_alone(gmm, method):
    noise = SIGMA_MAX * torch.randn(32, 2, generator=_g(6), dtype=torch.float64)
    sigmas = _grid(6)
    noise_copy, sigmas_copy = noise.clone(), sigmas.clone()
    a = sample(gmm.denoiser, noise, sigmas, method, generator=_g(8))
    b = sample(gmm.denoiser, noise, sigmas, method, generator=_g(8))
    assert torch.equal(a, b)
    assert torch.equal(noise, noise_copy) and torch.equal(sigmas, sigmas_copy)
    c = sample(gmm.denoiser, noise, sigmas, method, generator=_g(9))
    assert (not torch.equal(a, c)) == SOLVERS[method].is_stochastic()


STOCHASTIC_OPTIONS = {"ddim": {"eta": 1.0}, "heun": {"churn": 10.0}}


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_a_sample_does_not_depend_on_its_batch(gmm, method):
    # Per-sample generators: sample 2 of a batch of 4 equals sample 2 rendered alone (PC's
    # corrector step once used norms averaged over the batch, F5). Methods whose noise is an
    # option run with it on.
    assert SOLVERS[method].batch_independent
    options = STOCHASTIC_OPTIONS.get(method, {})
    noise = SIGMA_MAX * torch.randn(4, 2, generator=_g(6), dtype=torch.float64)
    sigmas = _grid(6)
    batch = sample(gmm.denoiser, noise, sigmas, method, generator=[_g(20 + i) for i in range(4)], **options)
    alone = sample(gmm.denoiser, noise[2:3], sigmas, method, generator=[_g(22)], **options)
    torch.testing.assert_close(batch[2:3], alone, rtol=1e-10, atol=1e-10)
    assert SOLVERS[method].is_stochastic(**options) == (
        not torch.equal(
            batch[0],
            sample(gmm.denoiser, noise, sigmas, method, generator=[_g(30 + i) for i in range(4)], **options)[0],
        )
    )


def test_pc_is_a_predictor_step_then_corrector_steps(gmm):
    # Song et al. 2021, Algorithm 2: predictor sigma_i -> sigma_{i-1}, then Langevin at sigma_{i-1}
    # with Algorithm 4's step at the noise-dominated norms, 2 (snr sigma)^2.
    noise = SIGMA_MAX * torch.randn(16, 2, generator=_g(4), dtype=torch.float64)
    sigmas = torch.tensor([SIGMA_MAX, 1.0, 0.0], dtype=torch.float64)
    generator = _g(11)
    x = _predict(gmm.denoiser, noise, sigmas[0], sigmas[1], _reverse_diffusion_coefs, generator)
    for _ in range(2):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = _langevin_step(x, gmm.denoiser(x, sigmas[1]), sigmas[1], 2 * (0.16 * sigmas[1]) ** 2, z)
    expected = gmm.denoiser(x, sigmas[1])
    torch.testing.assert_close(sample(gmm.denoiser, noise, sigmas, "pc", generator=_g(11), corrector_steps=2), expected)


def test_langevin_defaults_reach_the_noise_floor_within_2000_evaluations(gmm):
    # F9: Song & Ermon's defaults (100 steps per level, eps = 2e-5 at sigma_L = 0.01) on 19
    # geometric levels, 1,901 evaluations, land within 1.2x the mean distance between two fresh
    # mixture sample sets (the former defaults, 10 steps at ratio 0.05, ended 25x above it).
    info = {}
    noise = SIGMA_MAX * torch.randn(N, 2, generator=_g(2), dtype=torch.float64)
    x = sample(gmm.denoiser, noise, logsnr_sigmas(0.01, SIGMA_MAX, 19), "langevin", generator=_g(3), info=info)
    err = sliced_wasserstein(x, gmm.sample(N, _g(1)), generator=_g(7))
    fresh = [
        sliced_wasserstein(gmm.sample(N, _g(100 + 2 * i)), gmm.sample(N, _g(101 + 2 * i)), generator=_g(100))
        for i in range(8)
    ]
    assert info["nfe"] <= 2000 and err <= 1.2 * sum(fresh) / len(fresh), err


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_math_runs_in_the_noise_dtype(gmm, method, dtype):
    seen = set()

    def denoiser(x, sigma):
        seen.update({x.dtype, sigma.dtype})
        return gmm.denoiser(x, sigma)

    noise = SIGMA_MAX * torch.randn(8, 2, generator=_g(6), dtype=dtype)
    out = sample(denoiser, noise, _grid(4), method, generator=_g(8))
    assert out.dtype == dtype and seen == {dtype}


def test_rk45_reports_nfe_and_tightens_with_tolerance(gmm):
    noise = SIGMA_MAX * torch.randn(64, 2, generator=_g(4), dtype=torch.float64)
    sigmas = _grid(2)
    ref = sample(gmm.denoiser, noise, sigmas, "rk45", rtol=1e-9, atol=1e-9)
    errors, nfes = [], []
    for tol in (1e-3, 1e-6):
        info = {}
        x = sample(gmm.denoiser, noise, sigmas, "rk45", info=info, rtol=tol, atol=tol)
        errors.append(float((x - ref).abs().max()))
        nfes.append(info["nfe"])
        assert info["nfe"] == 1 + 6 * info["steps"] + 1  # first evaluation, 6 per step (FSAL), final D
    assert errors[1] < errors[0] / 100 and nfes[1] > nfes[0]


def test_rk45_result_does_not_depend_on_the_rest_of_the_batch(gmm):
    noise = SIGMA_MAX * torch.randn(16, 2, generator=_g(4), dtype=torch.float64)
    sigmas = _grid(2)
    whole = sample(gmm.denoiser, noise, sigmas, "rk45")
    alone = sample(gmm.denoiser, noise[3:4], sigmas, "rk45")
    torch.testing.assert_close(whole[3:4], alone, rtol=1e-12, atol=1e-12)


def test_heun_churn_is_stochastic_and_zero_churn_is_algorithm_1(gmm):
    noise = SIGMA_MAX * torch.randn(64, 2, generator=_g(4), dtype=torch.float64)
    sigmas = _grid(10)
    plain = sample(gmm.denoiser, noise, sigmas, "heun")
    assert torch.equal(plain, sample(gmm.denoiser, noise, sigmas, "heun", generator=_g(1), churn=0.0))
    churned = sample(gmm.denoiser, noise, sigmas, "heun", generator=_g(1), churn=10.0, churn_min=0.05, churn_max=50)
    assert not torch.equal(plain, churned)


def test_nfe_counts(gmm):
    noise = SIGMA_MAX * torch.randn(4, 2, generator=_g(4), dtype=torch.float64)
    sigmas = _grid(10)  # 10 levels + 0 -> 10 steps
    expected = {
        "ddpm": 10,
        "ddim": 10,
        "euler": 10,
        "heun": 19,
        "euler_maruyama": 10,
        "pc": 10 + 9,
        "langevin": 10 * 100 + 1,
        "dpmpp_2m": 10,
        "dpmpp_3m_sde": 10,
    }
    for method, nfe in expected.items():
        info = {}
        sample(gmm.denoiser, noise, sigmas, method, generator=_g(1), info=info)
        assert info["nfe"] == nfe, method


def test_rejects_bad_grids_and_names(gmm):
    noise = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="end at 0"):
        sample(gmm.denoiser, noise, torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="descending"):
        sample(gmm.denoiser, noise, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample(gmm.denoiser, noise, torch.tensor([1.0, 0.0]), method="nope")
