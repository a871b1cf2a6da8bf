"""Process group, devices, mixed precision and collectives: the one place that touches
accelerate and torch.distributed. Models and math receive collectives as plain functions
(``all_reduce_sum``, ``all_gather_rows``) and stay single-device code.

Launch several processes with ``accelerate launch`` (``--cpu`` uses gloo) or ``torchrun``;
a plain ``python``/``latentpipe`` call is a world of one.
"""

from __future__ import annotations

import contextlib
import torch
import torch.distributed as torch_dist


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Runtime:
    """One rank's view of the job: accelerate's ``Accelerator`` plus the collectives we need.

    Mixed precision is applied here (autocast, and a gradient scaler for fp16) rather than by
    accelerate: accelerate keeps its precision in process-global state that refuses to change,
    and one ``latentpipe run`` process runs several stages with their own precisions.
    """

    def __init__(self, *, precision: str = "fp32", cpu: bool | None = None):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available() if cpu is None else cpu)
        self.dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, *objects):
        """Wrap models/optimisers for the launch mode (DDP, DeepSpeed, mixed precision)."""
        return self.accelerator.prepare(*objects)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss if self.scaler is None else self.scaler.scale(loss))

    def clip_grad_norm(self, parameters, max_norm: float, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step (skipped by the fp16 scaler when gradients overflowed)."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks (a new tensor; the input is not modified)."""
        if self.world_size == 1:
            return tensor
        out = tensor.clone()
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
        return out

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows along dim 0 in rank order; row counts may differ."""
        if self.world_size == 1:
            return tensor
        count = torch.tensor([tensor.shape[0]], device=tensor.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        torch_dist.all_gather(counts, count)
        longest = int(max(c.item() for c in counts))
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (e.g. a preemption signal, a NaN)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())
