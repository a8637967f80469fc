"""Checkpoint conversion: the released FP8 format in and out, streaming, N processes, EP layouts, the demo's
checkpoint, `train.init_from`."""

from __future__ import annotations

import dataclasses
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mimo_train.training import checkpoint as ckpt
from mimo_train.launch import cli
from mimo_train.interop import hf, hf_stream
from mimo_train.config import load_config
from mimo_train.interop.fp8_release import BLOCK, Fp8FormatError, quantised_in_release
from tests.helpers import randomised_model, tiny_model_config

E4M3_MAX = 448.0
# Not multiples of 128: every weight has partial edge blocks (hidden 136, q 4 x 48 = 192 rows, experts 72 rows).
ODD_DIMS = dict(hidden_size=136, moe_intermediate_size=72, intermediate_size=200)


def _quantise_like_the_release(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent of the code under test: per 128x128 block, scale = amax / 448, values = w / scale in E4M3."""
    rows, cols = w.shape
    scale = torch.empty((rows + 127) // 128, (cols + 127) // 128)
    values = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            scale[i, j] = block.abs().max() / E4M3_MAX
            values[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / scale[i, j]).to(torch.float8_e4m3fn)
    return values, scale


def _dequantised_reference(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = values.shape
    return values.float() * scale[torch.arange(rows) // 128][:, torch.arange(cols) // 128]


def write_release_like(model, out: Path, shards: int = 3) -> dict[str, torch.Tensor]:
    """`model` in the released format (FP8 blocks where the release has them, bf16 elsewhere), written with the
    safetensors library; returns the reference: each tensor as the release defines its value, in fp32."""
    state = hf.to_hub_state_dict({k: v.detach() for k, v in model.state_dict().items()})
    files, reference = [{} for _ in range(shards)], {}
    for i, name in enumerate(sorted(state)):
        if quantised_in_release(name):
            values, scale = _quantise_like_the_release(state[name].float())
            files[i % shards][name], files[i % shards][name + "_scale_inv"] = values, scale
            reference[name] = _dequantised_reference(values, scale)
        else:
            files[i % shards][name] = state[name].to(torch.bfloat16)
            reference[name] = files[i % shards][name].float()
    out.mkdir(parents=True)
    weight_map = {}
    for i, tensors in enumerate(files):
        save_file(tensors, str(out / f"part-{i}.safetensors"))
        weight_map.update({k: f"part-{i}.safetensors" for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {**hf.to_hf_config(model.cfg), "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(BLOCK)}}
    (out / "config.json").write_text(json.dumps(config))
    return reference


def _load_ours(path: Path, like) -> dict[str, torch.Tensor]:
    state = {"model": {k: torch.zeros_like(v) for k, v in like.state_dict().items()}}
    ckpt.load_checkpoint(path, state)
    return state["model"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A random tiny model with odd dimensions in the released FP8 format, and its import."""
    root = tmp_path_factory.mktemp("release")
    model = randomised_model(tiny_model_config(**ODD_DIMS)).eval()
    reference = write_release_like(model, root / "hf")
    imported = hf_stream.import_hf(root / "hf", root / "ckpt", "fp32", progress=False)
    return model, reference, root, imported


def _export(path: Path, out: Path, dtype: str, shard_mb: int = 5120) -> Path:
    assert cli.main(["hf-export", str(path), str(out), "--dtype", dtype, "--shard-mb", str(shard_mb)]) == 0
    return out


def test_release_fp8_import_equals_the_dequantised_reference_exactly(release):
    model, reference, root, imported = release
    ours = hf.from_hub_state_dict(reference)
    loaded = _load_ours(imported, model)
    assert loaded.keys() == ours.keys()
    for name, t in ours.items():
        assert torch.equal(loaded[name], t), name
    # The quantised tensors really were FP8 with partial blocks (q_proj: 192 x 136 -> 2 x 2 blocks).
    raw = load_file(str(root / "hf" / json.loads((root / "hf" / "model.safetensors.index.json").read_text())[
        "weight_map"]["model.layers.1.self_attn.q_proj.weight_scale_inv"]))
    assert raw["model.layers.1.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert raw["model.layers.1.self_attn.q_proj.weight_scale_inv"].shape == (2, 2)


def test_unknown_quantisation_is_one_clear_error(release, tmp_path, capsys):
    _, _, root, _ = release
    for field, value, message in [("quant_method", "awq", "quant_method 'awq' is not supported"),
                                  ("weight_block_size", [64, 64], "weight_block_size [64, 64] is not supported")]:
        bad = tmp_path / f"bad_{field}"
        shutil.copytree(root / "hf", bad)
        config = json.loads((bad / "config.json").read_text())
        config["quantization_config"][field] = value
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(Fp8FormatError, match=re.escape(message)):
            hf_stream.HubReader(bad)
        assert cli.main(["hf-import", str(bad), str(tmp_path / f"out_{field}")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / f"out_{field}").exists()


def test_fp8_export_then_import_equals_the_bf16_path_within_e4m3_rounding(release, tmp_path):
    model, _, root, imported = release
    via_fp8 = _load_ours(hf_stream.import_hf(_export(imported, tmp_path / "fp8", "fp8"), tmp_path / "c8",
                                             progress=False), model)
    via_bf16 = _load_ours(hf_stream.import_hf(_export(imported, tmp_path / "bf16", "bf16"), tmp_path / "c16",
                                              progress=False), model)
    exact = _load_ours(imported, model)
    hub_fp8 = hf.to_hub_state_dict(via_fp8)
    hub_bf16, hub_exact = hf.to_hub_state_dict(via_bf16), hf.to_hub_state_dict(exact)
    for name, w in hub_exact.items():
        if quantised_in_release(name):
            # E4M3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value; below the normal range (2^-6 of the
            # block scale) the spacing is 2^-9 of the scale.
            scale = w.abs().max() / E4M3_MAX
            bound = torch.maximum(w.abs() * 2**-4, torch.full_like(w, 2**-10) * scale) + scale * 1e-6
            assert ((hub_fp8[name] - w).abs() <= bound).all(), name
            assert not torch.equal(hub_fp8[name], hub_bf16[name]), name  # really quantised
        else:
            assert torch.equal(hub_fp8[name], hub_bf16[name]), name  # bf16 in both (the router fp32 in both)
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv" in index
    assert "model.layers.1.self_attn.o_proj.weight_scale_inv" not in index
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [128, 128]
    assert "model.layers.1.self_attn.o_proj" in config["ignored_layers"] and "lm_head" in config["ignored_layers"]
    assert cli.main(["hf-verify", str(tmp_path / "fp8")]) == 0


def test_fp8_export_loads_in_transformers_as_the_release_does(tmp_path):
    """transformers loads the fp8 export with its FP8 loader (dequantised), as it loads the release, with logits
    equal to ours on the same files. Dimensions are 128-multiples or single blocks, as every weight of the 309B
    model is: transformers 5.23 derives the block from the shapes and misplaces a partial edge block that follows
    full ones (rows 96-127 of a 192-row weight get the second block's scale)."""
    from transformers import FineGrainedFP8Config, MiMoV2FlashForCausalLM

    model = randomised_model(tiny_model_config(num_attention_heads=8)).eval()
    hf.save_hf(model, tmp_path / "fp32")
    imported = hf_stream.import_hf(tmp_path / "fp32", tmp_path / "ckpt", progress=False)
    out = _export(imported, tmp_path / "fp8", "fp8")
    ours = hf.load_pretrained(tmp_path / "fp32")
    ours.load_state_dict(_load_ours(hf_stream.import_hf(out, tmp_path / "back", progress=False), ours))
    theirs = MiMoV2FlashForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True)).eval().float()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-5


def test_streaming_peak_memory_is_a_few_of_the_largest_tensor(tmp_path):
    """Import and fp8 export of a model of 24 layers (84 MiB in fp32) whose largest tensor is 2 MiB peak at a few
    times that, and no higher than for a model of 2 layers with the same largest tensor: the peak does not grow
    with the model (tests/scripts/convert_peak.py: a fresh process, the kernel's high-water mark)."""
    # glibc serves allocations above 32 MiB (every tensor of a 309B model) with mmap, returned to the system when
    # freed; at this size it would keep freed tensors in its heap: the threshold makes it behave as at scale.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, "tests/scripts/convert_peak.py", str(tmp_path)], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.splitlines()[-1])
    peaks, sizes = result["peaks"], result["sizes"]
    total, largest = sizes["large"]["total"], sizes["large"]["largest"]
    print(f"model {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.1f} MiB, peak above start: "
          + ", ".join(f"{k} {v / 2**20:.1f} MiB ({v / largest:.2f}x)" for k, v in peaks.items()))
    assert sizes["small"]["largest"] == largest and total >= 30 * largest
    for kind in ("import", "export"):
        assert peaks[f"{kind}_large"] <= 4 * largest, peaks
        assert peaks[f"{kind}_large"] <= peaks[f"{kind}_small"] + largest, peaks


def test_expert_parallel_checkpoint_round_trips_and_n_processes_equal_one(tmp_path):
    """One launch of 4 ranks (tests/scripts/convert_ep.py): an EP4 checkpoint exported by 4 ranks, re-imported by
    4, loaded under EP2 (from the re-import and from the export): every tensor, every expert bitwise. Here, one
    process exports and imports the same checkpoint: byte-identical files, identical tensors."""
    out = tmp_path / "ep"
    r = subprocess.run([sys.executable, "tests/scripts/convert_ep.py", str(out)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    for rank in json.loads((out / "result.json").read_text()):
        assert rank["local_experts_ep4"] == 2
        for source in ("imported4", "hf4"):
            assert rank[source]["wrong"] == [] and rank[source]["checked"] == 145
            assert rank[source]["local_experts_ep2"] == 4
    single = _export(out / "ep4" / "step_00000000", tmp_path / "hf1", "fp32", shard_mb=1)
    files = sorted(p.name for p in (out / "hf4").iterdir())
    assert len(files) > 4 and files == sorted(p.name for p in single.iterdir())
    for name in files:
        assert (out / "hf4" / name).read_bytes() == (single / name).read_bytes(), name
    one = hf_stream.import_hf(single, tmp_path / "imported1", progress=False)
    four, ones = hf_stream.CheckpointTensors(out / "imported4" / "step_00000000"), hf_stream.CheckpointTensors(one)
    assert four.names == ones.names and len(four.names) == 145
    for name in four.names:
        assert torch.equal(four.get(name), ones.get(name)), name


def test_the_demo_checkpoint_exports_from_any_directory_and_loads_in_transformers(tmp_path):
    """What `mimo-train train` writes with the demo's settings (no data.cache_dir: the cache under the run
    directory): `hf-export --nproc 2 --dtype bf16` from another directory, without $MIMO_TRAIN_CACHE, gives a
    directory transformers loads, with logits equal to our model's on the same bf16 weights; an export into a
    non-empty directory and a failed export leave nothing behind."""
    from transformers import MiMoV2FlashForCausalLM

    from mimo_train.training.trainer import Trainer

    run_dir = tmp_path / "runs" / "demo"
    cfg = load_config("configs/train/tiny_cpu.yaml", ["train.steps=1", "train.seq_len=64", "train.global_batch_size=2",
                                                      "train.micro_batch_size=2", "run.wandb_mode=disabled",
                                                      f"run.dir={run_dir}"])
    trainer = Trainer(cfg, resume="none")
    trainer.save(block=True)  # the checkpoint a run writes (model, optimizer, meta.json; config.yaml in the run)
    trainer.close()
    # The demo keeps its tokenizer in the run directory's cache: put the session's copy there.
    _copy_tokenizer_into_run(cfg, run_dir)
    env = {k: v for k, v in os.environ.items() if k != "MIMO_TRAIN_CACHE"}
    out = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "mimo_train.launch.cli", "hf-export", str(run_dir / "checkpoints"), str(out),
                        "--nproc", "2", "--shard-mb", "1"], capture_output=True, text=True, timeout=300, env=env,
                       cwd="/")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= {p.name for p in out.iterdir()}
    assert cli.main(["hf-verify", str(out)]) == 0
    ref = MiMoV2FlashForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    ours = hf.load_pretrained(out)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5
    trained = trainer.model.state_dict()
    for name, t in ours.state_dict().items():  # bf16, except the router (weight, correction bias): fp32
        kept = trained[name] if ".mlp.gate." in name else trained[name].to(torch.bfloat16).float()
        assert torch.equal(t, kept), name
    # Refusals and failures leave no output behind.
    assert cli.main(["hf-export", str(run_dir / "checkpoints"), str(out)]) == 2
    assert _fails_mid_export(run_dir / "checkpoints", tmp_path / "failed")
    assert not (tmp_path / "failed").exists() and not hf_stream.staging_dir(tmp_path / "failed").exists()
    step = ckpt.find_latest(run_dir / "checkpoints")
    data = next(step.glob("*.distcp"))
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, other bytes: only the checksum tells
    data.write_bytes(bytes(blob))
    assert cli.main(["hf-export", str(step), str(tmp_path / "corrupt")]) == 2
    assert not (tmp_path / "corrupt").exists() and not hf_stream.staging_dir(tmp_path / "corrupt").exists()


def _copy_tokenizer_into_run(cfg, run_dir: Path) -> None:
    from data_pipeline.builtin_corpus import ensure_builtin_tokenizer

    shared = Path(ensure_builtin_tokenizer(cfg.data.resolved_cache_dir(), cfg.data.vocab_size))
    own = run_dir / "cache" / "tokenizers" / shared.name
    own.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared, own)


def _fails_mid_export(src: Path, out: Path) -> bool:
    """An export whose second shard fails to write raises, after the first was written."""
    real = hf_stream.write_file
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real(*args, **kwargs)

    hf_stream.write_file = failing
    try:
        cli.main(["hf-export", str(src), str(out), "--shard-mb", "1"])
    except OSError:
        return len(calls) == 2
    finally:
        hf_stream.write_file = real
    return False


def test_init_from_starts_a_new_run_and_its_resume_ignores_it(release, tmp_path):
    """A bf16 run from the FP8 release's import (another precision, fresh optimizer, step 0): the fp32 masters
    equal the import, the bf16 weights are cast from them; its resume continues from its own checkpoint."""
    from mimo_train.interop.init_from import load_initial_weights
    from mimo_train.training.trainer import Trainer

    model, _, root, imported = release
    overrides = ["train.steps=1", "train.seq_len=64", "train.global_batch_size=2", "train.micro_batch_size=2",
                 "run.wandb_mode=disabled", f"run.dir={tmp_path / 'run'}", "train.precision=bf16",
                 f"train.init_from={root / 'ckpt'}", "train.save_interval=1", "train.async_save=false",
                 *[f"model.{k}={v}" for k, v in ODD_DIMS.items()]]
    cfg = load_config("configs/train/tiny_cpu.yaml", overrides)
    trainer = Trainer(cfg, resume="none", initial_weights=load_initial_weights)
    source = _load_ours(imported, model)
    assert trainer.step == 0 and trainer.samples == 0
    for name, master in trainer.optimizer.masters.items():  # one process: each master is the whole tensor
        assert torch.equal(master, source[name].reshape(master.shape)), name
    for name, t in trainer.model.state_dict().items():
        assert t.dtype == torch.bfloat16 or "e_score_correction_bias" in name, name
        assert torch.equal(t, source[name].to(t.dtype)), name
    for state in trainer.optimizer.inner.state.values():  # fresh moments
        assert all(not v.any() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")) and float(state["step"]) == 0
    trainer.fit(log=False)
    trainer.close()
    after = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    again = Trainer(load_config("configs/train/tiny_cpu.yaml", overrides), resume="auto")
    assert again.step == 1
    for name, t in again.model.state_dict().items():
        assert torch.equal(t, after[name]), name
    again.close()
    # A source that does not exist: one line before any process starts.
    assert cli.main(["train", "--config", "configs/train/tiny_cpu.yaml", "--nproc", "2",
                     f"train.init_from={tmp_path / 'absent'}", f"run.dir={tmp_path / 'new'}"]) == 2
    assert not (tmp_path / "new").exists()
    # A source whose model differs from the run's: one clear error naming the field and the tensors.
    from types import SimpleNamespace

    from mimo_train.config import ConfigError
    from mimo_train.training.engine import AdamSettings, build_engine

    other = load_config("configs/train/tiny_cpu.yaml", [f"train.init_from={root / 'ckpt'}"])
    e = build_engine(other.model, dataclasses.replace(other.parallel, dp=1), 64, precision="fp32",
                     adam=AdamSettings(), device="cpu")
    with pytest.raises(ConfigError, match="train.init_from: .* does not hold this run's model"):
        load_initial_weights(SimpleNamespace(cfg=other, model=e.model, layouts=e.layouts, topo=e.topo,
                                             optimizer=e.optimizer, is_logger=True))
