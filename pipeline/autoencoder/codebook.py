"""Vector quantiser of a VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation
Learning"), with the codebook learned either by gradient (the vq loss) or by exponential moving
averages (ibid. Appendix A.1), k-means initialisation, dead-code restarts, cosine codes and a
low-dimensional lookup (Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN",
Sec. 3.2, "factorized and l2-normalized codes").

Notation: codebook e in R^{K x D}; encoder output z_e = E(x); k = argmin_i ||z_e - e_i||_2;
z_q = e_k.

- Straight-through estimator (Eq. 2 and text below it): the decoder sees
  ``z_e + sg[e_k - z_e]``, whose value is e_k and whose gradient w.r.t. z_e is the identity.
- Loss (Eq. 3): ||x - D(e_k)||^2 + ||sg[z_e] - e_k||^2 + beta ||z_e - sg[e_k]||^2. This module
  returns the last two terms (means over elements): the *codebook loss* (gradient mode only) and
  the *commitment* (beta = 0.25 by default). The decoder gets only the reconstruction gradient,
  the encoder reconstruction + commitment, the codebook only the codebook loss.
- KL term: q(z|x) is deterministic and the prior uniform, so KL = log K, a constant that is
  reported (:attr:`Codebook.kl_nats`) and never optimised.
- EMA codebook (App. A.1): with n_i^(t) encoder outputs {z_ij} assigned to code i at step t,
  N_i^(t) = gamma N_i^(t-1) + (1 - gamma) n_i^(t),
  m_i^(t) = gamma m_i^(t-1) + (1 - gamma) sum_j z_ij^(t),
  e_i^(t) = m_i^(t) / N~_i^(t),
  with Laplace smoothing N~_i = (N_i + eps) / (n + K eps) * n, n = sum_i N_i, so an unused code
  never divides by zero (as in Sonnet's VectorQuantizerEMA).

Several ranks: every statistic that depends on the batch goes through two collectives passed
in by the runtime: ``all_reduce`` (elementwise sum over ranks) for counts and EMA sums, and
``all_gather`` (concatenation along dim 0 in rank order; ranks may contribute different numbers
of rows) for the vectors that k-means and restarts sample from (only on the steps that need
them). Random choices use a CPU generator seeded from (seed, step), identical on every rank,
that draws on the CPU and moves the few indices to the codes' device (:mod:`pipeline.seeding`),
so the choices are also the same on every device.
Hence one rank with batch 2B and two ranks with B each hold the same codebook.
The defaults (identity) are the single-process case; nothing is detected at construction.

Device discipline: a training step reads nothing back to the host except whether some code is
dead (one sync per step when ``dead_after`` > 0: the restart needs the gathered vectors of that
step, a collective no other step pays). The step counter and the "k-means done" flag have host
mirrors, refreshed from the buffers when a state dict is loaded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import seeding

Collective = Callable[[Tensor], Tensor]


def single_process(t: Tensor) -> Tensor:
    """The all_reduce / all_gather of a world of one rank."""
    return t


@dataclass
class Quantized:
    """Output of :meth:`Codebook.forward`."""

    z_q: Tensor
    """(N, C, H, W) decoder input: value e_k (projected back to C), straight-through gradient."""
    indices: Tensor
    """(N, H, W) code indices k."""
    commitment: Tensor
    """beta * mean ||z_e - sg[e_k]||^2 (trains the encoder)."""
    codebook_loss: Tensor
    """mean ||sg[z_e] - e_k||^2 (trains the codebook; zero in EMA mode)."""
    counts: Tensor
    """(K,) how many vectors each code received in this step, summed over ranks."""

    @property
    def loss(self) -> Tensor:
        return self.commitment + self.codebook_loss


def perplexity(counts: Tensor) -> Tensor:
    """exp(H(p)) of the code histogram p = counts / sum(counts): K when every code is used
    equally, 1 when one code takes everything."""
    p = counts.double() / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-30))).sum()).float()


def usage(counts: Tensor) -> Tensor:
    """Fraction of codes with a non-zero count."""
    return (counts > 0).float().mean()


def nearest(x: Tensor, codes: Tensor, *, cosine: bool = False, chunk: int = 8192) -> Tensor:
    """argmin_i ||x - codes_i||_2 per row (argmax of the dot product for unit vectors), computed
    as ||e_i||^2 - 2 x.e_i in row chunks so M x K distances never sit in memory at once."""
    sq = None if cosine else codes.pow(2).sum(1)
    out = []
    for part in x.split(chunk):
        score = part @ codes.t()
        out.append(score.argmax(1) if cosine else (sq - 2 * score).argmin(1))
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.long)


def code_counts(idx: Tensor, k: int) -> Tensor:
    """(k,) float histogram of code indices. A scatter-add, not ``bincount``: bincount's output
    size depends on the data, so it reads the maximum back to the host on every call."""
    return torch.zeros(k, device=idx.device).index_add_(0, idx, torch.ones(idx.shape, device=idx.device))


def random_rows(n: int, k: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """k row indices of an n-row table: distinct (a random permutation's first k) when n >= k,
    drawn with repeats otherwise; drawn on the generator's device, returned on ``device``."""
    if n >= k:
        return seeding.randperm(n, generator, device=device)[:k]
    return seeding.randint(n, (k,), generator, device=device)


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator, *, cosine: bool = False):
    """Lloyd's algorithm (Lloyd 1982) from k random distinct rows of x (with repeats when x has
    fewer than k rows). Empty clusters keep their previous centre. Returns (centres, counts)."""
    centres = x[random_rows(x.shape[0], k, generator, x.device)].clone()
    for it in range(iters + 1):
        idx = nearest(x, centres, cosine=cosine)
        counts = code_counts(idx, k).to(x.dtype)
        if it == iters:
            break
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        if cosine:
            centres = F.normalize(centres, dim=1)
    return centres, counts


class Codebook(nn.Module):
    """The quantiser between encoder and decoder; see the module docstring for the equations.

    num_codes: K.  dim: channels C of the encoder output.
    lookup_dim: D < C gives a 1x1-conv projection C -> D before the lookup and D -> C after it
        (factorised codes); None looks up in C directly.
    ema: learn the codebook by EMA (decay gamma, Laplace eps) instead of the codebook loss.
    beta: commitment weight.
    cosine: l2-normalise encoder vectors and codes before the lookup.
    kmeans_batches / kmeans_iters / kmeans_max_samples: initialise the codes by k-means on the
        encoder vectors of the first ``kmeans_batches`` training steps (0 disables: codes start
        uniform in [-1/K, 1/K] as in VQGAN), subsampled to at most ``kmeans_max_samples``.
    dead_after: a code unused for this many training steps is reset to a random encoder vector
        of the current step (0 disables).
    seed: seeds the initial codes, and (with the step) k-means and restarts: the same on all ranks.
    all_reduce / all_gather: the cross-rank collectives described in the module docstring.
    """

    # registered buffers (``codes`` is a Parameter when the codebook is learned by its loss);
    # declared so the type checker sees Tensors, not nn.Module.__getattr__'s ``Tensor | Module``
    codes: Tensor
    cluster_size: Tensor
    code_sum: Tensor
    step: Tensor
    last_used: Tensor
    restarts: Tensor
    initialised: Tensor

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        lookup_dim: int | None = None,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        beta: float = 0.25,
        cosine: bool = False,
        kmeans_batches: int = 1,
        kmeans_iters: int = 10,
        kmeans_max_samples: int = 1 << 16,
        dead_after: int = 100,
        seed: int = 0,
        all_reduce: Collective = single_process,
        all_gather: Collective = single_process,
    ):
        super().__init__()
        if num_codes < 2 or dim < 1 or (lookup_dim is not None and lookup_dim < 1):
            raise ValueError(f"need num_codes >= 2 and positive dims, got {num_codes}, {dim}, {lookup_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.num_codes, self.dim, self.ema, self.decay, self.eps = num_codes, dim, ema, decay, eps
        self.beta, self.cosine, self.seed = beta, cosine, seed
        self.kmeans_batches, self.kmeans_iters = kmeans_batches, kmeans_iters
        self.kmeans_max_samples, self.dead_after = kmeans_max_samples, dead_after
        self.all_reduce, self.all_gather = all_reduce, all_gather
        d = lookup_dim or dim
        self.proj_in = nn.Conv2d(dim, d, 1) if lookup_dim else nn.Identity()
        self.proj_out = nn.Conv2d(d, dim, 1) if lookup_dim else nn.Identity()
        # same initial codes on every rank (drawn on the CPU at construction)
        init = (seeding.rand((num_codes, d), torch.Generator().manual_seed(seed)) * 2 - 1) / num_codes
        if cosine:
            init = F.normalize(init, dim=1)
        if ema:
            self.register_buffer("codes", init)
            self.register_buffer("cluster_size", torch.ones(num_codes))  # N_i (1: e = m / N = codes)
            self.register_buffer("code_sum", init.clone())  # m_i
        else:
            self.codes = nn.Parameter(init)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(kmeans_batches == 0))
        self._host_step, self._host_initialised = 0, kmeans_batches == 0  # mirrors: no reads from the device
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh_host_mirrors())
        self._kmeans_pool: list[Tensor] = []
        self._warned_small_batch = False

    def _refresh_host_mirrors(self) -> None:
        self._host_step, self._host_initialised = int(self.step), bool(self.initialised)

    @property
    def kl_nats(self) -> float:
        """KL(q(z|x) || uniform prior) = log K for the deterministic VQ posterior."""
        return math.log(self.num_codes)

    def idle_steps(self) -> Tensor:
        """(K,) training steps since each code was last used (or restarted / initialised)."""
        return self.step - self.last_used

    def stats(self, counts: Tensor, window: int) -> dict[str, float]:
        """Perplexity of ``counts``, fraction of codes used within the last ``window`` steps,
        and the number of codes idle for ``dead_after`` steps or more (``window`` if disabled)."""
        idle = self.idle_steps()
        return {
            "perplexity": float(perplexity(counts)),
            "usage": float((idle < window).float().mean()),
            "dead_codes": int((idle >= (self.dead_after or window)).sum()),
        }

    def embed(self, indices: Tensor) -> Tensor:
        """Code indices (N, H, W) -> decoder input (N, C, H, W)."""
        codes = F.normalize(self.codes, dim=1) if self.cosine else self.codes
        return self.proj_out(codes[indices].permute(0, 3, 1, 2))

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 2_147_483_647 + self._host_step)

    def forward(self, z_e: Tensor) -> Quantized:
        z = self.proj_in(z_e)
        n, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.cosine:
            flat = F.normalize(flat, dim=1)
        if self.training and not self._host_initialised:
            self._collect_for_kmeans(flat.detach())
        codes = F.normalize(self.codes, dim=1) if self.cosine and not self.ema else self.codes
        with torch.no_grad():
            idx = nearest(flat.detach().float(), codes.detach().float(), cosine=self.cosine)
        e = codes[idx].to(flat.dtype)
        commitment = self.beta * F.mse_loss(flat, e.detach())
        codebook_loss = flat.new_zeros(()) if self.ema else F.mse_loss(flat.detach(), e)
        counts = code_counts(idx, self.num_codes)
        if self.training:  # evaluation is per-rank work: a lone rank must never wait in a collective
            counts = self.all_reduce(counts)
            self._update(flat.detach().float(), idx, counts)
        z_q = (flat + (e - flat).detach()).view(n, h, w, d).permute(0, 3, 1, 2)
        return Quantized(self.proj_out(z_q), idx.view(n, h, w), commitment, codebook_loss, counts)

    @torch.no_grad()
    def _collect_for_kmeans(self, flat: Tensor) -> None:
        pool = self.all_gather(flat.float())
        self._warn_if_batch_cannot_fill(pool.shape[0])
        self._kmeans_pool.append(pool)
        if len(self._kmeans_pool) < self.kmeans_batches:
            return
        data, g = torch.cat(self._kmeans_pool), self._generator()
        if data.shape[0] > self.kmeans_max_samples:
            data = data[random_rows(data.shape[0], self.kmeans_max_samples, g, data.device)]
        centres, counts = kmeans(data, self.num_codes, self.kmeans_iters, g, cosine=self.cosine)
        self.codes.data.copy_(centres)
        if self.ema:  # N = per-step counts of the k-means clusters, m = e * N
            self.cluster_size.copy_(counts * (pool.shape[0] / data.shape[0]))
            self.code_sum.copy_(centres * self.cluster_size[:, None])
        self.last_used.copy_(self.step.expand_as(self.last_used))
        self.initialised.fill_(True)
        self._host_initialised = True
        self._kmeans_pool = []

    def _warn_if_batch_cannot_fill(self, vectors: int) -> None:
        if vectors < self.num_codes and not self._warned_small_batch:
            self._warned_small_batch = True
            warnings.warn(
                f"codebook has {self.num_codes} codes but a training step yields only {vectors} "
                f"encoder vectors (batch x latent height x width, all ranks): at most {vectors} "
                f"codes can be used per step and k-means starts from repeated vectors; lower "
                f"num_codes or raise the batch size",
                stacklevel=3,
            )

    @torch.no_grad()
    def _update(self, flat: Tensor, idx: Tensor, counts: Tensor) -> None:
        """One training step of codebook state: EMA statistics, usage, dead-code restarts."""
        self.step += 1
        self._host_step += 1
        if self.ema:
            sums = self.all_reduce(torch.zeros_like(self.code_sum).index_add_(0, idx, flat))
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.code_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
            new = self.code_sum / smoothed[:, None]
            self.codes.copy_(F.normalize(new, dim=1) if self.cosine else new)
        self.last_used.copy_(torch.where(counts > 0, self.step, self.last_used))
        if self.dead_after and self._host_initialised:
            dead = self.idle_steps() >= self.dead_after
            # the one read-back of a step; counts are reduced, so every rank takes the same branch
            if bool(dead.any()):
                self.restart(dead, self.all_gather(flat))

    def restart(self, dead: Tensor, pool: Tensor) -> None:
        """Reset the codes marked in ``dead`` (K,) to random rows of ``pool`` (the encoder vectors
        of this step on all ranks): the i-th dead code takes the i-th of K random rows (distinct
        when the pool has at least K rows). Branch-free, so nothing is read back to the host."""
        self._warn_if_batch_cannot_fill(pool.shape[0])
        rows = random_rows(pool.shape[0], self.num_codes, self._generator(), pool.device)
        slot = (dead.long().cumsum(0) - 1).clamp_min(0)  # rank of each dead code among the dead
        fresh, mask = pool[rows[slot]], dead[:, None]
        self.codes.data.copy_(torch.where(mask, fresh.to(self.codes.dtype), self.codes.data))
        if self.ema:
            self.cluster_size.copy_(torch.where(dead, 1.0, self.cluster_size))
            self.code_sum.copy_(torch.where(mask, fresh, self.code_sum))
        self.last_used.copy_(torch.where(dead, self.step, self.last_used))
        self.restarts += dead.sum()
