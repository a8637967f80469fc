"""`python -m bench.gpu --smoke` (the one-GPU benchmark at tiny shapes on a CPU), every section, end to end in the
GPU machine's environment (tests/gpu_machine_env.py: torch, the device bundle and the checkout, every other package
unimportable): it runs, every RESULT line is well-formed and in the JSON, its numerics checks hold (FP8 GEMM errors
within E4M3's bound and equal to the emulated recipe, recompute exact, FP8 layers within their bound of bf16,
losses falling), and the whole run imports none of the packages the GPU machine lacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import parse_result

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "swa", "global_attention", "experts", "gemm", "layer", "train")
ABSENT_ON_THE_GPU_MACHINE = ("megatron", "webdataset", "wids", "wandb", "transformer_engine")
RUNNER = f"""
import sys
from bench.gpu.__main__ import main
rc = main(sys.argv[1:])
loaded = sorted({{m.split('.')[0] for m, mod in sys.modules.items() if mod is not None}} & set({ABSENT_ON_THE_GPU_MACHINE!r}))
print('IMPORTED', ','.join(loaded) or '-')
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from tests.gpu_machine_env import environment

    out = tmp_path_factory.mktemp("bench_gpu") / "bench_gpu.json"
    run = subprocess.run([sys.executable, "-c", RUNNER, "--smoke", "--only", *SECTIONS, "--json", str(out),
                          "--calibration", str(out.with_name("calibration.json"))],
                         cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout.splitlines(), json.loads(out.read_text())


def test_the_calibration_file_is_what_the_planner_reads(smoke, tmp_path_factory):
    from mimo_train.planning.calibration import load_calibration

    (bf16,) = [r for r in _results(smoke[1], "train") if r["precision"] == "bf16"]
    path = next(tmp_path_factory.getbasetemp().glob("bench_gpu*/calibration.json"))
    assert load_calibration(str(path)) == {"compute_efficiency": bf16["mfu"]}


def _results(payload: dict, name: str) -> list[dict]:
    return [r for r in payload["results"] if r["name"] == name]


def test_result_lines_are_well_formed_and_match_the_json(smoke):
    lines, payload = smoke
    result_lines = [line for line in lines if line.startswith("RESULT ")]
    parsed = [parse_result(line) for line in result_lines]  # raises on a malformed line
    assert [name for name, _ in parsed] == [r["name"] for r in payload["results"]]
    assert payload["smoke"] is True and payload["failed_sections"] == []
    for section in SECTIONS:
        assert f"== {section}" in lines
    assert lines[-1] == "IMPORTED -"  # nothing the GPU machine lacks, not even lazily


def test_env_reports_versions_and_no_blockwise_fp8_on_a_cpu(smoke):
    (env,) = _results(smoke[1], "env")
    assert env["torch"].startswith("2.") and env["blockwise_fp8"] is False and env["gpu"] == "none"


def test_gemm_errors_within_bounds(smoke):
    from bench.gpu.gemm import BF16_ERROR_BOUND, FP8_ERROR_BOUND

    rows = _results(smoke[1], "gemm")
    kinds = {r["kind"] for r in rows}
    assert {"bf16", "fp8_blockwise"} <= kinds
    for r in rows:
        assert r["tflops"] > 0
        err = max(float(r["err_y"]), float(r["err_dx"]))
        if r["kind"] == "bf16":
            assert err < BF16_ERROR_BOUND, r
        else:  # FP8 rounds (it is not secretly bf16) and stays within E4M3's bound; torchao's recipes too
            assert 1e-3 < err < FP8_ERROR_BOUND, r
    assert all(r["path"] == "emulated" for r in rows if r["kind"] == "fp8_blockwise")
    # the FP8 GEMM against the emulated recipe, checked (not only printed) for every shape and both recipes
    checks = _results(smoke[1], "gemm_blockwise_vs_emulation")
    assert {(r["shape"], r["recipe"]) for r in checks} == {(r["shape"], rc) for r in rows for rc in ("fwd", "wgrad")}
    assert all(r["ok"] and float(r["rel_diff"]) < r["bound"] for r in checks), checks


def test_global_attention_reference_runs_and_the_candidates_match_it(smoke):
    by_name = {(r["name"], r["seq_len"]): r for r in smoke[1]["results"] if r["name"].startswith("global_")}
    for S in {seq for _, seq in by_name}:
        assert by_name[("global_reference", S)]["status"] == "ok"
        for name in ("global_torch", "global_fused"):
            assert float(by_name[(name, S)]["err_out"]) <= 1e-5 and float(by_name[(name, S)]["err_dq"]) <= 1e-5


def test_layers_run_every_case_and_recompute_is_exact(smoke):
    layers = _results(smoke[1], "layer")
    assert {(r["type"], r["precision"], r["recompute"]) for r in layers} == {
        (t, p, rc) for t in ("swa_moe", "ga_moe") for p in ("bf16", "fp8") for rc in ("none", "selective")}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["planner_gib"] > 0 for r in layers)
    numerics = _results(smoke[1], "layer_numerics")
    assert len(numerics) == 6 and all(r["ok"] for r in numerics)
    for r in numerics:
        if r["precision"] == "bf16":  # recompute reruns the same kernels: bit-identical on a CPU
            assert float(r["err_out"]) == 0.0 and float(r["err_dx"]) == 0.0, r
        else:
            assert float(r["err_out"]) > 1e-3, r  # FP8 really changed the arithmetic


def test_training_losses_fall_in_bf16_and_fp8(smoke):
    runs = {r["precision"]: r for r in _results(smoke[1], "train")}
    assert set(runs) == {"bf16", "fp8"}
    for r in runs.values():
        assert r["loss_falls"] and r["last_loss"] < r["first_loss"] - 1.0, r
    assert runs["fp8"]["first_loss"] != runs["bf16"]["first_loss"]
    assert abs(runs["fp8"]["first_loss"] - runs["bf16"]["first_loss"]) < 1e-2 * runs["bf16"]["first_loss"]
