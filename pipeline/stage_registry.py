"""The pipeline's stages in run order: what each one depends on, and where its program is.

The library never imports the ``stages`` package statically (the stages are the library's
users, not its parts): the CLI and the SLURM submitter find a stage's ``run(cfg)`` here, by
the module path recorded in its :class:`StageSpec`. This module is the only place in
``pipeline/`` that turns a module name into a module.

    python -m pipeline.stage_registry checkpoints STAGE   # prints yes|no (for slurm/common.sh)
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import LatentpipeError

if TYPE_CHECKING:  # pipeline.config imports torch; slurm/common.sh asks this module at every job start
    from pipeline.config import Config


@dataclass(frozen=True)
class StageSpec:
    name: str
    sections: tuple[str, ...]
    """The config sections the stage's output depends on (its manifest's ``config_hash``)."""
    inputs: tuple[str, ...]
    """The upstream stages it reads, checked complete and consistent before it starts."""
    checkpoints: bool
    """Whether it saves its state on SIGUSR1 and exits 75 to be requeued (slurm/common.sh asks)."""
    module: str
    """The module whose ``run(cfg) -> Path`` runs the stage."""

    def run(self, cfg: Config) -> Path:
        """Run the stage: its module's ``run(cfg)``, imported on first use (it pulls in torch)."""
        run: Callable[[Config], Path] = importlib.import_module(self.module).run
        return run(cfg)

    def doc(self) -> str:
        """The stage module's docstring, read from its source without importing it (for --help)."""
        found = importlib.util.find_spec(self.module)
        if found is None or found.origin is None:
            raise LatentpipeError(f"stage '{self.name}': module {self.module} is not installed")
        return ast.get_docstring(ast.parse(Path(found.origin).read_text())) or ""


PIPELINE = (
    StageSpec("prepare", ("data",), (), checkpoints=False, module="stages.prepare"),
    # experiment: its seed
    StageSpec(
        "autoencoder",
        ("experiment", "data", "autoencoder"),
        ("prepare",),
        checkpoints=True,
        module="stages.autoencoder",
    ),
    StageSpec("encode", ("encode",), ("prepare", "autoencoder"), checkpoints=False, module="stages.encode"),
    StageSpec(
        "diffusion",
        ("experiment", "diffusion"),
        ("prepare", "autoencoder", "encode"),
        checkpoints=True,
        module="stages.diffusion",
    ),
    StageSpec(
        "sample",
        ("experiment", "sample"),
        ("prepare", "autoencoder", "encode", "diffusion"),
        checkpoints=False,
        module="stages.sample",
    ),
    StageSpec(
        "evaluate",
        ("experiment", "evaluate"),
        ("prepare", "autoencoder", "encode", "diffusion", "sample"),
        checkpoints=False,
        module="stages.evaluate",
    ),
)
STAGES = {spec.name: spec for spec in PIPELINE}


def get(name: str) -> StageSpec:
    """The stage called ``name``; an unknown name is an error listing the known ones."""
    if name not in STAGES:
        raise LatentpipeError(f"unknown stage '{name}'; choose from {', '.join(STAGES)}")
    return STAGES[name]


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "checkpoints" or argv[1] not in STAGES:
        print(f"usage: python -m pipeline.stage_registry checkpoints {{{','.join(STAGES)}}}", file=sys.stderr)
        return 2
    print("yes" if STAGES[argv[1]].checkpoints else "no")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
