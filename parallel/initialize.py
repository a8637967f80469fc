"""Build a model of any size without ever holding it whole: construct it on the meta device, shard it, then give
each rank's slices their initial values.

Every parameter's initial value is a function of (seed, name) (and of the expert index for stacked expert
weights), so a rank computes exactly the slice it holds: the same numbers as the single-process model, without
the single-process model. A tensor-parallel slice is cut from its parameter's full value (the largest dense
matrix of the 309B model is its 0.6B-entry embedding); expert-parallel ranks draw only their own experts.
"""

from __future__ import annotations

import torch

from parallel.parallelize import ParamLayout


@torch.no_grad()
def materialize(model, layouts: dict[str, ParamLayout], seed: int, device: str | torch.device = "cpu") -> None:
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        layout = layouts[name]
        if layout.dim is None or layout.num_slices == 1:
            value = model.initial_value(name, p.shape, seed)
        elif layout.gather_kind == "ep":
            per_rank = p.shape[0]
            full_shape = (per_rank * layout.num_slices, *p.shape[1:])
            value = model.initial_value(name, full_shape, seed,
                                        experts=range(layout.index * per_rank, (layout.index + 1) * per_rank))
        else:
            size = p.shape[layout.dim]
            full_shape = list(p.shape)
            full_shape[layout.dim] = size * layout.num_slices
            value = model.initial_value(name, full_shape, seed).narrow(layout.dim, layout.index * size, size)
        p.copy_(value.to(p.dtype))
    model.reset_buffers()
