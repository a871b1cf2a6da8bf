"""The pipeline's stages, one module each, in run order.

A stage module has ``NAME``, ``SECTIONS`` (the config sections its output depends on),
``INPUTS`` (the upstream stages it reads) and ``run(cfg)``.
"""

from stages import autoencoder, diffusion, encode, evaluate, prepare, sample

PIPELINE = (prepare, autoencoder, encode, diffusion, sample, evaluate)
BY_NAME = {stage.NAME: stage for stage in PIPELINE}
