"""Tiny random models of each family (transformers' config classes, real tokenizers) train two
LoRA steps through ``plugtune.train`` with the plugin loaded, on multi-turn chats with reasoning."""

from __future__ import annotations

import json
import math

import pytest

from plugtune.config import validate_recipe
from plugtune.plugins import get_plugin_manager, resolve_family
from plugtune.testing import load_shared_tokenizer
from plugtune_qwen3.plugin import FAMILIES
from plugtune_qwen3.tiny import save_tiny

#: model type -> (shared tokenizer, recipe overrides). SmolLM3's tokenizer is not in ../shared:
#: Llama 3.2's, from which SmolLM3's vocabulary is derived. Qwen3.5 is never packed (refused).
CASES = {
    "qwen3": ("qwen3", {"sample_packing": True}),
    "qwen3_moe": ("qwen3", {"lora_target_modules": "auto"}),
    "qwen3_5_text": ("qwen3", {"sample_packing": False}),
    "smollm3": ("llama3_2", {}),
}


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """Six two-turn chats, reasoning in the field, inline, or absent."""
    rows = []
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]:
        first = {"role": "assistant", "content": f"{a + b}", "reasoning_content": f"{a} plus {b}."}
        if a % 2:
            first = {"role": "assistant", "content": f"<think>\n{a} plus {b}.\n</think>\n\n{a + b}"}
        rows.append({"messages": [{"role": "user", "content": f"Add {a} and {b}."}, first,
                                  {"role": "user", "content": "Double it."},
                                  {"role": "assistant", "content": f"{2 * (a + b)}"}]})
    p = tmp_path_factory.mktemp("data") / "chats.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_lora_trains(model_type, chats, tmp_path):
    from plugtune.train import train

    tok_name, extra = CASES[model_type]
    base = save_tiny(model_type, tmp_path / "base", load_shared_tokenizer(tok_name))
    pm = get_plugin_manager()
    assert resolve_family(pm, model_type).family in FAMILIES  # routed to this plugin
    out = tmp_path / "run"
    rec = validate_recipe(dict(
        base_model=str(base), adapter="lora", lora_r=4, datasets=[{"path": str(chats), "type": "messages"}],
        sequence_len=128, micro_batch_size=2, max_steps=2, learning_rate=1e-3, logging_steps=1,
        output_dir=str(out), **extra), pm=pm)
    res = train(rec, pm=pm)
    m = res.metrics
    assert m["global_step"] == 2 and math.isfinite(m["train_loss"])
    assert (out / "adapter_model.safetensors").is_file()


def test_enable_thinking_false_run_keeps_its_default(chats, tmp_path):
    """A run trained without reasoning answers without it: the saved tokenizer's generation
    prompt ends with the empty block, and ``plugtune_generate`` on the loaded run works."""
    from plugtune.runs import load_run
    from plugtune.train import train

    base = save_tiny("qwen3", tmp_path / "base", load_shared_tokenizer("qwen3"))
    pm = get_plugin_manager()
    out = tmp_path / "run"
    rec = validate_recipe(dict(
        base_model=str(base), adapter="lora", lora_r=4, enable_thinking=False,
        datasets=[{"path": str(chats), "type": "messages"}], sequence_len=128,
        micro_batch_size=2, max_steps=2, output_dir=str(out)), pm=pm)
    assert train(rec, pm=pm).metrics["global_step"] == 2
    spec, loaded, pm = load_run(out, pm)
    assert spec.recipe.enable_thinking is False
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Add 1 and 1."}],
                                                  tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    outs = pm.hook.plugtune_generate(spec=spec, model=loaded.model, tokenizer=loaded.tokenizer,
                                     prompts=["Add 1 and 1.", "Add 2 and 3."], max_new_tokens=3,
                                     images=None)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)


def test_families_declare_packing_and_tests():
    by_type = {t: f for f in FAMILIES for t in f.model_types}
    assert set(by_type) == set(CASES)
    assert by_type["qwen3_5_text"].packing == "refused" and "linear" in by_type["qwen3_5_text"].packing_reason
    for fam in FAMILIES:
        assert fam.quirks and fam.tests
        assert all(t.startswith("packages/plugin-qwen3/tests/") for t in fam.tests)


@pytest.mark.parametrize("model_type,exact", [("qwen3", True), ("qwen3_5_text", False)])
def test_packing_exact_or_refused(model_type, exact):
    """Two samples packed in one row (position ids restarting) give each sample's logits alone
    for Qwen3's softmax attention, not for Qwen3.5's linear attention: its packing is refused."""
    import torch
    from transformers import AutoModelForCausalLM

    from plugtune.testing import make_spec
    from plugtune_qwen3.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, 300)).eval()
    a, b = torch.randint(3, 300, (9,)).tolist(), torch.randint(3, 300, (6,)).tolist()
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([a + b]), use_cache=False,
                       position_ids=torch.tensor([[*range(9), *range(6)]])).logits[0, 9:]
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
    assert torch.allclose(packed, alone, atol=1e-5) == exact
    spec, pm = make_spec(model_type, sample_packing=True)
    assert (spec.family.packing == "refused") == (not exact)
    if not exact:  # core refuses it before the model loads, with the family's reason
        from plugtune.train import TrainingError, check_packing

        with pytest.raises(TrainingError, match="linear-attention"):
            check_packing(spec.recipe, model_type, tiny_config(model_type, 300), spec.family)
