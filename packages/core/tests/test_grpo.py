"""Online RL (GRPO, RLOO) on the embedded demo task (reverse a word; reward = exact match):

* contract: one LoRA step (KL to the reference, ``beta > 0``) trains only the adapter and
  leaves the reference (adapter disabled) as it was;
* it works, not only runs: from a deliberately under-trained SFT checkpoint, GRPO raises the
  held-out reward of the policy's sampled completions.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from plugtune.config import load_recipe, validate_recipe


def _rl_recipe(base, out, rl, **kw):
    data = dict(
        base_model=base, model_type="causal_lm", chat_template="plain", rl=rl,
        datasets=[dict(path="demo://reverse-train.jsonl", type="prompt_completion")],
        test_datasets=[dict(path="demo://reverse-test.jsonl", type="prompt_completion")],
        sequence_len=32, micro_batch_size=16, lr_scheduler="constant", logging_steps=5,
        eval_metrics=["loss"], eval_max_samples=50, num_generations=8, max_completion_length=8,
        temperature=1.0, output_dir=str(out), save_total_limit=1)
    data.update(kw)
    return validate_recipe(data)


@pytest.mark.parametrize("rl", ["grpo", "rloo"])
def test_one_lora_step_trains_only_the_adapter_reference_unchanged(tmp_path, rl):
    from plugtune.train import prepare_run

    torch.set_num_threads(1)
    rec = _rl_recipe("demo://tiny-llama", tmp_path / "run", rl, adapter="lora", lora_r=8,
                     lora_alpha=16, lora_dropout=0.0, max_steps=1, learning_rate=1e-2, beta=0.05,
                     eval_max_samples=2,
                     reward_funcs=["exact_match", "regex:^ ?[a-h]+$", "length_penalty"],
                     reward_weights=[1.0, 0.5, 0.1])
    ctx = prepare_run(rec)
    trainer, metrics, _ = importlib.import_module(f"plugtune.methods.{rl}").build_trainer(ctx)
    assert metrics["reference"] == "base model with the adapter disabled"
    assert trainer.args.num_generations == 8 and trainer.args.beta == 0.05
    model = trainer.model
    probe = torch.tensor([ctx.tokenizer("reverse abc =")["input_ids"]])
    with model.disable_adapter(), torch.no_grad():
        ref_before = model(input_ids=probe).logits.clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    hist = trainer.state.log_history
    assert any("reward" in h for h in hist)
    assert all(math.isfinite(h["loss"]) for h in hist if "loss" in h)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed <= trainable
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, ref_before)


def test_reward_funcs_are_checked():
    from plugtune.config import RecipeError
    from plugtune.methods.grpo import resolve_reward

    with pytest.raises(RecipeError, match="is not exact_match"):
        resolve_reward("exactmatch", 8)
    with pytest.raises(RecipeError, match="cannot import"):
        resolve_reward("no_such_module_xyz:f", 8)
    f = resolve_reward("plugtune.methods.grpo:exact_match_reward", 8)
    assert f(prompts=[None, None], completions=[" cba", "abc"], reference=[" cba", "cba"]) == [1.0, 0.0]
    assert resolve_reward("regex:^x", 8)(prompts=[0], completions=[[{"role": "assistant", "content": "xy"}]]) == [1.0]


def test_grpo_raises_held_out_reward_of_an_undertrained_sft_model(tmp_path):
    from plugtune.train import train

    torch.set_num_threads(1)
    sft = load_recipe("demo", ["max_steps=200", "lr_scheduler=constant", "warmup_steps=0",
                               "eval_before_training=false", "eval_max_samples=50",
                               f"output_dir={tmp_path / 'sft'}", "logging_steps=50"])
    base = train(sft).metrics["after"]["exact_match"]
    assert 0.05 < base < 0.8, "the SFT checkpoint should be under-trained"
    res = train(_rl_recipe(str(tmp_path / "sft"), tmp_path / "grpo", "grpo", adapter="none",
                           micro_batch_size=64, max_steps=40, learning_rate=3e-4))
    before, after = res.metrics["before"], res.metrics["after"]
    assert before["reward"] == pytest.approx(base)  # same held-out words, greedy
    assert after["sampled_reward"] > before["sampled_reward"] + 0.03, (before, after)
    assert after["reward"] >= before["reward"] - 0.06  # greedy answers not broken on the way
    assert res.metrics["last_reward"] is not None and (tmp_path / "grpo" / "model.safetensors").exists()
