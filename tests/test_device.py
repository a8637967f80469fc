"""Which device a rank trains on, and the backend that goes with it (train.device: auto | cpu | cuda)."""

from __future__ import annotations

import pytest
import torch

from mimo_train.config import ConfigError, load_config
from parallel.device import backend_for, local_rank, resolve_device


@pytest.mark.parametrize("setting,cuda,env,expected", [
    ("auto", False, {}, "cpu"),
    ("cpu", True, {"LOCAL_RANK": "3"}, "cpu"),
    ("auto", True, {"LOCAL_RANK": "3"}, "cuda:3"),  # torchrun
    ("cuda", True, {"SLURM_LOCALID": "5"}, "cuda:5"),  # srun without torchrun
    ("cuda", True, {"LOCAL_RANK": "1", "SLURM_LOCALID": "5"}, "cuda:1"),  # torchrun inside a Slurm step
    ("cuda", True, {}, "cuda:0"),
])
def test_each_rank_uses_its_local_device(setting, cuda, env, expected):
    device = resolve_device(setting, env=env, cuda_available=cuda)
    assert device == torch.device(expected)
    assert backend_for(device) == ("nccl" if device.type == "cuda" else "gloo")


def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="train.device=cuda: no CUDA device is visible"):
        resolve_device("cuda", env={}, cuda_available=False)


def test_device_and_precision_fields_are_validated():
    with pytest.raises(ConfigError, match="train.device: must be one of auto, cpu, cuda"):
        load_config("configs/train/tiny_cpu.yaml", ["train.device=gpu"])
    with pytest.raises(ConfigError, match="train.precision: must be one of fp32, bf16"):
        load_config("configs/train/tiny_cpu.yaml", ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.bf16: removed; use train.precision=bf16"):
        load_config("configs/train/tiny_cpu.yaml", ["train.bf16=false", "train.precision=bf16"])


def test_local_rank_prefers_torchrun_then_slurm():
    assert local_rank({}) == 0
    assert local_rank({"SLURM_LOCALID": "2"}) == 2
    assert local_rank({"LOCAL_RANK": "1", "SLURM_LOCALID": "2"}) == 1
