"""The pipeline's stages, one module each; their order, config sections and inputs are listed in
:mod:`pipeline.stage_registry`.

A stage module has ``NAME``, ``SECTIONS`` and ``INPUTS`` (read from its registry entry) and
``run(cfg) -> Path``. It reads its inputs only through :mod:`pipeline.artifacts` and publishes
its output as one of them; it never imports another stage.
"""
