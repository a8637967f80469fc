"""Checkpoints with torch.distributed.checkpoint (DCP), published atomically.

Layout of a run directory's `checkpoints/`:

    step_00000040/            one complete checkpoint
        .metadata, *.distcp   DCP: model and optimizer tensors under their global (fully qualified) names
        meta.json             step, trainer and data-cursor state, file sizes; written last
    latest                    the name of the newest published checkpoint (moved after the directory is in place)

A checkpoint is written into `step_XXXXXXXX.tmp-*` and renamed into place only when every file, `meta.json` last, is
on disk; a killed writer therefore leaves a `.tmp-*` directory that is never picked up. `find_latest` trusts no
pointer: it takes the newest directory whose meta.json lists files that all exist with the recorded sizes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

META = "meta.json"
LATEST = "latest"
PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any], rank: int = 0) -> Path:
    """Save `tensors` (a DCP state dict: model and optimizer) and `meta` (JSON-able) as checkpoint `step`.

    Collective when distributed: every rank writes its shards into the same temporary directory, then rank 0
    alone writes meta.json, renames the directory into place and moves `latest`."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a writer that was killed
            shutil.rmtree(tmp)
    _barrier()
    dcp.save(tensors, checkpoint_id=str(tmp))
    _barrier()
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        meta = {**meta, "step": step, "files": files, "complete": True}
        meta_tmp = tmp / (META + ".partial")
        meta_tmp.write_text(json.dumps(meta, indent=1))
        with open(meta_tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(meta_tmp, tmp / META)
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume) replaces the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        latest_tmp = root / (LATEST + ".tmp")
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / LATEST)
    _barrier()
    return final


def is_complete(path: Path) -> bool:
    """Every file that meta.json lists exists with its recorded size (integrity check before any load)."""
    meta_path = path / META
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not meta.get("complete") or not meta.get("files"):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in meta["files"].items())


def list_checkpoints(root: str | Path) -> list[Path]:
    """Published checkpoint directories, oldest first (temporary ones excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and ".tmp" not in p.name]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def find_latest(root: str | Path) -> Path | None:
    for path in reversed(list_checkpoints(root)):
        if is_complete(path):
            return path
    return None


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def load_checkpoint(path: str | Path, tensors: dict[str, Any]) -> dict[str, Any]:
    """Load into `tensors` in place (DCP reshards to whatever layout they have) and return the meta dict."""
    path = Path(path)
    if not is_complete(path):
        raise RuntimeError(f"{path}: checkpoint is incomplete or corrupt (meta.json missing or file sizes differ)")
    dcp.load(tensors, checkpoint_id=str(path))
    return read_meta(path)


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """`auto`: the newest complete checkpoint, if any; `none`: start fresh; otherwise a checkpoint path."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(resume)
    if not is_complete(path):
        raise RuntimeError(f"--resume {resume}: not a complete checkpoint directory")
    return path


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
