"""Codebook state under two real gloo ranks with batch B each == one process with batch 2B."""

import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.autoencoder.codebook import Codebook

STEPS, B, DIM, K = 10, 6, 4, 16


def make_codebook(all_reduce=None, all_gather=None) -> Codebook:
    kw = {} if all_reduce is None else {"all_reduce": all_reduce, "all_gather": all_gather}
    return Codebook(K, DIM, ema=True, decay=0.8, kmeans_batches=2, kmeans_iters=5, dead_after=2, seed=7, **kw).train()


def batch(step: int) -> torch.Tensor:
    """The global batch (2B, DIM, 3, 3) of a step. Its modes move over time, so codes die and
    are restarted; the first steps feed k-means."""
    g = torch.Generator().manual_seed(step)
    centres = torch.randn(4, DIM, generator=g) * 3 + step
    pick = torch.randint(4, (2 * B, 3, 3), generator=g)
    return (centres[pick] + 0.1 * torch.randn(2 * B, 3, 3, DIM, generator=g)).permute(0, 3, 1, 2)


def run(codebook: Codebook, rank: int, world: int) -> dict:
    for step in range(STEPS):
        codebook(batch(step).chunk(world)[rank])
    return {k: v.clone() for k, v in codebook.state_dict().items()}


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 in rank order; ranks may hold different numbers of rows."""
    sizes = [torch.zeros((), dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(t.shape[0]))
    padded = t.new_zeros((int(max(sizes)), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n)] for p, n in zip(parts, sizes)])


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        torch.save(run(make_codebook(all_reduce, all_gather), rank, world), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_hold_the_codebook_of_one_rank_with_twice_the_batch(tmp_path, monkeypatch):
    # spawned children import this module by its pytest name (tests.autoencoder....)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = run(make_codebook(), 0, 1)
    assert single["initialised"] and single["restarts"] > 0  # the test exercises both paths
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # every rank holds the same state
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-5, msg=key)
