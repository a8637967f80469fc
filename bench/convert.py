"""Conversion throughput against raw safetensors I/O of the same bytes, measured in the same run.

    python -m bench.convert [--layers 8] [--hidden 512] [--repeats 1] [--smoke]

A model in the released format (FP8 E4M3 blocks with fp32 scales where the release has them, bf16 elsewhere) is
converted three ways, each timed from end to end (fsynced files):

- import: the release -> our fp32 checkpoint (FP8 dequantised), what `hf-import` does;
- export bf16 and export fp8: that checkpoint -> Hugging Face files, what `hf-export --dtype bf16|fp8` does.

The reference for each is a raw round of the same bytes: `safetensors.torch.load_file` of every input file (DCP's
files, the export's input, are read whole), then safetensors' `save_file` of as many bytes as the conversion
writes (fsynced). ratio = reference time / conversion
time (1.0: conversion as fast as reading and writing its bytes). The last line reads
``RESULT convert ratio=<import ratio> export_bf16_ratio=... export_fp8_ratio=... import_mib_s=... ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import machine_note, result_line, set_threads

import torch  # noqa: E402  (after bench.common: thread policy)


def _release_dir(model, out: Path) -> None:
    """`model` in the released format (quantised by the code under test: the inputs, not what is measured)."""
    from safetensors.torch import save_file

    from mimo_train.interop import fp8_release, hf

    state = hf.to_hub_state_dict({k: v.detach() for k, v in model.state_dict().items()})
    out.mkdir(parents=True)
    shards, weight_map, size, part = [{}], {}, 0, []
    for name in sorted(state):
        if fp8_release.quantised_in_release(name):
            values, scale = fp8_release.quantize(state[name])
            part = [(name, values), (name + fp8_release.SCALE_SUFFIX, scale)]
        else:
            part = [(name, state[name].to(torch.bfloat16))]
        for n, t in part:
            if shards[-1] and size > 64 << 20:
                shards.append({})
                size = 0
            shards[-1][n] = t
            size += t.numel() * t.element_size()
    for i, shard in enumerate(shards):
        save_file(shard, str(out / f"model-{i:05d}.safetensors"))
        weight_map.update({k: f"model-{i:05d}.safetensors" for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {**hf.to_hf_config(model.cfg), "quantization_config": fp8_release.release_quantization_config([])}
    (out / "config.json").write_text(json.dumps(config))


def _files_bytes(directory: Path, suffixes=(".safetensors", ".distcp")) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.suffix in suffixes)


def _fsync_tree(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def raw_round(inputs: list[Path], out_bytes: int, work: Path) -> float:
    """Seconds to read `inputs` (safetensors files with safetensors; DCP's files, which are not, whole) and write
    `out_bytes` with safetensors (fsynced)."""
    from safetensors.torch import load_file, save_file

    work.mkdir()
    t0 = time.perf_counter()
    read = [load_file(str(p)) if p.suffix == ".safetensors" else p.read_bytes() for p in inputs]
    blob = torch.empty(out_bytes, dtype=torch.uint8)
    blob[::4096] = 1  # touch it (the conversion's outputs are computed, not zero pages)
    save_file({"bytes": blob}, str(work / "out.safetensors"))
    _fsync_tree(work)
    elapsed = time.perf_counter() - t0
    del read, blob
    shutil.rmtree(work)
    return elapsed


def measure(model, work: Path, say) -> dict:
    from mimo_train.interop import hf_stream

    release = work / "release"
    _release_dir(model, release)
    cfg = model.cfg
    results = {}
    t0 = time.perf_counter()
    path = hf_stream.import_hf(release, work / "ckpt", "fp32", progress=False)
    results["import"] = (time.perf_counter() - t0, sorted(release.glob("*.safetensors")), _files_bytes(path))
    for dtype in ("bf16", "fp8"):
        out = work / f"export_{dtype}"
        t0 = time.perf_counter()
        hf_stream.staging_dir(out).mkdir()
        written = hf_stream.export_checkpoint(path, cfg, out, dtype, progress=False)
        hf_stream.write_index_and_config(out, cfg, dtype, written)
        hf_stream.publish_export(out)
        results[f"export_{dtype}"] = (time.perf_counter() - t0, sorted(path.glob("*.distcp")), _files_bytes(out))
    out = {}
    for kind, (seconds, inputs, out_bytes) in results.items():
        in_bytes = sum(p.stat().st_size for p in inputs)
        ref = raw_round(inputs, out_bytes, work / f"raw_{kind}")
        out[kind] = {"s": seconds, "ref_s": ref, "ratio": ref / seconds, "in_mib": in_bytes / 2**20,
                     "out_mib": out_bytes / 2**20, "mib_s": (in_bytes + out_bytes) / 2**20 / seconds}
        say(f"{kind:11s}: {in_bytes / 2**20:8.1f} MiB in, {out_bytes / 2**20:8.1f} MiB out, {seconds:6.2f} s "
            f"({out[kind]['mib_s']:.0f} MiB/s in+out); raw safetensors read+write of the same bytes {ref:6.2f} s; "
            f"ratio {out[kind]['ratio']:.2f}")
    return out


def run(layers: int = 8, hidden: int = 512, threads: int = 2, workdir: str | None = None) -> list[str]:
    from mimo_train.config import load_model_config
    from mimo_train.model import MiMoForCausalLM

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    set_threads(threads)
    cfg = load_model_config("configs/model/mimo_tiny.yaml", [f"model.num_layers={layers}", f"model.hidden_size={hidden}",
                                                            f"model.moe_intermediate_size={hidden // 2}",
                                                            f"model.intermediate_size={2 * hidden}"])
    model = MiMoForCausalLM(cfg)
    model.init_weights(seed=0)
    params = sum(p.numel() for p in model.parameters())
    say(f"conversion benchmark: {params / 1e6:.1f}M parameters ({layers} layers, hidden {hidden}); {machine_note()}")
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=workdir))
    try:
        r = measure(model, work, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(result_line("convert", ratio=r["import"]["ratio"], export_bf16_ratio=r["export_bf16"]["ratio"],
                    export_fp8_ratio=r["export_fp8"]["ratio"], import_mib_s=r["import"]["mib_s"],
                    export_bf16_mib_s=r["export_bf16"]["mib_s"], export_fp8_mib_s=r["export_fp8"]["mib_s"],
                    params_m=params / 1e6, threads=threads))
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the files go (default: the system's temp dir)")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model (seconds; for CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden = 2, 128
    run(args.layers, args.hidden, args.threads, args.workdir)


if __name__ == "__main__":
    main()
