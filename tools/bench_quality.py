"""Sample quality against sampling cost for a trained run: FID, KID and classifier accuracy per
sampler and step count, ours and the peers' (k-diffusion, diffusers), and with snap-to-codebook
on and off.

    python tools/bench_quality.py [--config X] [key=value ...] [--samples 500]
        [--settings ddpm:process:1000 ddim:process:10 ... dpmpp_2m:karras:20] [--snap-off dpmpp_2m:karras:20]
    python tools/bench_quality.py [key=value ...] --nfe 5 10 20   # the few-step frontier
    python tools/bench_quality.py [key=value ...] --settings ipndm:karras:20 --guidance 1 1.5 2 3
    python tools/bench_quality.py [key=value ...] --reconstructions --settings   # the autoencoder alone

``--reconstructions`` adds a first row: the autoencoder's reconstructions of as many train images
as samples, against the same val images. It is what a perfect denoiser would score, so it says
whether the autoencoder or the denoiser limits the samples' FID. With an empty ``--settings`` it
needs no denoiser: a run that has only trained its autoencoder can be compared.

A setting is ``[family/]method:grid:steps[:option=value,...]``:

- ``ipndm:karras:20``, ``unipc:logsnr:10:order=3``: our solvers (``pipeline.sampling.METHODS``)
  on a VE grid of ``steps`` levels: "karras" (the sample stage's, EDM eq. 5 over the process's
  range), "logsnr" (uniform in log sigma over that range), "process" (DDPM timesteps) or "own"
  (the levels diffusers' scheduler of the same method visits by default, from its starting point:
  ours and the peer then differ only in the solver);
- ``k-diffusion/dpmpp_2m:karras:20``: k-diffusion's ``sample_<method>`` on the same kind of grid
  (``dpm_adaptive`` uses only its two ends: give ``rtol=``/``atol=``);
- ``diffusers/UniPCMultistep:own:20:use_karras_sigmas=true``: diffusers' ``<method>Scheduler``
  with ``steps`` timesteps of its own grid (float32 tables, as it ships), on the eps-network of
  the same denoiser (a discrete DDPM process only).

Every setting renders the same sample indices (same per-sample seeds and labels, by
``sample.labels``) from
the same standard normal x_T (x_ve = x_T sigma_0) through the same guided denoiser (the run's
guidance scale and interval; one NFE = one guided call, which evaluates both branches in one
batched network call), decodes them with the run's autoencoder and compares them with the real
validation images (Inception features with the FID weights; the classifier of the evaluate
stage, trained on the real train digits). NFE is counted, not assumed: the calls each sampler
makes to the denoiser per batch (Heun: 2 per step but the last; dpm_adaptive: what its
tolerance needed, which depends on the batch). One table row per setting and guidance scale, in
markdown, with precision and recall (k-NN manifolds, ``evaluate.nearest_k``) beside FID: a
guidance scale is chosen by FID and recall together, since guidance buys accuracy and precision
with diversity.

``--nfe 5 10 20`` runs the frontier (``FRONTIER``: each template at the levels that fit the
budget, plus k-diffusion's dpm_adaptive at ``ADAPTIVE_RTOL``) and ends with a summary per
budget: our best and the best peer among the rows with NFE <= the budget, by FID and by accuracy.
Nothing is written to the run directory (the classifier is cached under ``--cache``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from pipeline import artifacts, config
from pipeline.data.stream import sequential_batches
from pipeline.diffusion import DDPM
from pipeline.diffusion.build import sampling_sigmas, sigma_range
from pipeline.labels import labels_for
from pipeline.latents import point_latent
from pipeline.metrics import classifier
from pipeline.metrics.features import InceptionFeatures
from pipeline.metrics.fid import FeatureStats, frechet_distance
from pipeline.metrics.kid import kernel_inception_distance
from pipeline.metrics.precision_recall import precision_recall
from pipeline.metrics.reference import evenly_spread
from pipeline.sampling import logsnr_sigmas, sample
from pipeline.sampling.generate import conditioned, initial_noise
from pipeline.seeding import generator
from tools.bench_samplers import Counted, levels
from tools.peer_samplers import (
    diffusers_sample,
    diffusers_scheduler,
    eps_network,
    k_diffusion_sample,
    scheduler_sigmas,
)

DEFAULT_SETTINGS = (
    "ddpm:process:1000",
    "ddim:process:10",
    "ddim:process:20",
    "ddim:process:50",
    "ddim:process:100",
    "heun:karras:10",
    "heun:karras:20",
    "dpmpp_2m:karras:10",
    "dpmpp_2m:karras:20",
)
FAMILIES = ("ours", "k-diffusion", "diffusers")
# The frontier at an NFE budget B: "B" becomes the levels that fit B (Heun: (B + 1) // 2).
FRONTIER = (
    "ipndm:karras:B",
    "ipndm:logsnr:B",
    "unipc:karras:B",
    "unipc:karras:B:order=3",
    "dpmpp_2m:karras:B",
    "ddim:process:B",
    "ddim:own:B",
    "unipc:own:B",
    "dpmpp_2m:own:B",
    "euler:karras:B",
    "heun:karras:B",
    "k-diffusion/euler:karras:B",
    "k-diffusion/heun:karras:B",
    "k-diffusion/dpmpp_2m:karras:B",
    "k-diffusion/dpmpp_3m_sde:karras:B",
    "diffusers/DDIM:own:B",
    "diffusers/DPMSolverMultistep:own:B",
    "diffusers/UniPCMultistep:own:B",
    "diffusers/DEISMultistep:own:B",
)
ADAPTIVE_RTOL = (0.2, 0.05)  # k-diffusion's dpm_adaptive (atol its default 0.0078); NFE is its own


def _value(text: str) -> bool | int | float | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclasses.dataclass(frozen=True)
class Setting:
    """One sampler run: ``family`` (ours, k-diffusion, diffusers), ``method``, ``grid``, ``steps``
    and the sampler's ``options``."""

    family: str
    method: str
    grid: str
    steps: int
    options: tuple[tuple[str, bool | int | float | str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``[family/]method:grid:steps[:key=value,...]``."""
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"a setting is [family/]method:grid:steps[:key=value,...], got {text!r}")
        family, _, method = parts[0].rpartition("/")
        family = family or "ours"
        if family not in FAMILIES:
            raise ValueError(f"{text!r}: family {family!r} is not one of {FAMILIES}")
        options = [item.split("=", 1) for item in parts[3].split(",")] if len(parts) == 4 else []
        if any(len(pair) != 2 for pair in options):
            raise ValueError(f"{text!r}: options are key=value,...")
        if (family == "diffusers" and parts[1] != "own") or (family == "k-diffusion" and parts[1] == "own"):
            raise ValueError(f"{text!r}: diffusers' schedulers use their own grid ('own'); k-diffusion's do not")
        return cls(family, method, parts[1], int(parts[2]), tuple((k, _value(v)) for k, v in options))

    def __str__(self) -> str:
        text = ("" if self.family == "ours" else f"{self.family}/") + f"{self.method}:{self.grid}:{self.steps}"
        return text + (":" + ",".join(f"{k}={v}" for k, v in self.options) if self.options else "")

    @property
    def sampler(self) -> str:
        """The table's sampler column: family, method and options."""
        opts = " ".join(f"{k}={v}" for k, v in self.options)
        return " ".join(part for part in (self.family, self.method, opts) if part)


def frontier(budgets: list[int]) -> list[Setting]:
    """``FRONTIER`` at each budget, then dpm_adaptive at each tolerance (its NFE is its own)."""
    settings = []
    for budget in budgets:
        for template in FRONTIER:
            method = template.split(":")[0].rpartition("/")[2]
            settings.append(Setting.parse(template.replace(":B", f":{levels(method, budget)}")))
    return settings + [Setting.parse(f"k-diffusion/dpm_adaptive:karras:2:rtol={rtol}") for rtol in ADAPTIVE_RTOL]


# The diffusers scheduler whose default grid "own" means for our solver (its namesake, else the
# multistep schedulers' shared "linspace" grid).
OWN_GRID_SCHEDULER = {"ddim": "DDIM", "unipc": "UniPCMultistep"}


def grid_sigmas(process, grid: str, steps: int, method: str) -> Tensor:
    """The VE grid of ``steps`` levels (then 0): "karras" / "process" as the sample stage builds
    them (``sampling_sigmas``), "logsnr" uniform in log sigma over the process's range, "own" the
    noise levels that diffusers' scheduler of the same method visits by default (DDIM's "leading"
    timesteps for ddim; the multistep schedulers' "linspace" ones, then 0, for the others), so that
    our solver and the peer differ only in the solver."""
    if grid == "logsnr":
        return logsnr_sigmas(*sigma_range(process), steps)
    if grid == "own":
        name = OWN_GRID_SCHEDULER.get(method, "DPMSolverMultistep")
        return scheduler_sigmas(diffusers_scheduler(name, process.betas, steps), process)
    if grid not in ("karras", "process"):
        raise ValueError(f"unknown grid {grid!r}: karras, logsnr, process, own")
    return sampling_sigmas(process, grid, steps)


def run_sampler(
    setting: Setting, denoiser, noise: Tensor, process, generators: list[torch.Generator]
) -> tuple[Tensor, int]:
    """(samples, denoiser calls) of ``setting`` from the standard normal x_T ``noise`` on the
    VE-frame ``denoiser`` (already conditioned); ``generators``: one per sample, for the
    stochastic samplers' noise."""
    options = dict(setting.options)
    if setting.family == "diffusers":
        if not isinstance(process, DDPM):
            raise ValueError(f"{setting}: diffusers' schedulers need a discrete DDPM process")
        scheduler = diffusers_scheduler(setting.method, process.betas, setting.steps, float64=False, **options)
        net = Counted(eps_network(denoiser, process))
        return diffusers_sample(scheduler, net, noise), net.calls
    sigmas = grid_sigmas(process, setting.grid, setting.steps, setting.method).to(noise.dtype)
    counted = Counted(denoiser)
    # On "own", start where the peer's scheduler starts (x_T in the VP frame is x_ve / sqrt(1 + sigma^2)).
    x = noise * ((1 + sigmas[0] ** 2).sqrt() if setting.grid == "own" else sigmas[0])
    if setting.family == "ours":
        out = sample(counted, x, sigmas, method=setting.method, generator=generators, **options)
    else:
        out = k_diffusion_sample(setting.method, counted, x, sigmas, generators, **options)
    return out, counted.calls


def render(
    trained,
    autoencoder,
    cfg,
    setting: Setting,
    count: int,
    snap: bool,
    data_absmax: float,
    seed: int,
    class_counts,
    guidance: float,
):
    """(decoded images, their labels, the fraction of samples off the data: a latent entry beyond
    twice the largest magnitude of the real validation latents, NFE per sample: the denoiser
    calls per batch, averaged over the samples). ``seed`` picks the initial noises (the sample
    stage uses the experiment's seed)."""
    images, batch, off, calls = [], 250, 0, 0
    interval = tuple(cfg.sample.guidance_interval) or None
    for start in range(0, count, batch):
        indices = range(start, min(start + batch, count))
        labels = labels_for(cfg.sample, indices, trained.num_classes, cfg.experiment.seed, class_counts)
        generators = [generator(seed, "sample", i) for i in indices]
        guided = conditioned(trained.denoiser, labels, trained.num_classes, guidance, interval)
        with torch.no_grad():
            noise = initial_noise(trained.shape, generators)
            latents, nfe = run_sampler(setting, guided, noise, trained.process, generators)
            images.append(autoencoder.decode(trained.space.to_decoder(latents, snap=snap)).clamp(-1, 1))
        off += int((latents.flatten(1).abs().max(1).values > 2 * data_absmax).sum())
        calls += nfe * len(indices)
    labels = labels_for(cfg.sample, range(count), trained.num_classes, cfg.experiment.seed, class_counts)
    return torch.cat(images), labels, off / count, calls / count


def reconstructions(autoencoder, kind: str, prepared, count: int) -> tuple[Tensor, Tensor]:
    """(decoded encodings, labels) of ``count`` train images spread evenly over the split: what a
    perfect denoiser would generate, so their FID against the val images is the best any
    denoiser on this autoencoder reaches at this sample count."""
    wanted = evenly_spread(prepared.count("train"), count)
    images, labels, seen = [], [], 0
    for batch in sequential_batches([str(path) for path in prepared.files("train")], 250):
        keep = [j for j in range(len(batch["image"])) if seen + j in wanted]
        seen += len(batch["image"])
        if keep:
            with torch.no_grad():
                encoded = autoencoder.encode(batch["image"][keep])
                images.append(autoencoder.decode(point_latent(encoded, kind)).clamp(-1, 1))
            labels.append(batch["label"][keep] if "label" in batch else torch.full((len(keep),), -1))
    return torch.cat(images), torch.cat(labels)


def summary(rows: list[dict], budgets: list[int]) -> str:
    """Per NFE budget, among the rows with NFE <= it: our best and the best peer by FID (with that
    row's accuracy) and by accuracy."""

    def best(family_is_ours: bool, budget: int, key):
        within = [r for r in rows if (r["family"] == "ours") == family_is_ours and r["nfe"] <= budget and r["snap"]]
        return min(within, key=key) if within else None

    def cell(row) -> str:
        return "-" if row is None else f"{row['sampler']} ({row['grid']}, {row['nfe']:.0f} NFE)"

    lines = [
        "| NFE | our best (FID) | FID | acc. | best peer (FID) | FID | acc. | ours <= peer | our best acc. "
        "| best peer acc. |",
        "|---:|---|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    for budget in budgets:
        by_fid = (lambda r: (r["fid"], -r["accuracy"])), (lambda r: (-r["accuracy"], r["fid"]))
        ours, peer = best(True, budget, by_fid[0]), best(False, budget, by_fid[0])
        ours_acc, peer_acc = best(True, budget, by_fid[1]), best(False, budget, by_fid[1])
        if ours is None or peer is None or ours_acc is None or peer_acc is None:
            continue
        lines.append(
            f"| {budget} | {cell(ours)} | {ours['fid']:.2f} | {ours['accuracy']:.1%} | {cell(peer)} | "
            f"{peer['fid']:.2f} | {peer['accuracy']:.1%} | {'yes' if ours['fid'] <= peer['fid'] else 'no'} | "
            f"{ours_acc['accuracy']:.1%} | {peer_acc['accuracy']:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument(
        "--settings", nargs="*", default=None, help="[family/]method:grid:steps[:key=value,...] (none: no samplers)"
    )
    parser.add_argument("--nfe", type=int, nargs="+", help="run the frontier at these NFE budgets (after --settings)")
    parser.add_argument("--snap-off", nargs="*", default=None, help="settings also run unsnapped")
    parser.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        help="run every setting at each of these guidance scales (default: the run's)",
    )
    parser.add_argument(
        "--reconstructions",
        action="store_true",
        help="first, a row for the autoencoder's reconstructions of as many train images (a perfect denoiser)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--seed", type=int, help="seed of the initial noises (default: the experiment's)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "latentpipe-bench-quality")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.snap_off is None:  # an empty --settings asks for no sampler at all
        args.snap_off = [] if args.nfe or args.settings == [] else ["dpmpp_2m:karras:20"]
    if args.settings is None:
        args.settings = [] if args.nfe else list(DEFAULT_SETTINGS)
    runs = [(Setting.parse(s), True) for s in args.settings]
    runs += [(s, True) for s in (frontier(args.nfe) if args.nfe else [])]
    runs += [(Setting.parse(s), False) for s in args.snap_off]

    cfg = config.load(args.config, args.overrides)
    autoencoder = artifacts.load_autoencoder(cfg, "cpu")
    inception = InceptionFeatures()
    prepared = artifacts.PreparedShards.from_stage_dir(cfg)
    train, val = ([str(path) for path in prepared.files(split)] for split in ("train", "val"))
    real = torch.cat([inception(b["image"]) for b in sequential_batches(val, 250)])
    real_stats = FeatureStats.of(real)
    source = {"shards": sorted(prepared.shard_hashes("train") + prepared.shard_hashes("val"))}
    settings = classifier.Settings(steps=cfg.evaluate.classifier_steps)  # the evaluate stage's classifier
    digits = classifier.load_or_train(args.cache, source, train, val, len(prepared.classes), settings)
    if runs:  # --reconstructions alone needs only the autoencoder
        encoded = artifacts.EncodedLatents.from_stage_dir(cfg)
        trained = artifacts.TrainedDenoiser.from_stage_dir(cfg).load(cfg, encoded, "cpu")
        latents = [str(path) for path in encoded.files("val")]
        data_absmax = max(float(trained.latents_from_batch(b).abs().max()) for b in sequential_batches(latents, 500))
    print(
        f"{args.samples} samples vs {len(real)} real val images; prediction {cfg.diffusion.prediction}; guidance "
        f"{cfg.sample.guidance_scale}; classifier accuracy on real val {digits.val_accuracy:.1%}\n"
    )
    print(
        "| sampler | grid | steps | NFE/sample | snap | guidance | FID | KID x1e3 | precision | recall | accuracy "
        "| off-data | s/sample |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows, ceiling = [], []  # ceiling: the reconstructions' row, kept out of the sampler summary

    def scores(images: Tensor, labels: Tensor) -> dict:
        features = torch.cat([inception(images[i : i + 250]) for i in range(0, len(images), 250)])
        kid, _ = kernel_inception_distance(features, real, generator=torch.Generator().manual_seed(0), subsets=50)
        precision, recall = precision_recall(real, features, k=cfg.evaluate.nearest_k)
        labelled = bool((labels >= 0).all())
        return {
            "fid": frechet_distance(FeatureStats.of(features), real_stats),
            "kid": kid,
            "precision": precision,
            "recall": recall,
            "accuracy": classifier.accuracy(digits.model, images, labels)["accuracy"] if labelled else float("nan"),
        }

    if args.reconstructions:
        kind = artifacts.TrainedAutoencoder.from_stage_dir(cfg).latent.kind
        s = scores(*reconstructions(autoencoder, kind, prepared, args.samples))
        print(
            f"| autoencoder: {args.samples} train reconstructions | - | - | - | - | - | {s['fid']:.2f} | "
            f"{s['kid'] * 1e3:.2f} | {s['precision']:.3f} | {s['recall']:.3f} | {s['accuracy']:.1%} | - | - |",
            flush=True,
        )
        ceiling.append({"setting": "reconstructions", "family": "autoencoder", "samples": args.samples, **s})
        if args.json:
            args.json.write_text(json.dumps(ceiling, indent=1))
    counts = prepared.class_counts("train")
    for (setting, snap), guidance in itertools.product(runs, args.guidance or [cfg.sample.guidance_scale]):
        start = time.perf_counter()
        seed = cfg.experiment.seed if args.seed is None else args.seed
        images, labels, off, nfe = render(
            trained, autoencoder, cfg, setting, args.samples, snap, data_absmax, seed, counts, guidance
        )
        seconds = (time.perf_counter() - start) / args.samples
        s = scores(images, labels)
        fid, kid, precision, recall, accuracy = (s[k] for k in ("fid", "kid", "precision", "recall", "accuracy"))
        row = {
            "setting": str(setting),
            "family": setting.family,
            "sampler": setting.sampler,
            "grid": setting.grid,
            "steps": setting.steps,
            "nfe": nfe,
            "snap": snap,
            "guidance": guidance,
            "fid": fid,
            "kid": kid,
            "precision": precision,
            "recall": recall,
            "accuracy": accuracy,
            "off_data": off,
            "s_per_sample": seconds,
        }
        rows.append(row)
        print(
            f"| {row['sampler']} | {setting.grid} | {setting.steps} | {nfe:.0f} | {'on' if snap else 'off'} | "
            f"{guidance:g} | {fid:.2f} | {kid * 1e3:.2f} | {precision:.3f} | {recall:.3f} | {accuracy:.1%} | "
            f"{off:.1%} | {seconds:.3f} |",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(ceiling + rows, indent=1))
    if args.nfe:
        print("\n" + summary(rows, args.nfe), flush=True)


if __name__ == "__main__":
    main()
