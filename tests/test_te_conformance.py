"""The `te` spec against Transformer Engine's own sources: the only check TE's API gets until a GPU cluster runs it.

The `transformer-engine` wheel of the pinned version (1 MB, py3-none-any: TE's Python sources, no binaries) is
downloaded with `pip download --no-deps` into `.cache/te-wheel/` (git-ignored; reused once there) and parsed with
`ast`, never imported. Checked:
- every TE call of parallel/kernels/te.py takes its keywords from one builder of parallel/kernels/te_rules.py, whose
  `TE_CALLS` names the TE signature (read from te.py's own AST, so no call escapes);
- every keyword each builder produces is a named parameter of that TE signature, and the positional arguments fit;
- the values the issue requires: learnable sink, window (127, 0) for 128 keys with the query, (192, 128) head dims,
  a2a on SWA layers and p2p on global ones under context parallelism; thd and padding_causal are TE's names;
- TE's parameter names the spec binds (`softmax_offset`, `weight`, `weight{i}`), and the exports `autocast`,
  `Float8BlockScaling`, `DotProductAttention`, `Linear`, `GroupedLinear`; the pin in pyproject's `gpu` extra.
In CI (CI=true) a failed download fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from mimo_train.config import load_model_config
from parallel.kernels import te_rules

ROOT = Path(__file__).resolve().parent.parent
WHEEL_DIR = ROOT / ".cache" / "te-wheel"
SPEC_FILE = ROOT / "parallel" / "kernels" / "te.py"


def _download_wheel() -> Path:
    pattern = f"transformer_engine-{te_rules.TE_PINNED}-py3-none-any.whl"
    found = sorted(WHEEL_DIR.glob(pattern))
    if found:
        return found[0]
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest",
                          str(WHEEL_DIR), f"transformer-engine=={te_rules.TE_PINNED}"],
                         capture_output=True, text=True, timeout=300)
    found = sorted(WHEEL_DIR.glob(pattern))
    if run.returncode or not found:
        reason = f"pip download transformer-engine=={te_rules.TE_PINNED} failed: {run.stderr.strip()[-400:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found[0]


@pytest.fixture(scope="module")
def te_sources() -> dict[str, ast.Module]:
    """transformer_engine/<path> -> its parsed source, for every file of the wheel the spec touches."""
    wanted = {entry[0] for entry in te_rules.TE_CALLS.values()} | set(te_rules.TE_EXPORTS) | {
        "pytorch/constants.py", "pytorch/attention/dot_product_attention/context_parallel.py",
        "pytorch/quantization.py"}
    with zipfile.ZipFile(_download_wheel()) as wheel:
        return {path: ast.parse(wheel.read(f"transformer_engine/{path}").decode(), filename=path) for path in wanted}


def _find(tree: ast.Module, cls: str, method: str | None) -> ast.FunctionDef | ast.ClassDef:
    for node in tree.body:
        if method is None and isinstance(node, ast.FunctionDef) and node.name == cls:
            return node
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return item
            return node  # a dataclass: the fields are the constructor's keywords
    raise AssertionError(f"TE {te_rules.TE_PINNED}: no {cls}.{method}")


def _signature(node) -> tuple[list[str], set[str]]:
    """(positional parameter names after self, every name a keyword may take). **kwargs is refused: with it, no
    keyword could be checked."""
    if isinstance(node, ast.ClassDef):
        fields = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
        return fields, set(fields)
    assert node.args.kwarg is None, f"{node.name} takes **{node.args.kwarg.arg}: its keywords cannot be checked"
    positional = [a.arg for a in node.args.posonlyargs + node.args.args]
    positional = positional[1:] if positional[:1] in (["self"], ["cls"]) else positional
    return positional, set(positional) | {a.arg for a in node.args.kwonlyargs}


# Every builder evaluated over the shapes the spec produces: both layer types, at tp 1 and 8, the project's MiMo
# config and a window of 128 keys with the query; cp on; FP8 on and off.
def _builder_outputs() -> dict[str, list[dict]]:
    cfgs = [load_model_config("configs/model/mimo_v2_flash.yaml"),
            load_model_config("configs/model/mimo_v2_flash.yaml", ["model.sliding_window_includes_query=true"])]
    shapes = [te_rules.AttentionShape(t, c.num_attention_heads // tp,
                                      max((c.swa_num_key_value_heads if t == te_rules.SLIDING else
                                           c.num_key_value_heads) // tp, 1), c.head_dim, c.v_head_dim,
                                      c.window_keys, c.head_dim ** -0.5)
              for c in cfgs for t in (te_rules.SLIDING, te_rules.GLOBAL) for tp in (1, 8)]
    import torch

    cu = torch.zeros(3, dtype=torch.int32)
    return {
        "attention_init_kwargs": [te_rules.attention_init_kwargs(s) for s in shapes],
        "attention_cp_kwargs": [te_rules.attention_cp_kwargs(t, None, [0, 1], None) for t in te_rules.CP_COMM_TYPE],
        "attention_forward_kwargs": [te_rules.attention_forward_kwargs(cu, cu, 8, 8)],
        "linear_init_kwargs": [te_rules.linear_init_kwargs(torch.bfloat16, "cuda")],
        "grouped_linear_init_kwargs": [te_rules.grouped_linear_init_kwargs(torch.bfloat16, "cuda")],
        "linear_forward_kwargs": [te_rules.linear_forward_kwargs()],
        "grouped_linear_forward_kwargs": [te_rules.grouped_linear_forward_kwargs()],
        "autocast_kwargs": [te_rules.autocast_kwargs(True, "recipe"), te_rules.autocast_kwargs(False, None)],
        "recipe_kwargs": [te_rules.recipe_kwargs()],
        "cudnn_version_kwargs": [te_rules.cudnn_version_kwargs()],
        "fp8_available_kwargs": [te_rules.fp8_available_kwargs()],
        "padding_init_kwargs": [te_rules.padding_init_kwargs()],
        "padding_forward_kwargs": [te_rules.padding_forward_kwargs()],
        "unpadding_init_kwargs": [te_rules.unpadding_init_kwargs()],
        "unpadding_forward_kwargs": [te_rules.unpadding_forward_kwargs()],
    }


def test_every_keyword_the_spec_passes_exists_in_te_signatures(te_sources):
    outputs = _builder_outputs()
    assert set(outputs) == set(te_rules.TE_CALLS)
    for builder, (path, cls, method, n_positional) in te_rules.TE_CALLS.items():
        node = _find(te_sources[path], cls, method)
        positional, accepted = _signature(node)
        print(f"{builder}: {cls}{'.' + method if method else ''}, transformer_engine/{path}:{node.lineno}")
        assert n_positional <= len(positional), (builder, positional)
        for kwargs in outputs[builder]:
            unknown = set(kwargs) - accepted
            assert not unknown, f"{builder} passes {sorted(unknown)}, not parameters of TE's {cls}.{method}"
            taken = set(positional[:n_positional]) & set(kwargs)
            assert not taken, f"{builder} passes {sorted(taken)} also positionally"


def _te_rules_builder(keyword: ast.keyword) -> str | None:
    """`**te_rules.<builder>(...)` -> builder."""
    v = keyword.value
    if keyword.arg is None and isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) \
            and isinstance(v.func.value, ast.Name) and v.func.value.id == "te_rules":
        return v.func.attr
    return None


def _dotted(node) -> str:
    return f"{_dotted(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "?")


def test_every_te_call_in_the_spec_goes_through_a_declared_builder():
    """Read from te.py's AST: a call that passes a builder's keywords passes nothing else by keyword and the
    declared number of positional arguments; a call on the TE namespace (`te.pytorch.X`, `te.recipe.X`) passes
    keywords only through the builder of X; every declared builder is used; literal keywords appear only in calls
    of torch."""
    used = set()
    for call in (n for n in ast.walk(ast.parse(SPEC_FILE.read_text())) if isinstance(n, ast.Call)):
        name = _dotted(call.func)
        builders = [b for b in map(_te_rules_builder, call.keywords) if b]
        literal = [k.arg for k in call.keywords if k.arg is not None]
        if name.startswith(("te.pytorch.", "te.recipe.")):
            assert len(builders) == 1 and not literal, f"te.py: {name}(...) must take its keywords from one builder"
            assert te_rules.TE_CALLS[builders[0]][1] == name.rsplit(".", 1)[1], (name, builders[0])
        if builders:
            assert len(builders) == 1 and not literal, f"te.py line {call.lineno}: {name} mixes keyword sources"
            builder = builders[0]
            assert builder in te_rules.TE_CALLS, f"te.py line {call.lineno}: {builder} is not declared in TE_CALLS"
            _, _, method, n_positional = te_rules.TE_CALLS[builder]
            assert len(call.args) == n_positional, f"te.py line {call.lineno}: {name} with {len(call.args)} positional"
            if method not in ("__init__", "forward", None):
                assert name.endswith("." + method), (name, method)
            used.add(builder)
        elif literal:
            assert name.split(".")[0] in ("torch", "te_rules", "SimpleNamespace") or name.endswith(".chunk"), \
                f"te.py line {call.lineno}: {name}(...) passes literal keywords {literal}"
    assert used == set(te_rules.TE_CALLS), f"declared but not called: {set(te_rules.TE_CALLS) - used}"


def _strings(node) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_required_values_are_passed_and_are_te_values(te_sources):
    dpa_file = "pytorch/attention/dot_product_attention/dot_product_attention.py"
    cfg = load_model_config("configs/model/mimo_v2_flash.yaml", ["model.sliding_window_includes_query=true"])
    swa = te_rules.attention_init_kwargs(te_rules.AttentionShape(te_rules.SLIDING, 64, 8, 192, 128, cfg.window_keys,
                                                                 1.0))
    ga = te_rules.attention_init_kwargs(te_rules.AttentionShape(te_rules.GLOBAL, 64, 4, 192, 128, cfg.window_keys, 1.0))
    assert cfg.window_keys == 128 and swa["window_size"] == (127, 0) and ga["window_size"] == (-1, 0)
    assert swa["softmax_type"] == "learnable" and ga["softmax_type"] == "vanilla"
    assert swa["kv_channels"] == ga["kv_channels"] == (192, 128) and swa["num_gqa_groups"] == 8
    assert te_rules.CP_COMM_TYPE == {te_rules.SLIDING: "a2a", te_rules.GLOBAL: "p2p"}

    init = _find(te_sources[dpa_file], "DotProductAttention", "__init__")
    assert {"learnable", "vanilla", "softmax_offset"} <= _strings(init)  # TE's sink mode and the parameter it makes
    assert te_rules.TE_PARAMETER_OF["sinks"] == "softmax_offset"
    registered = [c for c in ast.walk(init) if isinstance(c, ast.Call) and _dotted(c.func) == "self.register_parameter"]
    assert any(isinstance(c.args[0], ast.Constant) and c.args[0].value == "softmax_offset" for c in registered)
    masks = next(n.value for n in te_sources["pytorch/constants.py"].body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "AttnMaskTypes")
    assert swa["attn_mask_type"] in ast.literal_eval(masks)
    cp_func = next(n for n in te_sources["pytorch/attention/dot_product_attention/context_parallel.py"].body
                   if isinstance(n, ast.FunctionDef) and n.name == "attn_forward_func_with_cp")
    assert {"a2a", "p2p", "thd"} <= _strings(cp_func)


def test_parameter_names_and_exports_exist(te_sources):
    grouped = _find(te_sources["pytorch/module/grouped_linear.py"], "GroupedLinear", "__init__")
    names = [ast.unparse(c.args[0]) for c in ast.walk(grouped) if isinstance(c, ast.Call)
             and _dotted(c.func) == "self.register_parameter"]
    expert_slot = te_rules.TE_PARAMETER_OF["gate_up_proj"]  # GroupedLinear's weight0..weight{E-1}
    assert te_rules.TE_PARAMETER_OF["down_proj"] == expert_slot
    assert {f"f'{expert_slot}'", f'f"{expert_slot}"'} & set(names), names
    linear = _find(te_sources["pytorch/module/linear.py"], "Linear", "__init__")
    assigned = [ast.literal_eval(n.value) for n in ast.walk(linear) if isinstance(n, ast.Assign)
                and ast.unparse(n.targets[0]) == "self.weight_names" and isinstance(n.value, ast.List) and n.value.elts]
    assert [te_rules.TE_PARAMETER_OF["weight"]] in assigned  # Linear's one unsplit weight
    for path, exported in te_rules.TE_EXPORTS.items():
        tree = te_sources[path]
        names = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        names |= {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        assert set(exported) <= names, f"transformer_engine/{path} lacks {set(exported) - names}"
    recipe = _find(te_sources["common/recipe/__init__.py"], "Float8BlockScaling", "__init__")
    fields = _signature(recipe)[1]
    assert {"x_block_scaling_dim", "w_block_scaling_dim", "fp8_dpa"} <= fields  # 1x128 / 128x128, no FP8 attention
    defaults = {s.target.id: ast.literal_eval(s.value) for s in recipe.body if isinstance(s, ast.AnnAssign)
                and s.target.id in ("x_block_scaling_dim", "w_block_scaling_dim", "grad_block_scaling_dim", "fp8_dpa")}
    assert defaults == {"x_block_scaling_dim": 1, "w_block_scaling_dim": 2, "grad_block_scaling_dim": 1,
                        "fp8_dpa": False}


def test_fp8_group_alignment_is_tes(te_sources):
    """TE's alignment of FP8 groups for the blockwise recipe (not MXFP8, not NVFP4): the function's final return."""
    func = next(n for n in te_sources["pytorch/quantization.py"].body
                if isinstance(n, ast.FunctionDef) and n.name == "get_align_size_for_quantization")
    assert isinstance(func.body[-1], ast.Return) and ast.literal_eval(func.body[-1].value) == te_rules.FP8_ALIGN
    assert "mxfp8" in ast.unparse(func) and "nvfp4" in ast.unparse(func)


def test_the_gpu_extra_pins_the_checked_version():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    te = next(Requirement(r) for r in extras if Requirement(r).name == "transformer-engine")
    assert te.specifier.contains(te_rules.TE_PINNED)
    assert not te.specifier.contains("2.16.9") and not te.specifier.contains("2.18.0")  # m_splits tensor; checked
