"""The device run in the GPU machine's environment, on a CPU (tests/gpu_machine_env.py: torch, the device bundle and
the checkout; every other installed package unimportable, its metadata hidden): the GPU tests collect from the
bundle's pytest with zero errors and are deselected (pytest's exit status 5, which the device run reads as
"deselected" on a CPU and as a failure on a GPU), the environment check names what is missing, and the training
steps the GPU tests run (synthetic batches through the trainer's engine) work here too, DP2 and TP2 on the fake
process group included: no data pipeline, wandb or megatron-core on those paths. (`bench.gpu --smoke` runs in
the same environment in tests/test_bench_gpu_smoke.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

from parallel import comm
from tests.gpu_machine_env import REPO, environment

STEPS = """
import json, sys, pytest, torch
from tests.gpu.synthetic import collective_devices, train
mp = pytest.MonkeyPatch()
seen = {}
for name, layout in (("dp2", ["parallel.dp=2", "train.micro_batch_size=1"]), ("tp2", ["parallel.tp=2"])):
    seen[name] = sorted(set(collective_devices(layout, torch.device("cpu"), mp)))
    mp.undo()
_, records = train(["train.precision=bf16"], torch.device("cpu"))
absent = ("numpy", "webdataset", "wids", "tokenizers", "tqdm", "wandb", "megatron", "safetensors", "data_pipeline.stream")
print("RESULT", json.dumps({"seen": seen, "losses": [r["lm_loss"] for r in records],
                            "imported": sorted(m for m in absent if sys.modules.get(m) is not None)}))
"""


def test_gpu_tests_collect_from_the_bundle_and_are_deselected(tmp_path):
    env = environment()
    run = subprocess.run(["bash", "bench/gpu/device_run.sh", str(tmp_path), "--parts", "tests_kernels",
                          "tests_training"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    parts = [json.loads(line) for line in (tmp_path / "parts.jsonl").read_text().splitlines()]
    assert [(p["part"], p["rc"], p["status"]) for p in parts[:-1]] == [
        ("tests_kernels", 5, "deselected"), ("tests_training", 5, "deselected")]
    log = (tmp_path / "device_run.log").read_text()
    assert "11 deselected" in log and "5 deselected" in log and "error" not in log.lower(), log
    assert parts[-1]["rerun"] is None
    check = subprocess.run([sys.executable, "-m", "bench.gpu.device_check", "--out", str(tmp_path)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 2, check.stdout + check.stderr  # no CUDA here
    assert "CUDA" in json.loads((tmp_path / "env.json").read_text())["missing"]


def test_training_steps_of_the_gpu_tests_run_without_the_data_pipeline():
    run = subprocess.run([sys.executable, "-c", STEPS], cwd=REPO, env=environment(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["imported"] == []
    for layout in ("dp2", "tp2"):  # the fake group's collectives all ran, all on the training device
        kinds = {kind for kind, _ in result["seen"][layout]}
        assert {"all_reduce", comm.REDUCE_SCATTER, comm.ALL_GATHER} <= kinds, result["seen"]
        assert {device for _, device in result["seen"][layout]} == {"cpu"}
    assert len(result["losses"]) == 2 and all(7 < loss < 9.5 for loss in result["losses"])  # ~ln(4096) = 8.3
