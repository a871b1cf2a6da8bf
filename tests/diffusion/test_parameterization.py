"""eps / x0 / v / score networks under every process -> the one denoiser D, and back."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import DDPM, NCSN, VE, VP, Denoiser, GaussianMixture, SubVP
from pipeline.diffusion.parameterization import eps_from_denoised, score_from_denoised, v_from_denoised
from tests.diffusion.oracle import process_time

GMM = GaussianMixture.random(dim=3, components=3, generator=torch.Generator().manual_seed(0))
PROCESSES = {
    "ddpm": DDPM.linear(),
    "ddpm_cosine": DDPM.cosine(),
    "vp": VP(),
    "subvp": SubVP(),
    "ve": VE(),
    "ncsn": NCSN(levels=50),
}


def _oracle_network(process, prediction):
    """What a perfectly trained network outputs, written from the definitions in the x_t frame:
    x_t = alpha x_0 + s eps, v = alpha eps - s x_0, score = grad_{x_t} log p_t = -E[eps | x_t] / s,
    output scaled by the marginal std: s * score = -E[eps | x_t] (score_sde's convention)."""

    def net(x_t, time):
        time = process_time(process, time)
        sigma = process.sigma_ve(time)[:, None]
        alpha, s = process.marginal(time)
        alpha, s = alpha[:, None], s[:, None]
        x0 = GMM.denoiser(x_t / alpha, sigma)
        eps = (x_t - alpha * x0) / s
        return {"eps": eps, "x0": x0, "v": alpha * eps - s * x0, "score": -eps}[prediction]

    return net


def _levels(process):
    if isinstance(process, (DDPM, NCSN)):  # discrete: the trained indices
        return process.sigma_ve(torch.tensor([0, 3, 10, process.t_max]))
    return process.sigma_ve(torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_wrapper_turns_every_prediction_into_the_same_denoiser(name, prediction):
    process = PROCESSES[name]
    denoiser = Denoiser(_oracle_network(process, prediction), process, prediction)
    for sigma in _levels(process):
        x = GMM.sample(16, torch.Generator().manual_seed(1), sigma=float(sigma))
        torch.testing.assert_close(denoiser(x, sigma), GMM.denoiser(x, sigma), rtol=1e-8, atol=1e-8)


def test_back_from_the_denoiser_to_eps_score_and_v():
    process = VP()
    x = GMM.sample(16, torch.Generator().manual_seed(2), sigma=0.8)
    sigma = torch.tensor(0.8, dtype=torch.float64)
    t = process.network_time(sigma).reshape(1).expand(16)
    d = GMM.denoiser(x, sigma)
    alpha = process.input_scale(sigma)
    torch.testing.assert_close(score_from_denoised(x, sigma, d), GMM.score(x, sigma))
    for prediction, back in (("eps", eps_from_denoised(x, sigma, d)), ("v", v_from_denoised(x, sigma, d, alpha))):
        torch.testing.assert_close(back, _oracle_network(process, prediction)(alpha * x, t))


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="prediction"):
        Denoiser(lambda x, t: x, VP(), "noise")
