"""Rows of added tokens and of untrained stop tokens are trained under LoRA, saved and reloaded
(stories260K: a real 260K-parameter base with a real tokenizer, no chat tokens, and an EOS row
it never trained)."""

from __future__ import annotations

import json
import logging

import torch

from plugtune.config import validate_recipe
from plugtune.testing import shared_path
from plugtune.token_rows import add_tokens, untrained_stop_tokens
from plugtune.train import train


def _chat_data(tmp_path, n=16):
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": f"Tell me about cat {i}.",
                                       "output": f"The cat {i} was happy."}) for i in range(n)))
    return p


def _recipe(tmp_path, model, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return validate_recipe({
        "base_model": str(model), "model_type": "causal_lm", "output_dir": str(tmp_path / "run"),
        "datasets": [{"path": str(_chat_data(tmp_path)), "type": "alpaca"}],
        "sequence_len": 64, "micro_batch_size": 4, "max_steps": 4, "learning_rate": 1e-2,
        "warmup_steps": 0, "logging_steps": 1, "eval_before_training": False, **kw})


def test_added_template_tokens_are_trained_saved_and_reloaded(tmp_path, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = shared_path("models", "stories260K", "hf")
    with caplog.at_level(logging.INFO, logger="plugtune"):
        result = train(_recipe(tmp_path, model_dir, chat_template="chatml"))
    out = result.output_dir
    tok = AutoTokenizer.from_pretrained(out)
    new = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert min(new) >= 512, "the base has no chatml tokens: they were added"
    # the run's own reload: base resized to the saved tokenizer, then the adapter
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.resize_token_embeddings(len(tok))
    fresh_rows = base.get_output_embeddings().weight[new].detach().clone()
    model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = tok("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(ids).logits
        trained_rows = model.get_output_embeddings()(torch.eye(64)).T[new]  # rows as used
    assert not torch.allclose(trained_rows, fresh_rows, atol=1e-4), "the new rows changed"
    # a second reload (fresh random resize) gives identical logits: the rows live in the adapter
    base2 = AutoModelForCausalLM.from_pretrained(model_dir)
    base2.resize_token_embeddings(len(tok))
    with torch.no_grad():
        b = PeftModel.from_pretrained(base2, str(out)).eval()(ids).logits
    assert torch.equal(a, b)
    assert "model.resize_token_embeddings(len(tokenizer))" in (out / "README.md").read_text()
    assert "training the embedding and output rows of <|im_start|> (added), <|im_end|> (added)" \
        in caplog.text


def _p_eos_after_response(run_dir, tok):
    from plugtune.runs import load_run

    _, loaded, _ = load_run(run_dir)
    chat = [{"role": "user", "content": "Tell me about cat 3."},
            {"role": "assistant", "content": "The cat 3 was happy."}]
    text = loaded.tokenizer.apply_chat_template(chat, tokenize=False)  # as trained (BOS, preamble)
    text = text[:text.rindex(tok.eos_token)]
    prompt = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(loaded.model(prompt).logits[0, -1].softmax(-1)[tok.eos_token_id])


def test_untrained_eos_row_is_detected_and_learned(tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = shared_path("models", "stories260K", "hf")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"input_ids": tok("Once upon a time.").input_ids + [2],
             "labels": tok("Once upon a time.").input_ids + [2]}]
    weak = untrained_stop_tokens(base, rows, [tok.eos_token_id])
    assert set(weak) == {tok.eos_token_id} and weak[tok.eos_token_id] < 1e-9
    p = {}
    for rows_on in (True, False):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="plugtune"):
            result = train(_recipe(tmp_path / str(rows_on), model_dir, chat_template="alpaca",
                                   max_steps=8, learning_rate=3e-3, train_token_rows=rows_on,
                                   sequence_len=256))  # Stanford's alpaca preamble fits
        assert caplog.text.count("untrained: P=") == (1 if rows_on else 0)
        p[rows_on] = _p_eos_after_response(result.output_dir, tok)
    print("P(EOS) rows trained / frozen", p)
    assert p[True] > 3e-3 and p[True] > 100 * p[False], p


def test_trained_stop_row_is_left_alone(make_tiny_llama):
    from plugtune.testing import load_shared_tokenizer

    tok = load_shared_tokenizer("llama2")
    model = make_tiny_llama(len(tok))
    ids = tok("Once upon a time.").input_ids + [tok.eos_token_id]
    assert untrained_stop_tokens(model, [{"input_ids": ids, "labels": ids}], [tok.eos_token_id]) == {}


def test_add_tokens_keeps_existing_extra_special_tokens():
    from plugtune.testing import load_shared_tokenizer

    tok = load_shared_tokenizer("qwen2_5")
    before = list(tok.additional_special_tokens) if hasattr(tok, "additional_special_tokens") else []
    assert add_tokens(tok, ["<|im_end|>", "<tool>"]) == ["<tool>"]
    assert tok.tokenize("a<tool>b")[1] == "<tool>"
    after = getattr(tok, "additional_special_tokens", [])
    assert set(before) <= set(after)


def test_train_token_rows_off_trains_no_rows(tmp_path):
    model_dir = shared_path("models", "stories260K", "hf")
    result = train(_recipe(tmp_path, model_dir, chat_template="chatml", train_token_rows=False,
                           max_steps=1))
    cfg = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert not cfg.get("trainable_token_indices")


def test_token_rows_get_their_own_learning_rate(make_tiny_llama):
    from peft import LoraConfig, get_peft_model

    from plugtune.token_rows import scale_token_rows_lr, trainable_token_indices

    model = make_tiny_llama(64)
    rows = trainable_token_indices(model, [2, 5])
    assert rows == {"model.embed_tokens": [2, 5], "lm_head": [2, 5]}, "untied: both layers"
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices=rows))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    assert scale_token_rows_lr(opt, peft_model, 10.0) == 2
    by_lr = {g["lr"]: len(g["params"]) for g in opt.param_groups}
    assert by_lr[1e-3 * 10.0] == 2 and by_lr[1e-3] >= 4
