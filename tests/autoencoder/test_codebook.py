import math

import pytest
import torch

from pipeline.autoencoder.codebook import Codebook, kmeans, nearest, perplexity, usage


def clustered(n: int, centres: torch.Tensor, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """(n, D, 2, 2) encoder outputs scattered around ``centres`` (K, D)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(centres), (n, 2, 2), generator=g)
    vecs = centres[pick] + noise * torch.randn(n, 2, 2, centres.shape[1], generator=g)
    return vecs.permute(0, 3, 1, 2)


def test_straight_through_and_gradient_routing():
    cb = Codebook(8, 4, ema=False, kmeans_batches=0, dead_after=0).train()
    z = torch.randn(3, 4, 2, 2, requires_grad=True)
    out = cb(z)
    # value is the code, gradient to z_e is the identity
    torch.testing.assert_close(out.z_q, cb.codes[out.indices].permute(0, 3, 1, 2))
    (grad_z,) = torch.autograd.grad(out.z_q.sum(), z, retain_graph=True)
    assert torch.equal(grad_z, torch.ones_like(z))
    # codebook loss moves only the codes, commitment only the encoder output
    gz, ge = torch.autograd.grad(out.codebook_loss, [z, cb.codes], retain_graph=True, allow_unused=True)
    assert gz is None and ge.abs().sum() > 0
    gz, ge = torch.autograd.grad(out.commitment, [z, cb.codes], allow_unused=True)
    assert ge is None and gz.abs().sum() > 0


def test_losses_follow_the_vq_vae_objective():
    cb = Codebook(8, 4, ema=False, beta=0.25, kmeans_batches=0, dead_after=0).train()
    z = torch.randn(3, 4, 2, 2)
    out = cb(z)
    e = cb.codes[out.indices].permute(0, 3, 1, 2)
    sq = ((z - e) ** 2).mean()
    torch.testing.assert_close(out.codebook_loss, sq)
    torch.testing.assert_close(out.commitment, 0.25 * sq)
    assert cb.kl_nats == pytest.approx(math.log(8))


def test_lookup_is_the_nearest_code():
    g = torch.Generator().manual_seed(1)
    x, codes = torch.randn(500, 3, generator=g), torch.randn(16, 3, generator=g)
    brute = torch.cdist(x, codes).argmin(1)
    assert torch.equal(nearest(x, codes, chunk=64), brute)


@pytest.mark.filterwarnings("ignore:codebook has")
def test_ema_update_matches_the_equations():
    cb = Codebook(4, 2, ema=True, decay=0.9, eps=1e-5, kmeans_batches=0, dead_after=0).train()
    cb.codes.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    cb.code_sum.copy_(cb.codes)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0]]).view(3, 2, 1, 1)
    n_prev, m_prev = cb.cluster_size.clone(), cb.code_sum.clone()
    cb(z)
    counts = torch.tensor([2.0, 1.0, 0.0, 0.0])
    sums = torch.tensor([[1.0, 1.0], [9.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    n_new = 0.9 * n_prev + 0.1 * counts
    m_new = 0.9 * m_prev + 0.1 * sums
    total = n_new.sum()
    smoothed = (n_new + 1e-5) / (total + 4 * 1e-5) * total
    torch.testing.assert_close(cb.cluster_size, n_new)
    torch.testing.assert_close(cb.code_sum, m_new)
    torch.testing.assert_close(cb.codes, m_new / smoothed[:, None])


@pytest.mark.filterwarnings("ignore:codebook has")
def test_laplace_smoothing_keeps_never_used_codes_finite():
    cb = Codebook(64, 3, ema=True, decay=0.5, kmeans_batches=0, dead_after=0).train()
    for _ in range(60):  # N of unused codes decays to ~1e-18
        cb(torch.full((2, 3, 1, 1), 0.3))
    assert torch.isfinite(cb.codes).all() and cb.cluster_size.min() < 1e-15


def test_kmeans_init_from_the_first_batches_fits_the_data():
    centres = torch.randn(8, 4, generator=torch.Generator().manual_seed(3)) * 4
    # gradient mode: forward changes the codes only through the k-means initialisation
    cb = Codebook(8, 4, ema=False, kmeans_batches=2, kmeans_iters=20, dead_after=0).train()
    random_codes = cb.codes.detach().clone()
    first, second = clustered(64, centres, seed=1), clustered(64, centres, seed=2)
    cb(first)
    assert not cb.initialised and torch.equal(cb.codes, random_codes)  # still collecting
    out = cb(second)
    assert cb.initialised and usage(out.counts) == 1.0
    data = torch.cat([first, second]).permute(0, 2, 3, 1).reshape(-1, 4)
    codes = cb.codes.detach()
    idx = nearest(data, codes)
    for i in range(8):  # Lloyd's fixed point: each code is the mean of its cell
        torch.testing.assert_close(codes[i], data[idx == i].mean(0), rtol=1e-4, atol=1e-4)

    def err(c):
        return (data - c[nearest(data, c)]).pow(2).sum(1).mean()

    assert err(codes) < 0.1 * err(random_codes)


def test_kmeans_is_lloyd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, generator=g)
    c, counts = kmeans(x, 5, 50, g)
    idx = nearest(x, c)  # converged: every centre is the mean of its cluster
    for i in range(5):
        torch.testing.assert_close(c[i], x[idx == i].mean(0))
    assert counts.sum() == 300


@pytest.mark.parametrize("ema", [True, False])
def test_dead_codes_are_restarted_to_recent_encoder_outputs(ema):
    cb = Codebook(16, 4, ema=ema, kmeans_batches=0, dead_after=3, seed=0).train()
    z = torch.randn(8, 4, 2, 2, generator=torch.Generator().manual_seed(0)) + 5.0
    for _ in range(3):
        out = cb(z)
    assert cb.restarts > 0
    vectors = z.permute(0, 2, 3, 1).reshape(-1, 4)
    restarted = (cb.idle_steps() == 0) & (out.counts == 0)
    assert restarted.any()
    for code in cb.codes[restarted]:
        assert (vectors - code).abs().sum(1).min() < 1e-5
    assert cb.stats(out.counts, window=3)["dead_codes"] == 0


def test_cosine_codes_are_unit_vectors_and_projection_keeps_shape():
    cb = Codebook(32, 16, lookup_dim=4, cosine=True, ema=True, kmeans_batches=1, dead_after=2).train()
    z = torch.randn(4, 16, 3, 3)
    for _ in range(4):
        out = cb(z)
    assert out.z_q.shape == z.shape and out.indices.shape == (4, 3, 3)
    torch.testing.assert_close(cb.codes.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(cb.eval()(z).z_q, cb.embed(out.indices))


def test_eval_does_not_change_state():
    cb = Codebook(8, 4, kmeans_batches=0, dead_after=1).eval()
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    cb(torch.randn(2, 4, 2, 2))
    assert all(torch.equal(before[k], v) for k, v in cb.state_dict().items())


def test_perplexity_and_usage():
    assert perplexity(torch.full((10,), 3.0)) == pytest.approx(10)
    assert perplexity(torch.tensor([5.0, 0, 0])) == pytest.approx(1)
    assert usage(torch.tensor([1.0, 0, 2, 0])) == 0.5


def test_warns_when_a_batch_cannot_fill_the_codebook():
    cb = Codebook(64, 4, kmeans_batches=1).train()
    with pytest.warns(UserWarning, match="only 8 encoder vectors"):
        cb(torch.randn(2, 4, 2, 2))


def test_state_dict_round_trip_resumes_identically():
    def make():
        return Codebook(16, 4, kmeans_batches=1, dead_after=2, seed=3).train()

    batches = [torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    a = make()
    for z in batches:
        a(z)
    b = make()
    for z in batches[:3]:
        b(z)
    c = make()
    c.load_state_dict(b.state_dict())
    for z in batches[3:]:
        c(z)
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
