"""The attention backends compute the same function; half precision never overflows to NaN."""

import pytest
import torch

from pipeline.networks.layers import BACKENDS, SelfAttention, attention, available_backends, check_backend

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def qkv(dtype, scale=1.0, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 3, 17, 16)  # batch, heads, tokens (odd on purpose), head_dim
    return [(torch.randn(shape, generator=gen) * scale).to(device, dtype) for _ in range(3)]


def reference(q, k, v):
    """fp32 softmax(q k^T / sqrt(d)) v written out from the definition."""
    q, k, v = q.double(), k.double(), v.double()
    weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backends_agree_with_the_definition(backend, dtype):
    if backend == "xformers":
        pytest.skip("xformers kernels need CUDA; covered by the gpu test")
    q, k, v = qkv(dtype)
    out = attention(q, k, v, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_logits_do_not_overflow_in_half_precision(backend, dtype):
    q, k, v = qkv(dtype, scale=120.0)
    logits = q @ k.transpose(-2, -1)
    if dtype == torch.float16:
        assert not torch.isfinite(logits).all(), "the inputs must overflow fp16 when multiplied naively"
    out = attention(q, k, v, backend=backend)
    assert torch.isfinite(out).all()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_gradients_agree_across_backends(backend):
    q, k, v = (t.requires_grad_() for t in qkv(torch.float64))
    attention(q, k, v, backend=backend).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference(q, k, v).square().sum().backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want)


def test_self_attention_layer_is_backend_independent():
    torch.manual_seed(0)
    sdpa = SelfAttention(32, 4, backend="sdpa")
    math = SelfAttention(32, 4, backend="math")
    math.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 10, 32)
    torch.testing.assert_close(sdpa(x), math(x), atol=1e-5, rtol=1e-5)


def test_unknown_or_missing_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="flash"):
        check_backend("flash")
    if "xformers" not in available_backends():
        with pytest.raises(ValueError, match="xformers"):
            SelfAttention(32, 4, backend="xformers")
    assert set(available_backends()) <= set(BACKENDS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backends_agree_on_gpu(dtype):
    q, k, v = qkv(dtype, scale=30.0, device="cuda")
    want = reference(q, k, v)
    tol = TOLERANCE[dtype]
    for backend in available_backends():
        out = attention(q, k, v, backend=backend)
        assert torch.isfinite(out).all(), backend
        torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
