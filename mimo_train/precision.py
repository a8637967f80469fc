"""What `train.precision` means, in one place: the dtypes of every tensor kind of a training rank and the FP8 scope.

The engine casts the parameters to `param_dtype` and keeps fp32 main gradients and masters where the precision asks
for them; the optimizer keeps masters when `has_masters`; checkpoints save the name and read it back with
`precision(name)`; the planner sizes each kind of state from the byte counts below; `parallel/kernels/fp8.py` converts the
linears in `fp8_gemms` scope and leaves `fp8_exclusions` alone.

- fp32: everything fp32; the parameters are their own masters.
- bf16: bf16 weights and activations (no autocast), gradients accumulated and reduced in fp32 (`main_grad`), fp32
  masters and Adam moments in the optimizer's shard (Megatron-Core's distributed optimizer).
- fp8: bf16 as above; only the dense and expert GEMMs quantise their operands on the fly (blockwise E4M3), so what
  is stored, communicated and checkpointed is exactly bf16's.
"""

from __future__ import annotations

from dataclasses import dataclass

# The linears that stay bf16 under fp8 (the MiMo-V2-Flash recipe: the attention output projection and the output
# head). The embedding is an nn.Embedding and the router its own fp32 matmul: neither is a linear to convert.
FP8_EXCLUSIONS = ("o_proj", "lm_head")

# Element sizes of the dtypes named below (the planner's memory model needs no torch).
_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Precision:
    """Each tensor kind's dtype, by torch name (`torch.float32` is "float32"): this module stays importable without
    torch, since the config layer validates `train.precision` against it."""

    name: str
    param: str  # the weights the forward reads, hence the activations and the pipeline messages
    grad: str  # gradient accumulation across micro-batches
    reduce: str  # the data-parallel gradient reduction
    master: str | None  # the optimizer's copy of its shard; None: the parameters are the masters
    moment: str  # each of Adam's two moments
    fp8_gemms: bool  # dense and expert GEMMs in blockwise-scaled FP8 (parallel/kernels/fp8.py)
    fp8_exclusions: tuple[str, ...] = ()  # linears (by module name) left in the parameter dtype under fp8_gemms

    @property
    def has_masters(self) -> bool:
        return self.master is not None

    @property
    def param_dtype(self):
        import torch  # lazily: see the class docstring

        return getattr(torch, self.param)

    # Bytes per element, for the planner.
    @property
    def param_bytes(self) -> int:
        return _BYTES[self.param]

    @property
    def grad_bytes(self) -> int:
        return _BYTES[self.grad]

    @property
    def master_bytes(self) -> int:
        return 0 if self.master is None else _BYTES[self.master]

    @property
    def moment_bytes(self) -> int:
        return _BYTES[self.moment]

    @property
    def act_bytes(self) -> int:
        return _BYTES[self.param]

    def byte_sizes(self) -> dict[str, object]:
        """The planner's view (printed with a plan's assumptions): bytes per element of each kind of state."""
        return {"name": self.name, "param_bytes": self.param_bytes, "grad_bytes": self.grad_bytes,
                "master_bytes": self.master_bytes, "moment_bytes": self.moment_bytes, "act_bytes": self.act_bytes}


_F32, _BF16 = "float32", "bfloat16"
PRECISIONS = {
    "fp32": Precision("fp32", _F32, _F32, _F32, None, _F32, fp8_gemms=False),
    "bf16": Precision("bf16", _BF16, _F32, _F32, _F32, _F32, fp8_gemms=False),
    "fp8": Precision("fp8", _BF16, _F32, _F32, _F32, _F32, fp8_gemms=True, fp8_exclusions=FP8_EXCLUSIONS),
}
NAMES = tuple(PRECISIONS)


def precision(name: str) -> Precision:
    """The precision called `name` (`train.precision`, a checkpoint's saved string, a CLI flag)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r}: must be one of {', '.join(NAMES)}")
    return PRECISIONS[name]
