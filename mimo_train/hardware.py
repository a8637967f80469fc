"""The GPUs we know: their datasheet figures, read by the trainer's MFU, the planner and the GPU benchmarks.

Torch-free (the config layer reads the peak table for `run.device_peak_tflops`'s default).
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense BF16 peak TFLOP/s per device (vendor datasheets, without sparsity), keyed by what the CUDA device name
# contains. "cpu" is a nominal figure for the demo (a few AVX2 cores); set run.peak_tflops for a real CPU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
               "B200": 2250.0, "GB200": 2500.0, "B300": 2500.0, "L40S": 362.0, "cpu": 0.2}


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gb: float  # HBM per GPU (vendor figure, 1e9 bytes)
    peak_tflops: float  # dense BF16 peak (no sparsity)
    nvlink_gbs: float  # effective per-GPU bandwidth inside a node (GB/s, one direction)
    ib_gbs: float  # effective per-GPU bandwidth across nodes (GB/s, one direction)
    gpus_per_node: int = 8


# The types the planner models. NVLink: H100/H200 NVLink 4 = 450 GB/s per direction, B200 NVLink 5 = 900 GB/s,
# taken at 80% as achievable bus bandwidth. InfiniBand: one 400 Gb/s NDR NIC per GPU = 50 GB/s, at 80%.
GPUS = {
    "h100": Hardware("h100", 80.0, PEAK_TFLOPS["H100"], 360.0, 40.0),
    "h200": Hardware("h200", 141.0, PEAK_TFLOPS["H200"], 360.0, 40.0),
    "b200": Hardware("b200", 192.0, PEAK_TFLOPS["B200"], 720.0, 40.0),
}
