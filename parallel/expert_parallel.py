"""Expert parallelism: the experts of an MoE layer are split over the ep group and tokens travel to them.

Each rank routes its own tokens (its sequence slice under SP), sends every (token, expert) row to the rank that
owns the expert with an uneven all-to-all, runs its local experts through the layer spec's experts module, and
sends the results back. The balance-loss statistics are summed over the ranks that hold slices of the same
sequences, and the expert counts over every rank that holds distinct tokens, so the aux loss and the bias update
equal the single-process definitions under every layout.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mimo_train.model.layers import MoE, balance_loss, balance_statistics
from parallel import comm


class ExpertParallelMoE(MoE):
    def __init__(self, moe: MoE, ep_rank: int, ep_size: int, ep_group, sequence_group):
        nn.Module.__init__(self)
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.gate = moe.gate
        self.experts = moe.experts
        self.ep_size, self.ep_group = ep_size, ep_group
        self.local_experts = moe.num_experts // ep_size
        keep = slice(ep_rank * self.local_experts, (ep_rank + 1) * self.local_experts)
        self.experts.gate_up_proj = nn.Parameter(moe.experts.gate_up_proj.detach()[keep].clone())
        self.experts.down_proj = nn.Parameter(moe.experts.down_proj.detach()[keep].clone())
        self.sequence_group = sequence_group  # ranks holding other slices of the same sequences (SP)

    def compute_experts(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if self.ep_size == 1:
            return self.experts(rows, tokens_per_expert)
        E_local, ep = self.local_experts, self.ep_size
        # How many rows this rank sends to each (destination rank, its local expert), and receives back.
        send = tokens_per_expert.view(ep, E_local)
        recv = comm.all_to_all_counts(send.reshape(-1), self.ep_group).view(ep, E_local)
        # Every split size this layer needs, read to the host at once: its one device-to-host sync.
        sizes = torch.cat([send.sum(1), recv.sum(1), recv.sum(0), recv.reshape(-1)]).tolist()
        send_splits, recv_splits, per_local_expert = sizes[:ep], sizes[ep:2 * ep], sizes[2 * ep:2 * ep + E_local]
        by_source = sizes[2 * ep + E_local:]  # received rows are ordered (source rank, expert)
        received = comm.all_to_all(rows, recv_splits, send_splits, self.ep_group)

        # The grouped GEMM wants the received rows ordered (expert, source rank).
        device = received.device
        chunks = list(torch.arange(received.shape[0], device=device).split(by_source))
        to_expert_major = torch.cat([chunks[s * E_local + e] for e in range(E_local) for s in range(ep)]
                                    or [torch.zeros(0, dtype=torch.long, device=device)])
        out = self.experts(received[to_expert_major], per_local_expert)
        back = torch.empty_like(to_expert_major)
        back[to_expert_major] = torch.arange(to_expert_major.numel(), device=device)
        return comm.all_to_all(out[back], send_splits, recv_splits, self.ep_group)

    def balance_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        selected, score_sums, tokens = balance_statistics(scores, indices)
        n = comm.group_size(self.sequence_group)
        if n > 1:
            # Every rank of the group computes the same loss from the summed statistics, so the sum's backward is
            # the identity: each rank's scores receive exactly the gradient of their own tokens (as in Megatron TP).
            selected = comm.reduce_from_region(selected, self.sequence_group)
            score_sums = comm.reduce_from_region(score_sums, self.sequence_group)
            tokens = tokens * n
        return balance_loss(selected, score_sums, tokens, self.top_k)
