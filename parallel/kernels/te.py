"""The `te` layer spec (`parallel.backend: te`): Transformer Engine's attention, linears and grouped experts.

Written against TE 2.17.1's API and checked against its sources (tests/test_te_conformance.py); never run: TE cannot
be installed on the machines this project runs on.

| piece | TE module | notes |
| --- | --- | --- |
| SWA + sink core | `DotProductAttention(qkv_format="thd", window_size=(W-1, 0), softmax_type="learnable")` | cuDNN fused attention only; the sink is TE's `softmax_offset`, bound to our `sinks` |
| global core | `DotProductAttention(qkv_format="thd", softmax_type="vanilla")` | packed documents through cu_seqlens |
| q/k/v, dense FFN, MTP `eh_proj`, o_proj | `Linear(parallel_mode=None)` | our TP wrappers communicate; FP8 inside `te.pytorch.autocast(Float8BlockScaling())` except o_proj |
| routed experts | `GroupedLinear(E, ...)`, `forward(inp, m_splits)` with a device tensor | FP8 like the linears |
| embedding, head, router | ours | outside FP8 (the report's recipe) |

Every keyword passed to TE comes from a builder in `parallel/kernels/te_rules.py`; nothing else here names a TE
keyword. The TE modules are kept outside the model's module tree and their parameters are bound to ours before each
call (`te_rules.bind`): the state dict, the optimizer, initialisation and the sharding rules only ever see our names,
so one checkpoint resumes under `torch`, `fused` and `te`. Each TE module is built on its first call, on the device
and with the per-rank shapes it then sees (after tensor and expert parallelism have sharded our parameters).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn as nn

from mimo_train.model.layers import Experts
from parallel.kernels import te_rules
from mimo_train.model.kernels.metadata import AttentionMetadata
from mimo_train.model.kernels.spec import SLIDING, LayerSpec


def load_te() -> SimpleNamespace:
    """`transformer_engine.pytorch` (as `.pytorch`) and `transformer_engine.common.recipe` (as `.recipe`), imported
    on first use. Without TE, or without CUDA, the import fails with one of these three errors."""
    try:
        import transformer_engine
        import transformer_engine.pytorch as te_pytorch
        from transformer_engine.common import recipe
    except (ImportError, RuntimeError, OSError) as e:
        raise RuntimeError(f"parallel.backend=te: Transformer Engine is not importable "
                           f"({type(e).__name__}: {e})") from e
    return SimpleNamespace(pytorch=te_pytorch, recipe=recipe, version=getattr(transformer_engine, "__version__", None))


def probe_te() -> tuple[str | None, tuple[int, ...] | None, str]:
    """(TE version, the cuDNN version TE loads, the import error) for the checks before launch."""
    try:
        te = load_te()
    except RuntimeError as e:
        return None, None, str(e.__cause__ or e)
    try:
        cudnn = tuple(te.pytorch.get_cudnn_version(**te_rules.cudnn_version_kwargs()))
    except (RuntimeError, OSError, AttributeError):
        cudnn = None
    return te.version, cudnn, ""


def probe_blockwise_fp8() -> tuple[bool, str]:
    """(TE's blockwise FP8 runs on this GPU, why not) for the checks before launch (TE already probed)."""
    available, reason = load_te().pytorch.is_fp8_block_scaling_available(**te_rules.fp8_available_kwargs())
    return bool(available), str(reason)


def _blockwise_recipe(te):
    return te.recipe.Float8BlockScaling(**te_rules.recipe_kwargs())


def _autocast(te, fp8: bool):
    return te.pytorch.autocast(**te_rules.autocast_kwargs(fp8, _blockwise_recipe(te) if fp8 else None))


# ---- attention -----------------------------------------------------------------------------------------------
class TEAttentionCore:
    """An attention core on `DotProductAttention`, q [B, S, Hq, 192], k [B, S, Hkv, 192], v [B, S, Hkv, 128]
    (already scaled) -> [B, S, Hq, 128]. The B rows go to TE as one packed (thd) batch of documents."""

    def __init__(self, layer_type: str, window_keys: int, scale: float) -> None:
        self.layer_type, self.window_keys, self.scale = layer_type, window_keys, scale
        self.module = None
        self.context_parallel = None  # (cp group, its global ranks, stream) once TE's own CP is switched on

    def use_context_parallel(self, group, global_ranks: list[int], stream) -> None:
        """TE's own context parallelism (all-to-all on SWA layers, p2p on global ones): each rank holds chunks
        (r, 2cp - 1 - r) of every row, which TE's thd partition of a sequence is when the sequences are the rows."""
        self.context_parallel = (group, global_ranks, stream)

    def _build(self, q, k, v):
        te = load_te()
        shape = te_rules.AttentionShape(self.layer_type, q.shape[2], k.shape[2], q.shape[3], v.shape[3],
                                        self.window_keys, self.scale)
        module = te.pytorch.DotProductAttention(**te_rules.attention_init_kwargs(shape))
        if self.context_parallel is not None:
            group, ranks, stream = self.context_parallel
            module.set_context_parallel_group(**te_rules.attention_cp_kwargs(
                self.layer_type, group, ranks, stream if stream is not None else torch.cuda.Stream()))
        return module

    def _sequences(self, attn_meta: AttentionMetadata, B: int, S: int, device):
        """(cu_seqlens, max_seqlen): the documents of the rows; under TE's CP the full rows (one document each)."""
        if self.context_parallel is None:
            return attn_meta.cu_seqlens(0), S
        if attn_meta.doc_ids is not None:
            raise RuntimeError("parallel.backend=te with context parallelism: TE's thd partition splits each packed "
                               "document, ours splits rows; packed documents are not supported (use one per row)")
        full = S * len(self.context_parallel[1])
        return torch.arange(B + 1, dtype=torch.int32, device=device) * full, full

    def __call__(self, q, k, v, attn_meta: AttentionMetadata, sink=None):
        if self.module is None:
            os.environ.update(te_rules.TE_ENVIRONMENT)  # before TE picks a backend for the first time
            self.module = self._build(q, k, v)
        if sink is not None:
            te_rules.bind(self.module, te_rules.TE_PARAMETER_OF["sinks"], sink)
        B, S, Hq, _ = q.shape
        cu, max_len = self._sequences(attn_meta, B, S, q.device)
        q, k, v = (t.reshape(B * S, t.shape[2], t.shape[3]) for t in (q, k, v))
        out = self.module(q, k, v, **te_rules.attention_forward_kwargs(cu, cu, max_len, max_len))
        return out.reshape(B, S, Hq, v.shape[-1])  # thd output: [tokens, heads x V dim]


# ---- linears ---------------------------------------------------------------------------------------------------
class TELinearFunction:
    """`(x, weight) -> x @ weight^T` through a TE `Linear` bound to `weight`, FP8 or not: the matmul a linear
    hands to the tensor-parallel wrappers (`linear_function`), which keep the communication."""

    def __init__(self, fp8: bool) -> None:
        self.fp8 = fp8
        self.module, self.key = None, None

    def _module(self, te, weight):
        key = (tuple(weight.shape), weight.dtype, weight.device)
        if self.key != key:
            out_features, in_features = weight.shape
            self.module = te.pytorch.Linear(in_features, out_features,
                                            **te_rules.linear_init_kwargs(weight.dtype, weight.device))
            self.key = key
        return self.module

    def __call__(self, x, weight):
        te = load_te()
        module = self._module(te, weight)
        te_rules.bind(module, te_rules.TE_PARAMETER_OF["weight"], weight)
        with _autocast(te, self.fp8):
            return module(x, **te_rules.linear_forward_kwargs())


class TELinear(nn.Linear):
    """An nn.Linear (same `weight` Parameter, bias-free) whose matmul is TE's."""

    def forward(self, x):
        return self.linear_function(x, self.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fp8: bool) -> "TELinear":
        if linear.bias is not None:
            raise ValueError("parallel.backend=te: the model's linears are bias-free; got one with a bias")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, None
        new.linear_function = TELinearFunction(fp8)
        return new


# ---- experts ---------------------------------------------------------------------------------------------------
class TEGroupedExperts(Experts):
    """SwiGLU experts on two TE `GroupedLinear`s bound to our stacked weights (the same parameters, names and
    layout as the reference); `fp8` is set from outside (`convert_to_te`). In FP8 each expert's rows are padded to
    a multiple of 16 (TE's `Fp8Padding`), which reads the split sizes on the host once per layer, as our own FP8
    grouped GEMM does; without FP8 the split sizes stay on the device."""

    fp8 = False

    def _te_modules(self, te):
        key = (tuple(self.gate_up_proj.shape), tuple(self.down_proj.shape), self.gate_up_proj.dtype,
               self.gate_up_proj.device)
        if getattr(self, "_te_key", None) != key:
            built = []
            for w in (self.gate_up_proj, self.down_proj):
                E, out_features, in_features = w.shape
                built.append(te.pytorch.GroupedLinear(E, in_features, out_features,
                                                      **te_rules.grouped_linear_init_kwargs(w.dtype, w.device)))
            E = self.gate_up_proj.shape[0]
            built += [te.pytorch.Fp8Padding(E, **te_rules.padding_init_kwargs()),
                      te.pytorch.Fp8Unpadding(E, **te_rules.unpadding_init_kwargs())]
            # a plain attribute holding a tuple: the TE modules stay out of the module tree (and its state dict)
            object.__setattr__(self, "_te", tuple(built))
            object.__setattr__(self, "_te_key", key)
        return self._te

    def forward(self, x_sorted, tokens_per_expert):
        if x_sorted.shape[0] == 0:  # no row for any local expert (expert parallelism): stay in the graph
            return x_sorted.new_zeros(0, self.down_proj.shape[1]) + 0 * x_sorted.sum()
        te = load_te()
        fc1, fc2, pad, unpad = self._te_modules(te)
        te_rules.bind_experts(fc1, self.gate_up_proj)
        te_rules.bind_experts(fc2, self.down_proj)
        splits = torch.as_tensor(tokens_per_expert, dtype=torch.int64, device=x_sorted.device)
        with _autocast(te, self.fp8):
            if not self.fp8:
                return self._swiglu(fc1, fc2, x_sorted, splits)
            sizes = splits.tolist()
            x, padded = pad(x_sorted, sizes, **te_rules.padding_forward_kwargs())
            y = self._swiglu(fc1, fc2, x, torch.as_tensor(padded, dtype=torch.int64, device=x.device))
            return unpad(y, sizes, **te_rules.unpadding_forward_kwargs())

    @staticmethod
    def _swiglu(fc1, fc2, x, splits):
        gate, up = fc1(x, splits, **te_rules.grouped_linear_forward_kwargs()).chunk(2, dim=-1)
        return fc2(torch.nn.functional.silu(gate) * up, splits, **te_rules.grouped_linear_forward_kwargs())


# ---- the spec ----------------------------------------------------------------------------------------------------
class TESpec(LayerSpec):
    name = "te"

    def attention_core(self, layer_type: str, *, window_keys: int, scale: float) -> TEAttentionCore:
        return TEAttentionCore(layer_type, window_keys, scale)

    def experts(self, num_experts: int, hidden_size: int, intermediate_size: int) -> TEGroupedExperts:
        return TEGroupedExperts(num_experts, hidden_size, intermediate_size)


def convert_to_te(model: nn.Module, *, fp8: bool) -> list[str]:
    """Every linear of the model but the output head onto TE (the same Parameters), and FP8 on for the linears
    and experts `te_rules.fp8_linear` picks; before tensor parallelism wraps them (it keeps `linear_function`).
    Returns the names of the linears inside the FP8 region."""
    in_fp8 = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is nn.Linear and child_name != "lm_head":
                use_fp8 = fp8 and te_rules.fp8_linear(full)
                setattr(parent, child_name, TELinear.from_linear(child, use_fp8))
                in_fp8 += [full] if use_fp8 else []
            elif isinstance(child, TEGroupedExperts):
                child.fp8 = fp8
                in_fp8 += [full] if fp8 else []
    return in_fp8
