"""`mimo-train plan --calibrate FILE`: measured values (bench/gpu results) replacing the assumptions of the same
name."""

from __future__ import annotations

import json
from dataclasses import replace

from mimo_train.config import ConfigError
from mimo_train.hardware import Hardware
from mimo_train.planning.geometry import Assumptions


# --------------------------------------------------------------------------------------------------------------
# Calibration from measurements (bench/gpu results)
# --------------------------------------------------------------------------------------------------------------

# The fields `plan --calibrate FILE` reads: a JSON object with an optional "gpu" (the GPU type measured) and a
# "measured" object of any of these keys, each replacing the assumption of the same name.
CALIBRATION_FIELDS = {
    "compute_efficiency": "achieved fraction of the bf16 peak on the model's matmuls and attention (a train step's "
                          "model FLOPs / (time x peak))",
    "expert_half_rows": "rows per expert at which the grouped expert GEMM reaches half its efficiency",
    "peak_tflops": "the GPU's dense bf16 peak",
    "nvlink_gbs": "achieved per-GPU bus bandwidth inside a node (GB/s)",
    "ib_gbs": "achieved per-GPU bus bandwidth across nodes (GB/s)",
    "overlap_tp": "fraction of TP communication hidden", "overlap_ep": "fraction of EP communication hidden",
    "overlap_cp": "fraction of CP communication hidden", "overlap_pp": "fraction of PP communication hidden",
    "overlap_dp": "fraction of DP communication hidden",
}
HARDWARE_FIELDS = ("peak_tflops", "nvlink_gbs", "ib_gbs")


def load_calibration(path: str) -> dict[str, float]:
    """The measured values of a calibration file (see CALIBRATION_FIELDS), checked."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--calibrate {path}: cannot read it as JSON ({err})") from None
    measured = data.get("measured") if isinstance(data, dict) else None
    if not isinstance(measured, dict):
        raise ConfigError(f"--calibrate {path}: needs an object \"measured\" with any of "
                          f"{', '.join(CALIBRATION_FIELDS)}")
    unknown = sorted(set(measured) - set(CALIBRATION_FIELDS))
    if unknown:
        raise ConfigError(f"--calibrate {path}: unknown measured fields {unknown}; known: "
                          f"{', '.join(CALIBRATION_FIELDS)}")
    for key, value in measured.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"--calibrate {path}: measured.{key} must be a positive number, got {value!r}")
        if key.startswith("overlap_") or key == "compute_efficiency":
            if value > 1:
                raise ConfigError(f"--calibrate {path}: measured.{key} is a fraction and must be <= 1, got {value}")
    return {k: float(v) for k, v in measured.items()}


def calibration_device(path: str) -> str | None:
    """The device type a calibration file says it was measured on (its "gpu" field), if any."""
    with open(path) as f:
        data = json.load(f)
    gpu = data.get("gpu") if isinstance(data, dict) else None
    return str(gpu).lower() if gpu else None


def check_calibration_device(path: str, gpu: str, force: bool) -> None:
    """A calibration applies to the device type it was measured on: refuse another one's unless forced."""
    measured_on = calibration_device(path)
    if measured_on is not None and measured_on != gpu and not force:
        raise ConfigError(f"--calibrate {path}: measured on {measured_on}, and this plan is for --gpu {gpu}; "
                          f"calibrate on a {gpu.upper()} (python -m bench.gpu), or pass --force-calibration to "
                          f"apply it anyway")


def calibrated(A: Assumptions, hw: Hardware, measured: dict[str, float]) -> tuple[Assumptions, Hardware]:
    hw = replace(hw, **{k: v for k, v in measured.items() if k in HARDWARE_FIELDS})
    A = replace(A, **{k: v for k, v in measured.items() if k not in HARDWARE_FIELDS})
    return A, hw
