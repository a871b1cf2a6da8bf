"""Test helper: from a network's time input back to its process's time, written from the
definitions of ``network_time`` (not by calling the code under test)."""

from __future__ import annotations

import torch

from pipeline.diffusion import DDPM, NCSN


def process_time(process, time):
    """The process time whose network time is ``time``: DDPM's index itself; NCSN's level index
    from 999 i / (L - 1); the SDEs' t from 999 t."""
    time = torch.as_tensor(time)
    if isinstance(process, DDPM):
        return time
    if isinstance(process, NCSN):
        return (time.double() * (len(process.levels) - 1) / 999).round().long()
    return time.double() / 999
