"""`train.init_from`: a new run that starts from converted or trained weights, under its own layout and precision.

Only weights are taken: the optimizer moments, the step, the learning-rate schedule and the data position start
fresh, as in any new run. From one of our checkpoints (any layout: tensors are stored with their global names),
DCP reads each rank's slices; from a Hugging Face directory (bf16, fp32 or the release's FP8 blocks), each rank
reads every tensor it holds a part of, one tensor at a time (of an expert stack, only its own experts), and keeps
its part. Where the run's precision keeps
fp32 master weights, the fp32 values go to the masters and the bf16 parameters are cast from them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from mimo_train.training import checkpoint as ckpt
from mimo_train.config import ConfigError
from mimo_train.precision import precision
from parallel.state_dict import (copy_loaded_model_state, model_state, optimizer_state,
                                 read_fp32_values_from_saved_place)

HF = "hugging face directory"
CHECKPOINT = "checkpoint"


def resolve_source(init_from: str, share: tuple[int, int] = (0, 1), agree=ckpt._alone) -> tuple[str, Path]:
    """(kind, path): a Hugging Face directory (config.json), a checkpoint (meta.json), or a checkpoints/ or run
    directory whose newest checkpoint that verifies is taken. Distributed, each rank checks the checksums of its
    `share` of the files and `agree` returns the first problem any rank found (as for a resume)."""
    path = Path(init_from).expanduser()
    if (path / "config.json").is_file():
        return HF, path
    if (path / ckpt.META).is_file():
        problem = agree(ckpt.verify(path, share))
        if problem is not None:
            raise ConfigError(f"train.init_from: {path} is incomplete or corrupt ({problem})")
        return CHECKPOINT, path
    for root in (path, path / "checkpoints"):
        found = ckpt.find_verified(root, set_aside=False, share=share, agree=agree)
        if found is not None:
            return CHECKPOINT, found
    raise ConfigError(f"train.init_from: {path} is neither a Hugging Face directory (config.json) nor a mimo-train "
                      f"checkpoint, checkpoints/ or run directory with a checkpoint that verifies")


def check_before_launch(cfg, resume: str) -> None:
    """`train.init_from` must name a usable source when the run will start fresh (no checkpoint to resume): one
    error before any rank starts. A run that resumes never reads it (the source may be gone by then)."""
    if not cfg.train.init_from or resume not in ("none", "auto"):
        return
    if resume == "auto" and ckpt.list_checkpoints(Path(cfg.run.dir) / "checkpoints"):
        return
    path = Path(cfg.train.init_from).expanduser()
    if not path.is_dir():
        raise ConfigError(f"train.init_from: {path} is not a directory (a Hugging Face directory or a mimo-train "
                          f"checkpoint)")


def _check_shapes(source: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    wrong = [f"{n} {found.get(n)} vs {s}" for n, s in sorted(expected.items()) if found.get(n) != s]
    if wrong:
        raise ConfigError(f"train.init_from: {source} does not hold this run's model (model config): "
                          f"{len(wrong)} tensors differ, e.g. {wrong[:3]}")


def _global_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)  # a DTensor's shape is its global one


def load_initial_weights(trainer) -> None:
    """Fill the trainer's parameters (and fp32 masters) from `train.init_from` (collective)."""
    world = getattr(trainer, "world", 1)
    agree = trainer._first_problem if world > 1 else ckpt._alone
    kind, path = resolve_source(trainer.cfg.train.init_from, (getattr(trainer, "rank", 0), world), agree)
    state = {"model": model_state(trainer.model, trainer.layouts, trainer.topo),
             "optimizer": optimizer_state(trainer.optimizer, trainer.layouts, trainer.topo, create=True)}
    saved_masters = kind == CHECKPOINT and precision(ckpt.saved_precision(path)).has_masters
    read_fp32_values_from_saved_place(state, trainer.optimizer, saved_masters)
    wanted = {"model": state["model"],
              "optimizer": {k: v for k, v in state["optimizer"].items() if k.endswith(".master")}}
    expected = {n: _global_shape(t) for n, t in state["model"].items()}
    if kind == CHECKPOINT:
        _load_checkpoint(path, wanted, expected)
    else:
        _load_hf(path, wanted["model"], expected)
    copy_loaded_model_state(trainer.model, state["model"])
    if trainer.optimizer.masters is not None and not saved_masters:
        trainer.optimizer.params_from_masters()
    if trainer.is_logger:
        print(f"initialised from {path} ({kind}): weights only; step 0, fresh optimizer, schedule and data",
              flush=True)


def _load_checkpoint(path: Path, wanted: dict, expected: dict[str, tuple[int, ...]]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    found = {k[len("model."):]: tuple(v.size) for k, v in meta.items() if k.startswith("model.")}
    _check_shapes(path, found, expected)
    dcp.load(wanted, checkpoint_id=str(path))


def _load_hf(path: Path, model: dict, expected: dict[str, tuple[int, ...]]) -> None:
    from mimo_train.interop import hf_stream

    reader = hf_stream.HubReader(path)
    hub_cfg = reader.model_config()
    _check_shapes(path, {n: s for n, (s, _) in hf_stream.model_shapes(hub_cfg).items()}, expected)
    for name, dest in model.items():
        if hf_stream.is_expert_stack(name):  # only this rank's experts are read, one at a time
            offset, shape = local_region(dest)
            for i in range(shape[0]):
                part = hf_stream.read_ours(reader, name, expected[name], offset[0] + i)[0]
                with torch.no_grad():
                    _local_view(dest)[i].copy_(part[tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:]))])
            continue
        full = hf_stream.read_ours(reader, name, expected[name])
        with torch.no_grad():
            _local_view(dest).copy_(full_part(dest, full))
        del full


def _local_view(dest: torch.Tensor) -> torch.Tensor:
    return dest.to_local() if isinstance(dest, DTensor) else dest


def local_region(dest: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offset, shape) of the part of its global tensor that `dest` (a DTensor, or a whole tensor) holds."""
    if not isinstance(dest, DTensor):
        return (0,) * dest.dim(), tuple(dest.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(dest.shape, dest.device_mesh, dest.placements)
    return tuple(offset), tuple(shape)


def full_part(dest: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of the global tensor `full` that `dest` (a DTensor's local shard, or a whole tensor) holds."""
    offset, shape = local_region(dest)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
