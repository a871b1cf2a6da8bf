"""The few-step frontier: error against an exact Gaussian mixture vs NFE, ours and the peers'.

One denoiser, one set of initial noises per seed, in one run: our solvers
(``pipeline.sampling``), k-diffusion's samplers (euler, heun, dpmpp_2m, dpmpp_3m_sde,
dpm_adaptive) and diffusers' schedulers (DDIM, DPMSolverMultistep, UniPCMultistep,
DEISMultistep), at every NFE budget. The "network" is the mixture's exact eps-predictor under
diffusers' linear DDPM schedule (T = 1000, float32 betas), so the only error left is the
sampler's (plus the samples' finite-sample noise). Our solvers and k-diffusion's run on the VE-frame
denoiser D = x - sigma eps (the eps -> D wrapper, ``pipeline.diffusion.Denoiser``), diffusers'
schedulers on the eps-network in the x_t frame (tools/peer_samplers.py); x_T is the same
standard normal draw for all (x_ve = x_T sqrt(1 + sigma_0^2)).

Error: squared MMD to the mixture (Gaussian kernel, bandwidth 0.3) with the mixture's terms in
closed form (``GaussianMixture.mmd``), so only the samples' own noise remains; x 1e3, median over
seeds (a seed = a fresh set of initial noises, and the noise of stochastic samplers). "floor" =
the median |MMD^2| of fresh mixture sample sets of the same size. At budget B a sampler's error
is its best run with NFE <= B (heun: 2n - 1 NFE for n levels; dpm_adaptive: several tolerances).

Grids for the VE-frame samplers: "logsnr" (uniform in log sigma) and "karras" (EDM eq. 5, rho 7),
from --sigma-max down to the schedule's t = 0 level (0.01), and "logsnr-20" (from sigma 20, a
shorter range that pays off at <= 8 NFE); k-diffusion runs on all three, Euler@50 is its better
grid, DDIM@100 diffusers' DDIMScheduler with its default spacing; diffusers' schedulers use their own
timestep grids (default spacing, and with ``use_karras_sigmas`` / ``use_exponential_sigmas``).

    python tools/bench_samplers.py --dims 2 --samples 2000 --seeds 3  # and --dims 16, in parallel
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from pipeline.diffusion import DDPM, Denoiser, GaussianMixture
from pipeline.diffusion.build import sampling_sigmas, sigma_range
from pipeline.sampling import ddpm_sigmas, karras_sigmas, logsnr_sigmas, sample
from tools.peer_samplers import diffusers_sample, diffusers_scheduler, eps_network, k_diffusion_sample

BUDGETS = (5, 8, 10, 15, 20, 50)
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32).double()  # diffusers' linear schedule

# (label, method, grid, options) of our solvers; dpmpp_3m_sde with eta = 0 is the 3M ODE solver.
OURS = (
    [
        ("euler", "euler", "logsnr", {}),
        ("heun", "heun", "karras", {}),
        ("dpmpp_2m", "dpmpp_2m", "logsnr", {}),
        ("dpmpp_2m", "dpmpp_2m", "logsnr-20", {}),
        ("dpmpp_3m eta=0", "dpmpp_3m_sde", "logsnr", {"eta": 0.0}),
        ("dpmpp_3m_sde", "dpmpp_3m_sde", "logsnr", {}),
        ("unipc order=2", "unipc", "logsnr", {"order": 2}),
        ("unipc order=2", "unipc", "logsnr-20", {"order": 2}),
        ("unipc order=3", "unipc", "logsnr", {"order": 3}),
        ("ipndm", "ipndm", "logsnr", {}),
        ("ipndm", "ipndm", "karras", {}),
        ("ipndm", "ipndm", "logsnr-20", {}),
        ("ipndm max_order=3", "ipndm", "logsnr-20", {"max_order": 3}),
        ("ipndm max_order=2", "ipndm", "logsnr-20", {"max_order": 2}),
        ("dpmpp_3m_sde", "dpmpp_3m_sde", "logsnr-20", {}),
    ]
    + [
        (label, method, "logsnr-full", options)
        for label, method, options in (  # diffusers' exponential grid
            ("unipc order=2", "unipc", {"order": 2}),
            ("unipc order=3", "unipc", {"order": 3}),
            ("ipndm", "ipndm", {}),
        )
    ]
    + [
        (label, method, "logsnr-full-int", options)
        for label, method, options in (  # diffusers' exponential grid as its network sees it
            ("unipc order=2", "unipc", {"order": 2}),
            ("unipc order=3", "unipc", {"order": 3}),
            ("ipndm", "ipndm", {}),
        )
    ]
    + [
        (label, method, "karras-full", options)
        for label, method, options in (  # the sample stage's default grid
            ("euler", "euler", {}),
            ("heun", "heun", {}),
            ("dpmpp_2m", "dpmpp_2m", {}),
            ("dpmpp_3m eta=0", "dpmpp_3m_sde", {"eta": 0.0}),
            ("unipc order=2", "unipc", {"order": 2}),
            ("unipc order=3", "unipc", {"order": 3}),
            ("ipndm", "ipndm", {}),
        )
    ]
)
GRIDS = ("karras", "logsnr", "logsnr-20")
KDIFF = [(name, grid) for name in ("euler", "heun", "dpmpp_2m", "dpmpp_3m_sde") for grid in GRIDS]
ADAPTIVE_RTOL = (0.2, 0.1, 0.05, 0.02)  # k-diffusion's dpm_adaptive, atol = its default 0.0078
# (label, scheduler, config); diffusers' defaults, then its Karras / log-sigma grids.
DIFFUSERS = [
    ("DDIM", "DDIM", {}),
    ("DPMSolverMultistep", "DPMSolverMultistep", {}),
    ("DPMSolverMultistep karras", "DPMSolverMultistep", {"use_karras_sigmas": True}),
    ("UniPCMultistep", "UniPCMultistep", {}),
    ("UniPCMultistep order=3 karras", "UniPCMultistep", {"solver_order": 3, "use_karras_sigmas": True}),
    ("UniPCMultistep order=3 exp", "UniPCMultistep", {"solver_order": 3, "use_exponential_sigmas": True}),
    ("DEISMultistep", "DEISMultistep", {}),
    ("DEISMultistep order=3 karras", "DEISMultistep", {"solver_order": 3, "use_karras_sigmas": True}),
]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Counted:
    """A callable that counts its calls (the NFE of whatever runs it)."""

    def __init__(self, fn: Callable[..., Tensor]):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs) -> Tensor:
        self.calls += 1
        return self.fn(*args, **kwargs)


def levels(method: str, budget: int) -> int:
    """Grid levels within ``budget`` evaluations (Heun: 2n - 1 for n levels ending at 0)."""
    return (budget + 1) // 2 if method == "heun" else budget


def make_grid(kind: str, n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """ "karras" / "logsnr" from sigma_max; "logsnr-20" from sigma 20 (a shorter range for few steps);
    "karras-full" over the schedule's whole range, as the sample stage builds its default grid
    (``pipeline.diffusion.build.sampling_sigmas(process, "karras", n)``); "logsnr-full" uniform in
    log sigma over that range (diffusers' ``use_exponential_sigmas``); "logsnr-full-int" the levels of
    that grid's timesteps truncated to integers, the levels diffusers' network is called at (a
    repeated timestep once: fewer levels than asked at 50)."""
    if kind == "logsnr-20":
        return logsnr_sigmas(sigma_min, 20.0, n)
    if kind == "karras-full":
        return sampling_sigmas(DDPM(BETAS), "karras", n)
    if kind == "logsnr-full-int":
        scheduler = diffusers_scheduler("UniPCMultistep", BETAS, n, use_exponential_sigmas=True)
        return ddpm_sigmas(DDPM(BETAS), torch.unique_consecutive(scheduler.timesteps))  # 50 levels: repeats
    if kind == "logsnr-full":
        return logsnr_sigmas(*sigma_range(DDPM(BETAS)), n)
    return (karras_sigmas if kind == "karras" else logsnr_sigmas)(sigma_min, sigma_max, n)


def run_seed(
    gmm: GaussianMixture,
    n: int,
    seed: int,
    sigma_max: float,
    bandwidth: float,
    extra: dict[str, tuple[str, int]],
    only: tuple[str, ...] = (),
) -> dict[str, dict[int, float]]:
    """{sampler label: {budget: error}} for one seed, plus the reference rows of ``extra``
    ({label: (kind, steps)}); with ``only``, just the samplers whose label contains one of them."""
    process = DDPM(BETAS)
    eps_net = eps_network(gmm.denoiser, process)
    denoiser = Denoiser(eps_net, process, prediction="eps")
    sigma_min = float(process.sigma_table[0])
    latents = torch.randn(n, gmm.dim, generator=_g(1000 + seed), dtype=torch.float64)  # x_T, VP frame
    results: dict[str, dict[int, float]] = {}

    def wanted(label: str) -> bool:
        return not only or any(part in label for part in only)

    def record(label: str, budget: int, nfe: int, x: Tensor) -> None:
        if nfe <= budget:
            err = gmm.mmd(x, bandwidth)
            results.setdefault(label, {})[budget] = min(err, results.get(label, {}).get(budget, float("inf")))

    def ve_start(sigmas: Tensor) -> Tensor:
        return latents * (1 + sigmas[0] ** 2).sqrt()

    for budget in BUDGETS:
        for label, method, grid, options in OURS:
            if not wanted(f"ours {label} ({grid})"):
                continue
            sigmas = make_grid(grid, levels(method, budget), sigma_min, sigma_max)
            d = Counted(denoiser)
            x = sample(d, ve_start(sigmas), sigmas, method=method, generator=_g(2000 + seed), **options)
            record(f"ours {label} ({grid})", budget, d.calls, x)
        for name, grid in KDIFF:
            if not wanted(f"k-diffusion {name} ({grid})"):
                continue
            sigmas = make_grid(grid, levels(name, budget), sigma_min, sigma_max)
            d = Counted(denoiser)
            x = k_diffusion_sample(name, d, ve_start(sigmas), sigmas, _g(2000 + seed))
            record(f"k-diffusion {name} ({grid})", budget, d.calls, x)
        for label, name, config in DIFFUSERS:
            if not wanted(f"diffusers {label}"):
                continue
            net = Counted(eps_net)
            x = diffusers_sample(diffusers_scheduler(name, BETAS, budget, **config), net, latents)
            record(f"diffusers {label}", budget, net.calls, x)
    sigmas = make_grid("karras", 2, sigma_min, sigma_max)
    for rtol in ADAPTIVE_RTOL if wanted("k-diffusion dpm_adaptive") else ():
        d = Counted(denoiser)
        x = k_diffusion_sample("dpm_adaptive", d, ve_start(sigmas), sigmas, rtol=rtol)
        for budget in BUDGETS:
            record("k-diffusion dpm_adaptive", budget, d.calls, x)
    for label, (kind, steps) in extra.items():  # Euler: the better of its grids
        if kind == "euler":
            outs = [
                k_diffusion_sample("euler", denoiser, ve_start(sigmas), sigmas)
                for sigmas in (make_grid(grid, steps, sigma_min, sigma_max) for grid in GRIDS)
            ]
        else:
            outs = [diffusers_sample(diffusers_scheduler("DDIM", BETAS, steps), eps_net, latents)]
        results[label] = {0: min(gmm.mmd(x, bandwidth) for x in outs)}
    return results


def median_table(per_seed: list[dict[str, dict[int, float]]]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for label in per_seed[0]:
        for budget in per_seed[0][label]:
            values = [r[label].get(budget, float("inf")) for r in per_seed]
            out.setdefault(label, {})[budget] = statistics.median(values)
    return out


def report(dim: int, table: dict[str, dict[int, float]], floor: float, refs: dict[str, float]) -> str:
    def cell(v: float | None) -> str:
        return "-" if v is None or v == float("inf") else f"{1e3 * v:.2f}"

    def best(prefixes: tuple[str, ...], budget: int) -> tuple[str, float]:
        rows = [
            (label, errs[budget])
            for label, errs in table.items()
            if label.startswith(prefixes) and budget in errs and errs[budget] < float("inf")
        ]
        return min(rows, key=lambda r: r[1]) if rows else ("-", float("inf"))

    ref_text = ", ".join(f"{k} {cell(v)}" for k, v in refs.items())
    lines = [
        f"#### {dim}-D mixture: MMD^2 x 1e3, median over seeds (floor {cell(floor)}; {ref_text})",
        "",
        "| NFE budget | our best | error | best peer | error | ours <= peer |" + "".join(f" <= {k} |" for k in refs),
        "|---|---|---|---|---|---|" + "---|" * len(refs),
    ]
    for budget in BUDGETS:
        ours, peer = best(("ours",), budget), best(("k-diffusion", "diffusers"), budget)
        marks = "".join(f" {'yes' if ours[1] <= v else 'no'} |" for v in refs.values())
        tie = 1e-9 * abs(peer[1])  # the same method on the same grid (ours == the peer's to rounding)
        lines.append(
            f"| {budget} | {ours[0][5:]} | {cell(ours[1])} | {peer[0]} | {cell(peer[1])} | "
            f"{'yes' if ours[1] <= peer[1] + tie else 'no'} |{marks}"
        )
    lines += [
        "",
        "| sampler (grid) | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |",
        "|---|" + "---|" * len(BUDGETS),
    ]
    for label, errs in table.items():
        if label in refs:
            continue
        lines.append(f"| {label} | " + " | ".join(cell(errs.get(b)) for b in BUDGETS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--components", type=int, default=6)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bandwidth", type=float, default=0.3)
    parser.add_argument("--sigma-max", type=float, default=40.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only",
        nargs="*",
        default=(),
        help="run only the samplers whose label contains one of these, e.g. karras-full",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = {"Euler@50": ("euler", 50), "DDIM@100": ("ddim", 100)}
    for dim in args.dims:
        start = time.perf_counter()
        gmm = GaussianMixture.random(dim=dim, components=args.components, generator=_g(0))
        per_seed = [
            run_seed(gmm, args.samples, seed, args.sigma_max, args.bandwidth, extra, tuple(args.only))
            for seed in range(args.seeds)
        ]
        floor = statistics.median(
            abs(gmm.mmd(gmm.sample(args.samples, _g(10 + i)), args.bandwidth)) for i in range(args.seeds)
        )
        table = median_table(per_seed)
        refs = {label: table[label][0] for label in extra}
        print(report(dim, table, floor, refs), flush=True)
        print(f"({dim}-D: {time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
