"""Generic ``trylast`` fallbacks that serve any ``AutoModelForCausalLM``.

Family plugins answer first; these run only when every plugin passed. They also own the
pseudo model type ``causal_lm``: a recipe that sets ``model_type: causal_lm`` routes any
decoder-only model to these defaults (the bundled demo does).
"""

from __future__ import annotations

from plugtune.hookspecs import hookimpl
from plugtune.spec import Family, Loaded

GENERIC = Family(
    name="causal_lm",
    model_types=("causal_lm",),
    task="causal",
    description="generic decoder-only fallback (any AutoModelForCausalLM)",
)


@hookimpl
def plugtune_families():
    return [GENERIC]


@hookimpl(trylast=True)
def plugtune_load(spec):
    from plugtune.modeling import load_model, load_tokenizer

    if spec.task != "causal":
        return None
    tok = load_tokenizer(spec)
    model = load_model(spec)
    return Loaded(model=model, tokenizer=tok)


@hookimpl(trylast=True)
def plugtune_target_modules(spec, model, method):
    from plugtune import moe
    from plugtune.modeling import check_target_modules, linear_module_names, peft_default_targets

    if method in ("auto", "all-linear"):
        default = (peft_default_targets(getattr(model.config, "model_type", spec.model_type))
                   if method == "auto" else None)
        # MoE: attention projections (auto) / every Linear but routers and routed experts
        found = moe.lora_targets(model, method, default)
        if found is not None:
            return found
        return (default or linear_module_names(model)) if method == "auto" else linear_module_names(model)
    targets = list(method) if not isinstance(method, str) else [method]
    check_target_modules(model, targets)
    return targets


@hookimpl(trylast=True)
def plugtune_collate(spec, tokenizer):
    from plugtune.data.collate import Collator

    return Collator(pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


@hookimpl(trylast=True)
def plugtune_train_step(spec, model, batch, num_items_in_batch):
    from plugtune.modeling import loss_from_batch

    return loss_from_batch(model, batch, num_items_in_batch)


@hookimpl(trylast=True)
def plugtune_generate(spec, model, tokenizer, prompts, max_new_tokens):
    from plugtune.modeling import generate_causal

    g = spec.recipe.generation
    kwargs = dict(temperature=g.temperature, top_p=g.top_p) if g.do_sample else {}
    return generate_causal(model, tokenizer, prompts, max_new_tokens, do_sample=g.do_sample,
                           **kwargs)
