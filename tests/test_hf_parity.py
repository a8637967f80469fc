"""Our model against transformers' MiMoV2FlashForCausalLM (eager attention), the numerical reference."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import MiMoV2FlashForCausalLM

from mimo_train.interop import hf
from tests.helpers import randomised_model, tiny_model_config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny model exported in the Hub layout, and transformers' model loaded from that export."""
    torch.manual_seed(0)
    model = randomised_model(tiny_model_config()).eval()
    out = tmp_path_factory.mktemp("hf")
    hf.save_hf(model, out)
    ref, info = MiMoV2FlashForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    return model, ref.eval(), out, info


def test_export_loads_in_transformers_without_missing_or_unexpected_keys(exported):
    model, ref, out, info = exported
    assert info["missing_keys"] == set() or not info["missing_keys"]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("model.mtp.")]
    assert not unexpected, unexpected
    assert not info["mismatched_keys"]
    # Every tensor transformers holds is ours: random biases and sinks included (not re-initialised on load).
    ours = model.state_dict()
    for name, t in ref.state_dict().items():
        if name.endswith("inv_freq"):
            continue
        assert torch.equal(t, ours[name]), name
    # MTP weights are stored where the released checkpoint has them.
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.mtp.layers.0.eh_proj.weight" in weight_map
    assert "model.mtp.layers.0.self_attn.attention_sink_bias" in weight_map
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in weight_map


@pytest.mark.parametrize("seq_len", [70, 129])
def test_logits_match_transformers(exported, seq_len):
    """Sequences several windows long (window 16 + query), batch 3; max abs diff <= 1e-5 in float32."""
    model, ref, _, _ = exported
    ids = torch.randint(0, model.cfg.vocab_size, (3, seq_len), generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    assert ours.shape == (3, seq_len, model.cfg.vocab_size)
    assert theirs.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_packed_documents_match_transformers_on_each_document(exported):
    """A packed row (position ids restarting per document) equals transformers run on each document alone."""
    model, ref, _, _ = exported
    lengths = [23, 40, 17]
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    ids = torch.randint(0, model.cfg.vocab_size, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids, position_ids=position_ids).logits
        theirs = torch.cat([ref(doc).logits for doc in ids.split(lengths, dim=1)], dim=1)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_import_equals_export_and_round_trip_is_bit_exact(exported, tmp_path):
    model, ref, out, _ = exported
    loaded = hf.load_pretrained(out)
    assert loaded.cfg == model.cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ... and importing what transformers itself saves (fused experts, `sinks`) gives the same logits as HF.
    ref.save_pretrained(tmp_path / "hf_saved")
    from_hf = hf.load_pretrained(tmp_path / "hf_saved")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (from_hf(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5
    # Export again from the import: same files, byte for byte.
    hf.save_hf(loaded, tmp_path / "again")
    for f in out.iterdir():
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name


def test_window_semantics_follow_the_hub_config():
    """The Hub's sliding_window_size=128 means 129 keys in transformers; an explicit flag flips it."""
    cfg = hf.from_hf_config({**hf.to_hf_config(tiny_model_config()), "sliding_window_size": 128})
    assert cfg.sliding_window == 128 and cfg.window_keys == 129
    assert tiny_model_config(sliding_window_includes_query="true").window_keys == 16
