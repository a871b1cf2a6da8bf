"""Reconstruction metrics for image batches (per image, so callers can average over ranks).

- PSNR = 10 log10(R^2 / MSE), R the data range (2 for images in [-1, 1]).
- SSIM (Wang et al. 2004, "Image Quality Assessment: From Error Visibility to Structural
  Similarity", Eq. 13): mean over positions and channels of
  ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
  local statistics under an 11x11 Gaussian window with sigma 1.5 (Sec. III-C), C1 = (0.01 R)^2,
  C2 = (0.03 R)^2, over the "valid" positions (no padding), as scikit-image's
  ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB of (N, C, H, W) batches; inf for identical images."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> Tensor:
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0, *, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM of (N, C, H, W) batches (H, W >= window), averaged over channels."""
    if x.shape != y.shape or min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs equal shapes with H, W >= {window}, got {tuple(x.shape)}, {tuple(y.shape)}")
    c = x.shape[1]
    g = _gaussian_window(window, sigma).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)
    x, y = x.double(), y.double()
    blur = lambda t: F.conv2d(t, kernel, groups=c)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()
