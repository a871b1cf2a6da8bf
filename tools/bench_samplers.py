"""Error against an exact Gaussian mixture vs number of network evaluations, for every sampler.

The "network" is the mixture's exact eps-predictor under the linear DDPM schedule (T = 1000), so
the only error left is the sampler's (plus the finite-sample floor of the metric). Every method of
``pipeline.sampling.METHODS`` runs through the eps -> D wrapper from the same initial noise, and
diffusers' DDIMScheduler runs on the same eps-network in the same process as the baseline.
Error: squared MMD to the mixture with a Gaussian kernel, its mixture terms in closed form
(``GaussianMixture.mmd``, relative to E_pp k), so only the samples' own noise remains; "floor" is
the largest |MMD^2| of fresh mixture sample sets of the same size.

    .venv/bin/python tools/bench_samplers.py --dims 2 16 --samples 10000 --sigma-max 40
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.diffusion import DDPM, Denoiser
from pipeline.diffusion.gmm import GaussianMixture
from pipeline.sampling import ddpm_sigmas, ddpm_timesteps, karras_sigmas, logsnr_sigmas, sample

# (method, grid, budgets, options). Grids: "ddpm" = DDIM's uniform timestep subset of the
# training schedule (sigma from 0.01 up to ~157 at t = 999), as diffusers uses it; "logsnr" =
# uniform in log sigma and "karras" = EDM eq. 5 with rho = 7, both from --sigma-max (default 40,
# 20x the mixture's spread) down to the schedule's t = 0 level 0.01. rk45's budgets are tolerances.
PLAN = [
    ("ddim", "ddpm", (10, 20, 50, 100, 200), {}),
    ("euler", "logsnr", (10, 20, 50, 100), {}),
    ("heun", "logsnr", (5, 8, 10, 13, 25, 50), {}),
    ("heun", "karras", (8, 10, 13, 25, 50), {}),
    ("dpmpp_2m", "logsnr", (8, 10, 12, 15, 20, 30, 50), {}),
    ("dpmpp_2m", "karras", (10, 15, 20, 30, 50), {}),
    ("dpmpp_3m_sde", "logsnr", (8, 10, 12, 15, 20, 30, 50), {"eta": 0.0}),
    ("dpmpp_3m_sde", "logsnr", (10, 15, 20, 30, 50, 100), {}),
    ("rk45", "logsnr", (1e-2, 1e-3, 1e-4), {}),
    ("ddpm", "ddpm", (20, 50, 100, 200, 1000), {}),
    ("ddim", "ddpm", (20, 50, 100), {"eta": 1.0}),
    ("euler_maruyama", "logsnr", (20, 50, 100, 200, 500), {}),
    ("pc", "logsnr", (10, 25, 50, 100, 250), {}),
    ("langevin", "logsnr", (10, 20, 40), {"steps_per_level": 10, "step_ratio": 0.2}),
]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def eps_network(gmm: GaussianMixture, process: DDPM):
    """eps_theta(x_t, t) of the mixture under ``process``: (x - D(x, sigma_t)) / sigma_t at x = x_t / alpha_t."""

    def net(x_t, t):
        t = torch.as_tensor(t).reshape(-1).expand(x_t.shape[0])
        sigma = process.sigma_ve(t).to(x_t.dtype)[:, None]
        x = x_t * (1 + sigma**2).sqrt()
        return (x - gmm.denoiser(x, sigma)) / sigma

    return net


def diffusers_ddim(eps_net, latents: torch.Tensor, steps: int) -> torch.Tensor:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    x = latents
    for t in scheduler.timesteps:
        x = scheduler.step(eps_net(x, t), t, x, eta=0.0).prev_sample
    return x


def run(dim: int, components: int, n: int, seed: int, bandwidth: float, sigma_max: float) -> tuple[list[tuple], float]:
    gmm = GaussianMixture.random(dim=dim, components=components, generator=_g(seed))
    process = DDPM.linear()
    eps_net = eps_network(gmm, process)
    denoiser = Denoiser(eps_net, process, prediction="eps")
    floor = max(abs(gmm.mmd(gmm.sample(n, _g(seed + 10 + i)), bandwidth)) for i in range(3))
    latents = torch.randn(n, dim, generator=_g(seed + 3), dtype=torch.float64)  # x_T ~ N(0, I), VP frame
    sigma_min = float(process.sigma_table[0])

    def error(x):
        return gmm.mmd(x, bandwidth)

    rows = []
    for steps in (10, 20, 50, 100):
        start = time.perf_counter()
        err = error(diffusers_ddim(eps_net, latents, steps))
        rows.append(("diffusers DDIMScheduler (ddpm)", steps, steps, err, time.perf_counter() - start))
    for method, grid, budgets, options in PLAN:
        label = method + "".join(f" {k}={v:g}" for k, v in options.items()) + f" ({grid})"
        for budget in budgets:
            opts = options
            if method == "rk45":
                sigmas, opts = logsnr_sigmas(sigma_min, sigma_max, 2), {**options, "rtol": budget, "atol": budget}
            elif grid == "ddpm":
                sigmas = ddpm_sigmas(process, ddpm_timesteps(process.T, budget))
            elif grid == "karras":
                sigmas = karras_sigmas(sigma_min, sigma_max, budget)
            else:
                sigmas = logsnr_sigmas(sigma_min, sigma_max, budget)
            noise = latents * (1 + sigmas[0] ** 2).sqrt()  # VE frame: x = x_T / alpha_T
            info = {}
            start = time.perf_counter()
            x = sample(denoiser, noise, sigmas, method=method, generator=_g(seed + 4), info=info, **opts)
            rows.append((label, budget, info["nfe"], error(x), time.perf_counter() - start))
    return rows, floor


def report(dim: int, rows: list[tuple], floor: float) -> str:
    ddim100, ddim50 = (next(r[3] for r in rows if r[0].startswith("diffusers") and r[1] == n) for n in (100, 50))
    lines = [f"### {dim}-D mixture: MMD^2 x 1e3 (floor {1e3 * floor:.2f}; diffusers DDIM@100 {1e3 * ddim100:.2f}, "
             f"@50 {1e3 * ddim50:.2f})", "",
             "| method (grid) | steps or tol | NFE | MMD^2 x 1e3 | <= DDIM@100 | <= DDIM@50 | s |", "|---|---|---|---|---|---|---|"]
    for label, budget, nfe, err, secs in rows:
        marks = " | ".join("yes" if err <= ref else "" for ref in (ddim100, ddim50))
        lines.append(f"| {label} | {budget:g} | {nfe} | {1e3 * err:.2f} | {marks} | {secs:.2f} |")
    best = {}
    for label, _, nfe, err, _ in rows:
        if err <= ddim100 and (label not in best or nfe < best[label]):
            best[label] = nfe
    lines += ["", "Fewest NFE reaching diffusers' DDIM@100 error: "
              + ", ".join(f"{k} {v}" for k, v in sorted(best.items(), key=lambda kv: kv[1])), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--components", type=int, default=6)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--bandwidth", type=float, default=0.3)
    parser.add_argument("--sigma-max", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for dim in args.dims:
        rows, floor = run(dim, args.components, args.samples, args.seed, args.bandwidth, args.sigma_max)
        print(report(dim, rows, floor), flush=True)


if __name__ == "__main__":
    main()
