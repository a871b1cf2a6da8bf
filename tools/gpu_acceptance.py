"""Everything only a GPU can show, in one command (goal: under 8 minutes on one H100/H200).

    python tools/gpu_acceptance.py                       # on the first CUDA device
    python tools/gpu_acceptance.py --device cpu --smoke  # seconds: the suite runs this so it cannot rot

Sections, each isolated (a failing one is recorded as an error and the others still run):

  a  pipeline     the whole tiny pipeline (`latentpipe run`, configs/tiny.yaml) in bf16 with
                  reduced steps, in a temporary runs dir, ending with samples and FID
  b  dit          DiT-XL/2 on 32x32x4 latents (256 px images, f = 8): training images/s, MFU
                  and peak memory for each attention backend (sdpa, math, xformers when
                  installed), eager and torch.compile (sdpa), bf16, at the largest batch that fits
  c  unet         the U-Net preset for 32x32 latents, the same way (sdpa, eager and compiled)
  d  distributed  a DeepSpeed ZeRO-2 step on one device and an all-reduce in its process group
                  (NCCL on CUDA), through pipeline/runtime, in a child process
  e  autoencoder  peak memory and step time of configs/imagenet256-vq-f8.yaml's autoencoder
                  training step (LPIPS + PatchGAN on) at batch 8
  f  encode       encode throughput (images/s) of that autoencoder

A training step is what stages/diffusion.py does: loss (DDPM, eps prediction), backward, AdamW
step, EMA update. MFU = analytic training FLOPs (pipeline.networks.flops) x images/s / peak;
the peak comes from --peak-tflops or the device name (H100/H200: 989 TFLOP/s dense bf16,
A100: 312). Writes <out>/gpu_acceptance.json and <out>/gpu_acceptance.md (a table for
docs/benchmarks.md); every figure carries the device, torch/CUDA versions and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import config, seeding
from pipeline.diffusion.build import LOSSES
from pipeline.diffusion.schedules import DDPM
from pipeline.networks import available_backends, build_denoiser, training_flops
from pipeline.networks.layers import SelfAttention
from pipeline.runtime.ema import EMA
from pipeline.runtime.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peaks (NVIDIA data sheets, without sparsity)."""
VQ_F8 = ROOT / "configs" / "imagenet256-vq-f8.yaml"
# Reduced tiny pipeline: a few hundred steps each, FID on 1000 samples.
PIPELINE_GPU = (
    "autoencoder.max_steps=300",
    "autoencoder.mixed_precision=bf16",
    "diffusion.max_steps=600",
    "diffusion.mixed_precision=bf16",
    "diffusion.image_every=100000",
    "sample.num_samples=1000",
    "evaluate.likelihood_count=16",
)
# Smoke: the test suite's end-to-end sizes (tests/stages), fp32, FID only: checks the code path.
PIPELINE_SMOKE = (
    "data.source=digits",
    "data.limit=120",
    "data.resolution=16",
    "data.shard_max_count=40",
    "data.workers=0",
    "autoencoder.channels=8",
    "autoencoder.num_codes=32",
    "autoencoder.batch_size=8",
    "autoencoder.num_workers=0",
    "autoencoder.max_steps=3",
    "autoencoder.lpips=none",
    "encode.batch_size=16",
    "diffusion.backbone=dit",
    "diffusion.dit.width=32",
    "diffusion.dit.depth=1",
    "diffusion.dit.num_heads=2",
    "diffusion.dit.patch_size=1",
    "diffusion.batch_size=8",
    "diffusion.max_steps=3",
    "diffusion.num_workers=0",
    "diffusion.warmup_steps=1",
    "diffusion.ema_warmup_steps=0",
    "diffusion.log_every=1",
    "diffusion.image_every=1000",
    "diffusion.shuffle_buffer=50",
    "sample.num_samples=20",
    "sample.chunk_size=20",
    "sample.steps=3",
    "evaluate.classifier=false",
    "evaluate.reconstruction=false",
    "evaluate.likelihood_count=0",
    "evaluate.kid_subsets=2",
)
SMOKE_DIT = {"depth": 1, "width": 64, "num_heads": 2}  # S/2 shrunk: the code path, not the figure
SMOKE_AE = ", 32 channels (smoke)"
SMOKE_UNET = {"model_channels": 32, "channel_mult": (1, 2), "attention_resolutions": (4,), "num_head_channels": 32}


class Bench:
    """Device, precision and sizes of one acceptance run."""

    def __init__(self, args: argparse.Namespace):
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.smoke = args.smoke
        self.steps, self.warmup = (1, 1) if args.smoke else (args.steps, 3)
        self.max_batch = 2 if args.smoke else args.max_batch
        self.latent = 8 if args.smoke else 32
        self.image = 32 if args.smoke else 256  # PatchGAN needs 32 px
        self.peak_tflops = args.peak_tflops or self._detected_peak()

    def _detected_peak(self) -> float | None:
        name = self.device_name()
        return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)

    def device_name(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name(self.device)
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def reset_memory(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def timed(self, step: Callable[[], None]) -> float:
        """Seconds per call of ``step`` after the warm-up calls (which include any compilation)."""
        for _ in range(self.warmup):
            step()
        self.sync()
        start = time.perf_counter()
        for _ in range(self.steps):
            step()
        self.sync()
        return (time.perf_counter() - start) / self.steps


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)


def environment(bench: Bench) -> dict:
    return {
        "device": bench.device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if bench.cuda else None,
        "python": platform.python_version(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tf32": bench.cuda,
        "peak_tflops": bench.peak_tflops,
        "smoke": bench.smoke,
    }


# -- b, c: denoiser training throughput ---------------------------------------------------------
def _set_attention(net: torch.nn.Module, backend: str) -> None:
    for module in net.modules():
        if isinstance(module, SelfAttention):
            module.backend = backend


def _training_step(net, batch: int, bench: Bench, compiled: bool) -> Callable[[], None]:
    """One step of stages/diffusion.py on random latents: DDPM eps loss, backward, AdamW, EMA."""
    model = torch.compile(net) if compiled else net
    optimizer = build_optimizer(net.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    ema, process = EMA(net, decay=0.9999), DDPM.linear(1000)
    c = net.config.in_channels
    x0 = torch.randn(batch, c, bench.latent, bench.latent, device=bench.device)
    y = torch.randint(0, net.config.num_classes, (batch,), device=bench.device)
    generator, counter = seeding.generator(0, "gpu-acceptance"), [0]

    def step() -> None:
        with bench.autocast():
            loss = LOSSES["eps"](model, process, x0, generator, y=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counter[0] += 1
        ema.update(net, counter[0])

    return step


def _largest_batch(net, bench: Bench, compiled: bool, start: int) -> int:
    """Doubling search from ``start`` up to --max-batch: the largest batch whose step runs."""
    best, batch = 0, start
    while batch <= bench.max_batch:
        bench.reset_memory()
        try:
            _training_step(net, batch, bench, compiled)()
            bench.sync()
            best, batch = batch, batch * 2
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            break
        finally:
            net.zero_grad(set_to_none=True)
    if not best:
        raise RuntimeError(f"not even batch {start} fits")
    return best


def _throughput_rows(
    kind: str, preset: str, options: dict, backends: list[str], bench: Bench, compile_backends: list[str]
) -> list[dict]:
    with torch.device(bench.device):
        net = build_denoiser(kind, preset, input_size=bench.latent, in_channels=4, num_classes=1000, **options)
    flops = training_flops(net.config)
    rows = []
    for backend in backends:
        batch = 0
        for compiled in [False, True] if backend in compile_backends else [False]:
            label = f"{kind} {preset} {backend}{' compiled' if compiled else ''} bf16"
            try:
                _set_attention(net, backend)
                # compiled: the eager batch (a search would recompile for every batch size)
                batch = batch or _largest_batch(net, bench, compiled, start=2 if bench.smoke else 32)
                bench.reset_memory()
                seconds = bench.timed(_training_step(net, batch, bench, compiled))
                images = batch / seconds
                rows.append(
                    {
                        "config": label,
                        "batch": batch,
                        "images_per_s": images,
                        "step_ms": 1000 * seconds,
                        "model_tflops": flops * images / 1e12,
                        "peak_gib": bench.peak_gib(),
                        "mfu": flops * images / (bench.peak_tflops * 1e12) if bench.peak_tflops else None,
                    }
                )
            except Exception as err:
                rows.append({"config": label, "error": f"{type(err).__name__}: {err}"[:500]})
            finally:
                net.zero_grad(set_to_none=True)
                torch._dynamo.reset()
    return rows


def section_dit(bench: Bench) -> list[dict]:
    backends = list(available_backends())
    compile_backends = [] if bench.smoke else ["sdpa"]  # compiling on a CPU takes minutes, not seconds
    return _throughput_rows("dit", "XL/2", SMOKE_DIT if bench.smoke else {}, backends, bench, compile_backends)


def section_unet(bench: Bench) -> list[dict]:
    compile_backends = [] if bench.smoke else ["sdpa"]
    return _throughput_rows("unet", "32x32", SMOKE_UNET if bench.smoke else {}, ["sdpa"], bench, compile_backends)


# -- a: the tiny pipeline ----------------------------------------------------------------------
def section_pipeline(bench: Bench) -> list[dict]:
    from pipeline import cli, manifest

    with tempfile.TemporaryDirectory(prefix="gpu-acceptance-") as runs:
        overrides = [f"experiment.runs_dir={runs}", *(PIPELINE_SMOKE if bench.smoke else PIPELINE_GPU)]
        start = time.perf_counter()
        code = cli.main(["-q", "run", *overrides])
        seconds = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"latentpipe run exited with {code}")
        evaluated = manifest.read(config.load(overrides=overrides).stage_dir("evaluate"))
    metrics = evaluated.get("metrics", {})
    fid = next((v for k, v in metrics.items() if k.startswith("fid")), None)
    return [
        {
            "config": "tiny pipeline, " + ("fp32 smoke sizes" if bench.smoke else "bf16, reduced steps"),
            "seconds": seconds,
            "fid": fid,
            "overrides": overrides[1:],
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }
    ]


# -- d: DeepSpeed ZeRO-2 and the process group, in a child process -----------------------------
def distributed_worker() -> dict:
    """Runs in the child: one ZeRO-2 step and one all-reduce, through pipeline/runtime."""
    from pipeline.runtime.dist import Runtime

    runtime = Runtime(
        precision="bf16", deepspeed=ROOT / "configs" / "deepspeed" / "zero2.json", grad_clip=1.0, batch_size=4
    )
    torch.manual_seed(0)
    net = build_denoiser("dit", input_size=8, in_channels=4, width=64, depth=2, num_heads=2, num_classes=10)
    optimizer = build_optimizer(net.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    model, optimizer = runtime.prepare(net, optimizer)
    x0 = torch.randn(4, 4, 8, 8, device=runtime.device)
    y = torch.randint(0, 10, (4,), device=runtime.device)
    before = [p.detach().float().clone() for p in runtime.unwrap(model).parameters()]
    with runtime.autocast():
        loss = LOSSES["eps"](model, DDPM.linear(1000), x0, seeding.generator(0, "zero2"), y=y)
    runtime.backward(loss)
    runtime.step(optimizer)
    moved = any(not torch.equal(b, p.detach().float()) for b, p in zip(before, runtime.unwrap(model).parameters()))
    summed = runtime.all_reduce_sum(torch.full((3,), 2.0, device=runtime.device))
    return {
        "zero_stage": runtime.zero_stage,
        "world_size": runtime.world_size,
        "backend": runtime.accelerator.state.backend,
        "loss": float(loss),
        "parameters_moved": moved,
        "all_reduce_ok": bool(torch.equal(summed.cpu(), torch.full((3,), 2.0 * runtime.world_size))),
    }


def section_distributed(bench: Bench) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    if not bench.cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--distributed-worker"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker exited with {done.returncode}: {done.stderr[-1500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not (result["parameters_moved"] and result["all_reduce_ok"]):
        raise RuntimeError(f"ZeRO-2 step or all-reduce wrong: {result}")
    return [
        {
            "config": f"DeepSpeed ZeRO-{result['zero_stage']} step + all-reduce ({result['backend']}, "
            f"{result['world_size']} rank)",
            "seconds": time.perf_counter() - start,
            **result,
        }
    ]


# -- e, f: the ImageNet VQ-f8 autoencoder ---------------------------------------------------------
def _vq_f8(bench: Bench):
    from pipeline.autoencoder import LPIPS, PatchDiscriminator
    from pipeline.autoencoder.build import build_autoencoder

    cfg = config.load(VQ_F8, ["autoencoder.channels=32"] if bench.smoke else []).autoencoder
    with torch.device(bench.device):
        torch.manual_seed(0)
        model = build_autoencoder(cfg, image_channels=3)
        disc = PatchDiscriminator(in_channels=3)
    return cfg, model, LPIPS(cfg.lpips).to(bench.device), disc


def section_autoencoder(bench: Bench) -> list[dict]:
    from pipeline.autoencoder import adaptive_weight, generator_loss, hinge_d_loss
    from pipeline.autoencoder.objective import Objective

    cfg, model, lpips, disc = _vq_f8(bench)
    batch = 2 if bench.smoke else cfg.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=cfg.betas)
    d_optimizer = torch.optim.AdamW(disc.parameters(), lr=cfg.learning_rate, betas=cfg.betas)
    objective, generator = Objective(cfg, lpips), seeding.generator(0, "gpu-acceptance-ae")
    x = torch.rand(batch, 3, bench.image, bench.image, device=bench.device) * 2 - 1

    def step() -> None:  # stages/autoencoder.py after gan_start_step: the largest step it takes
        with bench.autocast():
            loss, x_hat, _, _ = objective(model, x, generator)
            gan = generator_loss(disc(x_hat))
        loss = loss + cfg.gan_weight * adaptive_weight(loss, gan, model.decoder.last_layer) * gan
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with bench.autocast():
            d_loss = hinge_d_loss(disc(x), disc(x_hat.detach()))
        d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optimizer.step()

    model.train()
    bench.reset_memory()
    seconds = bench.timed(step)
    return [
        {
            "config": f"imagenet256-vq-f8 autoencoder step (LPIPS-{cfg.lpips} + PatchGAN), "
            f"{cfg.mixed_precision}, {bench.image}px{SMOKE_AE if bench.smoke else ''}",
            "batch": batch,
            "step_ms": 1000 * seconds,
            "images_per_s": batch / seconds,
            "peak_gib": bench.peak_gib(),
        }
    ]


def section_encode(bench: Bench) -> list[dict]:
    _, model, _, _ = _vq_f8(bench)
    model.eval()
    batch = 2 if bench.smoke else 64
    x = torch.rand(batch, 3, bench.image, bench.image, device=bench.device) * 2 - 1

    @torch.no_grad()
    def encode() -> None:
        with bench.autocast():
            model.encode(x).indices.to(torch.int16)

    bench.reset_memory()
    seconds = bench.timed(encode)
    return [
        {
            "config": f"imagenet256-vq-f8 encode, bf16, {bench.image}px{SMOKE_AE if bench.smoke else ''}",
            "batch": batch,
            "images_per_s": batch / seconds,
            "step_ms": 1000 * seconds,
            "peak_gib": bench.peak_gib(),
        }
    ]


SECTIONS = {
    "a": ("pipeline", section_pipeline),
    "b": ("dit", section_dit),
    "c": ("unet", section_unet),
    "d": ("distributed", section_distributed),
    "e": ("autoencoder", section_autoencoder),
    "f": ("encode", section_encode),
}


# -- report --------------------------------------------------------------------------------------
def _cell(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict) -> str:
    env = report["environment"]
    smoke = " (smoke: not a measurement)" if env["smoke"] else ""
    lines = [
        (
            f"GPU acceptance on {env['device']}: torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
            f"{env['date']}, peak {_cell(env['peak_tflops'], 0)} TFLOP/s{smoke}."
        ),
        f"Command: `{env['command']}`",
        "",
        "| section | configuration | batch | images/s | step ms | MFU | peak GiB | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, section in report["sections"].items():
        if section.get("error"):
            lines.append(f"| {key} | - | - | - | - | - | - | error: {section['error'][:200]} |")
            continue
        for row in section["rows"]:
            notes = row.get("error") and f"error: {row['error'][:200]}"
            if notes is None and "fid" in row:
                notes = f"FID {_cell(row['fid'], 2)}, {row['seconds']:.0f} s"
            if notes is None and "backend" in row:
                notes = f"ok in {row['seconds']:.0f} s"
            mfu = row.get("mfu")
            lines.append(
                f"| {key} | {row['config']} | {_cell(row.get('batch'))} | {_cell(row.get('images_per_s'))} | "
                f"{_cell(row.get('step_ms'))} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
                f"{_cell(row.get('peak_gib'), 2)} | {notes or ''} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (the current CUDA device) or cpu")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes and single steps: checks the code, not the GPU"
    )
    parser.add_argument("--sections", default="abcdef", help="which sections to run (letters a-f)")
    parser.add_argument("--out", type=Path, default=Path("gpu_acceptance"), help="directory for the JSON and Markdown")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: from the GPU name)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per throughput figure")
    parser.add_argument("--max-batch", type=int, default=1024, help="upper end of the batch-size search")
    parser.add_argument("--distributed-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.distributed_worker:
        print(json.dumps(distributed_worker()))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or use --device cpu --smoke to check the code")
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls/convs outside autocast: TF32 tensor cores
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    bench = Bench(args)
    report = {"environment": environment(bench), "sections": {}}
    for letter in args.sections:
        name, run = SECTIONS[letter]
        start = time.perf_counter()
        try:
            rows, error = run(bench), None
        except Exception as err:
            rows, error = [], f"{type(err).__name__}: {err}"
            traceback.print_exc()
        finally:
            bench.reset_memory()
        report["sections"][f"{letter} {name}"] = {
            "rows": [{**row, "environment": "see top"} for row in rows],
            "error": error,
            "seconds": time.perf_counter() - start,
        }
        print(
            f"gpu_acceptance: {letter} {name}: {'error: ' + error if error else 'ok'} "
            f"({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_acceptance.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "gpu_acceptance.md").write_text(markdown(report))
    print((args.out / "gpu_acceptance.md").read_text())
    failed = [k for k, s in report["sections"].items() if s["error"] or any("error" in r for r in s["rows"])]
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
