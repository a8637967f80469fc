"""Which device a rank trains on, and the communication backend that goes with it.

Each rank uses one device: `cuda:LOCAL_RANK` (torchrun; `SLURM_LOCALID` under srun) on GPUs, else the CPU. The
process group's backend follows the device (NCCL for CUDA, gloo for the CPU), and so do the device meshes, so a
collective always receives tensors of the device its backend serves.
"""

from __future__ import annotations

import os

import torch

from mimo_train.config import ConfigError


def local_rank(env=os.environ) -> int:
    """This process's index on its node: torchrun's LOCAL_RANK, else Slurm's SLURM_LOCALID, else 0."""
    return int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))


def resolve_device(setting: str = "auto", env=os.environ, cuda_available: bool | None = None) -> torch.device:
    """`train.device` (auto | cpu | cuda) -> this rank's torch.device."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if setting == "cpu" or (setting == "auto" and not cuda_available):
        return torch.device("cpu")
    if setting not in ("auto", "cuda"):
        raise ConfigError(f"train.device: must be one of auto, cpu, cuda (got {setting!r})")
    if not cuda_available:
        raise ConfigError("train.device=cuda: no CUDA device is visible to this process (torch.cuda.is_available() is "
                          "False); use train.device=cpu or auto")
    return torch.device("cuda", local_rank(env))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def use_device(device: torch.device) -> None:
    """Make `device` the current CUDA device (NCCL communicators and default CUDA allocations follow it)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
