"""Smoke run of the conversion benchmark at a tiny size: it converts, its RESULT line is well-formed, it cleans
up (its timings belong to `python -m bench.convert`)."""

from __future__ import annotations

import math

import pytest
import torch

from bench import convert
from bench.common import parse_result

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def test_convert_bench_result_line(tmp_path):
    threads = torch.get_num_threads()
    try:
        lines = convert.run(layers=2, hidden=128, threads=1, workdir=str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    name, fields = parse_result(lines[-1])
    assert name == "convert"
    for key in ("ratio", "export_bf16_ratio", "export_fp8_ratio", "import_mib_s", "export_bf16_mib_s",
                "export_fp8_mib_s"):
        assert math.isfinite(float(fields[key])) and float(fields[key]) > 0, key
    assert list(tmp_path.iterdir()) == []
