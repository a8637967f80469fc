"""Streaming, parallel conversion between a Hugging Face directory (the released layout) and our checkpoints.

Neither direction holds the model. Import reads each of our tensors from the safetensors files (an expert stack
from its per-expert tensors, FP8 blocks dequantised) only when DCP asks for it to write it: the state dict handed
to DCP holds meta tensors, and `_LazyTensors.resolve_data` produces each one just before its bytes go to the file.
Export plans the output shards from the checkpoint's metadata alone, then writes each shard tensor by tensor,
loading from the checkpoint (any layout: DCP reads tensors by their global names) only the tensors that shard
needs. With N processes the tensors (import) or the shards (export) are split over the ranks; the plan does not
depend on N, so an export is byte-identical to a one-process export, and an import holds the same tensors.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemReader

from mimo_train.training import checkpoint as ckpt
from mimo_train.interop import fp8_release as fp8
from mimo_train.config import Config, ModelConfig, save_config
from mimo_train.interop.hf import _SINK_HUB, _SINK_OURS, from_hf_config, to_hf_config
from mimo_train.interop.safetensors_io import SafetensorsFile, TensorInfo, write_file
from mimo_train.model import MiMoForCausalLM

MODEL_PREFIX = "model."  # our checkpoints keep the model under "model" (DCP flattens it to "model.<name>")
MASTER_KEY = "optimizer.optim.{}.master"  # a bf16/fp8 run's fp32 master weight of parameter {}
_GATE_UP, _DOWN = ".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"
_MTP = re.compile(r"^model\.mtp\.layers\.(\d+)\.")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ConversionError(ValueError):
    """A conversion that cannot be done: the message names the file or tensor and what is wrong."""


# --------------------------------------------------------------------------------------------------------------
# Reading a Hugging Face directory
# --------------------------------------------------------------------------------------------------------------


class HubReader:
    """A Hugging Face directory's tensors by name, read one at a time; FP8 weights come back dequantised (fp32)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        config = self.dir / "config.json"
        if not config.is_file():
            raise ConversionError(f"{self.dir}: no config.json (not a Hugging Face model directory)")
        self.config = json.loads(config.read_text())
        self.block = fp8.check_quantization_config(self.config.get("quantization_config"), str(config))
        index = self.dir / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else sorted(p.name for p in self.dir.glob("*.safetensors")))
        if not files:
            raise ConversionError(f"{self.dir}: no safetensors files")
        self.files = {name: SafetensorsFile(self.dir / name) for name in files}
        self.where = {t: f for f in self.files.values() for t in f.entries}

    def names(self) -> list[str]:
        """Every tensor except the FP8 scales (which belong to their weight)."""
        return sorted(n for n in self.where if not n.endswith(fp8.SCALE_SUFFIX))

    def has(self, name: str) -> bool:
        return name in self.where

    def read(self, name: str) -> torch.Tensor:
        t = self.where[name].read(name)
        scale = name + fp8.SCALE_SUFFIX
        if scale in self.where:
            if self.block is None:
                raise ConversionError(f"{self.dir}: {name} has a {scale} but config.json declares no "
                                      f"quantization_config")
            return fp8.dequantize(t, self.where[scale].read(scale), name)
        if t.dtype.itemsize == 1 and t.is_floating_point():
            raise ConversionError(f"{self.dir}: {name} is {t.dtype} without a {scale}")
        return t

    def model_config(self) -> ModelConfig:
        blocks = {int(m.group(1)) for n in self.where if (m := _MTP.match(n))}
        return from_hf_config(self.config, num_mtp_blocks=len(blocks))


def read_ours(reader: HubReader, name: str, shape: tuple[int, ...], expert: int | None = None) -> torch.Tensor:
    """Our tensor `name` from the Hub's names (experts one by one, `attention_sink_bias`) or transformers' own;
    with `expert`, only that expert's [1, rows, cols] of an expert stack."""
    if reader.has(name):
        t = reader.read(name)
        return t if expert is None else t[expert:expert + 1].clone()
    if is_expert_stack(name):
        prefix = name[: name.rindex(".") + 1]
        parts = ["gate_proj", "up_proj"] if name.endswith(_GATE_UP) else ["down_proj"]
        experts = range(shape[0]) if expert is None else [expert]
        out = None
        for i, e in enumerate(experts):
            rows = [reader.read(f"{prefix}{e}.{p}.weight") for p in parts]
            if out is None:
                out = torch.empty((len(experts), *shape[1:]), dtype=rows[0].dtype)
            torch.cat(rows, dim=0, out=out[i])
        return out
    if name.endswith(_SINK_OURS):
        return reader.read(name[: -len(_SINK_OURS)] + _SINK_HUB)
    raise ConversionError(f"{reader.dir}: no tensor for {name}")


def hub_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """The released checkpoint's names of our tensor `name`."""
    if name.endswith(_GATE_UP):
        prefix = name[: -len("gate_up_proj")]
        return [f"{prefix}{e}.{p}.weight" for e in range(shape[0]) for p in ("gate_proj", "up_proj")]
    if name.endswith(_DOWN):
        prefix = name[: -len("down_proj")]
        return [f"{prefix}{e}.down_proj.weight" for e in range(shape[0])]
    if name.endswith(_SINK_OURS):
        return [name[: -len(_SINK_OURS)] + _SINK_HUB]
    return [name]


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Our state dict's names, shapes and dtypes, from a model built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = MiMoForCausalLM(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_names_match(reader: HubReader, shapes: dict) -> None:
    """Every tensor of ours has a source and every source tensor is used: one error listing both, before work."""
    fused = {n for n in shapes if reader.has(n)}
    wanted = {h for n, (s, _) in shapes.items() if n not in fused for h in hub_names(n, s)} | fused
    present = set(reader.names())
    missing, unexpected = sorted(wanted - present), sorted(present - wanted)
    if missing or unexpected:
        raise ConversionError(f"{reader.dir}: weights do not match config.json: missing {missing[:6]} "
                              f"({len(missing)}), unexpected {unexpected[:6]} ({len(unexpected)})")


# --------------------------------------------------------------------------------------------------------------
# Import: Hugging Face directory -> our checkpoint
# --------------------------------------------------------------------------------------------------------------


def split_by_bytes(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Names spread over `world` ranks, largest first onto the least loaded (deterministic)."""
    loads, parts = [0] * world, [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (loads[i], i))
        parts[r].append(name)
        loads[r] += sizes[name]
    return parts


def is_expert_stack(name: str) -> bool:
    return name.endswith(_GATE_UP) or name.endswith(_DOWN)


class _LazyTensors(DefaultSavePlanner):
    """DCP sees meta tensors (names, shapes, dtypes); each real tensor is produced when DCP writes it. An expert
    stack ([experts, rows, cols]; at 309B a layer's gate_up_proj is 17 GB in fp32) is written as one chunk per
    expert, as a sharded save would: the checkpoint stays layout-free (DCP reads any slice across chunks) and no
    process ever holds a whole stack."""

    def __init__(self, produce: Callable[[str, int | None], torch.Tensor]):
        super().__init__()
        self.produce = produce

    def create_local_plan(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        plan = super().create_local_plan()
        items = []
        for item in plan.items:
            if not is_expert_stack(item.index.fqn):
                items.append(item)
                continue
            size = item.tensor_data.size
            for e in range(size[0]):
                offsets, sizes = torch.Size([e, 0, 0]), torch.Size([1, *size[1:]])
                items.append(WriteItem(index=MetadataIndex(item.index.fqn, offsets), type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(ChunkStorageMetadata(offsets, sizes),
                                                                   item.tensor_data.properties, size)))
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        return self.produce(fqn, write_item.index.offset[0] if is_expert_stack(fqn) else None)


def import_hf(hf_dir: str | Path, ckpt_root: str | Path, dtype: str = "fp32", rank: int = 0, world: int = 1,
              progress: bool = True) -> Path:
    """Write `hf_dir` as checkpoint step 0 (model only) under `ckpt_root`, with its config.yaml beside it.
    Collective when `world` > 1: each rank reads and writes its share of the tensors."""
    reader = HubReader(hf_dir)
    cfg = reader.model_config()
    shapes = model_shapes(cfg)
    check_names_match(reader, shapes)
    target = DTYPES[dtype]
    sizes = {n: torch.Size(s).numel() * target.itemsize for n, (s, _) in shapes.items()}
    mine = split_by_bytes(sizes, world)[rank]
    written: list[torch.Tensor] = []
    count = [0]
    items = sum(shapes[n][0][0] if is_expert_stack(n) else 1 for n in mine)  # an expert stack: one per expert

    def produce(fqn: str, expert: int | None) -> torch.Tensor:
        # DCP's writer keeps a reference to every tensor of a file until the file is closed (for its safetensors
        # format), though each is written before the next is asked for (a serial loader: see _import_writer):
        # the previous tensor's memory is released here, or the import would hold this rank's whole share.
        if written:
            written.pop().untyped_storage().resize_(0)
        name = fqn[len(MODEL_PREFIX):]
        t = read_ours(reader, name, shapes[name][0], expert).to(target)
        if not t.untyped_storage().resizable():  # read straight from a file through numpy's buffer: not releasable
            t = t.clone()
        written.append(t)
        count[0] += 1
        if progress and rank == 0 and (count[0] % 200 == 0 or count[0] == items):
            print(f"  rank 0: {count[0]}/{items} tensors and experts written", flush=True)
        return t

    state = {MODEL_PREFIX + n: torch.empty(shapes[n][0], dtype=target, device="meta") for n in mine}
    root = Path(ckpt_root)
    tmp = ckpt.prepare_tmp(root, 0, rank)
    with _single_process_quiet():
        dcp.save(state, storage_writer=_import_writer(tmp), planner=_LazyTensors(produce), no_dist=world == 1)
    _barrier(world)
    if rank == 0:
        meta = {"source": str(Path(hf_dir).resolve()), "model_only": True, "hf_import": {"dtype": dtype}}
        ckpt.publish(root, 0, meta)
        save_config(Config(model=cfg), root / "config.yaml")
    _barrier(world)
    return root / ckpt.checkpoint_name(0)


def _import_writer(tmp: Path):
    """DCP's file writer with checksums, one thread and no copy-ahead: it asks for tensor k + 1 only after tensor k
    is in the file (with copy-ahead, as on CUDA machines by default, it would resolve several first)."""
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(str(tmp), sync_files=True, thread_count=1, per_thread_copy_ahead=0)
    writer.fs = ckpt.ChecksummingFileSystem()
    return writer


@contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process whenever no process group is given: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------------------------------
# Export: our checkpoint -> Hugging Face directory
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """One tensor of the exported files: which of our tensors it comes from, and how."""

    info: TensorInfo
    source: str  # our tensor name
    part: tuple  # ("all",) | ("gate", e) | ("up", e) | ("expert", e)
    encoding: str  # "plain" | "fp8" (E4M3 values) | "scale" (their scale_inv)


def _parts(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple, tuple[int, ...]]]:
    """(hub name, part, shape) of each released tensor of our tensor `name`."""
    if name.endswith(_GATE_UP):
        half = (shape[1] // 2, shape[2])
        return [(h, (h.rsplit(".", 2)[1][:-5], int(h.split(".")[-3])), half) for h in hub_names(name, shape)]
    if name.endswith(_DOWN):
        return [(h, ("expert", int(h.split(".")[-3])), shape[1:]) for h in hub_names(name, shape)]
    return [(hub_names(name, shape)[0], ("all",), shape)]


def _keeps_fp32(hub_name: str) -> bool:
    """The router (its weight and correction bias) is computed in fp32; its few bytes stay fp32 in every export."""
    return ".mlp.gate." in hub_name


def plan_outputs(shapes: dict[str, tuple[int, ...]], dtype: str) -> list[Output]:
    """Every exported tensor, grouped by source (so that a source is loaded once per shard)."""
    out = []
    for name in sorted(shapes):
        for hub, part, shape in _parts(name, shapes[name]):
            plain = torch.float32 if dtype == "fp32" or _keeps_fp32(hub) else torch.bfloat16
            if dtype == "fp8" and fp8.quantised_in_release(hub) and len(shape) == 2:
                out.append(Output(TensorInfo(hub, fp8.E4M3, shape), name, part, "fp8"))
                out.append(Output(TensorInfo(hub + fp8.SCALE_SUFFIX, torch.float32, fp8.scale_shape(shape)),
                                  name, part, "scale"))
            else:
                out.append(Output(TensorInfo(hub, plain, shape), name, part, "plain"))
    return out


def plan_shards(outputs: list[Output], max_shard_bytes: int) -> list[list[Output]]:
    shards: list[list[Output]] = [[]]
    size = 0
    for o in outputs:
        if shards[-1] and size + o.info.nbytes > max_shard_bytes and o.encoding != "scale":
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.info.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class CheckpointTensors:
    """Our checkpoint's model tensors by name, each loaded alone (DCP reads only its bytes), the fp32 master
    weight where the run kept one; the last one is cached (a shard's outputs come grouped by source)."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = FileSystemReader(str(path)).read_metadata()
        self.meta = self.metadata.state_dict_metadata
        self.names = sorted(k[len(MODEL_PREFIX):] for k in self.meta if k.startswith(MODEL_PREFIX))
        self._cached: tuple[str, torch.Tensor] | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.meta[MODEL_PREFIX + n].size) for n in self.names}

    def get(self, name: str, expert: int | None = None) -> torch.Tensor:
        """The whole tensor, or with `expert` that expert's [rows, cols] of an expert stack (only its bytes read)."""
        if self._cached is None or self._cached[0] != (name, expert):
            self._cached = None  # free the previous one first
            key = MASTER_KEY.format(name) if MASTER_KEY.format(name) in self.meta else MODEL_PREFIX + name
            md = self.meta[key]
            shape = tuple(md.size) if expert is None else (1, *md.size[1:])
            buf = torch.empty(shape, dtype=md.properties.dtype)
            planner = None if expert is None else _ChunkLoad(key, expert)
            with _single_process_quiet():
                dcp.load({key: buf}, storage_reader=_KnownMetadataReader(self.path, self.metadata), planner=planner,
                         no_dist=True)
            self._cached = ((name, expert), buf if expert is None else buf[0])
        return self._cached[1]


class _ChunkLoad(DefaultLoadPlanner):
    """Load expert `expert` of a stack into a [1, rows, cols] buffer: the read items of that chunk only (DCP's
    resharding reads, whatever chunks the checkpoint was saved in)."""

    def __init__(self, key: str, expert: int):
        super().__init__()
        self.key, self.expert = key, expert

    def create_local_plan(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.metadata.state_dict_metadata[self.key]
        chunk = ChunkStorageMetadata(torch.Size([self.expert, 0, 0]), torch.Size([1, *md.size[1:]]))
        return LoadPlan(create_read_items_for_chunk_list(self.key, md, [chunk]))

    def resolve_tensor(self, read_item):
        """Where a read lands: the part of the [1, rows, cols] buffer it covers (offsets relative to the chunk)."""
        t = self.state_dict[self.key]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, offset, length)
        return t


class _KnownMetadataReader(FileSystemReader):
    """DCP's reader, given the metadata it would otherwise read and unpickle again for every tensor."""

    def __init__(self, path: Path, metadata):
        super().__init__(str(path))
        self._known = metadata

    def read_metadata(self):
        return self._known


def _slice(t: torch.Tensor, part: tuple) -> torch.Tensor:
    if part[0] == "all":
        return t
    if part[0] == "expert":
        return t[part[1]]
    half = t.shape[1] // 2
    return t[part[1], :half] if part[0] == "gate" else t[part[1], half:]


def _producer(tensors: CheckpointTensors, shard: list[Output]):
    by_name = {o.info.name: o for o in shard}
    quantised: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def produce(info: TensorInfo) -> torch.Tensor:
        o = by_name[info.name]
        if o.part[0] == "all":
            t = tensors.get(o.source)
        else:  # one expert of a stack: only its bytes are read
            t = _slice(tensors.get(o.source, o.part[1]).unsqueeze(0), (o.part[0], 0))
        if o.encoding == "plain":
            return t.to(info.dtype).contiguous()
        hub = info.name if o.encoding == "fp8" else info.name[: -len(fp8.SCALE_SUFFIX)]
        if hub not in quantised:
            quantised.clear()
            quantised[hub] = fp8.quantize(t)
        return quantised[hub][0] if o.encoding == "fp8" else quantised[hub][1]

    return produce


def export_checkpoint(path: Path, cfg: ModelConfig, out_dir: Path, dtype: str = "bf16", rank: int = 0,
                      world: int = 1, max_shard_bytes: int = 5 * 1024**3, progress: bool = True) -> dict:
    """Write this rank's share of the shards into `staging_dir(out_dir)` (created by the caller); returns
    {file: {size, checksum}} of the files this rank wrote."""
    tensors = CheckpointTensors(path)
    shapes = tensors.shapes()
    expected = model_shapes(cfg)
    wrong = sorted(n for n in expected if shapes.get(n) != expected[n][0])
    if wrong:
        raise ConversionError(f"{path}: the checkpoint's tensors do not match its config.yaml ({wrong[:4]})")
    shards = plan_shards(plan_outputs(shapes, dtype), max_shard_bytes)
    tmp = staging_dir(out_dir)
    written = {}
    for i in range(rank, len(shards), world):
        fname = shard_name(i, len(shards))
        checksum = ckpt.Checksum(ckpt.checksum_algorithm())
        size = write_file(tmp / fname, [o.info for o in shards[i]], _producer(tensors, shards[i]), checksum)
        written[fname] = {"size": size, "checksum": checksum.hexdigest(), "algorithm": checksum.algorithm,
                          "tensors": [o.info.name for o in shards[i]]}
        if progress:
            print(f"  rank {rank}: wrote {fname} ({size / 2**20:.1f} MiB)", flush=True)
    return written


def staging_dir(out_dir: Path) -> Path:
    """Where an export is written before it is renamed into place (beside it: the same file system)."""
    return out_dir.with_name(out_dir.name + ".partial")


def write_index_and_config(out_dir: Path, cfg: ModelConfig, dtype: str, written: dict) -> None:
    """Rank 0, once every shard is written: the index (with each file's checksum), config.json."""
    tmp = staging_dir(out_dir)
    weight_map = {t: f for f in sorted(written) for t in written[f]["tensors"]}
    total = sum(w["size"] for w in written.values())
    algorithm = next(iter(written.values()))["algorithm"]
    index = {"metadata": {"total_size": total, "checksum_algorithm": algorithm,
                          "checksums": {f: written[f]["checksum"] for f in sorted(written)},
                          "sizes": {f: written[f]["size"] for f in sorted(written)}},
             "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    hf_config = to_hf_config(cfg)
    hf_config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}[dtype]
    if dtype == "fp8":
        not_converted = {n[: -len(".weight")] for n in weight_map
                         if n == "lm_head.weight" or re.search(r"\.(o_proj|mlp\.gate)\.weight$", n)}
        hf_config["quantization_config"] = fp8.release_quantization_config(sorted(not_converted))
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=1))


def publish_export(out_dir: Path) -> None:
    """The staged directory renamed into place (atomic: a reader sees nothing or everything)."""
    tmp = staging_dir(out_dir)
    if out_dir.exists():
        out_dir.rmdir()  # only an empty directory is replaced (checked before any work)
    tmp.rename(out_dir)


def discard_staging(out_dir: Path) -> None:
    shutil.rmtree(staging_dir(out_dir), ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------------------------


def verify_export(hf_dir: str | Path) -> list[str]:
    """Problems of an exported directory (empty when every file has its recorded size and checksum)."""
    hf_dir = Path(hf_dir)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["metadata"]
    if "checksums" not in index:
        return [f"{hf_dir}: the index records no checksums (not written by mimo-train hf-export)"]
    problems = []
    for fname, expected in index["checksums"].items():
        p = hf_dir / fname
        if not p.is_file():
            problems.append(f"{fname}: missing")
        elif p.stat().st_size != index["sizes"][fname]:
            problems.append(f"{fname}: {p.stat().st_size} bytes, {index['sizes'][fname]} were written")
        elif (actual := ckpt.file_checksum(p, index["checksum_algorithm"])) != expected:
            problems.append(f"{fname}: checksum {actual} differs from the {expected} recorded at export")
    return problems
