"""Runtimes one after another in one process, as `latentpipe run` makes one per stage: plain
(DDP), DeepSpeed ZeRO (config path in argv[1]), plain again; each trains a step and reduces.
Prints "ok <kind>" per Runtime."""

import os
import sys

import torch

from pipeline.runtime.dist import Runtime
from pipeline.runtime.optim import build_optimizer


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for deepspeed in (None, sys.argv[1], None):
        runtime = Runtime(deepspeed=deepspeed, batch_size=2)
        assert runtime.zero_stage == (2 if deepspeed else 0), runtime.zero_stage
        assert runtime.world_size == world and runtime.all_reduce_sum(torch.ones(1)).item() == world
        model = torch.nn.Linear(3, 2)
        optimizer = build_optimizer(model.parameters(), lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
        model, optimizer = runtime.prepare(model, optimizer)
        before = runtime.unwrap(model).weight.detach().clone()
        runtime.backward(model(torch.randn(2, 3)).square().mean())
        runtime.step(optimizer)
        optimizer.zero_grad()
        assert not torch.equal(before, runtime.unwrap(model).weight), "the step did not move the weights"
        assert (type(model).__name__ == "DeepSpeedEngine") == bool(deepspeed), type(model)
        print("ok", "deepspeed" if deepspeed else "plain", flush=True)
        runtime.barrier()


if __name__ == "__main__":
    main()
