"""Training-step speed of the denoisers: seconds per step, model GFLOP/s, MFU.

``cpu``: forward + backward + AdamW step, fp32, of the issue's ~5M-parameter DiT (width 256,
depth 4, 4 heads, batch 64, 8x8x4 latents) at patch 2 and patch 1 and of a tiny U-Net
(4.3M parameters), each in two set-ups measured in the same run, rounds interleaved:

- ``straightforward``: the math attention backend, AdamW's per-parameter loop (``foreach=False``);
- ``latentpipe``: sdpa attention, ``AdamW(fused=True)``.

The fp32 matmul ceiling of the machine (a 2048^3 matmul) is measured in the same run too.
Model FLOPs are ``pipeline.networks.flops.training_flops`` (3 x forward, FLOPs = 2 x MACs);
the optimizer's arithmetic is not counted. Every figure is the median over ``--repeats``
rounds of the per-step median of ``--steps`` steps.

``gpu``: DiT (default XL/2 at 32x32x4, 1000 classes, learned sigma), bf16 autocast, the largest
batch that fits from ``--batch`` down by halving, with sdpa vs math attention and eager vs
torch.compile in one run: images/s and MFU against ``--peak-tflops`` (and against the bf16
matmul ceiling measured in the same run).

    python tools/bench_networks.py cpu --threads 2 --repeats 7 --steps 5
    python tools/bench_networks.py gpu --preset XL/2 --batch 256 --peak-tflops 800
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from pipeline.networks import DIT_PRESETS, build_denoiser, mfu, training_flops

DIT_5M = dict(kind="dit", width=256, depth=4, num_heads=4, input_size=8, num_classes=10)
TINY_UNET = dict(
    kind="unet",
    input_size=8,
    model_channels=64,
    channel_mult=(1, 2),
    num_res_blocks=2,
    attention_resolutions=(4,),
    num_head_channels=32,
    num_classes=10,
)
CPU_NETWORKS = {
    "DiT w256 d4, patch 2": dict(DIT_5M, patch_size=2),
    "DiT w256 d4, patch 1": dict(DIT_5M, patch_size=1),
    "U-Net mc64 (1,2) x2": TINY_UNET,
}


@dataclass(frozen=True)
class Setup:
    attention_backend: str
    adamw: dict


SETUPS = {
    "straightforward": Setup("math", dict(foreach=False)),
    "latentpipe": Setup("sdpa", dict(fused=True)),
}


class Run:
    """One network + optimizer + fixed batch, timed a few steps at a time."""

    def __init__(
        self,
        options: dict,
        setup: Setup,
        batch: int,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        compile: bool = False,
    ):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        options = dict(options)
        kind = options.pop("kind")
        self.net = build_denoiser(kind, **options, attention_backend=setup.attention_backend).to(device)
        self.forward = torch.compile(self.net) if compile else self.net
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4, **setup.adamw)
        self.device, self.dtype, self.batch = device, dtype, batch
        size, channels = self.net.config.input_size, self.net.config.in_channels
        self.x = torch.randn(batch, channels, size, size, generator=gen).to(device)
        self.t = (torch.rand(batch, generator=gen) * 1000).to(device)
        self.y = torch.randint(0, self.net.config.num_classes, (batch,), generator=gen).to(device)

    def step(self) -> None:
        with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype is not None):
            out = self.forward(self.x, self.t, self.y)
        loss = out.float().square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def seconds_per_step(self, steps: int) -> float:
        times = []
        for _ in range(steps):
            if self.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            self.step()
            if self.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    @property
    def flops_per_step(self) -> int:
        return training_flops(self.net.config) * self.batch

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())


def matmul_gflops(size: int = 2048, repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Median GFLOP/s of a size^3 matmul: the same-run ceiling the networks are compared with."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def bench_cpu(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    runs = {(net, setup): Run(CPU_NETWORKS[net], SETUPS[setup], args.batch) for net in CPU_NETWORKS for setup in SETUPS}
    for run in runs.values():  # warm-up: allocator, kernels, optimizer state
        run.seconds_per_step(args.warmup)
    seconds = {key: [] for key in runs}
    ceiling = []
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):  # interleaved rounds: drift on a shared machine hits every case alike
        ceiling.append(matmul_gflops())
        for key, run in runs.items():
            seconds[key].append(run.seconds_per_step(args.steps))
    peak = statistics.median(ceiling)
    print(
        f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads, batch {args.batch}, fp32, "
        f"{args.repeats} rounds x {args.steps} steps, "
        f"1-min load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; "
        f"fp32 matmul ceiling (2048^3, same run): {peak:.0f} GFLOP/s median, {max(ceiling):.0f} best\n"
    )
    print("| network | params | set-up | s/step (median) | GFLOP/s (median) | of ceiling | best s/step | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for net in CPU_NETWORKS:
        base = statistics.median(seconds[(net, "straightforward")])
        for setup in SETUPS:
            run, s = runs[(net, setup)], statistics.median(seconds[(net, setup)])
            gflops = run.flops_per_step / s / 1e9
            print(
                f"| {net} | {run.parameters / 1e6:.2f}M | {setup} | {s:.3f} | {gflops:.0f} | "
                f"{gflops / peak:.0%} | {min(seconds[(net, setup)]):.3f} | {base / s:.2f}x |"
            )


def largest_batch_run(options: dict, setup: Setup, batch: int, device: str, compile: bool) -> Run:
    """A warmed-up Run at the largest batch, from ``batch`` down by halving, that fits in memory."""
    while True:
        try:
            run = Run(options, setup, batch, device, torch.bfloat16, compile)
            run.seconds_per_step(3)
            return run
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch == 1:
                raise
            batch //= 2


def bench_gpu(args: argparse.Namespace) -> None:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the gpu benchmark needs a CUDA device")
    options = dict(kind="dit", **DIT_PRESETS[args.preset], input_size=32, num_classes=1000, learn_sigma=True)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.machine()
    measured = matmul_gflops(8192 if device == "cuda" else 1024, 10, device, torch.bfloat16) / 1e3
    print(
        f"torch {torch.__version__}, {name}, DiT-{args.preset} on 32x32x4 (1000 classes, learned sigma), "
        f"bf16 autocast, AdamW(fused); bf16 matmul ceiling measured in this run {measured:.0f} TFLOP/s; "
        f"MFU against {args.peak_tflops:.0f} TFLOP/s\n"
    )
    print("| attention | compile | batch | s/step | images/s | model TFLOP/s | MFU | of measured ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for backend in ("sdpa", "math"):
        for compiled in (False, True):
            setup = Setup(backend, dict(fused=True))
            run = largest_batch_run(options, setup, args.batch, device, compiled)
            s = statistics.median(run.seconds_per_step(args.steps) for _ in range(args.repeats))
            images = run.batch / s
            util = mfu(run.net.config, images, args.peak_tflops * 1e12)
            achieved = run.flops_per_step / s / 1e12
            print(
                f"| {backend} | {compiled} | {run.batch} | {s:.3f} | {images:.0f} | "
                f"{achieved:.1f} | {util:.1%} | {achieved / measured:.1%} |"
            )
            del run
            if device == "cuda":
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="target", required=True)
    cpu = sub.add_parser("cpu", help="fp32 CPU training steps of small networks")
    cpu.add_argument("--threads", type=int, default=2)
    cpu.add_argument("--batch", type=int, default=64)
    cpu.add_argument("--warmup", type=int, default=3)
    gpu = sub.add_parser("gpu", help="bf16 DiT training throughput and MFU on one GPU")
    gpu.add_argument("--preset", default="XL/2")
    gpu.add_argument("--batch", type=int, default=256, help="first batch tried; halved on out-of-memory")
    gpu.add_argument("--peak-tflops", type=float, default=800.0, help="measured bf16 matmul ceiling")
    gpu.add_argument("--device", default="cuda", help="'cpu' only to smoke-test this code path")
    for p in (cpu, gpu):
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    bench_cpu(args) if args.target == "cpu" else bench_gpu(args)


if __name__ == "__main__":
    main()
