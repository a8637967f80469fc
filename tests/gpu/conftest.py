"""GPU tests (marker `gpu`) run where CUDA is available and are deselected elsewhere, so a CPU run reports them as
deselected (never as passed or skipped)."""

from __future__ import annotations

import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    deselected = [item for item in items if item.get_closest_marker("gpu") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]
