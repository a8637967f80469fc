"""Peak memory of streaming conversion, in a fresh process (so that no earlier test's heap is in the figures):

    python tests/scripts/convert_peak.py WORK_DIR          # prints one JSON line

Three models with the same largest tensor (2 MiB): 2 layers (a warm-up: imports and first-use allocations), 2
layers and 24 layers. Each is imported (HF -> checkpoint) and exported in fp8 (checkpoint -> HF); before each
conversion the heap gives its free memory back (`malloc_trim`) and the kernel's resident-set high-water mark is
reset (`/proc/self/clear_refs` = 5), so VmHWM minus VmRSS at the start is the conversion's own peak. Run it with
MALLOC_MMAP_THRESHOLD_=65536 (as the test does) so that glibc returns freed tensors as it does for tensors above
32 MiB, i.e. every tensor of the 309B model.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _measured(fn) -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    start = _status("VmRSS")
    fn()
    return _status("VmHWM") - start


def main(work: Path) -> dict:
    from mimo_train.interop import hf, hf_stream
    from tests.helpers import randomised_model, tiny_model_config

    dims = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, vocab_size=1024, num_experts=4)
    result = {"peaks": {}, "sizes": {}}
    for run, layers in (("warm-up", 2), ("small", 2), ("large", 24)):
        cfg = tiny_model_config(num_layers=layers, **dims)
        model = randomised_model(cfg)
        hf.save_hf(model, work / f"hf_{run}")
        result["sizes"][run] = {"total": sum(t.numel() * 4 for t in model.state_dict().values()),
                                "largest": max(t.numel() * 4 for t in model.state_dict().values())}
        del model
        ckpt_dir, out = work / f"ckpt_{run}", work / f"out_{run}"
        result["peaks"][f"import_{run}"] = _measured(
            lambda: hf_stream.import_hf(work / f"hf_{run}", ckpt_dir, progress=False))
        hf_stream.staging_dir(out).mkdir()
        path = ckpt_dir / "step_00000000"
        result["peaks"][f"export_{run}"] = _measured(
            lambda: hf_stream.export_checkpoint(path, cfg, out, "fp8", max_shard_bytes=16 << 20, progress=False))
    return result


if __name__ == "__main__":
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(main(work)))
