"""Per-step metrics: `metrics.jsonl` in the run directory, console progress lines, and wandb.

`metrics.jsonl` holds one JSON object per optimizer step. On a resume from step k the lines after k (written by the
interrupted run after its last checkpoint, or by a branch abandoned when an older checkpoint is resumed) are moved
to an archive first (`metrics.superseded.jsonl`, or the abandoned branch's directory), so the file never holds a
step twice and no line is lost. Evaluation losses are printed as their own console line.

wandb: `run.wandb_mode` online, offline, disabled, or auto (online when an API key is configured, offline
otherwise; online without a key falls back to offline); `WANDB_MODE` in the environment overrides it. The run id is kept in the run directory
(`wandb_run_id`), so a resumed run continues the same wandb run. Per-layer lists (expert load, bias norms) are
logged to wandb as one series per layer (`expert_load/cv_per_layer/3`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch


def expert_load_summary(counts: torch.Tensor) -> dict[str, Any]:
    """counts [num_moe_layers, E]: tokens each expert received in this step. Scalars over all layers (worst max,
    lowest min, mean coefficient of variation, dead experts in total) and the same per layer."""
    c = counts.double()
    mean = c.mean(dim=1).clamp(min=1e-12)
    max_over_mean = c.max(dim=1).values / mean
    min_over_mean = c.min(dim=1).values / mean
    cv = c.std(dim=1, unbiased=False) / mean
    dead = (counts == 0).sum(dim=1)
    return {
        "expert_load/max_over_mean": max_over_mean.max().item(),
        "expert_load/min_over_mean": min_over_mean.min().item(),
        "expert_load/cv": cv.mean().item(),
        "expert_load/dead_experts": int(dead.sum().item()),
        "expert_load/max_over_mean_per_layer": [round(v, 5) for v in max_over_mean.tolist()],
        "expert_load/min_over_mean_per_layer": [round(v, 5) for v in min_over_mean.tolist()],
        "expert_load/cv_per_layer": [round(v, 5) for v in cv.tolist()],
        "expert_load/dead_experts_per_layer": [int(v) for v in dead.tolist()],
    }


def peak_tflops(run_cfg) -> float:
    """The peak dense BF16 TFLOP/s of one device, for MFU: `run.peak_tflops` if set, else the entry of
    `run.device_peak_tflops` whose key the CUDA device name contains (longest key first), else its "cpu" entry."""
    if run_cfg.peak_tflops > 0:
        return run_cfg.peak_tflops
    table = run_cfg.device_peak_tflops
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().upper()
        for key in sorted(table, key=len, reverse=True):
            if key.upper() in name and key != "cpu":
                return table[key]
        return float("nan")  # an unknown GPU: set run.peak_tflops
    return table.get("cpu", float("nan"))


def wandb_values(record: dict[str, Any]) -> dict[str, Any]:
    """What wandb can plot: numbers and booleans; lists of numbers become one key per entry."""
    out = {}
    for k, v in record.items():
        if isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            out.update({f"{k}/{i}": x for i, x in enumerate(v)})
    return out


SUPERSEDED = "metrics.superseded.jsonl"


def truncate_after(path: Path, step: int, archive: Path | None = None) -> int:
    """Keep only the lines of steps <= step (the ones covered by the checkpoint being resumed); the later lines are
    appended to `archive` (default: `metrics.superseded.jsonl` beside it), never lost. Returns how many moved."""
    if not path.is_file():
        return 0
    kept, moved = [], []
    for line in path.read_text().splitlines():
        try:
            (kept if json.loads(line)["step"] <= step else moved).append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write
    if not moved:
        return 0
    archive = archive or path.with_name(SUPERSEDED)
    with open(archive, "a") as f:  # first the copy, then the cut: a kill in between duplicates, never loses
        f.write("".join(line + "\n" for line in moved))
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(moved)


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, wandb_cfg: dict | None, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.enabled = enabled
        self.start_time = time.time()
        self.start_step = start_step
        self.wandb = None
        self._notes: dict[str, Any] = {}
        if enabled:
            truncate_after(self.path, start_step)
            if wandb_cfg:
                wandb_cfg = {**wandb_cfg, "mode": configured_wandb_mode(wandb_cfg["mode"])}
            if wandb_cfg and wandb_cfg["mode"] != "disabled":
                self.wandb = _init_wandb(run_dir, wandb_cfg)

    def note(self, values: dict[str, Any]) -> None:
        """Values that arise between steps (checkpoint timings): added to the next step's record."""
        self._notes.update(values)

    def log(self, record: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        if self._notes:
            record.update(self._notes)
            self._notes = {}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(wandb_values(record), step=record["step"])
        if console:
            print(self.progress_line(record), flush=True)
        if any(k.startswith("eval/") for k in record):  # validation is rare: always shown
            print(eval_line(record), flush=True)

    def progress_line(self, r: dict[str, Any]) -> str:
        done = r["step"] - self.start_step
        elapsed = time.time() - self.start_time
        eta = elapsed / max(done, 1) * max(self.total_steps - r["step"], 0)
        mfu = r.get("mfu", float("nan"))
        stage = f" [{r['stage']}]" if "stage" in r else ""
        skipped = " | SKIPPED" if r.get("skipped") else ""
        return (
            f"step {r['step']:>6}/{self.total_steps}{stage} | loss {r['loss']:.4f} | lm {r['lm_loss']:.4f} | "
            f"mtp {r['mtp_loss']:.4f} | gnorm {r['grad_norm']:.3f} | lr {r['lr']:.2e} | "
            f"tok/s {r['tokens_per_s']:,.0f} | MFU {100 * mfu:.1f}% | ETA {_duration(eta)}{skipped}"
        )

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None


def eval_line(record: dict[str, Any]) -> str:
    """`eval step 20 | held: lm 5.1234, mtp1 5.3012, accepted length 1.21` (per eval source)."""
    sources: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        if key.startswith("eval/"):
            _, source, name = key.split("/", 2)
            sources.setdefault(source, {})[name] = value
    parts = []
    for source, values in sources.items():
        text = f"{source}: lm {values.get('lm_loss', float('nan')):.4f}"
        depths = sorted(int(k[len("mtp_loss_depth"):]) for k in values if k.startswith("mtp_loss_depth"))
        text += "".join(f", mtp{d} {values[f'mtp_loss_depth{d}']:.4f}" for d in depths)
        if depths and f"accepted_length_k{depths[-1]}" in values:
            text += f", accepted length {values[f'accepted_length_k{depths[-1]}']:.2f}"
        parts.append(text)
    return f"eval step {record['step']} | " + " | ".join(parts)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# WANDB_MODE values wandb itself accepts, as run.wandb_mode values.
_WANDB_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                    "disabled": "disabled", "auto": "auto"}


def configured_wandb_mode(config_mode: str) -> str:
    """`WANDB_MODE` from the environment overrides `run.wandb_mode` (as it does for wandb everywhere else)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return config_mode
    if env not in _WANDB_ENV_MODES:
        print(f"wandb: ignoring WANDB_MODE={env!r} (expected one of {', '.join(_WANDB_ENV_MODES)}); using "
              f"run.wandb_mode={config_mode}", flush=True)
        return config_mode
    return _WANDB_ENV_MODES[env]


def resolve_wandb_mode(mode: str) -> str:
    """auto: online when an API key is configured (WANDB_API_KEY or a netrc entry), else offline; online
    without a key: offline, with a warning."""
    if mode not in ("auto", "online"):
        return mode
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            import netrc

            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
    if has_key:
        return "online"
    if mode == "online":
        print("wandb: no API key (WANDB_API_KEY or ~/.netrc); logging offline (upload later with `wandb sync`)",
              flush=True)
    return "offline"


def _init_wandb(run_dir: Path, cfg: dict):
    import wandb

    # The run id is kept in the run directory so a resumed run continues the same wandb run.
    id_file = run_dir / "wandb_run_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        import secrets
        import string

        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(run_id)
        os.replace(tmp, id_file)
    return wandb.init(
        project=cfg["project"], name=cfg.get("name") or run_dir.name, id=run_id, resume="allow",
        dir=str(run_dir), mode=resolve_wandb_mode(cfg["mode"]), config=cfg.get("config"),
    )
