"""Model-level checks beyond the forward parity: gradients against transformers, the banded SWA kernel's
memory, MoE routing and balance terms against megatron-core, MTP indexing and packed documents."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import MiMoV2FlashForCausalLM

from mimo_train.interop import hf
from mimo_train.model import IGNORE_INDEX
from mimo_train.training.trainer import update_expert_bias
from mimo_train.model.kernels import torch_backend
from tests.helpers import randomised_model, tiny_model_config


def test_gradients_match_transformers(tmp_path):
    """Backward parity: the gradient of the LM loss w.r.t. every parameter equals transformers' (float32)."""
    model = randomised_model(tiny_model_config(**{"mtp.num_blocks": 0}), seed=4)
    hf.save_hf(model, tmp_path)
    ref = MiMoV2FlashForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 61), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, dims=1)
    out = model(ids, labels=labels)
    (out.lm_loss_sum / out.lm_tokens).backward()
    logits = ref(ids).logits
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
    theirs = dict(ref.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        g_ref = theirs[name].grad
        assert p.grad is not None and g_ref is not None, name
        scale = g_ref.abs().max().clamp(min=1e-6)
        worst = max(worst, ((p.grad - g_ref).abs().max() / scale).item())
    assert worst <= 1e-4, worst


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_sliding_window_kernel_never_builds_an_s_by_s_tensor():
    S, W = 16384, 128
    q = torch.randn(1, S, 2, 16, requires_grad=True)
    k = torch.randn(1, S, 1, 16, requires_grad=True)
    v = torch.randn(1, S, 1, 8, requires_grad=True)
    sink = torch.zeros(2, requires_grad=True)
    with _LargestTensor() as probe:
        out = torch_backend.sliding_window_attention(q, k, v, window_keys=W + 1, scale=0.25, sink=sink,
                                                            doc_ids=torch.zeros(1, S, dtype=torch.long))
        out.sum().backward()
    # Scores are [heads, S, block + W]: linear in S. An S x S mask alone would be 268M elements.
    assert probe.largest <= 2 * S * 2 * W + S * 64, probe.largest
    assert probe.largest < S * S // 8


def _dense_reference(q, k, v, window_keys, scale, sink, doc_ids):
    """Straightforward masked attention with the sink as an extra softmax column (the gpt-oss / HF eager form)."""
    B, S, Hq, D = q.shape
    G = Hq // k.shape[2]
    kk, vv = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    i, j = torch.arange(S).view(S, 1), torch.arange(S).view(1, S)
    allowed = (j <= i) & (i - j < window_keys) & (doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)).unsqueeze(1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores = torch.cat([scores, sink.view(1, Hq, 1, 1).expand(B, Hq, S, 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1)[..., :-1]
    return torch.einsum("bhqk,bkhd->bqhd", probs, vv)


@pytest.mark.parametrize("S,window_keys", [(50, 17), (97, 16), (33, 1), (20, 64)])
def test_sliding_window_kernel_matches_dense_reference_with_documents(S, window_keys):
    gen = torch.Generator().manual_seed(S)
    q, k, v = torch.randn(2, S, 4, 12, generator=gen), torch.randn(2, S, 2, 12, generator=gen), torch.randn(2, S, 2, 8, generator=gen)
    sink = torch.randn(4, generator=gen)
    doc_ids = torch.cumsum((torch.rand(2, S, generator=gen) < 0.08).long(), dim=1)
    ours = torch_backend.sliding_window_attention(q, k, v, window_keys=window_keys, scale=0.3, sink=sink,
                                                         doc_ids=doc_ids)
    ref = _dense_reference(q, k, v, window_keys, 0.3, sink, doc_ids)
    assert (ours - ref).abs().max().item() < 1e-5


def test_router_selects_with_bias_but_weights_without_it():
    cfg = tiny_model_config()
    model = randomised_model(cfg, seed=2)
    gate = model.model.layers["1"].mlp.gate
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
        gate.e_score_correction_bias[3] = 10.0  # expert 3 is now always chosen ...
        scores, weights, idx = gate(x)
    assert (idx == 3).any(dim=1).all()
    # ... but its combine weight is its unbiased score, renormalised over the chosen experts.
    expected = scores.gather(1, idx)
    assert torch.allclose(weights, expected / expected.sum(dim=1, keepdim=True))
    assert weights.dtype == torch.float32


def test_sequence_balance_loss_matches_megatron_core():
    """Our sequence-wise aux loss equals megatron-core's switch_load_balancing_loss_func applied per sequence,
    the way its TopKRouter builds the seq_aux_loss."""
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    from mimo_train.model.layers import sequence_balance_loss

    gen = torch.Generator().manual_seed(0)
    B, T, E, k = 3, 40, 8, 2
    scores = torch.rand(B, T, E, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(B * T)]).view(B, T, k)
    ours = sequence_balance_loss(scores, idx, k)
    ref = 0.0
    for b in range(B):
        probs = scores[b] / scores[b].sum(dim=-1, keepdim=True)
        counts = torch.zeros(E).scatter_add_(0, idx[b].reshape(-1), torch.ones(T * k))
        ref = ref + switch_load_balancing_loss_func(probs, counts, T, k, E, 1.0)
    assert torch.allclose(ours, ref, rtol=1e-6)


def test_expert_bias_update_is_sign_based():
    model = randomised_model(tiny_model_config(), seed=0)
    moe = [l.mlp for l in model.decoder_layers() if l.is_moe]
    before = [m.gate.e_score_correction_bias.clone() for m in moe]
    counts = torch.zeros(len(moe), 8)
    counts[:, 0] = 100  # expert 0 overloaded, expert 1 exactly at the mean (100 / 8 is not), others starved
    update_expert_bias(model, counts, 1e-3)
    for m, b in zip(moe, before):
        delta = m.gate.e_score_correction_bias - b
        assert torch.allclose(delta[0], torch.tensor(-1e-3))
        assert torch.allclose(delta[1:], torch.full((7,), 1e-3))


def test_moe_with_all_tokens_on_one_expert_is_finite():
    model = randomised_model(tiny_model_config(), seed=3)
    for l in model.decoder_layers():
        if l.is_moe:
            l.mlp.gate.e_score_correction_bias[:2] = 100.0  # every token goes to experts 0 and 1
    ids = torch.randint(0, 4096, (2, 40))
    out = model(ids, labels=ids)
    out.lm_loss_sum.backward()
    assert torch.isfinite(out.lm_loss_sum)
    assert (out.expert_counts[:, 2:] == 0).all() and (out.expert_counts[:, :2] == 80).all()


def test_mtp_predicts_two_ahead_and_stops_at_document_ends():
    model = randomised_model(tiny_model_config(), seed=5)
    ids = torch.arange(1, 13).view(1, 12)
    labels = torch.arange(2, 14).view(1, 12)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    counts = model.count_targets(labels, position_ids)
    # Depth 1 has a target at i when i + 1 is in the same document: 4 + 6 positions.
    assert counts.tolist() == [12, 10]
    out = model(ids, position_ids=position_ids, labels=labels)
    assert out.mtp_tokens[0].item() == 10
    # The MTP loss is the cross-entropy of the MTP head's logits against tokens two ahead.
    assert torch.isfinite(out.mtp_loss_sums[0]) and out.mtp_loss_sums[0] > 0


def test_ignore_index_positions_carry_no_loss():
    model = randomised_model(tiny_model_config(), seed=6)
    ids = torch.randint(0, 4096, (1, 30))
    labels = ids.clone()
    labels[:, 10:] = IGNORE_INDEX
    out = model(ids, labels=labels)
    assert out.lm_tokens.item() == 10
