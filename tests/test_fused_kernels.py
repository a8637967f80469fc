"""The `fused` layer spec against the `torch` reference on CPU: same weights and inputs, forward and backward within
1e-5 in fp32 wherever torch has the CPU kernel (the CPU flash kernel for both attention types, `_grouped_mm` for the
experts), flex_attention's forward (it has no CPU backward), the block-mask and cu_seqlens construction exactly, and
a short training run of the tiny model. What each piece runs on a GPU is in parallel/kernels/fused.py."""

from __future__ import annotations

import pytest
import torch

from mimo_train.config import ConfigError, load_config
from parallel.kernels import get_spec
from parallel.kernels.flex import document_block_mask, document_mask_mod, flex_sink_attention
from parallel.kernels.grouped_experts import group_offsets, grouped_mm
from mimo_train.model.kernels.metadata import AttentionMetadata, document_ids
from tests.helpers import randomised_model, tiny_model_config

TOL = 1e-5
REFERENCE, FUSED = get_spec("torch"), get_spec("fused")


def _positions(rows: list[list[int]]) -> torch.Tensor:
    """Rows of packed documents given by their lengths; a negative first length is a row that starts mid-document
    (its positions continue from that many tokens before)."""
    out = []
    for lengths in rows:
        parts = [torch.arange(-n, -n + abs(n) * 2) if n < 0 else torch.arange(n) for n in lengths]
        out.append(torch.cat([p[: abs(n)] for p, n in zip(parts, lengths)]))
    return torch.stack(out)


def _run_core(spec, layer_type, q, k, v, sink, meta, *, window_keys, q_start=None):
    core = spec.attention_core(layer_type, window_keys=window_keys, scale=0.27)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    s = sink.clone().requires_grad_() if sink is not None else None
    if q_start is None:
        out = core(*leaves, meta, sink=s)
    else:
        out = core.at(*leaves, meta, q_start=q_start)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * dout).sum().backward()
    return [out, *(t.grad for t in leaves), *([s.grad] if s is not None else [])]


def _assert_close(got, ref, what):
    names = ["out", "dq", "dk", "dv", "dsink"]
    for name, a, b in zip(names, got, ref):
        err = (a - b).abs().max().item()
        print(f"{what} {name}: max abs diff {err:.1e}")
        assert err <= TOL, (what, name, err)


def _qkv(B, S, Hq, Hkv, D=24, Dv=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, Hq, D, generator=g), torch.randn(B, S, Hkv, D, generator=g),
            torch.randn(B, S, Hkv, Dv, generator=g), torch.randn(Hq, generator=g))


# Row 0: documents of 37 and 50 tokens (the second starts 37 tokens in: mid-window for window 33); row 1 starts
# mid-document and packs a short document (5 tokens, shorter than the window) between two others.
SWA_CASES = {
    "packed-gqa": (_positions([[37, 50], [-20, 5, 62]]), 8, 2, 33),
    "one-document-mha": (_positions([[70]]), 4, 4, 17),
    "window-past-sequence": (_positions([[12, 9]]), 4, 1, 64),
}


@pytest.mark.parametrize("case", list(SWA_CASES))
def test_sliding_window_sink_core_matches_reference(case):
    positions, Hq, Hkv, window_keys = SWA_CASES[case]
    B, S = positions.shape
    q, k, v, sink = _qkv(B, S, Hq, Hkv)
    docs = document_ids(positions)
    ref = _run_core(REFERENCE, "sliding_attention", q, k, v, sink, REFERENCE.metadata(docs, B, S, "cpu"),
                    window_keys=window_keys)
    got = _run_core(FUSED, "sliding_attention", q, k, v, sink, FUSED.metadata(docs, B, S, "cpu"),
                    window_keys=window_keys)
    _assert_close(got, ref, case)
    assert got[4].abs().min() > 0  # the sink gradient is really exercised


def test_sliding_window_chunk_of_a_longer_sequence_matches_reference():
    """The context-parallel case: a chunk [start - W, end) of a longer packed sequence (the halo prepended), its
    metadata a slice of the whole micro-batch's; the chunk's last L outputs equal the whole sequence's there."""
    positions = _positions([[45, 30, 53], [-10, 118]])
    B, S = positions.shape
    q, k, v, sink = _qkv(B, S, 8, 2, seed=3)
    window_keys, start, end = 25, 64, 96
    W = window_keys - 1
    whole = REFERENCE.metadata(document_ids(positions), B, S, "cpu")
    chunk = [t[:, start - W:end] for t in (q, k, v)]
    ref = _run_core(REFERENCE, "sliding_attention", *chunk, sink, whole.slice(start - W, end), window_keys=window_keys)
    got = _run_core(FUSED, "sliding_attention", *chunk, sink, whole.slice(start - W, end), window_keys=window_keys)
    _assert_close(got, ref, "chunk")
    full = _run_core(REFERENCE, "sliding_attention", q, k, v, sink, whole, window_keys=window_keys)[0]
    assert (got[0][:, W:] - full[:, start:end]).abs().max() <= TOL


def test_global_core_matches_reference_whole_and_chunk():
    positions = _positions([[37, 50], [-20, 5, 62]])
    B, S = positions.shape
    q, k, v, _ = _qkv(B, S, 8, 2, seed=1)
    meta = AttentionMetadata(document_ids(positions), B, S, "cpu")
    _assert_close(_run_core(FUSED, "full_attention", q, k, v, None, meta, window_keys=0),
                  _run_core(REFERENCE, "full_attention", q, k, v, None, meta, window_keys=0), "global")
    # queries [40, 87) over keys [0, 87) (context parallelism's all-gathered keys)
    end, q_start = 87, 40
    keys = meta.slice(0, end)
    args = (q[:, q_start:end], k[:, :end], v[:, :end], None, keys)
    _assert_close(_run_core(FUSED, "full_attention", *args, window_keys=0, q_start=q_start),
                  _run_core(REFERENCE, "full_attention", *args, window_keys=0, q_start=q_start), "global chunk")


def test_cu_seqlens_are_built_exactly_with_a_static_size():
    positions = _positions([[3, 4, 1], [-2, 6]])  # row 1 starts mid-document (document 0)
    meta = AttentionMetadata(document_ids(positions), 2, 8, "cpu")
    # max_documents = S + 1 = 9 slots per row; row 0 uses documents 1..3, row 1 documents 0..1.
    lengths = [0, 3, 4, 1, 0, 0, 0, 0, 0] + [2, 6, 0, 0, 0, 0, 0, 0, 0]
    expected = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    assert torch.equal(meta.cu_seqlens(), expected)
    assert meta.cu_seqlens().dtype == torch.int32
    # queries of a chunk [5, 8) keep the numbering of the keys [0, 8), so documents pair up
    chunk_lengths = [0, 0, 2, 1, 0, 0, 0, 0, 0] + [0, 3, 0, 0, 0, 0, 0, 0, 0]
    assert torch.equal(meta.cu_seqlens(5), torch.tensor([0] + chunk_lengths).cumsum(0).to(torch.int32))
    # a host-known bound shortens the table; the metadata is cached per micro-batch
    bounded = AttentionMetadata(document_ids(positions), 2, 8, "cpu", max_documents=4)
    assert bounded.cu_seqlens().tolist() == [0, 0, 3, 7, 8, 10, 16, 16, 16]
    assert bounded.cu_seqlens() is bounded.cu_seqlens()


def test_the_data_streams_document_bound_holds_and_keeps_the_tables_exact():
    """The data stream's host-side bound (no device read) covers every document id and only drops empty slots."""
    from data_pipeline.stream import split_micro_batches

    eos = torch.tensor([7, 7, 7, 7], dtype=torch.int32)
    windows = torch.randint(0, 7, (4, 33), dtype=torch.int32)
    windows[0, [3, 9, 10, 20]] = 7  # four documents end inside row 0 (one of them empty)
    windows[1, 31] = 7  # EOS as the last input: the document after it starts with the label only
    windows[3, -1] = 7  # EOS as a label only: no new document among the inputs
    for mb in split_micro_batches(windows, eos, micro_batch_size=2):
        docs = document_ids(mb["position_ids"])
        bound = mb["max_documents"]
        assert int(docs.max()) < bound <= int(docs.max()) + 1  # holds, and is tight
        B, S = docs.shape
        exact = AttentionMetadata(docs, B, S, "cpu", max_documents=bound).cu_seqlens()
        loose = AttentionMetadata(docs, B, S, "cpu").cu_seqlens()
        assert torch.equal(exact.unique_consecutive(), loose.unique_consecutive())


def _dense_allowed(doc_ids, q_start, q_len, kv_len, window_keys):
    q_pos = torch.arange(q_start, q_start + q_len).view(-1, 1)
    kv = torch.arange(kv_len).view(1, -1)
    allowed = (q_pos >= kv) & ((q_pos - kv < window_keys) if window_keys is not None else True)
    same = doc_ids[:, q_start:q_start + q_len].unsqueeze(-1) == doc_ids.unsqueeze(-2)
    return allowed & same  # [B, q_len, kv_len]


@pytest.mark.parametrize("window_keys,q_start", [(129, 0), (None, 0), (None, 128)])
def test_flex_block_mask_equals_the_dense_reference(window_keys, q_start):
    from torch.nn.attention.flex_attention import create_mask

    positions = _positions([[100, 200, 84], [-30, 354]])
    B, S = positions.shape
    docs = document_ids(positions)
    meta = AttentionMetadata(docs, B, S, "cpu")
    q_len = S - q_start
    dense = _dense_allowed(docs, q_start, q_len, S, window_keys)
    mod = document_mask_mod(docs, window_keys=window_keys, q_start=q_start)
    assert torch.equal(create_mask(mod, B, 1, q_len, S, device="cpu")[:, 0], dense)
    block_mask = document_block_mask(meta, q_len=q_len, window_keys=window_keys, q_start=q_start, block=128)
    nq, nk = -(-q_len // 128), -(-S // 128)
    tiles = torch.nn.functional.pad(dense, (0, nk * 128 - S, 0, nq * 128 - q_len)).view(B, nq, 128, nk, 128)
    any_allowed = tiles.any(dim=4).any(dim=2)
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), any_allowed)  # partial + full blocks
    full = torch.zeros_like(any_allowed)
    for b in range(B):
        for i in range(nq):
            n = block_mask.full_kv_num_blocks[b, 0, i]
            full[b, i, block_mask.full_kv_indices[b, 0, i, :n]] = True
    # a full block is one the kernel runs without the mask_mod: every pair of it inside the sequence is allowed
    inside = torch.nn.functional.pad(dense, (0, nk * 128 - S, 0, nq * 128 - q_len), value=True)
    assert not (full & ~inside.view(B, nq, 128, nk, 128).all(dim=4).all(dim=2)).any()
    if window_keys is None:  # causal cases have full blocks below the diagonal (a window of 128 has none)
        assert full.any()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_matches_reference_on_cpu():
    positions = _positions([[100, 156], [-7, 249]])
    B, S = positions.shape
    q, k, v, sink = _qkv(B, S, 4, 2, seed=5)
    meta = AttentionMetadata(document_ids(positions), B, S, "cpu")
    swa = REFERENCE.attention_core("sliding_attention", window_keys=129, scale=0.27)(q, k, v, meta, sink=sink)
    got = flex_sink_attention(q, k, v, meta, scale=0.27, sink=sink, window_keys=129)
    assert (got - swa).abs().max() <= TOL
    ref = REFERENCE.attention_core("full_attention", window_keys=0, scale=0.27).at(
        q[:, 128:], k, v, meta, q_start=128)
    got = flex_sink_attention(q[:, 128:], k, v, meta, scale=0.27, q_start=128)
    assert (got - ref).abs().max() <= TOL


def _expert_pair(E, H, I):
    ref, fused = REFERENCE.experts(E, H, I), FUSED.experts(E, H, I)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        ref.gate_up_proj.copy_(torch.randn(ref.gate_up_proj.shape, generator=g))
        ref.down_proj.copy_(torch.randn(ref.down_proj.shape, generator=g))
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("counts", [[3, 0, 7, 0, 2, 11], [0, 0, 0, 0, 0, 23], [23, 0, 0, 0, 0, 0]])
def test_grouped_experts_match_the_loop_with_empty_and_uneven_groups(counts):
    ref, fused = _expert_pair(len(counts), 16, 8)
    x = torch.randn(sum(counts), 16, generator=torch.Generator().manual_seed(3))
    results = []
    for experts in (ref, fused):
        leaf = x.clone().requires_grad_()
        y = experts(leaf, torch.tensor(counts))
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y, leaf.grad, experts.gate_up_proj.grad, experts.down_proj.grad])
    for name, a, b in zip(["out", "dx", "dgate_up", "ddown"], *results):
        assert (a - b).abs().max() <= TOL, name
    for e, n in enumerate(counts):
        if n == 0:  # exactly zero, not merely small
            assert not fused.gate_up_proj.grad[e].any() and not fused.down_proj.grad[e].any()


def test_grouped_mm_zeroes_rows_past_the_last_offset():
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(3, 4, 8, requires_grad=True)
    offs = group_offsets(torch.tensor([2, 0, 5]), "cpu")
    assert offs.dtype == torch.int32 and offs.tolist() == [2, 2, 7]
    y = grouped_mm(x, w, offs)
    y.backward(torch.ones_like(y))
    assert not y[7:].any() and not x.grad[7:].any() and not w.grad[1].any()
    loop = torch.cat([x[:2] @ w[0].T, x[2:7] @ w[2].T])
    assert (y[:7] - loop).abs().max() <= TOL


def test_grouped_experts_with_no_row_stay_in_the_graph():
    """An expert-parallel rank that receives no row: an empty output that still carries a gradient path."""
    _, fused = _expert_pair(4, 16, 8)
    x = torch.zeros(0, 16, requires_grad=True)
    y = fused(x, torch.zeros(4, dtype=torch.long))
    assert y.shape == (0, 16) and y.requires_grad
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 16)


def test_fused_model_keeps_parameter_names_and_matches_the_reference():
    cfg = tiny_model_config()
    ref = randomised_model(cfg, seed=3)
    from mimo_train.model import MiMoForCausalLM

    fused = MiMoForCausalLM(tiny_model_config(), spec=get_spec("fused"))
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    positions = _positions([[30, 50], [-5, 75]])
    outs = [m(ids, position_ids=positions, labels=ids.roll(-1, 1)) for m in (ref, fused)]
    for o in outs:
        (o.lm_loss_sum + sum(o.mtp_loss_sums) + o.aux_loss_sum).backward()
    assert (outs[0].logits - outs[1].logits).abs().max() <= TOL
    grads = dict(fused.named_parameters())
    # relative to each gradient's largest entry (the randomised weights make some gradients ~10)
    worst = max(((p.grad - grads[n].grad).abs().max() / p.grad.abs().max().clamp(min=1e-6)).item()
                for n, p in ref.named_parameters())
    print(f"fused vs torch, whole tiny model: max relative gradient difference {worst:.1e}")
    assert worst <= TOL


def test_fused_training_run_equals_the_torch_backend(tmp_path):
    from mimo_train.training.trainer import Trainer

    common = ["train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=4",
              "train.warmup_steps=1", "run.wandb_mode=disabled", "train.async_save=false", "data.num_workers=0"]
    losses = {}
    for backend in ("torch", "fused"):
        cfg = load_config("configs/train/tiny_cpu.yaml", [*common, f"parallel.backend={backend}",
                                                             f"run.dir={tmp_path / backend}"])
        trainer = Trainer(cfg, resume="none")
        losses[backend] = [trainer.train_step()["loss"] for _ in range(4)]
        trainer.data.close()
    gaps = [abs(a - b) / abs(b) for a, b in zip(losses["fused"], losses["torch"])]
    print(f"fused vs torch, 4 training steps: losses {losses['fused']} vs {losses['torch']}, max rel gap {max(gaps):.1e}")
    assert losses["torch"][-1] < losses["torch"][0]
    assert max(gaps) <= TOL


def test_unknown_backend_fails_in_config_validation_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"parallel.backend: must be one of torch, fused, te \(got 'flash'\)"):
        load_config("configs/train/tiny_cpu.yaml", ["parallel.backend=flash"])
