"""Group Relative Policy Optimization (Shao et al. 2024, arXiv:2402.03300) through TRL's
``GRPOTrainer``: ``rl: grpo``; online RL with rewards computed on the policy's own samples.

Data: any chat-kind dataset (``prompt_completion``, ``alpaca``, ``messages`` ...); each example's
prompt (the messages before the last answer) is sampled ``num_generations`` times and the
example's answer is its ``reference`` (what the ``exact_match`` reward compares with).

Rewards (``reward_funcs``, summed with ``reward_weights``), each one of:

* ``exact_match``: 1.0 when the completion equals the reference (SQuAD normalisation), else 0;
* ``regex:PATTERN``: 1.0 when ``PATTERN`` matches the completion (``re.search``), else 0;
* ``length_penalty``: minus the completion's share of ``max_completion_length`` tokens;
* ``module:function``: any Python callable ``f(prompts, completions, reference, **kw) ->
  list[float]`` (TRL's reward-function signature);
* a folder written by ``plugtune train`` with ``rl: reward``: its reward model's score.

Generation settings and the KL coefficient keep TRL's names (``num_generations``,
``max_completion_length``, ``temperature``, ``beta``). With LoRA the reference (``beta > 0``)
is the base with the adapter disabled. Before and after training the run measures the mean
reward of greedy completions on the held-out examples (``metrics.before`` / ``after``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from plugtune.hookspecs import hookimpl
from plugtune.spec import Method


class OnlineRLKeys(BaseModel):
    """Recipe keys of ``rl: grpo`` and ``rl: rloo`` (TRL's names)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    reward_funcs: list[str] = Field(
        default_factory=lambda: ["exact_match"], min_length=1,
        description="exact_match | regex:PATTERN | length_penalty | module:function | a reward "
        "run folder")
    reward_weights: list[float] | None = Field(None, description="one weight per reward_funcs entry")
    num_generations: int = Field(4, ge=2, description="completions sampled per prompt")
    max_completion_length: int = Field(64, ge=1, description="tokens per sampled completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    beta: float | None = Field(None, ge=0, description="KL coefficient to the reference "
                               "(TRL default: grpo 0.0, rloo 0.05)")


METHOD = Method(
    name="grpo",
    run="plugtune.methods.grpo:run",
    data_kinds=("chat",),
    keys=OnlineRLKeys,
    description="GRPO: online RL with reward functions on sampled completions (TRL GRPOTrainer)",
)


@hookimpl
def plugtune_methods():
    return [METHOD]


# ---------------------------------------------------------------------------------------------
# rewards


def _text(completion) -> str:
    """A completion as text (TRL passes strings, or message lists for chat prompts)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")


def exact_match_reward(prompts, completions, reference, **_):
    """1.0 where the completion equals the ``reference`` column (SQuAD normalisation)."""
    from plugtune.evaluate import normalize_answer

    return [float(normalize_answer(_text(c)) == normalize_answer(r))
            for c, r in zip(completions, reference)]


def regex_reward(pattern: str):
    """A reward of 1.0 where ``pattern`` matches the completion (``re.search``), else 0."""
    import re

    rx = re.compile(pattern)

    def regex_match(prompts, completions, **_):
        return [float(bool(rx.search(_text(c)))) for c in completions]

    regex_match.__name__ = f"regex_{pattern}"[:60]
    return regex_match


def length_penalty(max_tokens: int):
    """A reward of minus the completion's share of ``max_tokens`` tokens (0 .. -1)."""
    def length_penalty(prompts, completions, completion_ids=None, **_):
        if completion_ids is not None:
            return [-len(ids) / max_tokens for ids in completion_ids]
        return [-min(1.0, len(_text(c).split()) / max_tokens) for c in completions]

    return length_penalty


def resolve_reward(spec: str, max_tokens: int):
    """A ``reward_funcs`` entry -> a TRL reward function, or ``(model, tokenizer)`` for a
    reward run folder.

    Raises:
        plugtune.config.RecipeError: an entry that is none of the accepted forms (the message
            names it and lists them).
    """
    import importlib
    from pathlib import Path

    from plugtune.config import RecipeError

    if spec == "exact_match":
        return exact_match_reward
    if spec == "length_penalty":
        return length_penalty(max_tokens)
    if spec.startswith("regex:"):
        return regex_reward(spec[len("regex:"):])
    if (Path(spec) / "recipe.yaml").is_file():
        from plugtune.methods.reward import load_reward_run

        return load_reward_run(spec)
    mod, sep, fn = spec.partition(":")
    if sep and mod and fn:
        try:
            return getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as exc:
            raise RecipeError(f"reward_funcs: cannot import {spec!r}: {exc}") from None
    raise RecipeError(f"reward_funcs: {spec!r} is not exact_match, length_penalty, regex:PATTERN, "
                      "module:function or a folder written by `plugtune train` with rl: reward")


def reward_functions(recipe) -> tuple[list, list]:
    """``(reward_funcs, reward_processing_classes)`` for TRL from the recipe."""
    funcs, tokenizers = [], []
    for spec in recipe.reward_funcs:
        f = resolve_reward(spec, recipe.max_completion_length)
        if isinstance(f, tuple):
            funcs.append(f[0])
            tokenizers.append(f[1])
        else:
            funcs.append(f)
            tokenizers.append(None)
    return funcs, tokenizers


def score_completions(funcs, weights, prompts, completions, references) -> dict:
    """Mean reward per function and weighted total over ``completions`` (texts)."""
    import torch

    out, total = {}, torch.zeros(len(completions))
    for i, f in enumerate(funcs):
        if isinstance(f, torch.nn.Module):
            continue  # a reward model scores during training only
        vals = torch.tensor(f(prompts=prompts, completions=completions, reference=references),
                            dtype=torch.float)
        out[getattr(f, "__name__", f"reward_{i}")] = round(float(vals.mean()), 4)
        total += vals * (weights[i] if weights else 1.0)
    out["reward"] = round(float(total.mean()), 4) if len(completions) else None
    return out


def sample_completions(model, tokenizer, prompts: list[list[dict]], n: int, max_new_tokens: int,
                       temperature: float, seed: int) -> list[list[str]]:
    """``n`` sampled completions per chat prompt (``model.generate``, ``do_sample``, the
    recipe's temperature, a fixed seed), as TRL samples them during training: the prompt
    rendered with the chat template's generation prompt, special tokens skipped in the text."""
    import torch

    out = []
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    for msgs in prompts:
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        ids = torch.tensor([ids], device=dev)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=max_new_tokens, num_return_sequences=n,
                                  pad_token_id=tokenizer.pad_token_id, use_cache=True)
        out.append(tokenizer.batch_decode(seqs[:, ids.shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return out


def held_out_reward(ctx, model, funcs) -> dict:
    """The reward of the policy on the held-out examples: of greedy completions
    (``plugtune_generate``: ``reward``) and of ``num_generations`` sampled completions per
    prompt at the recipe's temperature (``sampled_reward``: the expected reward GRPO / RLOO
    maximise)."""
    examples = [e for e in ctx.data.eval_examples if "reference" in e]
    if not examples:
        return {}
    recipe = ctx.recipe
    prompts, refs = [e["prompt"] for e in examples], [e["reference"] for e in examples]
    preds = ctx.pm.hook.plugtune_generate(
        spec=ctx.spec, model=model, tokenizer=ctx.tokenizer, prompts=prompts,
        max_new_tokens=recipe.max_completion_length, images=None, processor=None)
    res = score_completions(funcs, recipe.reward_weights, prompts, preds, refs)
    k = recipe.num_generations
    samples = sample_completions(model, ctx.tokenizer, prompts, k, recipe.max_completion_length,
                                 recipe.temperature, recipe.seed)
    flat = [c for group in samples for c in group]
    sampled = score_completions(funcs, recipe.reward_weights,
                                [p for p in prompts for _ in range(k)], flat,
                                [r for r in refs for _ in range(k)])
    return {"n": len(examples), **res, "sampled_reward": sampled["reward"],
            "samples": [{"reference": r, "prediction": p}
                        for r, p in list(zip(refs, preds))[:3]]}


# ---------------------------------------------------------------------------------------------
# data and trainer


def prompt_rows(ds):
    """Canonical chat examples -> ``{"prompt": messages before the last answer, "reference":
    the last answer}`` (TRL's conversational prompt layout)."""
    import datasets

    rows = []
    for ex in ds:
        msgs = ex["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        rows.append({"prompt": [{"role": m["role"], "content": m["content"]} for m in msgs[:last]],
                     "reference": msgs[last]["content"]})
    return datasets.Dataset.from_list(rows)


def online_config_kwargs(recipe, spec, default_beta: float) -> dict:
    """Trainer arguments as SFT plus the generation keys (TRL names).

    Raises:
        plugtune.config.RecipeError: ``micro_batch_size * gradient_accumulation_steps`` not a
            multiple of ``num_generations`` (every prompt's group must fit one generation batch).
    """
    from plugtune.config import RecipeError
    from plugtune.trainer import training_kwargs

    per_gen = recipe.micro_batch_size * recipe.gradient_accumulation_steps
    if per_gen % recipe.num_generations:
        raise RecipeError(
            f"micro_batch_size * gradient_accumulation_steps = {per_gen} must be a multiple of "
            f"num_generations = {recipe.num_generations} (each prompt's completions are one group)")
    if recipe.reward_weights is not None and len(recipe.reward_weights) != len(recipe.reward_funcs):
        raise RecipeError(f"reward_weights has {len(recipe.reward_weights)} entries for "
                          f"{len(recipe.reward_funcs)} reward_funcs")
    kw = training_kwargs(recipe, spec, False, seq2seq=False)
    kw.update(num_generations=recipe.num_generations,
              max_completion_length=recipe.max_completion_length,
              temperature=recipe.temperature,
              beta=default_beta if recipe.beta is None else recipe.beta,
              reward_weights=recipe.reward_weights,
              gradient_checkpointing=recipe.gradient_checkpointing,
              gradient_checkpointing_kwargs={"use_reentrant": False},
              train_sampling_strategy="random")
    kw["bf16"], kw["fp16"] = bool(kw.get("bf16")), bool(kw.get("fp16"))
    return kw


def build_online_trainer(ctx, trainer_cls, config_cls, default_beta: float):
    """``(trainer, metrics, stats, funcs)`` for GRPO / RLOO: prompts from the chat data, reward
    functions from the recipe, LoRA through ``peft_config`` (reference = adapter disabled)."""
    from plugtune.data.templates import ensure_chat_template
    from plugtune.trainer import CompleteCheckpointCallback, TrainingError, policy_and_reference

    recipe = ctx.recipe
    if ctx.spec.task != "causal":
        raise TrainingError(f"rl: {ctx.method.name} supports decoder-only (causal) families")
    from plugtune.modeling import new_tokens

    ctx.data.added_tokens = new_tokens(ctx.model, ctx.tokenizer, [
        *ctx.data.added_tokens, *ensure_chat_template(ctx.tokenizer, recipe.chat_template)])
    if ctx.data.added_tokens:
        ctx.model.resize_token_embeddings(len(ctx.tokenizer))
    funcs, tokenizers = reward_functions(recipe)
    train_rows = prompt_rows(ctx.data.raw_train)
    kw = online_config_kwargs(recipe, ctx.spec, default_beta)
    model, _, peft_config, reference = policy_and_reference(ctx, needs_reference=False)
    if kw["beta"] > 0:
        reference = ("base model with the adapter disabled" if peft_config is not None
                     else "frozen copy of the initial model (loaded by TRL)")
    before = held_out_reward(ctx, model, funcs)
    ctx.say(f"plugtune: {ctx.method.name}: held-out reward before training: {before}")
    trainer = trainer_cls(model=model, reward_funcs=funcs, args=config_cls(**kw),
                          train_dataset=train_rows, processing_class=ctx.tokenizer,
                          reward_processing_classes=tokenizers, peft_config=peft_config,
                          callbacks=[CompleteCheckpointCallback(ctx.say)])
    metrics = {"rl": ctx.method.name, "reward_funcs": list(recipe.reward_funcs),
               "num_generations": recipe.num_generations, "beta": kw["beta"],
               "reference": reference, "before": before}
    stats = {**ctx.data.stats, "prompts": len(train_rows), "kind": "prompts"}
    return trainer, metrics, stats, funcs


def run_online(ctx, trainer_cls, config_cls, default_beta: float):
    """Train GRPO / RLOO and write the run directory; ``metrics.before`` / ``after`` hold the
    held-out reward of greedy completions."""
    from plugtune.trainer import fit_and_save

    trainer, metrics, stats, funcs = build_online_trainer(ctx, trainer_cls, config_cls, default_beta)

    def after(tr):
        metrics["after"] = held_out_reward(ctx, tr.model, funcs)
        ctx.say(f"plugtune: {ctx.method.name}: held-out reward after training: {metrics['after']}")

    return fit_and_save(ctx, trainer, metrics, stats, watch=("reward",), after=after)


def build_trainer(ctx):
    """``(trainer, metrics, stats)`` for ``ctx`` (:class:`plugtune.trainer.MethodContext`)."""
    from trl import GRPOConfig, GRPOTrainer

    return build_online_trainer(ctx, GRPOTrainer, GRPOConfig, 0.0)[:3]


def run(ctx):
    """Run GRPO (see :func:`run_online`)."""
    from trl import GRPOConfig, GRPOTrainer

    return run_online(ctx, GRPOTrainer, GRPOConfig, 0.0)
