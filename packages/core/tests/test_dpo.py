"""DPO: tokenization of preference pairs (one template pass, one BOS, shared boundary) and short
runs on the real stories260K model with the real preference sets in ../shared/data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from plugtune.config import RecipeError, validate_recipe
from plugtune.data.preference import tokenize_pair
from plugtune.data.templates import ensure_chat_template
from plugtune.data.tokenize import probe_template, tokenize_chat
from plugtune.methods.dpo import dpo_config, preference_metrics
from plugtune.testing import load_shared_tokenizer, make_spec, shared_path

PROMPT = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Name a primary colour."}]
CHOSEN = "Red is a primary colour."
REJECTED = "Bananas are yellow and tasty, I think."


def _stories_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("models", "stories260K", "hf"))


@pytest.mark.parametrize("source,template", [
    ("stories", "alpaca"), ("stories", "zephyr"), ("llama2", "llama2"), ("mistral_v1", "zephyr"),
    ("llama3_2", None), ("qwen2_5", None)])
def test_pair_tokens_one_bos_and_same_boundary_as_sft(source, template):
    tok = _stories_tokenizer() if source == "stories" else load_shared_tokenizer(source)
    ensure_chat_template(tok, template)
    info = probe_template(tok)
    row = tokenize_pair(tok, info, PROMPT, CHOSEN, REJECTED, max_len=4096)
    p, c, r = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
    assert row["status"] == "kept" and c != r
    bos = tok.bos_token_id
    if bos is not None:
        # exactly one BOS, at the very start, never in front of an answer
        assert (p + c).count(bos) == (1 if p[0] == bos else 0)
        assert (p + r).count(bos) == (p + r)[:1].count(bos)
        assert c[0] != bos and r[0] != bos
    # each answer ends with a stop token of the template
    assert c[-1] in info.stop_token_ids and r[-1] in info.stop_token_ids
    # the same sequence SFT trains on, with the answer starting at the same token
    for answer, ids in ((CHOSEN, c), (REJECTED, r)):
        sft = tokenize_chat(tok, [*PROMPT, {"role": "assistant", "content": answer}], info, 4096)
        first_label = next(i for i, lab in enumerate(sft["labels"]) if lab != -100)
        assert first_label == len(p), "prompt/answer boundary differs from SFT's label mask"
        assert sft["input_ids"][: len(p) + len(ids)] == p + ids
    # and the rendered text is the chat template's, rendered once
    text = tok.decode(p + c)
    assert text.count(CHOSEN) == 1 and text.count(PROMPT[1]["content"]) == 1


@pytest.mark.parametrize("source", ["llama3_2", "qwen2_5", "llama2"])
def test_truncated_pair_keeps_bos_template_and_system_prompt(source):
    """A too-long pair is shortened where the user wrote: the BOS (written by the Llama 3
    template itself), the template's headers and the system prompt all survive; the answers
    stay whole and end on the stop token."""
    tok = load_shared_tokenizer(source)
    ensure_chat_template(tok, "llama2" if source == "llama2" else None)
    info = probe_template(tok)
    system = {"role": "system", "content": "You are a careful assistant."}
    long_prompt = [system, {"role": "user", "content": "Tell me about cats. " + "Cats purr. " * 80}]
    full = tokenize_pair(tok, info, long_prompt, CHOSEN, REJECTED, max_len=10_000)
    row = tokenize_pair(tok, info, long_prompt, CHOSEN, REJECTED, max_len=96)
    assert row["status"] == "truncated" and row["length"] <= 96
    assert row["chosen_ids"] == full["chosen_ids"] and row["rejected_ids"] == full["rejected_ids"]
    assert row["chosen_ids"][-1] in info.stop_token_ids
    p = row["prompt_ids"]
    if info.uses_bos:
        assert p[0] == info.bos_id and p.count(info.bos_id) == 1
    text = tok.decode(p)
    assert "You are a careful assistant." in text and "Tell me about cats." in text
    # the prompt ends as the untruncated one (the generation prompt) and starts alike
    assert text.rstrip().endswith(tok.decode(full["prompt_ids"][-3:]).strip())
    assert p[:4] == full["prompt_ids"][:4]


def test_length_policy_cuts_prompt_from_left_and_keeps_bos():
    tok = _stories_tokenizer()
    ensure_chat_template(tok, "alpaca")
    info = probe_template(tok)
    long_prompt = [{"role": "user", "content": "Once upon a time there was a cat. " * 40}]
    row = tokenize_pair(tok, info, long_prompt, CHOSEN, REJECTED, max_len=64)
    full = tokenize_pair(tok, info, long_prompt, CHOSEN, REJECTED, max_len=10_000)
    assert row["status"] == "truncated" and row["length"] <= 64
    assert row["prompt_ids"][0] == tok.bos_token_id
    # the end of the prompt (the generation prompt "### Response:") survives, answers are whole
    assert row["prompt_ids"][-8:] == full["prompt_ids"][-8:]
    assert row["chosen_ids"] == full["chosen_ids"] and row["rejected_ids"] == full["rejected_ids"]


def test_real_preference_files_become_canonical_pairs():
    from plugtune.config import DatasetConfig
    from plugtune.data.loading import load_datasets

    for path in (shared_path("llama_factory", "dpo_en_demo.json"),
                 shared_path("torchtune_assets", "stack_exchange_paired_tiny.json")):
        ds, _ = load_datasets([DatasetConfig(path=str(path), type="preference", max_samples=4)])
        ex = ds[0]
        assert isinstance(ex["prompt"], list) and ex["prompt"][-1]["role"] == "user"
        assert isinstance(ex["chosen"], str) and isinstance(ex["rejected"], str)
        assert ex["chosen"] != ex["rejected"]


def test_dpo_config_follows_recipe_not_trl_defaults():
    spec, _ = make_spec("causal_lm", dpo_beta=0.25, dpo_loss_type="ipo", learning_rate=3e-4,
                        sequence_len=96, output_dir="/tmp/unused")
    cfg = dpo_config(spec.recipe, spec, has_eval=False)
    assert cfg.beta == 0.25 and cfg.loss_type == ["ipo"] and cfg.max_length == 96
    assert cfg.learning_rate == 3e-4
    assert cfg.bf16 is False and cfg.gradient_checkpointing is False  # fp32 on this CPU
    bad, _ = make_spec("causal_lm", dpo_loss_type="sigmoidd", output_dir="/tmp/unused")
    with pytest.raises(RecipeError, match="dpo_loss_type"):
        dpo_config(bad.recipe, bad, has_eval=False)


def _recipe(tmp_path, adapter, dataset, **kw):
    data = dict(
        base_model=str(shared_path("models", "stories260K", "hf")), adapter=adapter, rl="dpo",
        chat_template="alpaca",
        datasets=[dict(path=str(dataset), type="preference", max_samples=8)],
        sequence_len=128, micro_batch_size=4, lr_scheduler="constant", logging_steps=1,
        lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules="all-linear",
        dpo_beta=0.1, output_dir=str(tmp_path / "run"), save_total_limit=1)
    data.update(kw)
    return validate_recipe(data)


def _check_rising(res):
    hist = [h for h in res.log_history if "rewards/accuracies" in h]
    assert len(hist) >= 4
    # step 1: policy == reference, so the loss is log 2 and no pair is preferred yet
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert hist[0]["rewards/accuracies"] == 0.0
    accs = [h["rewards/accuracies"] for h in hist]
    margins = [h["rewards/margins"] for h in hist]
    assert max(accs[-2:]) >= 0.75 and accs[-1] > accs[0]
    assert margins[-1] > margins[0] + 0.5
    m = res.metrics
    assert m["last_rewards_accuracies"] == accs[-1] and m["global_step"] == len(hist)
    saved = json.loads((res.output_dir / "metrics.json").read_text())
    assert saved["last_rewards_margins"] == pytest.approx(margins[-1])


@pytest.mark.slow
def test_dpo_lora_rewards_rise_reference_is_adapter_disabled(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from plugtune.train import train

    torch.set_num_threads(1)
    data = shared_path("llama_factory", "dpo_en_demo.json")
    res = train(_recipe(tmp_path, "lora", data, learning_rate=5e-3, max_steps=6))
    _check_rising(res)
    assert res.metrics["reference"] == "base model with the adapter disabled"
    base = AutoModelForCausalLM.from_pretrained(shared_path("models", "stories260K", "hf"))
    n_base = sum(p.numel() for p in base.parameters())
    # the trainer's model is base + adapter, no second copy of the base
    assert res.metrics["total_params"] == n_base + res.metrics["trainable_params"]
    probe = torch.tensor([[1, 45, 67, 89, 120, 33]])
    with torch.no_grad():
        base_logits = base(input_ids=probe).logits.clone()
    model = PeftModel.from_pretrained(base, str(res.output_dir))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "saved adapter is untrained"
    with torch.no_grad():
        tuned = model(input_ids=probe).logits
        with model.disable_adapter():  # the reference DPO compared against
            ref = model(input_ids=probe).logits
    assert torch.equal(ref, base_logits), "the reference is not the untouched base"
    assert not torch.allclose(tuned, base_logits), "the policy did not move"


@pytest.mark.slow
def test_dpo_full_weights_rewards_rise_with_frozen_reference(tmp_path):
    from safetensors.torch import load_file

    from plugtune.train import train

    torch.set_num_threads(1)
    data = shared_path("torchtune_assets", "stack_exchange_paired_tiny.json")
    res = train(_recipe(tmp_path, "none", data, learning_rate=1e-3, max_steps=6))
    _check_rising(res)
    assert res.metrics["reference"] == "frozen copy of the initial model"
    base = load_file(shared_path("models", "stories260K", "hf", "model.safetensors"))
    tuned = load_file(res.output_dir / "model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base), "weights did not change"


def test_dpo_needs_preference_data(tmp_path):
    from plugtune.train import TrainingError, train

    recipe = validate_recipe(dict(
        base_model=str(shared_path("models", "stories260K", "hf")), rl="dpo",
        datasets=[dict(path=str(shared_path("dolly", "dolly_validation_151.instruction_context_response.jsonl")),
                       type="dolly", max_samples=4)], output_dir=str(tmp_path / "run")))
    with pytest.raises(TrainingError, match="preference data"):
        train(recipe)


def test_dpo_stops_on_nan_loss_naming_the_step(tmp_path, monkeypatch):
    import trl

    from plugtune.train import TrainingError, train

    def nan_loss(self, model, inputs, return_outputs):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return out.logits.sum() * float("nan")

    monkeypatch.setattr(trl.DPOTrainer, "_compute_loss", nan_loss)
    data = shared_path("llama_factory", "dpo_en_demo.json")
    with pytest.raises(TrainingError, match="at step 1"):
        train(_recipe(tmp_path, "lora", data, learning_rate=1e-3, max_steps=2))


@pytest.mark.slow
def test_dpo_resume_from_checkpoint(tmp_path):
    """Killed in epoch 2 (8 pairs, 2 per step: step 5 is the first of epoch 2) and resumed: the
    same losses and weights as the straight run (constant lr, so 5 + 2 steps == 7 steps): the
    length-grouped order of epoch 2 comes from the seeded sampler, not the global RNG."""
    from plugtune.train import train

    torch.set_num_threads(1)
    data = shared_path("llama_factory", "dpo_en_demo.json")
    kw = dict(learning_rate=1e-3, micro_batch_size=2, save_steps=5, lora_dropout=0.1)
    first = train(_recipe(tmp_path, "lora", data, max_steps=5, **kw))
    assert first.metrics["global_step"] == 5
    assert (tmp_path / "run" / "checkpoint-5" / "plugtune_checkpoint_complete").exists()
    res = train(_recipe(tmp_path, "lora", data, max_steps=7, **kw), resume=True)
    steps = [h["step"] for h in res.log_history if "rewards/accuracies" in h]
    assert res.metrics["global_step"] == 7 and steps[-1] == 7
    straight = train(_recipe(tmp_path, "lora", data, max_steps=7, output_dir=str(tmp_path / "s"), **kw))

    def logged(r):
        return [(h["step"], h["loss"], h["learning_rate"]) for h in r.log_history if "loss" in h]

    assert logged(res) == logged(straight)
    a, b = (load_file(d / "adapter_model.safetensors") for d in (res.output_dir, straight.output_dir))
    assert all(bool((a[k] == b[k]).all()) for k in a)
    assert res.metrics["train_loss"] == straight.metrics["train_loss"]


@pytest.mark.slow
def test_zephyr_recipes_sft_merge_dpo(tmp_path, monkeypatch):
    """The bundled Zephyr pair on a tiny Mistral: QLoRA SFT -> merge -> QLoRA DPO."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from plugtune.cli import main
    from plugtune.data.templates import ZEPHYR

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    tok = load_shared_tokenizer("mistral_v1")
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=1024, sliding_window=128)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tiny-mistral")
    tok.save_pretrained(tmp_path / "tiny-mistral")
    quick = ["--set", "max_steps=2", "--set", "sequence_len=256", "--set", "logging_steps=1",
             "--set", "micro_batch_size=2", "--set", "gradient_accumulation_steps=1",
             "--set", "learning_rate=1e-3", "--set", "datasets.0.max_samples=24",
             "--set", "val_set_size=0"]
    sft_data = shared_path("llama_factory", "alpaca_en_demo.json")
    assert main(["train", "zephyr-sft", *quick, "--set", f"base_model={tmp_path / 'tiny-mistral'}",
                 "--set", f"datasets.0.path={sft_data}"]) == 0
    sft = tmp_path / "runs" / "zephyr-sft"
    assert (sft / "adapter_config.json").exists()
    assert main(["merge", str(sft), str(tmp_path / "runs" / "zephyr-sft-merged")]) == 0
    dpo_data = shared_path("llama_factory", "dpo_en_demo.json")
    assert main(["train", "zephyr-dpo", *quick, "--set", f"datasets.0.path={dpo_data}"]) == 0
    run = tmp_path / "runs" / "zephyr-dpo"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rl"] == "dpo" and metrics["global_step"] == 2
    assert metrics["reference"] == "base model with the adapter disabled"
    assert metrics["first_rewards_accuracies"] is not None
    recipe = yaml_load(run / "recipe.yaml")
    assert recipe["base_model"] == "./runs/zephyr-sft-merged" and recipe["dpo_beta"] == 0.01
    from transformers import AutoTokenizer

    from plugtune.data.templates import BOS_PREFIX, template_name

    saved = AutoTokenizer.from_pretrained(run).chat_template
    # the named template, led by {{ bos_token }} since the Mistral tokenizer adds a BOS
    assert saved == BOS_PREFIX + ZEPHYR and template_name(saved) == "zephyr"


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_dpo_eval_matches_trl_eval_and_scores_the_reference(tmp_path, adapter):
    """``plugtune eval`` on a DPO run recomputes TRL's held-out ``rewards/accuracies`` and
    ``rewards/margins`` from its own forward passes, and scores the reference (before)."""
    from plugtune.methods.dpo import evaluate_run
    from plugtune.train import train

    torch.set_num_threads(1)
    data = shared_path("llama_factory", "dpo_en_demo.json")
    test = [dict(path=str(data), type="preference", max_samples=8)]
    res = train(_recipe(tmp_path, adapter, data, learning_rate=5e-3 if adapter == "lora" else 1e-3,
                        max_steps=4, test_datasets=test))
    m = res.metrics
    got = evaluate_run(res.output_dir)
    assert got["trained"]["pairs"] == 8 and got["dpo_beta"] == 0.1
    assert got["trained"]["reward_accuracy"] == pytest.approx(m["eval_rewards/accuracies"])
    assert got["trained"]["reward_margin"] == pytest.approx(m["eval_rewards/margins"], abs=2e-3)
    assert got["trained"]["reward_margin"] > 0  # trained on these very pairs
    ref = got["reference"]  # the reference against itself: every implicit reward is 0
    assert ref["reward_accuracy"] == 0 and ref["reward_margin"] == 0
    assert 0 <= ref["logp_accuracy"] <= 1
    assert got["trained"]["logp_accuracy"] >= ref["logp_accuracy"]


def test_preference_metrics_table():
    # (policy chosen, policy rejected), (reference chosen, reference rejected)
    pol = ([-1.0, -5.0, -2.0], [-3.0, -1.0, -2.5])
    ref = ([-2.0, -4.0, -2.0], [-2.0, -2.0, -2.0])
    out = preference_metrics(pol, ref, beta=0.5)
    # margins: 0.5*((1)-(-1))=1.0, 0.5*((-1)-(1))=-1.0, 0.5*(0-(-0.5))=0.25
    assert out == {"pairs": 3, "logp_accuracy": round(2 / 3, 4),
                   "reward_accuracy": round(2 / 3, 4), "reward_margin": round(0.25 / 3, 4)}
    assert preference_metrics(([], []), ([], []), 0.1)["logp_accuracy"] is None


@pytest.mark.parametrize("recipe,kind", [
    ({"rl": "dpo"}, "dpo"), ({"rl": "ipo"}, "dpo"), ({"rl": "reward"}, "reward"),
    ({"reward_model": True}, "reward"), ({"rl": "kto"}, None), ({}, None)])
def test_plugtune_eval_routes_preference_runs_by_their_recipe(tmp_path, recipe, kind):
    import yaml

    from plugtune.cli import _run_method

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"base_model": "m", **recipe}))
    assert _run_method(str(tmp_path)) == kind
    assert _run_method(str(tmp_path / "missing")) is None
