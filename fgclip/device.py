"""The one rule for where a stage computes: ``train.device`` (auto, cpu, cuda)."""

from __future__ import annotations

import torch

from fgclip.errors import FGClipError


class DeviceError(FGClipError, RuntimeError):
    """The configured device is not available on this machine."""


def on_cuda(choice: str) -> bool:
    """Whether ``choice`` runs on CUDA here: not ``cpu``, and a GPU is present."""
    return choice != "cpu" and torch.cuda.is_available()


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; ``cuda`` without a GPU is an error.

    Under torchrun each process takes the GPU of its ``local_rank`` (and makes it
    the current one, so collectives and new tensors land there).
    """
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("train.device is 'cuda' but no CUDA device is available")
    if on_cuda(choice):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
