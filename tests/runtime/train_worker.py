"""A toy training job for tests/runtime: run under torchrun (or plain python, a world of one).

Each step's global batch is rows [step * G, (step + 1) * G) of a fixed data set (G = the
per-rank batch times the world size); rank r takes its r-th slice, so any world size sees the
same global batches. Trains with the Runtime (DDP or a DeepSpeed config), AdamW + cosine
schedule and an EMA; checkpoints through ``checkpoint.save(training_state)`` every
``--checkpoint-every`` steps and resumes from the newest checkpoint; ``--stop-at`` ends the job
early (as a preempted job would); ``--accumulate`` splits each rank's batch into micro-batches;
``--dump-resumed`` writes the resumed optimiser state, gathered (ZeRO), right after the resume.
Writes the per-step global loss, the final full weights and
the EMA weights to ``--out`` (rank 0).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from pipeline.runtime import checkpoint
from pipeline.runtime.dist import Runtime
from pipeline.runtime.ema import EMA
from pipeline.runtime.optim import build_optimizer, lr_schedule

DIM, HIDDEN, OUT = 6, 16, 3


def _data(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(rows, DIM, generator=generator)
    return x, torch.sin(x[:, :OUT] * 2) + 0.1 * torch.randn(rows, OUT, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--batch", type=int, required=True, help="per-rank batch")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--checkpoints", type=Path, default=None)
    parser.add_argument("--grad-clip", type=float, default=0.0)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimiser step")
    parser.add_argument("--dump-resumed", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    runtime = Runtime(
        deepspeed=args.deepspeed,
        grad_clip=args.grad_clip,
        batch_size=args.batch // args.accumulate,
        gradient_accumulation_steps=args.accumulate,
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(DIM, HIDDEN), torch.nn.LayerNorm(HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, OUT)
    )
    optimizer = build_optimizer(model.parameters(), lr=3e-2, betas=(0.9, 0.99), weight_decay=0.01, fused=False)
    scheduler = lr_schedule(optimizer, warmup_steps=2, total_steps=args.steps, kind="cosine", min_lr_ratio=0.1)
    model, optimizer = runtime.prepare(model, optimizer)
    with runtime.full_parameters(model):
        ema = EMA(runtime.unwrap(model), decay=0.8, warmup_steps=3)
        initial = {k: v.detach().clone() for k, v in runtime.unwrap(model).state_dict().items()}

    step, losses, norms = 0, [], []
    if args.checkpoints is not None and (found := checkpoint.latest(args.checkpoints)) is not None:
        shared, own = checkpoint.load(found, runtime.rank, runtime.world_size)
        runtime.load_training_state(model, optimizer, shared, own)
        scheduler.load_state_dict(shared["scheduler"])
        ema.load_state_dict(shared["ema"])
        step, losses, norms = int(shared["step"]), list(shared["losses"]), list(shared["norms"])
        if args.dump_resumed is not None:
            _, _, elastic = runtime.training_state(model, optimizer)
            if runtime.is_main:
                torch.save(elastic, args.dump_resumed)

    x, y = _data(args.steps * args.batch * runtime.world_size)
    global_batch = args.batch * runtime.world_size
    while step < (args.stop_at or args.steps):
        start = step * global_batch + runtime.rank * args.batch
        micro = args.batch // args.accumulate
        total = 0.0
        for first in range(start, start + args.batch, micro):  # micro-batches of one optimiser step
            xb, yb = x[first : first + micro].to(runtime.device), y[first : first + micro].to(runtime.device)
            with runtime.accumulate(model):
                with runtime.autocast():
                    loss = torch.nn.functional.mse_loss(model(xb).float(), yb)
                runtime.backward(loss)
                total += loss.detach().float() / args.accumulate
        # DDP measures the norm with an infinite bound; DeepSpeed's bound must equal its config's
        bound = args.grad_clip or (0.0 if runtime.zero_stage else math.inf)
        norms.append(float(runtime.clip_grad_norm(model.parameters(), bound, optimizer)))
        runtime.step(optimizer)
        optimizer.zero_grad(set_to_none=True)  # after the step: inside a window it would drop gradients
        scheduler.step()
        step += 1
        with runtime.full_parameters(model):
            ema.update(runtime.unwrap(model), step)
        losses.append(float(runtime.all_reduce_sum(total).item() / runtime.world_size))
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            shared, own, elastic = runtime.training_state(model, optimizer)
            shared.update(scheduler=scheduler.state_dict(), ema=ema.state_dict(), step=step, losses=losses, norms=norms)
            checkpoint.save(args.checkpoints, step, shared, own, runtime, keep=2, resume_key="toy", elastic=elastic)

    with runtime.full_parameters(model):
        final = {k: v.detach().cpu().clone() for k, v in runtime.unwrap(model).state_dict().items()}
    if runtime.is_main:
        torch.save(
            {
                "losses": losses,
                "norms": norms,
                "final": final,
                "initial": initial,
                "ema": ema.averaged_state_dict(),
                "world_size": runtime.world_size,
                "zero_stage": runtime.zero_stage,
            },
            args.out,
        )
    runtime.barrier()


if __name__ == "__main__":
    main()
