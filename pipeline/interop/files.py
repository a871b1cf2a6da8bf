"""Reading weight files given by the user: safetensors, or a pickle-format ``.ckpt``/``.pt``
loaded with ``torch.load(weights_only=True)`` only (no code from a checkpoint ever runs), and the
sha256 of every file read, for the manifest."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from pipeline.errors import LatentpipeError
from pipeline.manifest import sha256_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def existing(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or an error naming ``what`` was expected there."""
    path = Path(path).expanduser()
    if not path.exists():
        raise LatentpipeError(
            f"{path} does not exist: expected {what} (weights are never downloaded at run "
            f"time; copy them to this machine and pass their local path)"
        )
    return path


def read_state_dict(path: Path, nested: tuple[str, ...] = ("state_dict",)) -> dict[str, Tensor]:
    """The tensors of one weight file. A checkpoint that keeps them under a key (Lightning/CompVis:
    ``state_dict``; DiT's training script: ``ema`` and ``model``) gives the first of ``nested``."""
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise LatentpipeError(
            f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors or one of {PICKLE_SUFFIXES}"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an unpickling refusal names the offending global
        raise LatentpipeError(
            f"{path} cannot be read with weights-only loading ({error}). It holds pickled objects "
            f"besides tensors; on a machine you trust, save just its tensors as .safetensors "
            f"(safetensors.torch.save_file) and pass that file"
        ) from error
    if isinstance(data, dict):
        data = next((data[key] for key in nested if isinstance(data.get(key), dict)), data)
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise LatentpipeError(f"{path} does not hold a state dict (name -> tensor)")
    return data


def weight_hashes(paths: list[Path]) -> dict[str, str]:
    """file name -> sha256 of every weight file a model was read from."""
    return {path.name: sha256_file(path) for path in paths}
