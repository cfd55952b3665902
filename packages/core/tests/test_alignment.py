"""Every pair / unpaired alignment method (DPO and its loss variants, KTO, ORPO, CPO, SimPO) on
the real stories260K model and tokenizer with the real LLaMA-Factory preference set:

* contract: one step gives a finite loss, only the adapter has gradients and changes, and the
  reference (the base with the adapter disabled) still gives the initial logits;
* end to end: a few steps move the method's own preference metric the right way.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from plugtune.config import validate_recipe
from plugtune.testing import shared_path

METHODS = [  # (rl, extra recipe keys)
    ("dpo", {}),
    ("ipo", {}),
    ("dpo", {"dpo_loss_type": "hinge"}),
    ("kto", {}),
    ("orpo", {}),
    ("cpo", {}),
    ("simpo", {}),
]


def _recipe(tmp_path, rl, extra, **kw):
    data = dict(
        base_model=str(shared_path("models", "stories260K", "hf")), adapter="lora", rl=rl,
        chat_template="alpaca",
        datasets=[dict(path=str(shared_path("llama_factory", "dpo_en_demo.json")),
                       type="preference", max_samples=8)],
        sequence_len=128, micro_batch_size=4, lr_scheduler="constant", logging_steps=1,
        lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules="all-linear",
        output_dir=str(tmp_path / "run"), save_total_limit=1, **extra)
    data.update(kw)
    return validate_recipe(data)


def _trainer(recipe):
    from plugtune.train import prepare_run

    ctx = prepare_run(recipe)
    module = importlib.import_module(ctx.method.run.partition(":")[0])
    return ctx, module.build_trainer(ctx)


@pytest.mark.parametrize("rl,extra", METHODS, ids=[m[0] + "-".join(m[1].values()) for m in METHODS])
def test_one_step_trains_only_the_adapter_reference_unchanged(tmp_path, rl, extra):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ctx, (trainer, metrics, stats) = _trainer(_recipe(tmp_path, rl, extra, max_steps=1,
                                                      learning_rate=1e-2))
    model = trainer.model
    probe = torch.tensor([ctx.tokenizer("Once upon a time there was")["input_ids"]])
    with model.disable_adapter(), torch.no_grad():
        ref_before = model(input_ids=probe).logits.clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "a non-adapter weight trains"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= trainable, "only adapter weights may change"
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, ref_before), "the reference moved"
    needs_ref = rl in ("dpo", "ipo", "kto")
    assert metrics["reference"] == ("base model with the adapter disabled" if needs_ref
                                    else "none (reference-free method)")
    if rl == "ipo":
        assert trainer.args.loss_type == ["ipo"]
    if rl == "simpo":
        assert trainer.args.loss_type == "simpo" and trainer.args.cpo_alpha == 0.0


@pytest.mark.parametrize("rl,extra,key", [
    ("ipo", {}, "rewards/margins"),
    ("kto", {}, "rewards/margins"),
    ("orpo", {}, "rewards/margins"),
    ("simpo", {}, "rewards/margins"),
])
def test_preference_margin_rises(tmp_path, rl, extra, key):
    from plugtune.train import train

    torch.set_num_threads(1)
    res = train(_recipe(tmp_path, rl, extra, max_steps=8, learning_rate=5e-3))
    vals = [h[key] for h in res.log_history if key in h]
    assert len(vals) >= 6
    assert sum(vals[-2:]) / 2 > sum(vals[:2]) / 2, vals
    name = key.replace("/", "_")
    assert res.metrics[f"last_{name}"] == vals[-1]
    assert (res.output_dir / "adapter_model.safetensors").exists()


def test_reward_model_lora_learns_pairs_and_eval_compares_base(tmp_path, capsys):
    """``rl: reward``: a sequence classifier with a LoRA adapter (SEQ_CLS, score head saved)
    learns the pairs: pairwise accuracy and mean margin rise on the pairs it was measured on
    before training; ``plugtune eval RUN`` reports base vs trained."""
    import json

    from plugtune.cli import main
    from plugtune.train import train

    torch.set_num_threads(1)
    data = shared_path("llama_factory", "dpo_en_demo.json")
    rec = _recipe(tmp_path, "reward", {}, max_steps=10, learning_rate=5e-3,
                  test_datasets=[dict(path=str(data), type="preference", max_samples=8)])
    res = train(rec)
    before, after = res.metrics["before"], res.metrics["after"]
    assert after["pairs"] == 8
    assert after["mean_margin"] > before["mean_margin"] + 0.5
    assert after["pairwise_accuracy"] >= 0.75 and after["pairwise_accuracy"] > before["pairwise_accuracy"]
    cfg = json.loads((res.output_dir / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS"
    capsys.readouterr()
    assert main(["eval", str(res.output_dir)]) == 0
    text = capsys.readouterr().out
    out = json.loads(text[text.index("{"):])
    assert out["trained"]["pairwise_accuracy"] == after["pairwise_accuracy"]
    assert out["trained"]["mean_margin"] > out["base"]["mean_margin"]



def test_kto_on_real_unpaired_data(tmp_path):
    """``rl: kto`` on LLaMA-Factory's ``kto_en_demo.json`` (messages + bool label): rows keep
    their labels, start with one BOS, and every uncut completion ends on the stop token; two
    steps train end to end (the margin-rises check on unpaired rows is
    ``test_preference_margin_rises[kto]``)."""
    from transformers import AutoTokenizer

    from plugtune.data import prepare
    from plugtune.data.preference import tokenize_unpaired
    from plugtune.data.templates import ensure_chat_template
    from plugtune.data.tokenize import probe_template
    from plugtune.train import train

    torch.set_num_threads(1)
    data = shared_path("llama_factory", "kto_en_demo.json")
    rec = _recipe(tmp_path, "kto", {}, max_steps=2, learning_rate=5e-3, sequence_len=192,
                  datasets=[dict(path=str(data), type="kto", max_samples=16)])
    tok = AutoTokenizer.from_pretrained(rec.base_model)
    ensure_chat_template(tok, rec.chat_template)
    prepared = prepare(rec, tok, "causal")
    assert prepared.kind == "kto"
    rows, stats = tokenize_unpaired(prepared.raw_train, tok, probe_template(tok), 1024)
    assert stats["desirable"] + stats["undesirable"] == 16 and 0 < stats["desirable"] < 16
    assert all(r["prompt_ids"][0] == tok.bos_token_id and r["prompt_ids"].count(tok.bos_token_id) == 1
               for r in rows)
    whole = [r for r in rows if r["length"] < 1024]  # not cut by the length policy
    assert len(whole) >= 4 and all(r["completion_ids"][-1] == tok.eos_token_id for r in whole)
    res = train(rec)
    assert res.metrics["global_step"] == 2 and math.isfinite(res.metrics["train_loss"])
    assert res.metrics["last_rewards_margins"] is not None
