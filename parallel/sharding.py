"""The sharding plan: for every kind of parameter, how it is split over the ranks and over which group its gradient
is summed, stated once and read by everything that needs it.

Readers: the wrappers that cut a rank's slices (`parallel/parallelize.py`), the layout checks (`parallel/topology.py`,
`parallel/kernels/te_rules.py`), the groups and meshes of replicated KV heads (`parallel/topology.py`), the
optimizer's row blocks and the checkpoint views (through the `ParamLayout` records parallelize builds from the plan)
and the planner's memory and communication model (`mimo_train/planning/`). Torch-free, so that the planner and the
checks before launch can read it without building anything.

Tensor parallelism splits attention by heads. When a layer has fewer KV heads than tp ranks, the KV heads cannot be
split: each one is then held whole by tp / kv consecutive tp ranks (KV replication), and the gradient of a
replicated head is summed over those ranks and their dp x cp peers, the group of kind "kv<kv>".
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- the KV-replication rule -----------------------------------------------------------------------------------


def kv_splits(kv_heads: int, tp: int) -> bool:
    """Whether `kv_heads` KV heads can be placed on `tp` ranks: split evenly (tp divides them) or replicated
    (they divide tp)."""
    return kv_heads % tp == 0 or tp % kv_heads == 0


def kv_split(kv_heads: int, tp: int) -> tuple[int, int]:
    """(KV heads per rank, ranks holding each head) for `kv_heads` heads over `tp` tensor-parallel ranks: the heads
    split when there are at least tp of them, else each head is replicated on tp / kv ranks."""
    if not kv_splits(kv_heads, tp):
        raise ValueError(f"{kv_heads} KV heads cannot be placed on {tp} tensor-parallel ranks: tp must divide them "
                         "or be a multiple of them")
    return (kv_heads // tp, 1) if kv_heads >= tp else (1, tp // kv_heads)


def kv_grad_kind(kv_heads: int, tp: int) -> str:
    """The gradient group of a layer's K/V projections: dp x cp when the heads split, else the group of the ranks
    holding the same replicated head ("kv<kv>")."""
    return "dp_cp" if kv_split(kv_heads, tp)[1] == 1 else f"kv{kv_heads}"


def replicated_kv_heads(kv_head_counts, tp: int) -> list[int]:
    """Of the KV head counts of a model's layers (GA, SWA), those that are replicated under `tp` (fewer than tp):
    each needs its own gradient group and checkpoint mesh."""
    return sorted(kv for kv in set(kv_head_counts) if kv_split(kv, tp)[1] > 1)


# Gradient groups by kind; "kv<n>" is the group of a KV head replicated over tp / n ranks. Every rank walks the
# kinds in this order, so the collectives of different groups never interleave differently on different ranks.
GRAD_KINDS = ("tp_dp_cp", "dp_cp", "kv1", "kv2", "kv4", "kv8", "kv16", "kv32", "kv64", "edp")


# ---- per parameter kind: split dimension and gradient group ----------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """How one kind of parameter is placed: split along `dim` over the ranks of `split` ("tp": tensor-parallel;
    "kv": tensor-parallel by KV heads, with replication; "ep": expert-parallel; None: a full replica on every rank
    of the stage), its gradient summed over the group of kind `grad` ("kv": see `kv_grad_kind`)."""

    split: str | None
    dim: int | None
    grad: str


COLUMN = Rule("tp", 0, "dp_cp")  # output rows split: q, gate/up, the vocab of the embedding and head, the sinks
ROW = Rule("tp", 1, "dp_cp")  # input columns split: o, down
KV = Rule("kv", 0, "kv")  # k, v: by KV heads
EXPERT = Rule("ep", 0, "edp")  # stacked expert weights: by expert
REPLICATED = Rule(None, None, "tp_dp_cp")  # norms, router, MTP's eh_proj

# Parameter name endings -> rule (expert weights, matched first, are the parameters under `.experts.`: their
# `down_proj` is not the dense MLP's). Any other parameter is a full replica.
RULES = (
    ("embed_tokens.weight", COLUMN),
    ("lm_head.weight", COLUMN),
    ("q_proj.weight", COLUMN),
    ("self_attn.sinks", COLUMN),
    ("gate_proj.weight", COLUMN),
    ("up_proj.weight", COLUMN),
    ("o_proj.weight", ROW),
    ("down_proj.weight", ROW),
    ("k_proj.weight", KV),
    ("v_proj.weight", KV),
)


def rule_of(name: str) -> Rule:
    """The rule of the parameter called `name` in the single-process model."""
    if ".experts." in name:
        return EXPERT
    return next((rule for ending, rule in RULES if name.endswith(ending)), REPLICATED)


# ---- a rule under a layout: one rank's placement ---------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """One rank's share of a parameter: a full replica (dim None), or slice `index` of `num_slices` along `dim`,
    the slices held in order by the ranks of the `gather_kind` group, each slice on `replicas` consecutive ranks;
    its gradient summed over the group of kind `grad_kind`."""

    grad_kind: str
    dim: int | None = None
    index: int = 0
    num_slices: int = 1
    gather_kind: str | None = None
    replicas: int = 1

    def local(self, full: int) -> slice:
        """This rank's range of the `full` entries along the split dimension."""
        size = full // self.num_slices
        return slice(self.index * size, (self.index + 1) * size)


def place(rule: Rule, *, tp: int = 1, tp_rank: int = 0, ep: int = 1, ep_rank: int = 0,
          kv_heads: int | None = None) -> Placement:
    """Where `rule` puts a parameter on the rank at `tp_rank` of tp and `ep_rank` of ep. Without tensor
    parallelism, tensor-parallel kinds are full replicas; expert weights are always recorded as split over ep."""
    if rule.split == "ep":
        return Placement(rule.grad, rule.dim, ep_rank, ep, "ep")
    if rule.split is None or tp == 1:
        return Placement(REPLICATED.grad)
    if rule.split == "tp":
        return Placement(rule.grad, rule.dim, tp_rank, tp, "tp")
    per_rank, replicas = kv_split(kv_heads, tp)
    return Placement(kv_grad_kind(kv_heads, tp), rule.dim, tp_rank // replicas, tp // replicas, "tp", replicas)
