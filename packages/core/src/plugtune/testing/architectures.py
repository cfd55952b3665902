"""The per-architecture contract: a tiny model of each architecture, through the real paths.

:func:`run_contract` builds a tiny random model of a ``model_type`` from ``transformers``'
config class (2 layers, hidden 64), saves it beside a real tokenizer with a chat template
(``../shared/data/tokenizers``), and checks on CPU:

1. the run starts **without** ``model_type`` in the recipe (the route line, or the claiming
   plugin), through :func:`plugtune.train.train`;
2. LoRA trains 2 steps with ``sample_packing: true``; where packing is refused
   (:func:`plugtune.architectures.packing_support`) the run stops before the model loads with
   the reason, and trains unpacked;
3. packed logits equal each sample run alone (``|Δ| <= PACKED_ATOL``) where packing is exact,
   and differ where it is refused (the refusal is measured, not assumed);
4. the label-only loss (:func:`plugtune.modeling.loss_from_batch`) equals the model's own loss;
5. the merged model (:func:`plugtune.merge.load_for_merge`) gives the adapter's logits, and the
   adapter moved the logits (so the comparison can fail);
6. generation stops at the template's end-of-turn token: with the model biased to emit it,
   ``plugtune_generate`` runs one forward pass, not ``max_new_tokens``.

Plugin packages run the same contract for their families (``run_contract(mt, tmp, pm=...,
expect_plugin="plugtune-qwen3")``) and may add rows to :data:`TINY`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: shared by every tiny config (a row may override)
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
              tie_word_embeddings=True)

#: model_type -> (tokenizer folder in ../shared/data/tokenizers, config overrides). The
#: tokenizer is the family's own where one is there (qwen3, gemma3), else the nearest family's
#: with a chat template.
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "qwen3_5_text": ("qwen3", dict(layer_types=["linear_attention", "full_attention"],
                                   linear_num_value_heads=4, linear_num_key_heads=2,
                                   linear_key_head_dim=16, linear_value_head_dim=16)),
    "gemma3_text": ("gemma3", dict(sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"])),
    "gemma4_text": ("gemma3", dict(sliding_window=8,
                                   hidden_size_per_layer_input=0,
                                   layer_types=["sliding_attention", "full_attention"])),
    "llama4_text": ("llama3_2", dict(num_local_experts=4, num_experts_per_tok=1,
                                     intermediate_size_mlp=128, attention_chunk_size=8)),
    "gpt_oss": ("qwen2_5", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("llama3_2", {}),
    "smollm3": ("qwen3", {}),
    "olmo3": ("qwen2_5", dict(sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"])),
    "granite": ("llama3_2", {}),
    "mixtral": ("llama3_2", dict(num_local_experts=4, num_experts_per_tok=2)),
    "ministral3": ("llama3_2", {}),
    "glm4": ("qwen2_5", {}),
    "lfm2": ("qwen2_5", dict(layer_types=["conv", "full_attention"])),
    "deepseek_v3": ("llama3_2", dict(n_routed_experts=4, num_experts_per_tok=2,
                                     moe_intermediate_size=32, first_k_dense_replace=1,
                                     kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                     qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
                                     num_key_value_heads=4, n_group=1, topk_group=1)),
}

#: max |Δlogit| between a sample packed after another and the same sample alone (fp32)
PACKED_ATOL = 1e-5

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Add two and three."}, {"role": "assistant", "content": "Five."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
]


def tiny_config(model_type: str, tokenizer, **overrides: Any):
    """The tiny ``transformers`` config of ``model_type`` (:data:`TINY` row + ``overrides``),
    its vocabulary and special ids taken from ``tokenizer``.

    Raises:
        KeyError: ``model_type`` has no :data:`TINY` row and no ``overrides`` were given.
    """
    from transformers import AutoConfig

    _, row = TINY[model_type] if model_type in TINY or not overrides else ("", {})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = dict(vocab_size=len(tokenizer), pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id)
    return AutoConfig.for_model(model_type, **{**COMMON, **ids, **row, **overrides})


def save_tiny(model_type: str, path: str | Path, tokenizer_name: str | None = None,
              seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random ``model_type`` (safetensors) and a real tokenizer to ``path``."""
    from transformers import AutoModelForCausalLM

    from plugtune.testing import load_shared_tokenizer

    tok = load_shared_tokenizer(tokenizer_name or TINY[model_type][0])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, tok, **overrides))
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def packed_logit_gap(model, samples: list[list[int]]) -> float:
    """Max |Δlogit| between ``samples`` packed into one row (``position_ids`` restarting at 0,
    no attention mask, ``use_cache=False``: ../shared/FINDINGS.md) and each sample alone."""
    device = next(model.parameters()).device
    ids = torch.tensor([sum(samples, [])], device=device)
    pos = torch.tensor([[i for s in samples for i in range(len(s))]], device=device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
            gap, start = 0.0, 0
            for s in samples:
                alone = model(input_ids=torch.tensor([s], device=device), use_cache=False).logits[0]
                gap = max(gap, float((packed[start:start + len(s)] - alone).abs().max()))
                start += len(s)
    finally:
        model.train(was)
    return gap


def end_of_turn_id(tokenizer) -> int:
    """The special token the chat template puts right after an assistant message's content
    (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>`` ...), read from the rendered template.

    Raises:
        AssertionError: the template puts no special token after the content.
    """
    content = "Paris is the capital of France."
    text = tokenizer.apply_chat_template(CHATS[0], tokenize=False)
    after = text[text.rindex(content) + len(content):]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    for tid in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if tid in special:
            return tid
    raise AssertionError(f"the chat template puts no special token after the assistant "
                         f"content (rendered tail {after!r})")


class _Lines:
    """A console that records what ``train`` prints."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, msg: Any = "", *args: Any, **kwargs: Any) -> None:
        self.lines.append(str(msg))


@dataclass
class ContractResult:
    """What :func:`run_contract` measured for one architecture."""

    model_type: str
    plugin: str
    route_line: str
    attn_implementation: str
    packing_exact: bool
    packing_reason: str
    packed_gap: float
    label_only_delta: float
    merge_delta: float
    adapter_shift: float
    end_of_turn: str
    forwards_to_stop: int
    steps: int
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """A JSON-able dict (the closing note's table row)."""
        return dict(self.__dict__)


def _recipe(base: Path, data: Path, out: Path, packing: bool, **extra: Any):
    from plugtune.config import validate_recipe

    return validate_recipe({
        "base_model": str(base), "datasets": [{"path": str(data), "type": "messages"}],
        "adapter": "lora", "lora_r": 4, "lora_alpha": 8,
        "learning_rate": 1e-2, "warmup_steps": 0, "max_steps": 2, "micro_batch_size": 2,
        "sequence_len": 128, "sample_packing": packing, "output_dir": str(out),
        "eval_before_training": False, "logging_steps": 1, "seed": 0, **extra})


def run_contract(model_type: str, workdir: str | Path, pm=None, expect_plugin: str | None = None,
                 tokenizer_name: str | None = None, **overrides: Any) -> ContractResult:
    """Run the architecture contract for ``model_type`` (see the module docstring).

    Args:
        workdir: an empty folder (the tiny model, data, run and nothing else are written there).
        pm: the plugin manager (default: :func:`plugtune.plugins.get_plugin_manager`).
        expect_plugin: the plugin that must claim the model; ``None``: whatever the routing
            table says, and the generic route line must be printed when no plugin claims it.

    Returns:
        :class:`ContractResult` (the gaps, so a table can report them).

    Raises:
        AssertionError: a check failed (the message says which and by how much).
    """
    from peft import PeftModel

    from plugtune.architectures import packing_support
    from plugtune.data.collate import Collator
    from plugtune.merge import load_for_merge
    from plugtune.modeling import loss_from_batch, stop_token_ids
    from plugtune.plugins import get_plugin_manager, route_model
    from plugtune.train import TrainingError, build_spec, train

    pm = pm or get_plugin_manager()
    work = Path(workdir)
    base = save_tiny(model_type, work / "base", tokenizer_name, **overrides)
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 2),
                    encoding="utf-8")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    route, note = route_model(pm, model_type, cfg)
    if expect_plugin is not None:
        assert route.plugin == expect_plugin, f"{model_type} routed to {route.plugin}"
    verdict = packing_support(cfg, route.family)
    notes: list[str] = []

    # 1-2: start without model_type; LoRA + packing (or the refusal, before the model loads)
    out = work / "run"
    recipe = _recipe(base, data, out, packing=True)
    assert recipe.model_type is None
    if not verdict.exact:
        try:
            train(recipe, pm=pm, console=_Lines())
        except TrainingError as exc:
            assert "sample_packing: false" in str(exc) and verdict.reason in str(exc), str(exc)
            notes.append(f"refused: {exc}")
        else:
            raise AssertionError(f"{model_type}: sample_packing was not refused")
        assert not any(out.glob("*.safetensors")), "the refusal must come before training"
        recipe = _recipe(base, data, out, packing=False)
    console = _Lines()
    result = train(recipe, pm=pm, console=console, overwrite=True)
    steps = int(result.metrics.get("global_step", 0))
    assert steps == 2, f"{model_type}: trained {steps} steps"
    printed = "\n".join(console.lines)
    if note:
        assert note in printed and printed.count("no family plugin claims it") == 1, printed
    else:
        assert f"plugin {route.plugin}" in printed, printed

    # 3: packed == alone (or measurably not, where refused), through the plugin's own load
    spec = build_spec(recipe, pm)
    loaded = pm.hook.plugtune_load(spec=spec)
    model, tok = loaded.model, loaded.tokenizer
    attn = str(model.config._attn_implementation)
    a = tok("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]
    b = tok("Paris is the capital of France, said the fox.", add_special_tokens=False)["input_ids"]
    gap = packed_logit_gap(model, [a, b])
    if verdict.exact:
        assert gap <= PACKED_ATOL, f"{model_type}: packed logits differ by {gap:.2e}"
    else:
        assert gap > PACKED_ATOL, (f"{model_type}: packing is refused ({verdict.reason}) but "
                                   f"packed logits agree ({gap:.2e}): the refusal is stale")

    # 4: label-only loss == the model's own loss (labels on the second half of each row only)
    coll = Collator(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    feats = [{"input_ids": s, "labels": [-100] * (len(s) // 2) + s[len(s) // 2:]} for s in (a, b)]
    batch = coll(feats)
    with torch.no_grad():
        own = model(**batch, use_cache=False).loss
        mine = loss_from_batch(model, dict(batch))
    lo_delta = float((own - mine).abs())
    assert lo_delta <= 1e-5 * max(1.0, float(own.abs())), (
        f"{model_type}: label-only loss {float(mine)} != model loss {float(own)}")

    # 5: merge == adapter, and the adapter moved the logits
    probe = torch.tensor([a])
    with torch.no_grad():
        base_logits = model(input_ids=probe, use_cache=False).logits
        adapted = PeftModel.from_pretrained(model, str(out)).eval()
        adapter_logits = adapted(input_ids=probe, use_cache=False).logits
        merged, mtok, mspec, _ = load_for_merge(out, pm=pm)
        merged_logits = merged(input_ids=probe, use_cache=False).logits
    shift = float((adapter_logits - base_logits).abs().max())
    merge_delta = float((merged_logits - adapter_logits).abs().max())
    assert shift > 1e-4, f"{model_type}: the adapter did not change the logits ({shift:.1e})"
    assert merge_delta <= 1e-4 * max(1.0, float(adapter_logits.abs().max())), (
        f"{model_type}: merged logits differ from the adapter's by {merge_delta:.2e}")

    # 6: generation stops at the template's end of turn
    eot = end_of_turn_id(mtok)
    assert eot in stop_token_ids(mtok, merged), (
        f"{model_type}: end-of-turn {mtok.convert_ids_to_tokens(eot)!r} is not a stop token")
    calls = []

    def force_eot(module, args, output):
        calls.append(1)
        output = output.clone()
        output[..., eot] += 1e4
        return output

    handle = merged.get_output_embeddings().register_forward_hook(force_eot)
    try:
        outs = pm.hook.plugtune_generate(spec=mspec, model=merged, tokenizer=mtok,
                                         prompts=[CHATS[1][:1]], max_new_tokens=6, images=None)
    finally:
        handle.remove()
    assert outs is not None and len(outs) == 1
    assert len(calls) == 1, (f"{model_type}: generation ran {len(calls)} forward passes past "
                             f"the end-of-turn token")
    return ContractResult(
        model_type=model_type, plugin=route.plugin, route_line=note, attn_implementation=attn,
        packing_exact=verdict.exact, packing_reason=verdict.reason, packed_gap=gap,
        label_only_delta=lo_delta, merge_delta=merge_delta, adapter_shift=shift,
        end_of_turn=mtok.convert_ids_to_tokens(eot), forwards_to_stop=len(calls), steps=steps,
        notes=notes)
