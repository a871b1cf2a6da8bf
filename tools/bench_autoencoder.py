"""Autoencoder figures for docs/benchmarks.md: codebook usage and reconstruction quality.

1. The tiny default (MNIST 32x32) with the EMA codebook + k-means + dead-code restarts,
   side by side with plain gradient-learned VQ (vq loss, no k-means, no restarts), same run.
2. A colour set (the Twemoji PNGs, RGBA composited on white, 32x32) for K in --codes.
3. Step time and achieved GFLOP/s of one training step (forward + backward + AdamW, LPIPS
   included), FLOPs counted by torch.utils.flop_counter; median over --repeats.
4. Memory of a large config (--memory-config): parameters, and the bytes autograd saves for
   the backward pass of one image (saved_tensors_hooks), fp32 and bf16 autocast.

    python tools/bench_autoencoder.py --emoji /path/to/package/img/twitter/64
    (the emoji folder: `npm pack emoji-datasource-twitter@16.0.0 && tar xzf *.tgz`)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline import artifacts, config, manifest, stage_registry
from pipeline.autoencoder import LPIPS, lpips_input
from pipeline.autoencoder.build import build_autoencoder


def _train(root: Path, name: str, overrides: list[str]) -> dict:
    cfg = config.load(overrides=[f"experiment.runs_dir={root}", f"experiment.name={name}", *overrides])
    if not (cfg.stage_dir("prepare") / manifest.MANIFEST).is_file():
        stage_registry.get("prepare").run(cfg)
    start = time.perf_counter()
    stage_registry.get("autoencoder").run(cfg)
    trained = artifacts.TrainedAutoencoder.from_stage_dir(cfg)
    return {**trained.metrics, "seconds": time.perf_counter() - start, "K": cfg.autoencoder.num_codes}


def _row(label: str, m: dict) -> str:
    return (
        f"| {label} | {m['K']} | {m['steps']} | {m['seconds']:.0f} | {m['val_psnr']:.2f} | {m['val_ssim']:.3f} | "
        f"{m['val_lpips']:.4f} | {100 * m['val_codebook_usage']:.1f}% | "
        f"{m['val_codebook_perplexity'] / m['K']:.3f} |"
    )


def _step_cost(overrides: list[str], repeats: int) -> tuple[float, float]:
    """(median seconds, FLOPs) of one training step of the configured autoencoder on random data."""
    cfg = config.load(overrides=overrides).autoencoder
    model = build_autoencoder(cfg, 1).train()
    lpips = LPIPS(cfg.lpips)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    x = torch.rand(cfg.batch_size, 1, 32, 32) * 2 - 1

    def step():
        x_hat, quantized = model(x)
        loss = (x_hat - x).pow(2).mean() + quantized.loss
        loss = loss + cfg.lpips_weight * lpips(lpips_input(x_hat), lpips_input(x)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    with FlopCounterMode(display=False) as counter:
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), counter.get_total_flops()


def _saved_bytes_per_image(cfg: config.Config, channels: int, dtype: torch.dtype | None) -> int:
    """Bytes of the distinct tensors autograd keeps for backward through one training forward."""
    model = build_autoencoder(cfg.autoencoder, channels).train()
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    x = torch.rand(1, channels, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None),
    ):
        x_hat, quantized = model(x)
        (x_hat - x).abs().mean() + quantized.loss
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emoji", type=Path, help="folder of the Twemoji 64x64 PNGs (part 2 is skipped without it)")
    parser.add_argument("--codes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--emoji-steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--memory-config", type=Path, help="e.g. configs/imagenet256-vq-f8.yaml")
    args = parser.parse_args()
    header = (
        "| run | K | steps | train+val s | PSNR dB | SSIM | LPIPS | codes used | perplexity / K |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("### Tiny default (MNIST 32x32, validation split)\n")
        print(header)
        print(_row("EMA + k-means + restarts (default)", _train(root, "tiny", ["data.workers=2"])))
        plain = ["autoencoder.codebook_ema=false", "autoencoder.kmeans_init=false", "autoencoder.dead_code_steps=0"]
        print(_row("plain VQ (vq loss, no k-means, no restarts)", _train(root, "tiny-plain", plain)))
        if args.emoji:
            print("\n### Twemoji 32x32 RGB (3,786 images), EMA + k-means + restarts\n")
            print(header)
            emoji = [
                "data.source=folder",
                f"data.path={args.emoji}",
                "data.color=rgb",
                "data.workers=2",
                f"autoencoder.max_steps={args.emoji_steps}",
            ]
            for k in args.codes:
                print(_row(f"emoji K={k}", _train(root, f"emoji-{k}", [*emoji, f"autoencoder.num_codes={k}"])))
    seconds, flops = _step_cost([], args.repeats)
    print(
        f"\n### One training step of the tiny default (batch {config.load().autoencoder.batch_size}, LPIPS-alex "
        f"included)\n\n| step time (median of {args.repeats}) | GFLOP per step | achieved GFLOP/s |\n|---:|---:|---:|\n"
        f"| {seconds * 1000:.1f} ms | {flops / 1e9:.2f} | {flops / 1e9 / seconds:.1f} |"
    )
    if args.memory_config:
        cfg = config.load(args.memory_config)
        channels = 1 if cfg.data.color == "gray" else 3
        params = sum(p.numel() for p in build_autoencoder(cfg.autoencoder, channels).parameters())
        fp32, bf16 = (_saved_bytes_per_image(cfg, channels, d) for d in (None, torch.bfloat16))
        print(
            f"\n### Memory of {args.memory_config} ({cfg.data.resolution}x{cfg.data.resolution})\n\n"
            f"| parameters | weights + grads + AdamW (fp32) | saved for backward per image, fp32 | bf16 autocast |\n"
            f"|---:|---:|---:|---:|\n| {params / 1e6:.1f}M | {params * 16 / 2**30:.2f} GiB | "
            f"{fp32 / 2**30:.2f} GiB | {bf16 / 2**30:.2f} GiB |"
        )


if __name__ == "__main__":
    main()
