"""Mixture-of-Experts models through the real plugtune path (``plugtune.moe``): LoRA targets,
experts opt-in, frozen routers, the router auxiliary loss and the memory estimate.

One table row per architecture: tiny models from transformers' own config classes (2 layers,
hidden 64, 4 routed experts, top-2, expert width 24 so that a transposed expert weight cannot
pass for the right layout), the demo's character tokenizer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from plugtune import moe
from plugtune.config import RecipeError, validate_recipe
from plugtune.train import TrainingError, prepare_run

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=256)
#: model_type -> (config kwargs, router (module path inside a layer), attention projections,
#: aux loss computed by transformers' model)
ARCHS = {
    "qwen3_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=16),
                  "mlp.gate", ("q_proj", "k_proj", "v_proj", "o_proj"), True),
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24),
                "mlp.gate", ("q_proj", "k_proj", "v_proj", "o_proj"), True),
    "llama4_text": (dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24,
                         intermediate_size_mlp=48, head_dim=16),
                    "feed_forward.router", ("q_proj", "k_proj", "v_proj", "o_proj"), False),
    "deepseek_v3": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                         n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                         num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
                    "mlp.gate", ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                 "o_proj"), False),
    "gpt_oss": (dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, head_dim=16),
                "mlp.router", ("q_proj", "k_proj", "v_proj", "o_proj"), True),
}
AUX = [a for a, row in ARCHS.items() if row[3]]
NO_AUX = [a for a, row in ARCHS.items() if not row[3]]


def _tokenizer():
    from plugtune.demo import materialize

    return AutoTokenizer.from_pretrained(materialize("demo://tiny-llama"))


def _model(arch: str):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, vocab_size=len(_tokenizer()), **{**COMMON, **ARCHS[arch][0]})
    # gpt-oss has no sdpa; plugtune's automatic fallback is another change (attention)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


@pytest.fixture
def moe_dir(tmp_path):
    def make(arch: str):
        path = tmp_path / arch
        _model(arch).save_pretrained(path)
        _tokenizer().save_pretrained(path)
        return path
    return make


def _recipe(path, tmp_path, arch, rows=None, **kw):
    data = tmp_path / "d.jsonl"
    rows = rows or [{"prompt": f"copy {w} =", "completion": f" {w} {w}"}
                    for w in ("abc", "hello", "moe", "experts", "router", "tiny")]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = dict(base_model=str(path), model_type="causal_lm", chat_template="plain",
                datasets=[dict(path=str(data), type="prompt_completion")], sequence_len=64,
                micro_batch_size=2, max_steps=2, logging_steps=1, learning_rate=1e-2,
                lr_scheduler="constant", save_total_limit=1, group_by_length=False,
                eval_metrics=["loss"], output_dir=str(tmp_path / "run"), dtype="fp32")
    if arch == "gpt_oss":
        base["attn_implementation"] = "eager"
    base.update(kw)
    return validate_recipe(base)


def _routers(model, arch) -> list[str]:
    """The routers by the table (not by plugtune.moe's search), one per MoE layer."""
    suffix = "." + ARCHS[arch][1]
    return [n for n, _ in model.named_modules() if n.endswith(suffix)]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _peft_name(n: str) -> str:
    return n.replace("base_model.model.", "", 1).replace(".base_layer", "")


# -- target selection -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "all-linear"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_targets_are_attention_never_router_expert_or_tuple(arch, method):
    from plugtune.testing import make_spec
    from plugtune.trainer import lora_config

    model = _model(arch)
    spec, pm = make_spec("causal_lm", lora_target_modules=method)
    cfg = lora_config(spec, model, pm)
    targets = sorted(cfg.target_modules)
    assert not cfg.target_parameters, "experts are opt-in"
    routers = _routers(model, arch)
    assert routers and [b.router for b in moe.find_moe_blocks(model)] == routers
    mods = dict(model.named_modules())
    for t in targets:
        assert t in mods, f"{t}: targets are exact module names"
        assert not any(t == r or t.startswith(r + ".") for r in routers), t
        assert ".experts." not in f".{t}.", t
        out = mods[t](torch.randn(1, mods[t].in_features))
        assert isinstance(out, torch.Tensor), f"{t} returns {type(out).__name__}"
    leaves = {t.rsplit(".", 1)[-1] for t in targets}
    attention = set(ARCHS[arch][2])
    if method == "auto" and arch == "mixtral":
        attention = {"q_proj", "v_proj"}  # peft's own default for mixtral
    assert attention <= leaves
    if method == "auto":
        assert leaves == attention, "auto: the attention projections only"


@pytest.mark.parametrize("arch,name", [("llama4_text", "router"), ("mixtral", "gate"),
                                       ("qwen3_moe", "experts")])
def test_naming_a_router_or_expert_is_a_clear_error(arch, name):
    from plugtune.testing import make_spec
    from plugtune.trainer import lora_config

    spec, pm = make_spec("causal_lm", lora_target_modules=[name])
    with pytest.raises(ValueError, match="not layers LoRA can wrap"):
        lora_config(spec, _model(arch), pm)


def test_leaf_names_shared_with_routed_experts_stay_dense():
    """DeepSeek-V3's shared experts and its dense first layer are named like its routed experts
    (gate_proj/up_proj/down_proj): listed leaf names must not turn into expert ParamWrappers
    (peft's transformers-5 conversion would), so lora_dropout > 0 still works."""
    from peft import get_peft_model

    from plugtune.testing import make_spec
    from plugtune.trainer import lora_config

    model = _model("deepseek_v3")
    spec, pm = make_spec("causal_lm", lora_target_modules=["gate_proj", "up_proj", "down_proj"],
                         lora_dropout=0.1)
    cfg = lora_config(spec, model, pm)
    assert not cfg.target_parameters
    assert {t.rsplit(".", 2)[-2] for t in cfg.target_modules} == {"mlp", "shared_experts"}
    peft = get_peft_model(model, cfg)
    ids = torch.randint(0, 40, (2, 8))
    assert math.isfinite(peft(input_ids=ids, labels=ids).loss.item())
    assert not peft.peft_config["default"].target_parameters


# -- training ---------------------------------------------------------------------------------


def _train(recipe):
    ctx = prepare_run(recipe)
    before = _snapshot(ctx.model)
    result = ctx.method.load_run()(ctx)
    return ctx, before, result


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_trains_attention_router_frozen(arch, moe_dir, tmp_path):
    """The issue's repro: no model_type plugin, LoRA with the defaults, packed rows, 2 steps."""
    ctx, before, result = _train(_recipe(moe_dir(arch), tmp_path, arch, sample_packing=True))
    assert result.metrics["global_step"] == 2
    assert math.isfinite(result.metrics["train_loss"])
    after = {_peft_name(n): p for n, p in ctx.model.named_parameters()}
    lora_b = [n for n in after if "lora_B" in n]
    assert lora_b and all(".experts." not in n for n in lora_b)
    assert any(after[n].abs().max() > 0 for n in lora_b), "the adapter moved (B starts at 0)"
    for r in _routers(ctx.model, arch):
        for n in [k for k in before if k.startswith(r + ".")]:
            assert torch.equal(before[n], after[n]), f"router {n} changed"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_experts_opt_in_wraps_and_trains_experts(arch, moe_dir, tmp_path):
    recipe = _recipe(moe_dir(arch), tmp_path, arch, lora_target_parameters="experts")
    assert recipe.lora_dropout == 0  # set for the experts' ParamWrapper
    ctx, before, result = _train(recipe)
    assert math.isfinite(result.metrics["train_loss"])
    after = {_peft_name(n): p for n, p in ctx.model.named_parameters()}
    expert_b = [n for n, p in ctx.model.named_parameters() if ".experts." in n and "lora_B" in n]
    assert len(expert_b) == 2 * len(_routers(ctx.model, arch))  # gate_up_proj, down_proj per block
    assert all(p.abs().max() > 0 for n, p in ctx.model.named_parameters() if n in expert_b)
    routers = _routers(ctx.model, arch)
    for n in before:  # base weights: experts and routers unchanged
        if n in after and (".experts." in n or any(n.startswith(r) for r in routers)):
            assert torch.equal(before[n], after[n]), n
    # the saved adapter loads onto a fresh base and merges to the same logits
    from plugtune.merge import load_for_merge

    merged = load_for_merge(result.output_dir)[0]
    ids = torch.randint(0, 40, (2, 12))
    ctx.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ctx.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_expert_lora_with_dropout_is_refused_with_the_reason(tmp_path):
    with pytest.raises(RecipeError, match="lora_dropout: 0.*ParamWrapper"):
        _recipe(tmp_path, tmp_path, "mixtral", lora_target_parameters="experts", lora_dropout=0.1)


@pytest.mark.parametrize("arch,train_router", [("mixtral", False), ("llama4_text", False),
                                                ("qwen3_moe", True)])
def test_full_fine_tuning_freezes_the_router_unless_asked(arch, train_router, moe_dir, tmp_path):
    ctx, before, _ = _train(_recipe(moe_dir(arch), tmp_path, arch, adapter="none",
                                    moe_train_router=train_router))
    after = _snapshot(ctx.model)
    routers = [n for n in before if any(n.startswith(r + ".") for r in _routers(ctx.model, arch))]
    assert routers
    moved = [n for n in routers if not torch.equal(before[n], after[n])]
    assert (moved == routers) if train_router else not moved
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


# -- the router auxiliary loss ----------------------------------------------------------------


@pytest.mark.parametrize("arch", AUX)
def test_aux_loss_is_in_the_loss_and_logged(arch, moe_dir, tmp_path):
    """The loss trained on is the model's own CE + coef * aux (coef from moe_aux_loss_coef),
    and the logged aux_loss of step 1 is the aux loss of a direct forward on the same batch."""
    coef = 0.5
    recipe = _recipe(moe_dir(arch), tmp_path, arch, micro_batch_size=1, moe_aux_loss_coef=coef,
                     rows=[{"prompt": "copy router =", "completion": " router router"}])
    ctx = prepare_run(recipe)
    model = ctx.model
    assert model.config.output_router_logits
    collate = ctx.pm.hook.plugtune_collate(spec=ctx.spec, tokenizer=ctx.tokenizer)
    batch = {k: v for k, v in collate([ctx.data.train[0]]).items() if k != "length"}
    model.train()
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        ce = model(**batch, use_cache=False, output_router_logits=False).loss
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, ce + coef * out.aux_loss)
    result = ctx.method.load_run()(ctx)
    first = next(h for h in result.log_history if "loss" in h)
    assert first["aux_loss"] == pytest.approx(float(out.aux_loss), rel=1e-4)
    assert first["loss"] == pytest.approx(float(out.loss), rel=1e-4)
    assert sum("aux_loss" in h for h in result.log_history) == 2  # logging_steps 1, 2 steps


@pytest.mark.parametrize("arch", AUX)
def test_aux_loss_off_with_coefficient_zero(arch, moe_dir, tmp_path):
    ctx, _, result = _train(_recipe(moe_dir(arch), tmp_path, arch, moe_aux_loss_coef=0))
    assert not ctx.model.config.output_router_logits
    assert not any("aux_loss" in h for h in result.log_history)


@pytest.mark.parametrize("arch", NO_AUX)
def test_models_without_an_aux_loss_say_so(arch, moe_dir, tmp_path):
    path = moe_dir(arch)
    with pytest.raises(TrainingError, match="computes no router auxiliary loss"):
        prepare_run(_recipe(path, tmp_path, arch, moe_aux_loss_coef=0.1))
    ctx, _, result = _train(_recipe(path, tmp_path, arch))
    assert not any("aux_loss" in h for h in result.log_history)


# -- memory estimate --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_estimate_total_and_active_parameters(arch, moe_dir, tmp_path):
    from peft import get_peft_model

    from plugtune.estimate import estimate, format_estimate
    from plugtune.plugins import get_plugin_manager
    from plugtune.testing import make_spec
    from plugtune.trainer import lora_config

    path = moe_dir(arch)
    model = _model(arch)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    k, e = 2, 4
    est = estimate(_recipe(path, tmp_path, arch, lora_target_parameters="experts"), device="cpu")
    assert est.params == total > est.active_params
    assert est.active_params == total - routed + routed * k // e
    rows = dict(format_estimate(est))
    label = next(r for r in rows if r.startswith("active per token"))
    assert f"{k} of {e} routed experts" in label
    # trainable parameters as peft counts them, experts included
    spec, _ = make_spec("causal_lm", lora_target_parameters="experts")
    peft = get_peft_model(model, lora_config(spec, model, get_plugin_manager()))
    assert est.trainable_params == sum(p.numel() for p in peft.parameters() if p.requires_grad)


# -- the keys as axolotl and LLaMA-Factory spell them -----------------------------------------


def test_axolotl_and_llamafactory_moe_keys_translate():
    from plugtune.config.dialects import translate

    experts = ["experts.gate_up_proj", "experts.down_proj"]
    ax = translate({"base_model": "m", "adapter": "lora", "lora_dropout": 0.0,
                    "lora_target_parameters": experts,
                    "datasets": [{"path": "a.jsonl", "type": "alpaca"}]})
    assert ax.data["lora_target_parameters"] == experts
    assert validate_recipe(ax.data).lora_target_parameters == experts
    lf = translate({"model_name_or_path": "m", "stage": "sft", "finetuning_type": "lora",
                    "moe_aux_loss_coef": 0.01, "lora_target": "all"})
    assert lf.data["moe_aux_loss_coef"] == 0.01


# -- structure, not class names ---------------------------------------------------------------


class _ToyAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.o_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)


class _ToyExpert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3, self.w2 = (torch.nn.Linear(8, 6), torch.nn.Linear(8, 6),
                                     torch.nn.Linear(6, 8))


class _ToyBlock(torch.nn.Module):  # v4-style: a Linear router beside a ModuleList of experts
    def __init__(self, e):
        super().__init__()
        self.gate = torch.nn.Linear(8, e, bias=False)
        self.experts = torch.nn.ModuleList(_ToyExpert() for _ in range(e))


class _ToyLayer(torch.nn.Module):
    def __init__(self, e):
        super().__init__()
        self.self_attn, self.mlp = _ToyAttention(), _ToyBlock(e)


def test_modulelist_experts_and_a_layer_stack_as_long_as_the_expert_count():
    """Four decoder layers and four experts: the stack is not taken for experts (no router
    beside it); Linear experts are found, never default targets, and opt in as modules."""
    from types import SimpleNamespace

    e = 4
    toy = torch.nn.Module()
    toy.config = SimpleNamespace(num_local_experts=e, num_experts_per_tok=2, hidden_size=8)
    toy.layers = torch.nn.ModuleList(_ToyLayer(e) for _ in range(e))
    blocks = moe.find_moe_blocks(toy)
    assert [(b.experts, b.router) for b in blocks] == [
        (f"layers.{i}.mlp.experts", f"layers.{i}.mlp.gate") for i in range(e)]
    for method in ("auto", "all-linear"):
        assert {t.rsplit(".", 1)[-1] for t in moe.lora_targets(toy, method)} == {"q_proj", "o_proj"}
    linears = moe.expert_linears(toy)
    assert len(linears) == e * e * 3 and all(".mlp.experts." in n for n in linears)
    with pytest.raises(moe.MoeError, match="reach the MoE routers"):
        moe.resolve_targets(toy, ["w1", "q_proj"], explicit=True)
    from plugtune.testing import make_spec
    from plugtune.trainer import lora_config

    spec, pm = make_spec("causal_lm", lora_target_parameters="experts")
    cfg = lora_config(spec, toy, pm)
    assert set(linears) <= set(cfg.target_modules) and not cfg.target_parameters
    assert not any(t.endswith(".gate") for t in cfg.target_modules)
    counts = moe.parameter_counts(toy)
    routed = sum(p.numel() for n, p in toy.named_parameters() if ".experts." in n)
    assert counts["active_params"] == counts["total_params"] - routed // 2


def test_returns_tuple_reads_the_forward():
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    class Scaled(torch.nn.Linear):  # its own forward, a tensor out: LoRA can wrap it
        def forward(self, x):
            return super().forward(x) * 2

    assert moe.returns_tuple(Llama4Router)
    assert not moe.returns_tuple(torch.nn.Linear) and not moe.returns_tuple(Scaled)
    bnb = pytest.importorskip("bitsandbytes")
    assert not moe.returns_tuple(bnb.nn.Linear4bit) and not moe.returns_tuple(bnb.nn.Linear8bitLt)
