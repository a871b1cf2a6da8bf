"""latentpipe: a staged latent-diffusion training pipeline (library part).

Everything under ``pipeline`` is rank-agnostic single-process code; distributed concerns
live in ``pipeline.runtime`` only (see docs/architecture.md and ../shared/DESIGN.md).
"""

__version__ = "0.1.0"
