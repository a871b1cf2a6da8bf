"""eps / x0 / v / score networks under every process -> the one denoiser D, and back."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import DDPM, NCSN, VE, VP, Denoiser, GaussianMixture, SubVP
from pipeline.diffusion.parameterization import eps_from_denoised, score_from_denoised, v_from_denoised

GMM = GaussianMixture.random(dim=3, components=3, generator=torch.Generator().manual_seed(0))
PROCESSES = {"ddpm": DDPM.linear(), "ddpm_cosine": DDPM.cosine(), "vp": VP(), "subvp": SubVP(), "ve": VE(), "ncsn": NCSN(levels=50)}


def _oracle_network(process, prediction):
    """What a perfectly trained network outputs, written from the definitions in the x_t frame:
    x_t = alpha x_0 + s eps, v = alpha eps - s x_0, score = grad_{x_t} log p_t = -E[eps | x_t] / s."""

    def net(x_t, time):
        sigma = process.sigma_ve(time)[:, None]
        alpha, s = process.marginal(time)
        alpha, s = alpha[:, None], s[:, None]
        x0 = GMM.denoiser(x_t / alpha, sigma)
        eps = (x_t - alpha * x0) / s
        return {"eps": eps, "x0": x0, "v": alpha * eps - s * x0, "score": -eps / s}[prediction]

    return net


def _levels(process):
    if isinstance(process, DDPM):
        return process.sigma_table[torch.tensor([0, 3, 100, 500, 999])]
    if isinstance(process, NCSN):
        return process.levels[torch.tensor([0, 10, 49])]
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
    t = process.t_of_sigma(sigma).reshape(1).expand(16)
    d = GMM.denoiser(x, sigma)
    alpha = process.input_scale(sigma)
    torch.testing.assert_close(score_from_denoised(x, sigma, d), GMM.score(x, sigma))
    for prediction, back in (("eps", eps_from_denoised(x, sigma, d)), ("v", v_from_denoised(x, sigma, d, alpha))):
        torch.testing.assert_close(back, _oracle_network(process, prediction)(alpha * x, t))


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="prediction"):
        Denoiser(lambda x, t: x, VP(), "noise")
