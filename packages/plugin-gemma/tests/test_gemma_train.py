"""End to end through ``plugtune.train`` with the plugin loaded: a tiny Gemma 3 text model (real
Gemma 3 tokenizer, 262k vocabulary, a soft cap on its logits) trains 2 LoRA steps on packed
rows, and ``plugtune.merge`` writes a model whose logits equal base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PLUGIN_NAME
from transformers import AutoModelForCausalLM

from plugtune.config import validate_recipe
from plugtune.merge import merge_run
from plugtune.plugins import get_plugin_manager
from plugtune.train import build_spec, train

QA = [("What is 2+2?", "4."), ("Capital of France?", "Paris."), ("Colour of the sky?", "Blue."),
      ("Opposite of hot?", "Cold."), ("3 times 3?", "9."), ("First letter?", "A."),
      ("Largest planet?", "Jupiter."), ("Water freezes at?", "0 degrees Celsius.")]


def _chats(path):
    rows = [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in QA]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow  # ~45 s here: datasets hashes the 262k-vocabulary tokenizer for its cache
def test_gemma3_text_trains_packed_and_merges(tmp_path):
    from peft import PeftModel

    from plugtune.testing import load_shared_tokenizer
    from plugtune_gemma.tiny import save_tiny

    torch.set_num_threads(1)
    base_dir = save_tiny("gemma3_text", tmp_path / "base", load_shared_tokenizer("gemma3"),
                         final_logit_softcapping=30.0)
    recipe = validate_recipe(dict(
        base_model=str(base_dir), adapter="lora", lora_target_modules="all-linear",
        lora_r=8, lora_alpha=16, lora_dropout=0.0,
        datasets=[dict(path=str(_chats(tmp_path / "chats.jsonl")), type="chat_template")],
        sequence_len=64, sample_packing=True, micro_batch_size=2, max_steps=2,
        learning_rate=5e-2, lr_scheduler="constant", logging_steps=1, save_total_limit=1,
        output_dir=str(tmp_path / "run")))
    assert build_spec(recipe, get_plugin_manager()).plugin == PLUGIN_NAME
    res = train(recipe)
    assert res.metrics["global_step"] == 2
    losses = [h["loss"] for h in res.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

    merged_dir = merge_run(res.output_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.tensor([[2, 105, 2364, 107, 3912, 106, 107, 105, 4368, 107]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(res.output_dir)).eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-3, "the adapter changes nothing: test is vacuous"
    torch.testing.assert_close(got, adapted, atol=1e-4, rtol=1e-4)
    # Gemma's sqrt(hidden) input scale and tied embeddings survive the merge
    assert merged.config.tie_word_embeddings and merged.config.final_logit_softcapping == 30.0
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
