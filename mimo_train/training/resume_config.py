"""The config of a resumed run against the one its checkpoint was written with: what may change mid-run and what
may not (the trainer checks it when it resumes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mimo_train.config import Config, ConfigError

# What a resume may change (README "Resuming"): the layout (DCP reshards), batch sizes, stages not yet reached,
# the learning-rate schedule, logging, checkpointing and data-loading knobs. What it may not: the model, the seeds
# and the tokenization, and the stages already completed.
FROZEN_ON_RESUME = ("model", "train.seed", "data.seed", "data.tokenizer", "data.vocab_size")
# Fields of a completed stage that may still change (they do not alter what was trained).
STAGE_FIELDS_FREE = ("micro_batch_size", "parallel")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def config_differences(saved: dict[str, Any], current: Config, completed_stages: int) -> list[str]:
    """The fields that may not change on a resume and did, each as `field: checkpoint X, config Y`."""
    now = current.to_dict()
    old_flat, new_flat = _flatten(saved), _flatten(now)
    frozen = set()
    for key in old_flat:  # fields added to the schema since the checkpoint was written are not compared
        if any(key == f or key.startswith(f + ".") for f in FROZEN_ON_RESUME):
            frozen.add(key)
    old_stages, new_stages = saved.get("train", {}).get("stages", []), now["train"]["stages"]
    diffs = [f"{k}: checkpoint {old_flat.get(k, '(absent)')!r}, config {new_flat.get(k, '(absent)')!r}"
             for k in sorted(frozen) if old_flat.get(k, "(absent)") != new_flat.get(k, "(absent)")]
    for i in range(min(completed_stages, len(old_stages))):
        old = old_stages[i]
        new = new_stages[i] if i < len(new_stages) else {}
        for k in sorted(set(old) | set(new)):
            if k not in STAGE_FIELDS_FREE and old.get(k) != new.get(k):
                diffs.append(f"train.stages[{i}].{k} (a completed stage): checkpoint {old.get(k)!r}, "
                             f"config {new.get(k)!r}")
    return diffs


def check_resume_config(saved: dict[str, Any] | None, current: Config, completed_stages: int, path: Path) -> None:
    if saved is None:  # an imported (model-only) checkpoint or one from before configs were stored
        return
    diffs = config_differences(saved, current, completed_stages)
    if diffs:
        raise ConfigError(f"resuming from {path}: the config differs from the checkpoint's in fields that cannot "
                          f"change mid-run: {'; '.join(diffs)} (use the original values, or start a new run.dir; the "
                          f"fields that may change are listed in README 'Resuming')")
