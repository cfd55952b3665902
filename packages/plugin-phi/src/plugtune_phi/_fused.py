"""Phi-3's fused projections and chat-template details.

Fused layers. ``Phi3Attention`` computes queries, keys and values with one Linear ``qkv_proj``
(output ``(heads + 2 * kv_heads) * head_dim``) and ``Phi3MLP`` the gate and up projections with
one Linear ``gate_up_proj`` (output ``2 * intermediate_size``); ``o_proj`` and ``down_proj`` are
as in Llama. Recipes written for Llama (axolotl's ``lora_target_modules: [q_proj, v_proj]``,
LLaMA-Factory's ``lora_target: q_proj,v_proj``) name layers a Phi-3 model does not have; peft
would then stop with "Target modules ... not found" or, with a regex, wrap nothing. Here each
such name maps to the fused layer that holds it, with one notice. A LoRA on ``qkv_proj`` adapts
queries, keys and values together (its update spans all three output blocks), so asking for
``q_proj`` alone trains more than the name says: the notice says so.

Templates. Phi-3 / Phi-3.5 / Phi-4-mini turns are ``<|role|>`` + text + ``<|end|>``
(Phi-3: a newline after the role and after ``<|end|>``; Phi-4-mini: none). Their own templates
append the EOS after the *last* message when no generation prompt is asked for, so a turn renders
differently in a prefix and in the whole conversation (multi-turn label masking cannot be
derived from it). :func:`prefix_stable_template` removes that EOS from the tokenizer's own
template (checked by rendering), keeping everything else; the trained turns end with ``<|end|>``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

log = logging.getLogger(__name__)

#: Llama-style layer name -> the Phi-3 layer that holds it
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
#: ``lora_target_modules: auto``: the fused attention input (like peft's row for BLOOM / Falcon
#: ``query_key_value``: one fused layer = Llama's default ``q_proj, v_proj`` and ``k_proj``)
AUTO_TARGETS = ("qkv_proj",)
#: tokens a Phi-3-family response may end with: ``<|end|>`` (end of turn), ``<|endoftext|>``
#: (EOS) and ``<|assistant|>`` (Phi-3's ``generation_config.json`` lists ids 32000, 32001, 32007)
STOP_TOKENS = ("<|end|>", "<|endoftext|>", "<|assistant|>")
#: special tokens of the Phi-3 vocabulary beyond Llama 2's 32000 (ids 32000-32010, in order)
PHI3_ADDED_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
                     "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>",
                     "<|placeholder5|>", "<|placeholder6|>", "<|user|>")


def leaf_names(model) -> set[str]:
    """Leaf names of every module of ``model`` (``"qkv_proj"``, ``"o_proj"`` ...)."""
    return {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}


def map_fused_names(targets: Sequence[str], present: set[str]) -> tuple[list[str], str | None]:
    """Replace Llama-style names absent from the model by the fused layer that holds them.

    Args:
        targets: the recipe's ``lora_target_modules`` names.
        present: the model's module leaf names (:func:`leaf_names`).

    Returns:
        ``(names, notice)``: the names in order without repeats, each Llama-style name that the
        model lacks replaced by :data:`FUSED`'s fused name (when the model has it); ``notice`` is
        one line naming what was mapped, or ``None`` when nothing was.
    """
    out: list[str] = []
    mapped: dict[str, list[str]] = {}
    for t in targets:
        fused = FUSED.get(t)
        name = fused if (fused and t not in present and fused in present) else t
        if name != t:
            mapped.setdefault(name, []).append(t)
        if name not in out:
            out.append(name)
    if not mapped:
        return out, None
    parts = "; ".join(f"{', '.join(src)} -> {dst}" for dst, src in mapped.items())
    return out, (f"phi3: lora_target_modules {parts} (Phi-3 fuses these projections; a LoRA on "
                 "the fused layer adapts all of its parts)")


def check_regex_targets(model, pattern: str) -> None:
    """Raise ``ValueError`` when the regex ``pattern`` (peft full-match semantics) matches no
    module of ``model``, naming the fused layers a Llama-style pattern usually meant."""
    if not any(re.fullmatch(pattern, n) for n, _ in model.named_modules()):
        raise ValueError(
            f"lora_target_modules regex {pattern!r} matches no module of this Phi-3 model; its "
            "projections are qkv_proj, o_proj, gate_up_proj, down_proj (q/k/v and gate/up are "
            "fused)")


#: the tail of Phi-3 / Phi-3.5 / Phi-4-mini templates that appends the EOS when no generation
#: prompt is asked for: ``{% if add_generation_prompt %}...{% else %}{{ eos_token }}{% endif %}``
TRAILING_EOS = re.compile(r"\{%-?\s*else\s*-?%\}\s*\{\{-?\s*eos_token\s*-?\}\}\s*(\{%-?\s*endif\s*-?%\})")


def prefix_stable_template(tokenizer) -> bool:
    """Drop the EOS a Phi-3-family template appends after the last message (the ``else`` branch
    of its ``add_generation_prompt`` test, :data:`TRAILING_EOS`). Returns whether it was dropped.

    The edit is kept only when, for a two-turn conversation, the edited template renders
    exactly the original text without its final EOS, and the generation prompt is unchanged;
    any other template is left alone. The turns, roles and tool syntax of the tokenizer's own
    template stay as they are.
    """
    own = getattr(tokenizer, "chat_template", None)
    eos = tokenizer.eos_token
    if not isinstance(own, str) or not eos:
        return False
    edited = TRAILING_EOS.sub(r"\1", own, count=1)
    if edited == own:
        return False
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]

    def render(template, gen):
        return tokenizer.apply_chat_template(msgs[:4] if gen else msgs, tokenize=False,
                                             add_generation_prompt=gen, chat_template=template)

    try:
        same = (render(own, False) == render(edited, False) + eos
                and render(own, True) == render(edited, True))
    except Exception:  # a template that cannot render this conversation is left alone
        return False
    if not same:
        return False
    tokenizer.chat_template = edited
    log.info("phi3: the tokenizer's chat template appends %s after the last message (not "
             "prefix-stable for multi-turn labels); using it without that EOS", eos)
    return True
