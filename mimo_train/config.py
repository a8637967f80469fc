"""Typed configuration: dataclass schema, YAML loading, dotted command-line overrides and validation.

Every section is a plain dataclass. Loading walks the YAML tree against the dataclass fields, so an unknown
key or a value of the wrong type fails before any work starts, with the dotted field name in the message.
Cross-field rules (heads divisible by KV heads, top-k <= experts, ...) live in each section's `validate`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.config import DataConfig, SourceConfig
from mimo_train.hardware import PEAK_TFLOPS
from mimo_train.precision import NAMES as PRECISION_NAMES

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
# `parallel.backend`: the layer specs of parallel/kernels (`te`: Transformer Engine, checked before launch by
# parallel/kernels/te_rules.py).
KERNEL_BACKENDS = ("torch", "fused", "te")


class ConfigError(ValueError):
    """An invalid configuration; the message names the field and the rule it breaks."""


# --------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MTPConfig:
    num_blocks: int = 1
    # Which trunk hidden state feeds the MTP block: "final_norm" is the post-final-norm output that the
    # inference engines (vLLM, SGLang) feed; "pre_norm" is the raw last-layer output (spec section 6, item 12).
    hidden_input: str = "final_norm"
    # SGLang's MTP layer does not apply the value scale, vLLM and Megatron-Bridge do (spec section 6, item 8).
    apply_value_scale: bool = True

    def validate(self, prefix: str) -> None:
        _require(self.num_blocks >= 0, f"{prefix}.num_blocks", "must be >= 0", self.num_blocks)
        _require(self.hidden_input in ("final_norm", "pre_norm"), f"{prefix}.hidden_input",
                 "must be 'final_norm' or 'pre_norm'", self.hidden_input)


@dataclass
class ModelConfig:
    """The MiMo-V2-Flash architecture. Defaults are the released model (spec section 1)."""

    vocab_size: int = 152576
    hidden_size: int = 4096
    num_layers: int = 48
    num_attention_heads: int = 64
    # KV heads of the global-attention (GA) layers; sliding-window (SWA) layers have `swa_kv_head_factor` times more.
    num_key_value_heads: int = 4
    swa_kv_head_factor: int = 2
    head_dim: int = 192
    v_head_dim: int = 128
    partial_rotary_factor: float = 0.334
    rope_theta: float = 5_000_000.0  # GA layers; 640k in the 32k pre-training stages
    swa_rope_theta: float = 10_000.0
    # Sliding window, as the Hub's `sliding_window_size`. transformers reads it as `sliding_window_size + 1` keys
    # including the query (the query and the 128 tokens before it), so `sliding_window_includes_query` is false.
    # With true, the window holds `sliding_window` keys including the query (TE window_size=(W-1, 0)).
    sliding_window: int = 128
    sliding_window_includes_query: bool = False
    # Layer pattern: GA at i == 0 or (i + 1) % global_attention_every == 0, SWA elsewhere.
    global_attention_every: int = 6
    # The first `first_dense_layers` layers use a dense SwiGLU FFN; all later layers are MoE.
    first_dense_layers: int = 1
    intermediate_size: int = 16384
    moe_intermediate_size: int = 2048
    num_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    attention_value_scale: float = 0.707
    rms_norm_eps: float = 1e-5
    init_std: float = 0.006
    max_position_embeddings: int = 262144
    bos_token_id: int | None = 1
    eos_token_id: int | None = None
    mtp: MTPConfig = field(default_factory=MTPConfig)

    # ---- derived ------------------------------------------------------------------------------------------
    @property
    def swa_num_key_value_heads(self) -> int:
        return self.num_key_value_heads * self.swa_kv_head_factor

    def is_global_layer(self, i: int) -> bool:
        return i == 0 or (i + 1) % self.global_attention_every == 0

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_dense_layers

    @property
    def layer_types(self) -> list[str]:
        return ["full_attention" if self.is_global_layer(i) else "sliding_attention" for i in range(self.num_layers)]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def window_keys(self) -> int:
        """How many keys (the query included) a sliding-window query attends to."""
        return self.sliding_window if self.sliding_window_includes_query else self.sliding_window + 1

    def validate(self, prefix: str = "model") -> None:
        p = prefix
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads",
                     "swa_kv_head_factor", "head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size",
                     "num_experts", "num_experts_per_tok", "global_attention_every", "n_group", "topk_group"):
            _require(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1", getattr(self, name))
        _require(self.sliding_window >= 1, f"{p}.sliding_window", "window must be >= 1", self.sliding_window)
        for kv_name, kv in (("num_key_value_heads", self.num_key_value_heads),
                            ("num_key_value_heads x swa_kv_head_factor", self.swa_num_key_value_heads)):
            _require(self.num_attention_heads % kv == 0, f"{p}.num_attention_heads",
                     f"must be divisible by {kv_name} ({kv})", self.num_attention_heads)
        _require(self.num_experts_per_tok <= self.num_experts, f"{p}.num_experts_per_tok",
                 f"top-k must be <= num_experts ({self.num_experts})", self.num_experts_per_tok)
        _require(self.num_experts % self.n_group == 0, f"{p}.n_group",
                 f"must divide num_experts ({self.num_experts})", self.n_group)
        _require(self.topk_group <= self.n_group, f"{p}.topk_group", f"must be <= n_group ({self.n_group})",
                 self.topk_group)
        _require(0 < self.partial_rotary_factor <= 1, f"{p}.partial_rotary_factor", "must be in (0, 1]",
                 self.partial_rotary_factor)
        _require(self.rotary_dim % 2 == 0 and self.rotary_dim >= 2, f"{p}.partial_rotary_factor",
                 "int(head_dim x factor) must be an even number >= 2", self.rotary_dim)
        _require(0 <= self.first_dense_layers <= self.num_layers, f"{p}.first_dense_layers",
                 f"must be in [0, num_layers={self.num_layers}]", self.first_dense_layers)
        _require(self.rms_norm_eps > 0, f"{p}.rms_norm_eps", "must be > 0", self.rms_norm_eps)
        _require(self.init_std > 0, f"{p}.init_std", "must be > 0", self.init_std)
        _require(self.rope_theta > 0 and self.swa_rope_theta > 0, f"{p}.rope_theta",
                 "RoPE bases must be > 0", (self.rope_theta, self.swa_rope_theta))
        self.mtp.validate(f"{p}.mtp")


@dataclass(frozen=True)
class Layout:
    """A parallel layout with every degree resolved: the degrees, the pipeline schedule with its stages per rank,
    and the recompute mode. The one type for them that the topology (`parallel/topology.py`), the planner and the
    simulator share; `ParallelConfig.layout()` makes it from a `parallel:` section (whose dp may be "auto"), and
    its field names are that section's keys. Frozen, so that estimates can be cached by layout."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    pp_schedule: str = "1f1b"
    pp_virtual: int = 1
    recompute: str = "none"  # none | selective | full

    DEGREES = ("tp", "pp", "dp", "cp", "ep", "etp")

    @property
    def world(self) -> int:
        """Ranks: the attention mesh (pp, dp, cp, tp); the MoE mesh (pp, edp, ep, etp) folds the same ranks."""
        return self.tp * self.pp * self.dp * self.cp

    @property
    def edp(self) -> int:
        """The expert-data-parallel degree: the replicas of each expert shard within a pipeline stage."""
        return self.dp * self.cp * self.tp // (self.ep * self.etp)

    def parallel_config(self) -> "ParallelConfig":
        return ParallelConfig(tp=self.tp, pp=self.pp, dp=self.dp, cp=self.cp, ep=self.ep, etp=self.etp,
                              pp_schedule=self.pp_schedule, pp_virtual=self.pp_virtual)

    def describe(self) -> str:
        sched = {"1f1b": "1F1B", "interleaved_1f1b": f"I1F1B(v{self.pp_virtual})", "zbv": "ZBV",
                 "dualpipev": "DualPipeV"}[self.pp_schedule]
        s = f"TP{self.tp} PP{self.pp} {sched if self.pp > 1 else ''} CP{self.cp} DP{self.dp} EP{self.ep}"
        if self.etp > 1:
            s += f" ETP{self.etp}"
        return " ".join(s.split())


@dataclass
class ParallelConfig:
    """The `parallel:` section: the keys of a `Layout` (dp may be "auto" until the world size is known), the
    kernel backend, the pipeline's split, and the data-parallel wrapper's options."""

    tp: int = 1
    pp: int = 1
    # "auto" (the default, as in Megatron-LM and torchtitan): world size / (tp x pp x cp), resolved per stage when
    # the world size is known (`resolve_dp`). An explicit value must match the world size.
    dp: int | str = "auto"
    cp: int = 1
    ep: int = 1
    etp: int = 1
    backend: str = "torch"  # layer spec: "torch" (the reference, runs everywhere) or "fused" (torch's fused kernels)
    # Pipeline: the schedule, the number of (virtual) stages each rank holds, and the decoder layers of each
    # stage in order (empty: an even split). zbv and dualpipev place 2 stages per rank in a V.
    pp_schedule: str = "1f1b"
    pp_virtual: int = 1
    pp_layout: list[int] = field(default_factory=list)
    # Activation recompute: "none", "selective" (attention cores and SwiGLU intermediates) or "full" (each decoder
    # layer keeps only its input). See parallel/recompute.py.
    recompute: str = "none"
    # Data parallelism (parallel/data_parallel.py): reduce-scatter each bucket of gradients (about grad_bucket_mb MB
    # of fp32) while the backward still runs, as Megatron-LM's --overlap-grad-reduce; false: all after the backward.
    overlap_grad_reduce: bool = True
    grad_bucket_mb: float = 40.0

    PP_SCHEDULES = ("1f1b", "interleaved_1f1b", "zbv", "dualpipev")
    RECOMPUTE = ("none", "selective", "full")

    def validate(self, prefix: str = "parallel") -> None:
        _require(self.dp == "auto" or (isinstance(self.dp, int) and not isinstance(self.dp, bool) and self.dp >= 1),
                 f"{prefix}.dp", "must be 'auto' or an integer >= 1", self.dp)
        for name in ("tp", "pp", "cp", "ep", "etp", "pp_virtual"):
            _require(getattr(self, name) >= 1, f"{prefix}.{name}", "must be >= 1", getattr(self, name))
        _require(self.pp_schedule in self.PP_SCHEDULES, f"{prefix}.pp_schedule",
                 f"must be one of {', '.join(self.PP_SCHEDULES)}", self.pp_schedule)
        if self.pp_schedule in ("zbv", "dualpipev"):
            _require(self.pp_virtual == 2, f"{prefix}.pp_virtual", f"{self.pp_schedule} places exactly 2 stages "
                     "per rank (V shape): set pp_virtual=2", self.pp_virtual)
        if self.pp_schedule == "1f1b":
            _require(self.pp_virtual == 1, f"{prefix}.pp_virtual", "1f1b has one stage per rank; use "
                     "pp_schedule=interleaved_1f1b for virtual stages", self.pp_virtual)
        if self.pp_layout:
            _require(len(self.pp_layout) == self.pp * self.pp_virtual, f"{prefix}.pp_layout",
                     f"needs one layer count per stage (pp x pp_virtual = {self.pp * self.pp_virtual})", self.pp_layout)
            _require(all(n >= 0 for n in self.pp_layout), f"{prefix}.pp_layout", "layer counts must be >= 0",
                     self.pp_layout)
        _require(self.backend in KERNEL_BACKENDS, f"{prefix}.backend", f"must be one of {', '.join(KERNEL_BACKENDS)}",
                 self.backend)
        _require(self.recompute in self.RECOMPUTE, f"{prefix}.recompute", f"must be one of {', '.join(self.RECOMPUTE)}",
                 self.recompute)
        _require(isinstance(self.overlap_grad_reduce, bool), f"{prefix}.overlap_grad_reduce", "must be true or false",
                 self.overlap_grad_reduce)
        _require(isinstance(self.grad_bucket_mb, (int, float)) and not isinstance(self.grad_bucket_mb, bool)
                 and self.grad_bucket_mb > 0, f"{prefix}.grad_bucket_mb", "must be a number of megabytes > 0 "
                 "(the fp32 gradient bytes reduced by one collective; Megatron-LM uses about 40)", self.grad_bucket_mb)

    def layout(self) -> Layout:
        """This section's layout; dp must be resolved (`resolve_dp`)."""
        if self.dp == "auto":
            raise ConfigError("parallel.dp is 'auto': resolve it against the world size first (resolve_dp)")
        return Layout(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Layout)})

    @property
    def world_size(self) -> int:
        return self.layout().world

    def resolve_dp(self, world_size: int | None, prefix: str = "parallel") -> "ParallelConfig":
        """A copy with `dp: auto` replaced by world_size / (tp x pp x cp); without a world size, auto means 1."""
        if self.dp != "auto":
            return dataclasses.replace(self)
        model_parallel = self.tp * self.pp * self.cp
        if world_size is None:
            return dataclasses.replace(self, dp=1)
        if world_size % model_parallel:
            raise ConfigError(f"{prefix}.dp: 'auto' needs the world size {world_size} to be a multiple of tp x pp x "
                              f"cp = {self.tp}x{self.pp}x{self.cp} = {model_parallel}")
        return dataclasses.replace(self, dp=world_size // model_parallel)


_TOKEN_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_tokens(value: Any, name: str) -> int:
    """A token count: an integer, or a string with a unit suffix ("500B", "22T", "1.5M")."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: must be a token count (an integer or e.g. '22T'), got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        unit = _TOKEN_UNITS.get(text[-1:].upper())
        try:
            number = float(text[:-1]) if unit else float(text)
        except ValueError:
            number = None
        if number is not None and (number * (unit or 1)).is_integer():
            return int(number * (unit or 1))
    raise ConfigError(f"{name}: must be a token count (an integer or e.g. '500B', '22T'), got {value!r}")


@dataclass
class LRScheduleConfig:
    """One stage's learning rate, as a function of the tokens seen since the stage started: linear warm-up from
    `warmup_start` to `peak` over `warmup_tokens`, `peak` for `constant_tokens`, then cosine from `peak` to `final`
    over `decay_tokens` (0: until the stage ends). `final` null means no decay (constant at `peak`)."""

    peak: float = 3.2e-4
    final: float | None = None
    warmup_tokens: int | str = 0
    constant_tokens: int | str = 0
    decay_tokens: int | str = 0
    warmup_start: float = 0.0

    def validate(self, prefix: str) -> None:
        for name in ("warmup_tokens", "constant_tokens", "decay_tokens"):
            setattr(self, name, parse_tokens(getattr(self, name), f"{prefix}.{name}"))
            _require(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0", getattr(self, name))
        _require(self.peak > 0, f"{prefix}.peak", "must be > 0", self.peak)
        _require(self.final is None or 0 <= self.final, f"{prefix}.final", "must be >= 0", self.final)
        _require(self.warmup_start >= 0, f"{prefix}.warmup_start", "must be >= 0", self.warmup_start)


@dataclass
class BatchRampupConfig:
    """Megatron-style batch-size ramp-up within a stage: `start` sequences, growing by `increment` in equal steps
    over the stage's first `tokens` tokens (megatron-core's RampupBatchsizeNumMicroBatchesCalculator)."""

    start: int = 0
    increment: int = 0
    tokens: int | str = 0

    def validate(self, prefix: str) -> None:
        self.tokens = parse_tokens(self.tokens, f"{prefix}.tokens")
        for name in ("start", "increment", "tokens"):
            _require(getattr(self, name) >= 1, f"{prefix}.{name}", "must be >= 1", getattr(self, name))


STAGE_LAYOUT_KEYS = Layout.DEGREES  # a stage may change the degrees, not the schedule or recompute


@dataclass
class StageConfig:
    """One stage of a staged run (spec section 2). Fields left null/0 take the value of the `train:` section
    (or, for `rope_theta`, of `model.rope_theta`)."""

    name: str = ""
    end_tokens: int | str = 0  # cumulative token count at which this stage ends; the last one ends the run
    seq_len: int = 0
    global_batch_size: int = 0
    micro_batch_size: int = 0
    rampup: BatchRampupConfig | None = None
    lr: LRScheduleConfig | None = None
    mtp_loss_weight: float | None = None
    expert_bias_update_rate: float | None = None
    aux_loss_coeff: float | None = None
    rope_theta: float | None = None  # GA layers' RoPE base (SWA layers keep model.swa_rope_theta)
    data_weights: dict[str, float] = field(default_factory=dict)  # source name -> mixture weight
    parallel: dict[str, int | str] = field(default_factory=dict)  # layout overrides, e.g. {cp: 2, dp: auto}

    def validate(self, prefix: str) -> None:
        p = prefix
        self.end_tokens = parse_tokens(self.end_tokens, f"{p}.end_tokens")
        _require(self.end_tokens >= 1, f"{p}.end_tokens", "must be >= 1", self.end_tokens)
        for name in ("seq_len", "global_batch_size", "micro_batch_size"):
            _require(getattr(self, name) >= 0, f"{p}.{name}", "must be >= 0 (0: the train section's value)",
                     getattr(self, name))
        if self.rampup is not None:
            self.rampup.validate(f"{p}.rampup")
        if self.lr is not None:
            self.lr.validate(f"{p}.lr")
        for name in ("mtp_loss_weight", "expert_bias_update_rate", "aux_loss_coeff"):
            v = getattr(self, name)
            _require(v is None or v >= 0, f"{p}.{name}", "must be >= 0", v)
        _require(self.rope_theta is None or self.rope_theta > 0, f"{p}.rope_theta", "must be > 0", self.rope_theta)
        for k, v in self.parallel.items():
            _require(k in STAGE_LAYOUT_KEYS, f"{p}.parallel.{k}", f"unknown key (valid keys: {', '.join(STAGE_LAYOUT_KEYS)})", k)
            _require((k == "dp" and v == "auto") or (isinstance(v, int) and v >= 1), f"{p}.parallel.{k}",
                     "must be an integer >= 1" + (" or 'auto'" if k == "dp" else ""), v)
        for k, v in self.data_weights.items():
            _require(v > 0, f"{p}.data_weights.{k}", "must be > 0", v)


@dataclass
class TrainConfig:
    steps: int = 100  # with stages: an upper bound (the last stage's end_tokens ends the run)
    seed: int = 1234
    seq_len: int = 256
    global_batch_size: int = 8
    micro_batch_size: int = 4
    lr: float = 3.2e-4
    min_lr: float = 1e-4
    warmup_steps: int = 10
    # Steps of cosine decay after warm-up and the constant phase; 0 means "decay until train.steps".
    constant_steps: int = 0
    decay_steps: int = 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    mtp_loss_weight: float = 0.3
    aux_loss_coeff: float = 1e-5
    expert_bias_update_rate: float = 1e-3
    # Where and in which precision to train. device: "auto" (cuda when available), "cpu" or "cuda" (each rank
    # uses cuda:LOCAL_RANK). precision: "fp32", or "bf16": bf16 weights and activations, fp32 gradients
    # accumulated over micro-batches, fp32 master weights and Adam moments in each rank's optimizer shard; or
    # "fp8": bf16 as above, with the dense and expert GEMMs in blockwise-scaled FP8 (parallel/kernels/fp8.py; emulated
    # where the device has no blockwise FP8 GEMM). compile: regional torch.compile of each decoder layer.
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    log_interval: int = 1
    save_interval: int = 0  # checkpoint every N steps (0: only at stage boundaries and when the run ends)
    # Checkpoints: asynchronous writes (training goes on while DCP writes; published when complete), retention.
    async_save: bool = True
    keep_last: int = 3  # keep the newest N checkpoints (0: keep all)...
    keep_every: int = 0  # ...and every checkpoint whose step is a multiple of K (0: none)
    # Faults: a non-finite loss or gradient norm skips the update; this many in a row stop the run (0: never).
    max_consecutive_skips: int = 5
    # Validation on data.eval_sources every `eval_interval` steps (0: never), over each source's first
    # `eval_samples` sequences (mimo_train/training/evaluation.py).
    eval_interval: int = 0
    eval_samples: int = 8
    # Continued pre-training: a new run (step 0, fresh optimizer, schedule and data position) starts from the
    # weights of a Hugging Face directory or one of our checkpoints, under this run's layout and precision.
    # Read only when the run starts; its resumes load its own checkpoints.
    init_from: str = ""
    # Staged schedule (spec section 2): stages switch at token counts. Empty: one stage from the fields above.
    stages: list[StageConfig] = field(default_factory=list)

    DEVICES = ("auto", "cpu", "cuda")
    PRECISIONS = PRECISION_NAMES

    def validate(self, prefix: str = "train") -> None:
        p = prefix
        _require(self.device in self.DEVICES, f"{p}.device", f"must be one of {', '.join(self.DEVICES)}", self.device)
        _require(self.precision in self.PRECISIONS, f"{p}.precision", f"must be one of {', '.join(self.PRECISIONS)}",
                 self.precision)
        for name in ("steps", "seq_len", "global_batch_size", "micro_batch_size", "log_interval"):
            _require(getattr(self, name) >= 1, f"{p}.{name}", "must be >= 1", getattr(self, name))
        _require(self.global_batch_size % self.micro_batch_size == 0, f"{p}.global_batch_size",
                 f"must be a multiple of micro_batch_size ({self.micro_batch_size})", self.global_batch_size)
        _require(self.lr > 0, f"{p}.lr", "must be > 0", self.lr)
        _require(0 <= self.min_lr <= self.lr, f"{p}.min_lr", f"must be in [0, lr={self.lr}]", self.min_lr)
        for name in ("warmup_steps", "constant_steps", "decay_steps"):
            _require(getattr(self, name) >= 0, f"{p}.{name}", "must be >= 0", getattr(self, name))
        _require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, f"{p}.adam_beta1",
                 "Adam betas must be in [0, 1)", (self.adam_beta1, self.adam_beta2))
        _require(self.save_interval >= 0, f"{p}.save_interval", "must be >= 0", self.save_interval)
        _require(self.clip_grad >= 0, f"{p}.clip_grad", "must be >= 0 (0 disables clipping)", self.clip_grad)
        for name in ("mtp_loss_weight", "aux_loss_coeff", "expert_bias_update_rate", "weight_decay"):
            _require(getattr(self, name) >= 0, f"{p}.{name}", "must be >= 0", getattr(self, name))
        _require(self.eval_samples >= 1, f"{p}.eval_samples", "must be >= 1", self.eval_samples)
        _require(isinstance(self.init_from, str), f"{p}.init_from", "must be a directory path (or empty)",
                 self.init_from)
        for name in ("keep_last", "keep_every", "max_consecutive_skips", "eval_interval"):
            _require(getattr(self, name) >= 0, f"{p}.{name}", "must be >= 0", getattr(self, name))
        previous_end = 0
        names = set()
        for i, stage in enumerate(self.stages):
            sp = f"{p}.stages[{i}]"
            stage.validate(sp)
            if not stage.name:
                stage.name = f"stage{i + 1}"
            _require(stage.name not in names, f"{sp}.name", "duplicate stage name", stage.name)
            names.add(stage.name)
            _require(stage.end_tokens > previous_end, f"{sp}.end_tokens",
                     f"must be greater than the previous stage's end ({previous_end})", stage.end_tokens)
            previous_end = stage.end_tokens
            gbs = stage.global_batch_size or self.global_batch_size
            mbs = stage.micro_batch_size or self.micro_batch_size
            _require(gbs % mbs == 0, f"{sp}.global_batch_size", f"must be a multiple of micro_batch_size ({mbs})", gbs)
            if stage.rampup is not None:
                r = stage.rampup
                _require(r.start < gbs and (gbs - r.start) % r.increment == 0, f"{sp}.rampup",
                         f"global_batch_size - start must be a positive multiple of increment (global batch {gbs})",
                         (r.start, r.increment))
                for name in ("start", "increment"):
                    _require(getattr(r, name) % mbs == 0, f"{sp}.rampup.{name}",
                             f"must be a multiple of micro_batch_size ({mbs})", getattr(r, name))


DEFAULT_PEAK_TFLOPS = PEAK_TFLOPS


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = ""
    wandb_mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    wandb_project: str = "mimo-train"
    # MFU: model FLOP/s per device over the device's peak. `peak_tflops` > 0 overrides the table below, which
    # is matched (case-insensitively, longest key first) against the CUDA device name, or "cpu" on CPUs.
    peak_tflops: float = 0.0
    device_peak_tflops: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PEAK_TFLOPS))
    # How long a collective may wait for the other ranks before the run fails (torch.distributed's timeout): it
    # must cover the slowest step plus a checkpoint load; a dead rank is usually detected at once anyway.
    process_group_timeout_s: int = 600

    def validate(self, prefix: str = "run") -> None:
        _require(self.process_group_timeout_s >= 1, f"{prefix}.process_group_timeout_s", "must be >= 1 second",
                 self.process_group_timeout_s)
        _require(bool(self.dir), f"{prefix}.dir", "must be a non-empty path", self.dir)
        _require(self.peak_tflops >= 0, f"{prefix}.peak_tflops", "must be >= 0", self.peak_tflops)
        _require(self.wandb_mode in ("auto", "online", "offline", "disabled"), f"{prefix}.wandb_mode",
                 "must be auto, online, offline or disabled", self.wandb_mode)


@dataclass
class TrainingDataConfig(DataConfig):
    """The data pipeline's section plus what only training reads: held-out sources for validation (prepared like
    the training sources, e.g. a second `prepare-data` directory; never read by the training stream)."""

    eval_sources: list[SourceConfig] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        names = set()
        for i, source in enumerate(self.eval_sources):
            source.validate(f"data.eval_sources[{i}]")
            if source.name in names:
                raise ValueError(f"data.eval_sources[{i}].name: duplicate source name {source.name!r}")
            names.add(source.name)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: TrainingDataConfig = field(default_factory=TrainingDataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        self.model.validate("model")
        self.train.validate("train")
        self.parallel.validate("parallel")
        self.run.validate("run")
        limit = self.model.max_position_embeddings
        _require(self.train.seq_len <= limit, "train.seq_len",
                 f"must be <= model.max_position_embeddings ({limit})", self.train.seq_len)
        for i, stage in enumerate(self.train.stages):
            _require(stage.seq_len <= limit, f"train.stages[{i}].seq_len",
                     f"must be <= model.max_position_embeddings ({limit})", stage.seq_len)
        try:
            self.data.validate()
        except ValueError as e:  # the data section raises plain ValueErrors naming its fields
            raise ConfigError(str(e)) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _require(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: {rule} (got {value!r})")


def _strip_optional(tp: Any) -> Any:
    """`int | None` -> int (None is accepted separately)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML value into the declared field type, or fail naming the field."""
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    tp = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must not be null")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: must be a mapping, got {type(value).__name__}")
        return _build(tp, value, name)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: must be a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: must be a mapping, got {type(value).__name__}")
        _, val_tp = typing.get_args(tp)
        return {k: _coerce(v, val_tp, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: must be a string, got {value!r}")
        return value
    return value


# Keys that once existed, with what replaces them (an unknown-key error would not say).
REMOVED_KEYS = {
    "train.bf16": "use train.precision=bf16 (or fp32)",
    "parallel.sequence_parallel": "tensor parallelism always shards the sequence (the MoE layers need it): drop the key",
}


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    for key in unknown:
        if _join(prefix, key) in REMOVED_KEYS:
            raise ConfigError(f"{_join(prefix, key)}: removed; {REMOVED_KEYS[_join(prefix, key)]}")
    if unknown:
        raise ConfigError(f"{_join(prefix, unknown[0])}: unknown key (valid keys: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], _join(prefix, k)) for k, v in values.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _yaml():
    """PyYAML, imported when a config is read or written (the kernels and the one-GPU benchmark import this module
    for its schema alone, on machines that may have nothing but torch)."""
    try:
        import yaml
    except ImportError:
        raise ConfigError("reading a YAML config needs PyYAML: pip install pyyaml (on a GPU machine without it: "
                          "carry the bundle of `make device-bundle`)") from None
    return yaml


def _read_yaml(path: Path) -> dict[str, Any]:
    yaml = _yaml()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}:{_yaml_position(e)}: YAML syntax error: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _yaml_position(e: "yaml.YAMLError") -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f"{mark.line + 1}:{mark.column + 1}" if mark is not None else "?"


def _yaml_problem(e: "yaml.YAMLError") -> str:
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    return ", ".join(p for p in parts if p) or str(e).splitlines()[0]


def _resolve_model_section(value: Any, base_dir: Path) -> dict[str, Any]:
    """`model:` may name a model file (`mimo_tiny`, `model/mimo_tiny.yaml` or a path), or be a mapping that
    names one under `from:` and overrides some fields."""
    if isinstance(value, str):
        value = {"from": value}
    if not isinstance(value, dict):
        raise ConfigError("model: must be a mapping or the name of a model config")
    value = dict(value)
    ref = value.pop("from", None)
    if ref is None:
        return value
    candidates = [base_dir / ref, CONFIG_ROOT / ref, CONFIG_ROOT / "model" / f"{ref}.yaml", Path(ref)]
    for c in candidates:
        if c.is_file():
            return _merge(_read_yaml(c), value)
    raise ConfigError(f"model.from: no model config named {ref!r} (looked in {base_dir} and {CONFIG_ROOT / 'model'})")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.steps=10` -> (['train', 'steps'], 10). The value is parsed as YAML, so 1e-4, true and [1, 2] work."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=10")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment")
    yaml = _yaml()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}, column "
                          f"{len(key) + 1 + e.problem_mark.column + 1 if getattr(e, 'problem_mark', None) else '?'})"
                          ) from None
    return parts, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a training config (or a model-only config, which becomes the `model` section) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        if set(raw) & {f.name for f in dataclasses.fields(Config)}:
            tree = raw
            if "model" in tree:
                tree["model"] = _resolve_model_section(tree["model"], path.parent)
        else:  # a model-only file such as configs/model/mimo_v2_flash.yaml
            tree = {"model": raw}
    for item in overrides:
        parts, value = parse_override(item)
        if parts == ["model"]:  # `model=NAME` on the command line, as `model: NAME` in the YAML
            value = _resolve_model_section(value, path.parent if path is not None else CONFIG_ROOT)
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return _build(Config, tree, "").validate()


def load_model_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    return load_config(path, overrides).model


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(_yaml().safe_dump(cfg.to_dict(), sort_keys=False))
