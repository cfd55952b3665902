"""The real pretrained stories260K (Llama 2 architecture, vocab 512) on the real Dolly sample:
packed LoRA and packed QLoRA runs through ``plugtune.train.train``, then generation that stops."""

from __future__ import annotations

import json
import math

import pytest

from plugtune.config import validate_recipe
from plugtune.testing import shared_path

pytestmark = pytest.mark.slow
DOLLY = ("dolly", "dolly_validation_151.instruction_context_response.jsonl")


def _recipe(model, data, out, **kw):
    base = dict(base_model=str(model), lora_target_modules="all-linear", lora_r=16, lora_alpha=32,
                chat_template="alpaca", datasets=[{"path": str(data), "type": "dolly"}],
                sample_packing=True, logging_steps=1, output_dir=str(out))
    return validate_recipe({**base, **kw})


def test_packed_lora_on_dolly_lowers_the_loss(tmp_path):
    from plugtune.train import train

    model, dolly = shared_path("models", "stories260K", "hf"), shared_path(*DOLLY)
    res = train(_recipe(model, dolly, tmp_path / "run", adapter="lora", sequence_len=512,
                        micro_batch_size=2, max_steps=8, learning_rate=5e-3, warmup_steps=0))
    m = res.metrics
    losses = [h["loss"] for h in res.log_history if "loss" in h]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["packed"] and stats["rows"] < stats["kept"] + stats["truncated"]
    assert 0 < m["trainable_share"] < 0.5


#: a short instruction/response prompt as a literal Jinja chat template: the 0.26M-parameter model
#: cannot tell nine prompts apart behind the Stanford Alpaca preamble (~100 of its tokens shared
#: by every prompt) within 60 steps; this test is about QLoRA, packing and stopping, not the prompt
SHORT_PROMPT = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}")


def test_packed_qlora_learns_to_stop_at_eos(tmp_path):
    """QLoRA (4-bit base) on packed rows of the Dolly records with one-line answers; afterwards
    greedy generation reproduces most answers and *stops on </s>* well before max_new_tokens.

    stories260K never saw ``</s>`` in pre-training (llama2.c separates stories with BOS): its
    ``lm_head`` row for EOS is untrained and P(EOS) starts near 5e-10, out of reach of LoRA on the
    attention/MLP layers alone in a few dozen steps, so ``lm_head`` is trained in full
    (``lora_modules_to_save``). The file's responses end with a literal ``###eos_token###``
    marker left over from its source; it is removed here so the answer is followed by the real
    EOS only.
    """
    from transformers import AutoTokenizer

    from plugtune.runs import load_run
    from plugtune.train import train

    model, dolly = shared_path("models", "stories260K", "hf"), shared_path(*DOLLY)
    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in dolly.read_text().splitlines() if line.strip()]
    rows = [dict(r, response=r["response"].replace("###eos_token###", "").strip()) for r in rows]
    short = [r for r in rows if len(tok(r["response"])["input_ids"]) <= 25
             and len(tok(r["instruction"] + r["context"])["input_ids"]) <= 60]
    assert len(short) >= 6
    data = tmp_path / "short.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in short) + "\n")
    out = tmp_path / "run"
    res = train(_recipe(model, data, out, adapter="qlora", lora_modules_to_save=["lm_head"],
                        chat_template=SHORT_PROMPT,
                        lora_dropout=0.0, sequence_len=256, micro_batch_size=1, max_steps=60,
                        learning_rate=5e-3, lr_scheduler="constant", warmup_steps=0))
    assert res.metrics["last_logged_loss"] < 0.5 * res.metrics["first_logged_loss"]

    spec, loaded, pm = load_run(out)
    model_, tok_ = loaded.model, loaded.tokenizer
    produced = []
    original = model_.generate

    def spy(*args, **kwargs):
        ids = original(*args, **kwargs)
        produced.extend(ids[:, kwargs["input_ids"].shape[1]:].tolist())
        return ids

    model_.generate = spy
    prompts = [[{"role": "user", "content": r["instruction"] + ("\n\n" + r["context"] if r["context"] else "")}]
               for r in short]
    outs = pm.hook.plugtune_generate(spec=spec, model=model_, tokenizer=tok_, prompts=prompts,
                                     max_new_tokens=48, images=None)
    eos, pad = tok_.eos_token_id, tok_.pad_token_id
    stopped = 0
    for seq in produced:
        real = [t for t in seq if t != pad] if pad != eos else seq
        if eos in real:
            assert len(real) < 48
            assert all(t == pad for t in seq[seq.index(eos) + 1:])  # nothing after the stop
            stopped += 1
    assert len(produced) == len(short)
    assert stopped >= 0.8 * len(short), [tok_.decode(s) for s in produced]  # not cut off
    exact = sum(o == r["response"] for o, r in zip(outs, short))
    assert exact >= 0.7 * len(short), list(zip(outs, [r["response"] for r in short]))
