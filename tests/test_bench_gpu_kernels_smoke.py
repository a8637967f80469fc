"""`python -m bench.gpu --smoke --only swa global_attention experts`: the kernel sections run on a CPU at tiny shapes,
every RESULT line is well-formed, and their numerics agree (fused vs the reference in fp32; empty experts get
exactly zero gradients). No timing is checked."""

from __future__ import annotations

import json

import pytest
import torch

from bench.common import parse_result
from bench.gpu.__main__ import main


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_kernel_sections_run_and_agree_under_smoke(tmp_path, capsys):
    out = tmp_path / "bench_gpu.json"
    assert main(["--smoke", "--only", "swa", "global_attention", "experts", "--json", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT ")]
    results = [parse_result(line) for line in lines]
    names = {name for name, _ in results}
    expected = {"swa_fused", "swa_torch", "swa_sdpa_band_mask", "swa_numerics", "global_torch", "global_fused",
                "global_flex", "global_flash_varlen", "global_efficient_varlen", "global_chosen",
                "experts_all_grouped", "experts_all_loop", "experts_all_numerics", "experts_local_numerics"}
    assert expected <= names, expected - names
    for name, fields in results:
        if name == "swa_numerics" and fields["dtype"] == "float32":
            assert all(float(fields[f"err_{t}"]) <= 1e-5 for t in ("out", "dq", "dk", "dv", "dsink")), fields
        if name == "swa_numerics" and fields["dtype"] == "bfloat16":
            assert all(float(fields[f"err_{t}"]) <= 2e-2 for t in ("out", "dq", "dk", "dv", "dsink")), fields
        if name in ("global_fused", "global_flex"):
            assert float(fields["err_out"]) <= 1e-5, (name, fields)
        if name.startswith("experts_") and name.endswith("_numerics"):
            assert float(fields["empty_expert_grad_max"]) == 0.0 and int(fields["empty_experts"]) > 0
            assert float(fields["err_out"]) <= 1e-5 and float(fields["err_ddown"]) <= 1e-5, fields
    saved = json.loads(out.read_text())
    assert saved["failed_sections"] == [] and len(saved["results"]) == len(lines)
