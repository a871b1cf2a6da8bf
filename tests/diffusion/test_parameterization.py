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
    """What a perfectly trained network outputs, written from the definitions at its input
    x_t = alpha x_0 + s eps (alpha = input_scale: alpha_t, or EDM's c_in for VE/NCSN; s = alpha sigma),
    v = alpha eps - s x_0, and the score output scaled by the marginal std: -E[eps | x_t]
    (score_sde's convention)."""

    def net(x_t, time):
        time = process_time(process, time)
        sigma = process.sigma_ve(time)[:, None]
        alpha = process.input_scale(sigma)
        s = alpha * sigma
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


@pytest.mark.parametrize("process", [VE(), NCSN(levels=50)], ids=["ve", "ncsn"])
def test_ve_v_prediction_is_edm_preconditioning(process):
    # Karras et al. 2022, eq. 7 and Table 1 with sigma_data = 1: D = c_skip x + c_out F(c_in x),
    # c_skip = 1 / (1 + sigma^2), c_out = sigma / sqrt(1 + sigma^2), c_in = 1 / sqrt(1 + sigma^2);
    # F = -v. The network sees unit-variance input at every sigma, up to sigma_max = 50.
    net = lambda x, t: torch.sin(3 * x) + t[:, None] / 1000  # noqa: E731
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for sigma in _levels(process):
        c_in = (1 + sigma**2).rsqrt()
        edm = x / (1 + sigma**2) + sigma * c_in * -net(c_in * x, process.network_time(sigma).expand(8))
        torch.testing.assert_close(Denoiser(net, process, "v")(x, sigma), edm)
        noisy = GMM.sample(4096, torch.Generator().manual_seed(4), sigma=float(sigma))
        assert abs(float((c_in * noisy).std()) - 1) < 0.25  # the GMM is not unit variance; bounded


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="prediction"):
        Denoiser(lambda x, t: x, VP(), "noise")
