"""The `te` spec's TE-free logic on CPU: the validation rules (versions, device, layout) each with its one line, the
FP8 exclusions, the CP comm type per layer, the mapping of TE-native names, and the spec's binding of TE modules to
our parameters, checked end to end with STAND-INS for TE's modules.

The stand-ins below are not TE: they mimic TE's public names only (DotProductAttention owning `softmax_offset`,
Linear owning `weight`, GroupedLinear owning `weight0..weight{E-1}`, their constructor and forward keywords) and
compute with the reference kernels, so a mistake in binding, layout (thd packing, window (W-1, 0), split sizes) or
names shows up as a wrong loss, gradient or state-dict key. Whether TE really has those names and keywords is
checked against TE's own sources by tests/test_te_conformance.py; TE's numerics by tests/gpu/test_te.py.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import parallel.kernels.te as te_spec
from mimo_train.config import ConfigError, load_config
from mimo_train.model.kernels import torch_backend
from parallel.kernels import get_spec, te_rules
from tests.helpers import randomised_model, tiny_model_config


# ---- stand-ins with TE's parameter names and keywords ---------------------------------------------------------
def _doc_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    return torch.searchsorted(cu, torch.arange(total, dtype=cu.dtype), right=True).view(1, -1)


class StandInDotProductAttention(nn.Module):
    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 qkv_format="sbhd", attn_mask_type="causal", window_size=None, softmax_scale=None,
                 softmax_type="vanilla"):
        super().__init__()
        assert qkv_format == "thd" and attn_mask_type == "padding_causal" and attention_dropout == 0.0
        self.window_size, self.scale, self.kv_channels = window_size, softmax_scale, kv_channels
        self.cp = None
        if softmax_type == "learnable":  # TE: zeros, fp32, one per local head
            self.register_parameter("softmax_offset", nn.Parameter(torch.zeros(num_attention_heads)))
        else:
            self.softmax_offset = None

    def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type="p2p"):
        self.cp = cp_comm_type

    def forward(self, query_layer, key_layer, value_layer, cu_seqlens_q=None, cu_seqlens_kv=None,
                cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None, max_seqlen_q=None, max_seqlen_kv=None):
        assert torch.equal(cu_seqlens_q, cu_seqlens_q_padded) and query_layer.shape[-1] == self.kv_channels[0]
        T = query_layer.shape[0]
        docs = _doc_ids(cu_seqlens_q, T)
        q, k, v = (t.unsqueeze(0) for t in (query_layer, key_layer, value_layer))
        if self.window_size[0] >= 0:  # TE counts the keys on the left: W - 1 of them, plus the query
            sink = self.softmax_offset.float() if self.softmax_offset is not None else None
            out = torch_backend.sliding_window_attention(q, k, v, window_keys=self.window_size[0] + 1,
                                                         scale=self.scale, sink=sink, doc_ids=docs)
        else:
            out = torch_backend.causal_attention(q, k, v, scale=self.scale, doc_ids=docs)
        return out.reshape(T, -1)  # thd output: [t, heads x v dim]


class StandInLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, parallel_mode=None, device="cuda"):
        super().__init__()
        assert not bias and parallel_mode is None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))

    def forward(self, inp):
        CALLS.append(("linear", tuple(self.weight.shape), AUTOCAST[-1]))
        return F.linear(inp, self.weight)


class StandInGroupedLinear(nn.Module):
    def __init__(self, num_gemms, in_features, out_features, bias=True, params_dtype=None, parallel_mode=None,
                 device="cuda"):
        super().__init__()
        assert not bias and parallel_mode is None
        self.num_gemms = num_gemms
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", nn.Parameter(torch.empty(out_features, in_features,
                                                                           dtype=params_dtype, device=device)))

    def forward(self, inp, m_splits):
        assert isinstance(m_splits, torch.Tensor) and m_splits.dtype == torch.int64  # a device tensor (TE 2.17)
        CALLS.append(("grouped", self.num_gemms, AUTOCAST[-1]))
        parts = torch.split(inp, m_splits.tolist())
        return torch.cat([F.linear(x, getattr(self, f"weight{i}")) for i, x in enumerate(parts)])


class StandInFp8Padding(nn.Module):
    def __init__(self, num_gemms, align_size=None):
        super().__init__()
        self.num_gemms, self.align = num_gemms, align_size

    def forward(self, inp, m_splits):
        assert isinstance(m_splits, list) and len(m_splits) == self.num_gemms
        padded = [-(-m // self.align) * self.align for m in m_splits]
        parts = [F.pad(x, (0, 0, 0, p - m)) for x, m, p in zip(torch.split(inp, m_splits), m_splits, padded)]
        return torch.cat(parts), padded


class StandInFp8Unpadding(StandInFp8Padding):
    def forward(self, inp, m_splits):
        padded = [-(-m // self.align) * self.align for m in m_splits]
        return torch.cat([x[:m] for x, m in zip(torch.split(inp, padded), m_splits)])


AUTOCAST: list[bool] = [False]
CALLS: list[tuple] = []


@contextlib.contextmanager
def stand_in_autocast(enabled=True, recipe=None):
    assert (recipe is not None) == enabled
    AUTOCAST.append(enabled)
    try:
        yield
    finally:
        AUTOCAST.pop()


STAND_INS = SimpleNamespace(
    pytorch=SimpleNamespace(DotProductAttention=StandInDotProductAttention, Linear=StandInLinear,
                            GroupedLinear=StandInGroupedLinear, autocast=stand_in_autocast,
                            Fp8Padding=StandInFp8Padding, Fp8Unpadding=StandInFp8Unpadding),
    recipe=SimpleNamespace(Float8BlockScaling=lambda: "Float8BlockScaling"), version="2.17.1")


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setattr(te_spec, "load_te", lambda: STAND_INS)
    CALLS.clear()
    return STAND_INS


# ---- the spec end to end against the reference, through the stand-ins --------------------------------------------
def _batch(cfg, S=40):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (2, S), generator=g)
    pos = torch.cat([torch.arange(23), torch.arange(S - 23)]).repeat(2, 1)  # two packed documents per row
    pos[1] = torch.cat([torch.arange(5, 5 + 11), torch.arange(S - 11)])  # row 1 starts mid-document
    return ids, pos, torch.roll(ids, -1, 1)


def _loss_and_grads(model, batch):
    out = model(*batch)
    loss = out.lm_loss_sum + sum(out.mtp_loss_sums) + 0.01 * out.aux_loss_sum
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_te_spec_equals_the_reference_with_the_same_checkpoint_names(stand_ins):
    cfg = tiny_model_config()
    reference = randomised_model(cfg)
    te_model = te_spec_model(cfg, reference.state_dict())
    assert list(te_model.state_dict()) == list(reference.state_dict())  # no TE name, no _extra_state
    batch = _batch(cfg)
    ref_loss, ref_grads = _loss_and_grads(reference, batch)
    te_loss, te_grads = _loss_and_grads(te_model, batch)
    assert set(te_grads) == set(ref_grads)
    # relative to each gradient's largest entry (the loss is a sum over tokens: gradients reach ~1e1)
    worst = max(((te_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in ref_grads.items())
    sinks = [n for n in ref_grads if n.endswith("sinks")]
    print(f"te (stand-ins) vs torch: loss {te_loss.item():.6f} vs {ref_loss.item():.6f}, "
          f"max relative grad diff {worst:.1e}")
    assert abs(te_loss - ref_loss) <= 1e-5 * abs(ref_loss) and worst <= 1e-5
    assert sinks and all(ref_grads[n].abs().max() > 0 for n in sinks)  # the sink is live, and reaches our `sinks`
    kinds = {c[0] for c in CALLS}
    assert kinds == {"linear", "grouped"}  # every projection and the experts went through the TE modules

    # The te model's state dict resumes under fused (and torch): same names, same outputs.
    fused = te_spec_model(cfg, te_model.state_dict(), backend="fused")
    assert abs(_loss_and_grads(fused, batch)[0] - te_loss) <= 1e-5 * abs(te_loss)


def te_spec_model(cfg, state, backend="te"):
    from mimo_train.model import MiMoForCausalLM

    model = MiMoForCausalLM(cfg, spec=get_spec(backend))
    if backend == "te":
        te_spec.convert_to_te(model, fp8=False)
    model.load_state_dict(state)
    return model


def test_fp8_region_leaves_out_o_proj_head_embedding_and_router(stand_ins):
    cfg = tiny_model_config()
    from mimo_train.model import MiMoForCausalLM

    model = MiMoForCausalLM(cfg, spec=get_spec("te"))
    in_fp8 = te_spec.convert_to_te(model, fp8=True)
    reference = randomised_model(cfg)
    model.load_state_dict(reference.state_dict())
    assert in_fp8 and not any(n.endswith(("o_proj", "lm_head", "embed_tokens", "gate")) for n in in_fp8)
    assert any(n.endswith("q_proj") for n in in_fp8) and any(n.endswith("experts") for n in in_fp8)
    assert type(model.lm_head) is nn.Linear  # the head stays ours (and bf16)
    # The stand-ins compute in fp32 whatever the autocast: the FP8 path's padding of each expert's rows to 16 and
    # its removal leave the result exact.
    fp8_loss, ref_loss = _loss_and_grads(model, _batch(cfg))[0], _loss_and_grads(reference, _batch(cfg))[0]
    assert abs(fp8_loss - ref_loss) <= 1e-5 * abs(ref_loss)
    o_proj_shape = tuple(model.model.layers["0"].self_attn.o_proj.weight.shape)
    by_fp8 = {(kind, shape): fp8 for kind, shape, fp8 in CALLS}
    assert by_fp8[("linear", o_proj_shape)] is False  # o_proj runs with TE's autocast explicitly off
    assert by_fp8[("grouped", cfg.num_experts)] is True
    q_shape = tuple(model.model.layers["0"].self_attn.q_proj.weight.shape)
    assert by_fp8[("linear", q_shape)] is True


# ---- the calls the spec makes ------------------------------------------------------------------------------------
def _shape(layer_type, window_keys=128):
    return te_rules.AttentionShape(layer_type, 64, 8 if layer_type == te_rules.SLIDING else 4, 192, 128,
                                   window_keys, 192 ** -0.5)


def test_attention_calls_carry_the_window_sink_dims_and_comm_type_per_layer():
    swa = te_rules.attention_init_kwargs(_shape(te_rules.SLIDING))
    ga = te_rules.attention_init_kwargs(_shape(te_rules.GLOBAL))
    assert swa["window_size"] == (127, 0) and swa["softmax_type"] == "learnable"  # 128 keys, the query included
    assert ga["window_size"] == (-1, 0) and ga["softmax_type"] == "vanilla"
    assert swa["kv_channels"] == ga["kv_channels"] == (192, 128) and swa["qkv_format"] == "thd"
    assert te_rules.attention_cp_kwargs(te_rules.SLIDING, None, [0, 1], None)["cp_comm_type"] == "a2a"
    assert te_rules.attention_cp_kwargs(te_rules.GLOBAL, None, [0, 1], None)["cp_comm_type"] == "p2p"
    assert set(te_rules.TE_CALLS) == {n for n in dir(te_rules) if n.endswith("_kwargs")}


def test_te_native_names_map_to_ours_and_back():
    E, H, I = 3, 8, 4
    layer = "model.layers.1"
    ours = {f"{layer}.self_attn.sinks": torch.randn(4), f"{layer}.self_attn.q_proj.weight": torch.randn(8, 8),
            f"{layer}.mlp.experts.gate_up_proj": torch.randn(E, 2 * I, H),
            f"{layer}.mlp.experts.down_proj": torch.randn(E, H, I)}
    native = te_rules.ours_to_te_native(ours)
    assert f"{layer}.self_attn.core_attention.softmax_offset" in native
    assert f"{layer}.mlp.experts.linear_fc1.weight2" in native and f"{layer}.mlp.experts.linear_fc2.weight0" in native
    native[f"{layer}.self_attn.core_attention._extra_state"] = b"fp8 metadata"
    back = te_rules.te_native_to_ours(native)
    assert set(back) == set(ours) and all(torch.equal(back[k], v) for k, v in ours.items())


# ---- validation: one line per rule --------------------------------------------------------------------------------
@pytest.mark.parametrize("device, te, cudnn, rule", [
    ("cpu", "2.17.1", (9, 18, 0), "CPU device"),
    ("cuda", None, None, "Transformer Engine is missing"),
    ("cuda", "2.14.0", (9, 18, 0), "older than 2.15"),
    ("cuda", "2.17.1+cu13", (9, 17, 1), "cuDNN 9.17.1 is older than 9.18.0"),
])
def test_environment_rules(device, te, cudnn, rule):
    with pytest.raises(ConfigError, match=rule) as e:
        te_rules.check_environment(device, te, cudnn)
    assert "\n" not in str(e.value) and str(e.value).startswith("parallel.backend=te")
    te_rules.check_environment("cuda", "2.17.1", (9, 18, 0))  # what the pin installs passes


@pytest.mark.parametrize("tp, cp, rule", [
    (3, 1, r"parallel.tp=3: must divide model.num_attention_heads \(64\)"),
    (2, 8, r"tp x parallel.cp = 2x8 = 16 on SWA layers"),
    (8, 2, r"tp x parallel.cp = 8x2 = 16 on SWA layers"),
    (4, 2, r"parallel.cp=2 with parallel.backend=te: not supported yet"),
])
def test_layout_rules(tp, cp, rule):
    with pytest.raises(ConfigError, match=rule):
        te_rules.check_layout(tp, cp, 64, 8, 4)
    te_rules.check_layout(8, 1, 64, 8, 4)  # the paper's tp 8 (GA KV heads replicated)


def test_machine_check_probes_te_only_on_a_cuda_device(monkeypatch):
    te_cfg = load_config("configs/train/tiny_cpu.yaml", ["parallel.backend=te"])
    missing = lambda: (None, None, "ImportError: No module named 'transformer_engine'")  # noqa: E731
    with pytest.raises(ConfigError, match="CPU device"):
        te_rules.check_machine([te_cfg.parallel], "cpu", missing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="Transformer Engine is missing .*No module named"):
        te_rules.check_machine([te_cfg.parallel], "cuda", missing)
    te_rules.check_machine([te_cfg.parallel], "cuda", lambda: ("2.17.1", (9, 18, 1), ""))
    with pytest.raises(ConfigError, match="train.precision=fp8 with parallel.backend=te: this GPU has no blockwise "
                                          "FP8 \\(TE: Device compute capability 9.0 or higher required"):
        te_rules.check_machine([te_cfg.parallel], "cuda", lambda: ("2.17.1", (9, 18, 1), ""), fp8=True,
                               fp8_probe=lambda: (False, "Device compute capability 9.0 or higher required"))
    te_rules.check_machine([load_config("configs/train/tiny_cpu.yaml").parallel], "cpu")  # no te stage: nothing


def test_layout_rules_apply_to_te_stages_only_and_at_submit_too():
    from mimo_train.launch import preflight

    bad = ["parallel.tp=2", "parallel.cp=2", "train.seq_len=128"]
    for backend, refused in (("te", True), ("torch", False)):
        cfg = load_config("configs/train/tiny_cpu.yaml", [*bad, f"parallel.backend={backend}"])
        if refused:  # the tiny model's 2 SWA KV heads cannot split over tp x cp = 4 (TE's all-to-all)
            with pytest.raises(ConfigError, match="tp x parallel.cp = 2x2 = 4 on SWA layers"):
                preflight.check_layouts(cfg, 4, batches=False)
        else:
            preflight.check_layouts(cfg, 4, batches=False)


def test_train_command_on_a_cpu_refuses_backend_te_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mimo_train.launch.cli", "train", "--config", "configs/train/tiny_cpu.yaml",
                          "parallel.backend=te", f"run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallel.backend=te: needs a CUDA device" in lines[0] and "CPU device" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_checkpoint_resumes_under_te_then_fused(tmp_path, stand_ins):
    """A torch run stopped after step 1, resumed under te (stand-ins) for step 2, then under fused for step 3: the
    losses of the uninterrupted torch run, step by step (the checkpoint's names and values suit every backend).
    The learning rate is constant after warm-up (min_lr = lr), so a leg's train.steps does not change it."""
    from mimo_train.training.trainer import Trainer
    from tests.scripts.staged import metrics

    common = ["train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1",
              "train.min_lr=3.0e-3", "run.wandb_mode=disabled", "train.async_save=false", "data.num_workers=0",
              "train.save_interval=1"]

    def fit(run_dir, backend, steps):
        cfg = load_config("configs/train/tiny_cpu.yaml", [*common, f"run.dir={run_dir}", f"train.steps={steps}",
                                                          f"parallel.backend={backend}"])
        Trainer(cfg, resume="auto").fit()
        return [m["loss"] for m in metrics(run_dir) if "loss" in m]

    whole = fit(tmp_path / "whole", "torch", 3)
    for steps, backend in enumerate(("torch", "te", "fused"), start=1):
        resumed = fit(tmp_path / "split", backend, steps)
    print(f"losses: uninterrupted {whole}, torch -> te -> fused {resumed}")
    assert len(resumed) == len(whole) == 3 and whole[-1] < whole[0]
    assert {c[0] for c in CALLS} == {"linear", "grouped"}  # the te leg ran on the TE modules
    assert max(abs(a - b) / abs(b) for a, b in zip(resumed, whole)) <= 1e-5
