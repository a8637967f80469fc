"""What every section of the one-GPU benchmark shares: the device, timing, peak memory, RESULT lines and the JSON.

A section is a module of `bench/gpu/` with a function `run(h: Harness) -> None` that measures something against a
reference computed in the same run and reports it with `h.result(name, **fields)`. With `--smoke` the same code paths
run at tiny shapes on a CPU (in CI), so the script works the first time a GPU is lent; a smoke run checks that the
code runs and that its numerics agree, never what its timings say.
"""

from __future__ import annotations

import json
import statistics
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from bench.common import result_line


class Harness:
    def __init__(self, *, smoke: bool, device: torch.device, json_path: Path | None = None,
                 replacing: tuple[str, ...] = ()) -> None:
        """`replacing`: the sections this run measures; the results of other sections already in `json_path`
        (an earlier run of the same kind, smoke or not) are kept in it."""
        self.smoke = smoke
        self.device = device
        self.json_path = json_path
        self.results: list[dict] = []  # every RESULT of this run, as {"name": ..., "section": ..., **fields}
        self.failures: list[str] = []  # sections that raised (a GPU run goes on to the next section)
        self.sections: dict[str, dict] = {}  # section -> {"status": "ok" | "failed", "seconds": ...}
        self.calibration_written = False
        self._section: str | None = None
        self._kept = self._previous(set(replacing))

    def _previous(self, replacing: set[str]) -> dict:
        """What an earlier run wrote for the sections not run now."""
        try:
            earlier = json.loads(self.json_path.read_text()) if self.json_path is not None else {}
        except (OSError, ValueError):
            return {"results": [], "sections": {}}
        if earlier.get("smoke") != self.smoke:
            return {"results": [], "sections": {}}
        return {"results": [r for r in earlier.get("results", []) if r.get("section") not in replacing],
                "sections": {k: v for k, v in earlier.get("sections", {}).items() if k not in replacing}}

    def all_results(self) -> list[dict]:
        return [*self._kept["results"], *self.results]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def pick(self, full, smoke):
        """The full-size value on a GPU run, the tiny one under --smoke."""
        return smoke if self.smoke else full

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], *, warmup: int = 2, iters: int = 5) -> float:
        """Median seconds per call of `fn` after `warmup` untimed calls (one each under --smoke)."""
        if self.smoke:
            warmup, iters = min(warmup, 1), 1
        for _ in range(warmup):
            fn()
        self.sync()
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    def peak_memory(self, fn: Callable[[], object]) -> int | None:
        """Peak GPU bytes allocated while `fn` runs, above what was allocated before (None on a CPU)."""
        if not self.cuda:
            fn()
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) - before

    def result(self, name: str, **fields) -> None:
        """Print `RESULT <name> k=v ...` (None fields are written as `na`) and keep it for the JSON file."""
        shown = {k: ("na" if v is None else v) for k, v in fields.items()}
        print(result_line(name, **shown), flush=True)
        self.results.append({"name": name, "section": self._section, **fields})

    @contextmanager
    def section(self, name: str):
        """Run one section; on a GPU a failure is reported and the next section still runs, under --smoke it
        propagates (CI must fail)."""
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        self._section = name
        self.sections[name] = {"status": "failed", "seconds": None}  # until it returns
        try:
            yield
            self.sections[name]["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, then re-raised under --smoke
            if self.smoke:
                raise
            traceback.print_exc()
            self.failures.append(name)
            self.sections[name]["error"] = f"{type(exc).__name__}: {exc}"[:500]
            self.result("section_failed", error=type(exc).__name__)
        finally:
            self.sections[name]["seconds"] = round(time.perf_counter() - start, 1)
            self._section = None
            print(f"== {name} took {time.perf_counter() - start:.1f} s", flush=True)

    def write_json(self, extra: dict | None = None) -> None:
        if self.json_path is None:
            return
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        sections = {**self._kept["sections"], **self.sections}
        payload = {"smoke": self.smoke, "device": str(self.device), "results": self.all_results(),
                   "sections": sections, "failed_sections": [k for k, v in sections.items() if v["status"] != "ok"],
                   **(extra or {})}
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")  # never a half-written file
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        tmp.replace(self.json_path)


def max_abs_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference, in fp32."""
    return (ours.float() - reference.float()).abs().max().item()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference|| in fp32 (0 when both are 0)."""
    ref = reference.float()
    denom = ref.norm().item()
    diff = (ours.float() - ref).norm().item()
    return diff / denom if denom > 0 else diff
