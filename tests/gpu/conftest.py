"""GPU tests (marker `gpu`) run where CUDA is available and are deselected elsewhere, so a CPU run reports them as
deselected (never as passed or skipped)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from parallel.kernels import fp8


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    deselected = [item for item in items if item.get_closest_marker("gpu") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]


def pytest_runtest_logreport(report):
    """With MIMO_TEST_LOG set (the device run sets it), one JSON line per test as soon as it ends, so a run that is
    cut short keeps the outcome of every test it finished."""
    path = os.environ.get("MIMO_TEST_LOG")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    line = {"test": report.nodeid, "phase": report.when, "outcome": report.outcome,
            "seconds": round(report.duration, 2)}
    if report.failed:
        line["error"] = str(report.longrepr)[-2000:]
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


@pytest.fixture
def fp8_gemm_calls(monkeypatch):
    """Counts the blockwise GEMMs cuBLAS runs, and records every emulation notice (the notice is said once per
    process, so its flag is reset for each test)."""
    # the device's support is probed (one blockwise GEMM, cached per device) before counting starts
    fp8.blockwise_supported(torch.device("cuda", torch.cuda.current_device()))
    calls = {"cublas": 0, "emulated": []}
    real = fp8._scaled_mm_blockwise

    def counting(*args, **kwargs):
        calls["cublas"] += 1
        return real(*args, **kwargs)

    real_note = fp8._note_emulation

    def noting(device):
        calls["emulated"].append(device.type)
        return real_note(device)

    monkeypatch.setattr(fp8, "_scaled_mm_blockwise", counting)
    monkeypatch.setattr(fp8, "_note_emulation", noting)
    monkeypatch.setattr(fp8, "_emulation_reported", False)
    return calls
