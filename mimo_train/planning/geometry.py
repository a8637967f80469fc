"""The model as the planner sees it: the assumptions of an estimate, the model's parameters by sharding rule per
pipeline-placeable unit (read from the real module tree on the meta device), and the units each pipeline rank of a
`Layout` (mimo_train/config.py) holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from mimo_train.config import Layout, ModelConfig, load_config
from parallel.pipeline import stage_layers, stage_ranks
from parallel.sharding import rule_of

GB = 1e9


# --------------------------------------------------------------------------------------------------------------
# Assumptions
# --------------------------------------------------------------------------------------------------------------


def kernel_of(backend: str) -> str:
    """The activation model for a `parallel.backend`: the reference `torch` kernels, or the O(S) ones every GPU
    backend uses (flash / efficient / flex attention)."""
    return "torch" if backend == "torch" else "fused"


@dataclass(frozen=True)
class Assumptions:
    compute_efficiency: float = 0.5  # achieved fraction of peak on the model's matmuls and attention
    # Grouped expert GEMMs lose efficiency when each expert gets few rows per micro-batch: their FLOPs run at
    # rows / (rows + expert_half_rows) of the efficiency above (rows = ep x tokens per rank x top-k / experts).
    expert_half_rows: float = 128.0
    reserve_gb: float = 8.0  # per GPU: CUDA context, NCCL buffers, allocator fragmentation
    overlap_tp: float = 0.5  # fraction of each kind's communication hidden behind compute
    overlap_ep: float = 0.5  # (DualPipeV overlaps the EP all-to-all of one micro-batch with another's compute)
    overlap_ep_dualpipe: float = 0.9
    overlap_cp: float = 0.5
    overlap_pp: float = 0.9
    overlap_dp: float = 0.5
    # attention kernels: "fused" (parallel.backend=fused on a GPU: flash varlen / flex, O(S) memory) or "torch"
    kernel: str = "fused"
    packed_documents: bool = True  # torch kernel: GA layers use the masked (S x S) SDPA path
    micro_batch_size: int = 1


# --------------------------------------------------------------------------------------------------------------
# The model as the planner sees it: parameters by sharding rule, per unit (decoder layer, embedding, head, MTP)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """Parameter counts of one pipeline-placeable unit, by sharding rule."""

    tp: int = 0  # split over tp (q/o projections, sinks, dense FFN, vocab-parallel embedding and head)
    kv: dict = field(default_factory=dict)  # {kv heads: params} k/v projections
    expert: int = 0  # split over ep x etp
    rep: int = 0  # replicated (norms, router, eh_proj)
    buffers_fp32: int = 0  # expert correction biases, rotary tables (fp32, replicated)

    @property
    def total(self) -> int:
        return self.tp + sum(self.kv.values()) + self.expert + self.rep


@dataclass
class LayerShape:
    sliding: bool
    moe: bool
    kv_heads: int


@dataclass
class ModelGeometry:
    cfg: ModelConfig
    layers: list[Unit]
    shapes: list[LayerShape]
    embed: Unit
    head: Unit  # final norm + LM head
    mtp: Unit  # all MTP blocks
    mtp_blocks: int
    total_params: int  # main + MTP, from the module tree
    everywhere: Unit = field(default_factory=Unit)  # on every pipeline rank: the rotary tables
    # Per-rank figures that do not depend on recompute or the sequence, shared by a plan's layouts.
    cache: dict = field(default_factory=dict, repr=False)


# The Unit field a parameter counts in, by its split in the sharding plan (`parallel/sharding.py`).
_UNIT_OF_SPLIT = {"tp": "tp", "kv": "kv", "ep": "expert", None: "rep"}


def _rule(name: str) -> str:
    return _UNIT_OF_SPLIT[rule_of(name).split]


def geometry(cfg: ModelConfig) -> ModelGeometry:
    """Parameters of the real module tree (meta device), bucketed by unit and sharding rule."""
    from mimo_train.model.info import build_meta_model

    model = build_meta_model(cfg)
    layers = [Unit() for _ in range(cfg.num_layers)]
    embed, head, mtp, everywhere = Unit(), Unit(), Unit(), Unit()
    shapes = []
    for layer in model.decoder_layers():
        shapes.append(LayerShape(layer.self_attn.sliding, layer.is_moe, layer.self_attn.num_kv_heads))
    kv_of = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "num_kv_heads") and hasattr(mod, "k_proj"):
            kv_of[name] = mod.num_kv_heads

    def unit_of(name: str) -> Unit:
        if name.startswith("model.layers."):
            return layers[int(name.split(".")[2])]
        if name.startswith("model.embed_tokens"):
            return embed
        if name.startswith("model.mtp"):
            return mtp
        if name.startswith("model.rotary_emb"):
            return everywhere
        return head  # model.norm, lm_head

    total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        u, rule = unit_of(name), _rule(name)
        if rule == "kv":
            kv = kv_of[name.rsplit(".", 2)[0]]
            u.kv[kv] = u.kv.get(kv, 0) + n
        else:
            setattr(u, rule, getattr(u, rule) + n)
    for name, b in model.named_buffers():
        unit_of(name).buffers_fp32 += b.numel()
    return ModelGeometry(cfg, layers, shapes, embed, head, mtp, cfg.mtp.num_blocks, total, everywhere)


def pipeline_split(geo: ModelGeometry, L: Layout) -> tuple[list[list[int]], list[int]]:
    """`parallel/pipeline.py`'s decoder layers per stage and the pipeline rank of each stage (cached per layout)."""
    key = ("split", L.pp, L.pp_virtual, L.pp_schedule)
    if key not in geo.cache:
        if L.pp == 1:
            geo.cache[key] = ([list(range(geo.cfg.num_layers))], [0])
        else:
            geo.cache[key] = (stage_layers(L.parallel_config(), geo.cfg), stage_ranks(L.parallel_config()))
    return geo.cache[key]


def rank_units(geo: ModelGeometry, L: Layout, pp_rank: int) -> list[Unit]:
    """The units pipeline rank `pp_rank` holds: its stages' decoder layers (`parallel/pipeline.py`'s split and
    placement), the embedding on the first stage (and a copy on the last when MTP reads it), the final norm, head
    and MTP on the last. In a V (ZBV, DualPipeV) rank 0 holds both the first and the last stage."""
    if L.pp == 1:
        return geo.layers + [geo.embed, geo.head, geo.mtp, geo.everywhere]
    stages, ranks = pipeline_split(geo, L)
    local = [si for si in range(len(stages)) if ranks[si] == pp_rank]
    units = [geo.layers[i] for si in local for i in stages[si]]
    has_first, has_last = 0 in local, len(stages) - 1 in local
    if has_first or (has_last and geo.mtp_blocks > 0):
        units.append(geo.embed)  # one parameter when both stages are local
    if has_last:
        units += [geo.head, geo.mtp]
    return units + [geo.everywhere]


def model_config(path: str, overrides: list[str], mtp_blocks: int) -> ModelConfig:
    """The model of a model or training YAML, with overrides (bare keys are model keys) and the MTP blocks trained
    (-1: as in the file)."""
    overrides = [o if o.split("=", 1)[0].split(".")[0] in ("model", "train", "parallel", "data", "run")
                 else f"model.{o}" for o in overrides]
    if mtp_blocks >= 0:
        overrides.append(f"model.mtp.num_blocks={mtp_blocks}")
    return load_config(path, overrides).model
